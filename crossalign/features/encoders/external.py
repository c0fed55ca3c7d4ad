"""Image encoders from torchvision, timm and Hugging Face, by name, for users with the internet
(or a local cache of the weights). Each brings its own normalisation and token layout:

- ``torchvision:<name>``: weights = the model's ``DEFAULT`` weights enum, mean/std from the enum's
  transforms. ResNet / ResNeXt / Wide-ResNet: the last stage's grid (7x7x2048 for resnet50 at 224
  px), pooled = its average (what ``fc`` sees). ConvNets with ``.features`` (EfficientNet,
  MobileNet, ConvNeXt, DenseNet, VGG, ...) and RegNet: their last map likewise. ViT: the patch
  tokens after the encoder's final LayerNorm, pooled = the class token (the head's input); inputs
  resized on the device to the model's fixed side. Swin: its final normed map.
- ``timm:<name>``: ``forward_features``; a 4-D output is a grid, a 3-D one patch tokens after the
  model's prefix (class / register) tokens; pooled = ``forward_head(..., pre_logits=True)``.
- ``hf:<name or dir>``: ViT-style ``ViTModel`` / CLIP's ``CLIPVisionModel`` / others through
  ``AutoModel``; patch tokens after the prefix tokens, pooled = CLIP's ``pooler_output`` (the
  post-LayerNorm class token) or the final class token; a 4-D ``last_hidden_state`` is a grid.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from crossalign.features.encoders import DEFAULT_IMAGE_ENCODER, ImageEncoder, flatten_grid, unavailable


def _fail(name: str, err: Exception) -> ValueError:
    first = str(err).splitlines()[0][:200] if str(err) else ""
    return unavailable("image_encoder", name, DEFAULT_IMAGE_ENCODER,
                       f"could not be loaded ({type(err).__name__}: {first})")


def _probe_dim(encoder: ImageEncoder) -> int:
    side = encoder.input_size or 64
    with torch.inference_mode():
        tokens, _, _ = encoder.encode(encoder.prepare(torch.zeros(1, 3, side, side, dtype=torch.uint8)))
    return int(tokens.shape[-1])


# ------------------------------------------------------------------------------- torchvision
class TorchvisionEncoder(ImageEncoder):
    """A torchvision classification model, read before its classifier (see the module docstring)."""

    def __init__(self, model: nn.Module, name: str, mean: Sequence[float], std: Sequence[float]):
        super().__init__(mean, std)
        from torchvision.models import RegNet, SwinTransformer, VisionTransformer

        self.model, self.name = model, name
        if isinstance(model, VisionTransformer):
            self.family, self.layout, self.input_size = "vit", "patch", int(model.image_size)
        elif isinstance(model, SwinTransformer):
            self.family = "swin"
        elif isinstance(model, RegNet):
            self.family = "regnet"
        elif all(hasattr(model, a) for a in ("conv1", "layer4", "fc")):
            self.family = "resnet"
        elif hasattr(model, "features"):
            self.family = "features"
        else:
            raise ValueError(f"features.image_encoder = {name!r}: torchvision model {type(model).__name__} "
                             "has no known token layout (supported: ResNet family, RegNet, ViT, Swin, "
                             "ConvNets with .features)")
        self.dim = _probe_dim(self)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        m = self.model
        if self.family == "vit":
            seq = m._process_input(x)  # (B, h*w, D)
            cls = m.class_token.expand(seq.shape[0], -1, -1)  # (B, 1, D)
            seq = m.encoder(torch.cat([cls, seq], dim=1))  # (B, 1+h*w, D), final LayerNorm applied
            side = self.input_size // m.patch_size
            return seq[:, 1:], seq[:, 0], (side, side)
        if self.family == "resnet":
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))  # (B, 64, S/4, S/4)
            fmap = m.layer4(m.layer3(m.layer2(m.layer1(x))))  # (B, 2048, S/32, S/32) for resnet50
        elif self.family == "regnet":
            fmap = m.trunk_output(m.stem(x))  # (B, C, S/32, S/32)
        elif self.family == "swin":
            fmap = m.permute(m.norm(m.features(x)))  # (B, C, S/32, S/32)
        else:
            fmap = m.features(x)  # (B, C, h, w)
            if type(m).__name__ == "DenseNet":
                fmap = torch.relu(fmap)
        return flatten_grid(fmap)


def torchvision_encoder(name: str, pretrained: bool = True) -> TorchvisionEncoder:
    """``torchvision.models.get_model(name, weights=DEFAULT)`` (``pretrained=False``: random
    weights, same normalisation; for offline tests)."""
    from torchvision import models

    full = f"torchvision:{name}"
    try:
        weights = models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError) as err:
        raise unavailable("image_encoder", full, DEFAULT_IMAGE_ENCODER,
                          "not a torchvision classification model with a weights enum") from err
    transform = weights.transforms()
    try:
        model = models.get_model(name, weights=weights if pretrained else None)
    except Exception as err:  # noqa: BLE001 - download/cache failures, re-raised with the param
        raise _fail(full, err) from err
    return TorchvisionEncoder(model, full, transform.mean, transform.std)


# -------------------------------------------------------------------------------------- timm
class TimmEncoder(ImageEncoder):
    """A timm model read through ``forward_features`` / ``forward_head(pre_logits=True)``."""

    def __init__(self, model: nn.Module, name: str):
        cfg = getattr(model, "pretrained_cfg", None) or {}
        super().__init__(cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225)))
        self.model, self.name = model, name
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
            self.layout, self.input_size = "patch", int(patch_embed.img_size[0])
        self.dim = int(getattr(model, "num_features", 0)) or _probe_dim(self)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        feats = self.model.forward_features(x)
        pooled = self.model.forward_head(feats, pre_logits=True)  # (B, D)
        if feats.dim() == 4:
            if feats.shape[1] != self.dim and feats.shape[-1] == self.dim:
                feats = feats.permute(0, 3, 1, 2)  # NHWC models (e.g. Swin) -> (B, D, h, w)
            tokens, _, hw = flatten_grid(feats)
            return tokens, pooled, hw
        prefix = int(getattr(self.model, "num_prefix_tokens", 0))
        tokens = feats[:, prefix:]  # (B, h*w, D)
        grid = getattr(self.model.patch_embed, "grid_size", None)
        side = math.isqrt(tokens.shape[1])
        return tokens, pooled, (tuple(int(g) for g in grid) if grid else (side, side))


def timm_encoder(name: str, pretrained: bool = True) -> TimmEncoder:
    """``timm.create_model(name, pretrained=...)`` (weights come from the Hugging Face hub)."""
    full = f"timm:{name}"
    try:
        import timm
    except ImportError as err:
        raise unavailable("image_encoder", full, DEFAULT_IMAGE_ENCODER,
                          "timm is not installed (pip install 'crossalign[timm]')") from err
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0)
    except Exception as err:  # noqa: BLE001
        raise _fail(full, err) from err
    return TimmEncoder(model, full)


# ------------------------------------------------------------------------------ Hugging Face
class HFImageEncoder(ImageEncoder):
    """A transformers vision model: ``pixel_values`` -> ``last_hidden_state`` (+ ``pooler_output``)."""

    def __init__(self, model: nn.Module, name: str, mean: Sequence[float], std: Sequence[float]):
        super().__init__(mean, std)
        self.model, self.name = model, name
        cfg = model.config
        self.use_pooler = cfg.model_type in ("clip_vision_model", "siglip_vision_model")
        if getattr(cfg, "patch_size", None) and getattr(cfg, "image_size", None):
            self.layout, self.input_size = "patch", int(cfg.image_size)
        self.dim = int(getattr(cfg, "hidden_size", 0)) or _probe_dim(self)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        out = self.model(pixel_values=x.contiguous())
        hidden = out.last_hidden_state
        if hidden.dim() == 4:
            return flatten_grid(hidden)  # (B, D, h, w) -> (B, h*w, D)
        side = self.input_size // int(self.model.config.patch_size)
        prefix = hidden.shape[1] - side * side  # class / distillation / register tokens
        tokens = hidden[:, prefix:]  # (B, h*w, D)
        pooled = out.pooler_output if self.use_pooler else hidden[:, 0]  # (B, D)
        return tokens, pooled, (side, side)


def hf_encoder(source: str) -> HFImageEncoder:
    """Load ``source`` (hub name or local directory) and its image processor's mean/std."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModel, ViTModel

    full = f"hf:{source}"
    try:
        cfg = AutoConfig.from_pretrained(source)
        if cfg.model_type in ("clip", "clip_vision_model"):
            model = CLIPVisionModel.from_pretrained(source)
        elif cfg.model_type == "vit":
            model = ViTModel.from_pretrained(source, add_pooling_layer=False)
        else:
            model = AutoModel.from_pretrained(source)
        processor = AutoImageProcessor.from_pretrained(source)
    except Exception as err:  # noqa: BLE001
        raise _fail(full, err) from err
    return HFImageEncoder(model, full, processor.image_mean, processor.image_std)


def build(name: str, pretrained: bool = True) -> ImageEncoder:
    """Dispatch ``torchvision:`` / ``timm:`` / ``hf:`` names."""
    prefix, _, rest = name.partition(":")
    if not rest:
        raise unavailable("image_encoder", name, DEFAULT_IMAGE_ENCODER, f"no model named after '{prefix}:'")
    if prefix == "torchvision":
        return torchvision_encoder(rest, pretrained)
    if prefix == "timm":
        return timm_encoder(rest, pretrained)
    return hf_encoder(rest)
