"""Optimiser parameter groups: weight decay only where it regularises (as open_clip's ``main.py``).

Decaying a bias, a LayerNorm gain/shift or CLIP's learnable ``logit_scale`` towards 0 does not
shrink a function's complexity, it just distorts it (a LayerNorm gain pulled to 0 silences its
features; a logit scale pulled to 0 raises the temperature). open_clip excludes every parameter
with fewer than two dimensions and anything named bias / bn / ln / logit_scale; here the modules'
names are ``bias``, ``norm.*`` (LayerNorm, 1-D) and ``logit_scale`` (0-D), so the rule is: decay a
parameter iff it is at least 2-D and neither a bias nor the logit scale.
"""
from __future__ import annotations

from typing import Any

from torch import nn


def decays(name: str, param: nn.Parameter) -> bool:
    """Whether ``param`` (called ``name`` in its module) gets weight decay."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim >= 2 and leaf != "bias" and "logit_scale" not in name


TEXT_LAYERS = "text_layers."  # crossalign.methods.text_layers.WithTextLayers: the encoder's trained layers


def param_groups(model: nn.Module, weight_decay: float, text_layers_lr: float | None = None) -> list[dict[str, Any]]:
    """Trainable parameters of ``model`` in two AdamW groups: [decayed, not decayed (weight_decay 0)].
    Frozen parameters (``requires_grad=False``, e.g. a fixed logit scale) are left out; the order
    of parameters within a group is the model's, so optimiser state keys are stable.

    The text encoder's trained layers (``text_layers.*``), when the model has them, are two more
    groups (decayed, not) whose ``peak_lr`` is ``text_layers_lr`` (``train.text_layers_lr``):
    pretrained weights move at a fine-tuning rate while the fresh heads move at ``train.lr``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    own = [(n, p) for n, p in named if not n.startswith(TEXT_LAYERS)]
    groups = [{"params": [p for n, p in own if decays(n, p)], "weight_decay": weight_decay},
              {"params": [p for n, p in own if not decays(n, p)], "weight_decay": 0.0}]
    text = [(n, p) for n, p in named if n.startswith(TEXT_LAYERS)]
    if text:
        if text_layers_lr is None:
            raise ValueError("the model trains text encoder layers: give their learning rate (train.text_layers_lr)")
        groups += [{"params": [p for n, p in text if decays(n, p)], "weight_decay": weight_decay,
                    "lr": text_layers_lr, "peak_lr": text_layers_lr},
                   {"params": [p for n, p in text if not decays(n, p)], "weight_decay": 0.0,
                    "lr": text_layers_lr, "peak_lr": text_layers_lr}]
    return groups
