"""The text encoder's top layers, trained (``features.text_trainable_layers: k``): LiT's
"partially locked" text side (Zhai et al., 2022), for every method that reads caption tokens.

The features stage caches the token states *below* the encoder's top k layers (the output of
layer ``top - k``, where ``top`` is ``features.text_token_layer`` or the encoder's depth) and
writes those k layers' pretrained weights beside the training split (``text_layers.safetensors``,
keys as in the encoder's own ``encoder.layer.<i>.`` state dict). Training wraps the method in
:class:`WithTextLayers`: the k layers, initialised from those weights, turn the cached states into
the states the method reads, and are trained with their own learning rate
(``train.text_layers_lr``; :func:`crossalign.train.optim.param_groups`). Everything downstream
(scoring, evaluation, search, the logged model) sees an :class:`Aligner` like any other; the
saved ``model.json`` carries the layers' shapes under ``text_layers`` so :func:`load` rebuilds them.

Why: every matcher here read *frozen* MiniLM states, and a linear probe on those tells which
named object of "A left of B" is the subject only 56-70 % of the time (``bench/text_probe.py``);
what moved left/right in the literature is training the text side with swap negatives (NegCLIP,
CounterCurate). k = 0 builds nothing: today's models, byte for byte.

:class:`BertLayer` is written out here (post-LN self-attention + GELU MLP, as BERT / MiniLM), so
the model depends on no ``transformers`` internals: ``tests/test_text_layers.py`` checks that it
reproduces the encoder's own layers on real captions.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossalign.methods.base import Aligner, Batch, State

ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}
CONFIG_KEYS = ("first", "layers", "hidden", "heads", "intermediate", "eps", "act", "dropout")


def check_config(config: Any, where: str) -> dict[str, Any]:
    """A ``text_layers`` description (from a features meta.json or a model.json) -> a checked dict;
    a missing key or a wrong value names ``where`` and what was expected."""
    if not isinstance(config, dict) or set(CONFIG_KEYS) - set(config):
        raise ValueError(f"{where}: text_layers must be an object with keys {list(CONFIG_KEYS)}; got {config!r}")
    ints = {k: config[k] for k in ("first", "layers", "hidden", "heads", "intermediate")}
    if any(not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "first" else 1) for k, v in ints.items()):
        raise ValueError(f"{where}: text_layers {ints} must be integers (first >= 0, the others >= 1)")
    if ints["hidden"] % ints["heads"]:
        raise ValueError(f"{where}: text_layers hidden {ints['hidden']} is not divisible by heads {ints['heads']}")
    if config["act"] not in ACTIVATIONS:
        raise ValueError(f"{where}: text_layers act {config['act']!r}: expected one of {sorted(ACTIVATIONS)}")
    for key in ("eps", "dropout"):
        if not isinstance(config[key], (int, float)) or isinstance(config[key], bool) or not 0 <= config[key] < 1:
            raise ValueError(f"{where}: text_layers {key} = {config[key]!r}: expected a number in [0, 1)")
    return {k: config[k] for k in CONFIG_KEYS}


class BertLayer(nn.Module):
    """One post-LN encoder layer; parameter names are BERT's (``attention.self.query``, ...)."""

    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float, act: str, dropout: float):
        super().__init__()
        self.heads, self.act, self.p = heads, ACTIVATIONS[act], dropout
        self.attention = nn.ModuleDict({
            "self": nn.ModuleDict({k: nn.Linear(hidden, hidden) for k in ("query", "key", "value")}),
            "output": nn.ModuleDict({"dense": nn.Linear(hidden, hidden), "LayerNorm": nn.LayerNorm(hidden, eps=eps)})})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(hidden, intermediate)})
        self.output = nn.ModuleDict({"dense": nn.Linear(intermediate, hidden), "LayerNorm": nn.LayerNorm(hidden, eps=eps)})

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # x (B, L, H), mask (B, L) True = real token
        attn = self.attention["self"]
        q, k, v = (attn[n](x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for n in ("query", "key", "value"))
        p = self.p if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], dropout_p=p)  # (B, h, L, H/h)
        out = self.attention["output"]
        x = out["LayerNorm"](x + F.dropout(out["dense"](ctx.transpose(1, 2).flatten(2)), p, self.training))
        h = self.output["dense"](self.act(self.intermediate["dense"](x)))
        return self.output["LayerNorm"](x + F.dropout(h, p, self.training))


class TextLayers(nn.Module):
    """The k trainable layers: cached states of layer ``first`` -> states of layer ``first + k``,
    zero past each caption's length (as the features stage stores them)."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = check_config(config, "text_layers")
        c = self.config
        self.layers = nn.ModuleList(BertLayer(c["hidden"], c["heads"], c["intermediate"], c["eps"], c["act"],
                                              c["dropout"]) for _ in range(c["layers"]))

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:  # (B, L, H), (B, L) -> (B, L, H)
        keys = mask.clone()
        keys[:, 0] |= ~keys.any(1)  # an empty caption keeps one key so the attention is defined
        x = tokens
        for layer in self.layers:
            x = layer(x, keys)
        return x * mask.unsqueeze(-1).to(x.dtype)

    def macs(self, length: int) -> int:
        """Multiply-accumulates of one caption of ``length`` tokens (linear layers and attention)."""
        c = self.config
        per_layer = length * (4 * c["hidden"] ** 2 + 2 * c["hidden"] * c["intermediate"]) + 2 * length ** 2 * c["hidden"]
        return c["layers"] * per_layer


class WithTextLayers(Aligner):
    """``inner`` reading the output of :class:`TextLayers` instead of the cached token states."""

    def __init__(self, inner: Aligner, text_layers: TextLayers):
        super().__init__()
        if not inner.reads_tokens:
            raise ValueError(f"{type(inner).__name__} reads no caption tokens: it has no use for trainable text layers")
        self.inner, self.text_layers = inner, text_layers

    # what the method is, and how it ranks, are the wrapped method's (evaluation sets ``rerank``)
    embeds = property(lambda self: self.inner.embeds)
    matches = property(lambda self: self.inner.matches)
    reads_tokens = property(lambda self: self.inner.reads_tokens)
    rerank = property(lambda self: self.inner.rerank, lambda self, value: setattr(self.inner, "rerank", value))

    def encode_images(self, tokens: Tensor, pooled: Tensor) -> State:
        return self.inner.encode_images(tokens, pooled)

    def encode_texts(self, tokens: Tensor, mask: Tensor, pooled: Tensor) -> State:
        return self.inner.encode_texts(self.text_layers(tokens, mask), mask, pooled)

    def similarity(self, images: State, texts: State) -> Tensor:
        return self.inner.similarity(images, texts)

    def match(self, images: State, texts: State) -> Tensor:
        return self.inner.match(images, texts)

    def match_block(self, images: State, texts: State) -> Tensor:
        return self.inner.match_block(images, texts)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """The method's own training outputs over the trained layers' states (captions and their
        perturbed negatives alike)."""
        neg = None
        if batch.neg_text_tokens is not None and batch.neg_text_mask is not None:
            neg = self.text_layers(batch.neg_text_tokens, batch.neg_text_mask)
        return self.inner(dataclasses.replace(batch, text_tokens=self.text_layers(batch.text_tokens, batch.text_mask),
                                              neg_text_tokens=neg))


def features_config(meta: dict, where: str) -> dict[str, Any] | None:
    """The ``text_layers`` a feature split's meta.json describes (its ``text_encoder`` entry), or
    None when its encoder has no trainable layers."""
    entry = (meta.get("text_encoder") or {}).get("text_layers")
    return None if entry is None else check_config(entry, where)


def attach(model: Aligner, config: dict[str, Any], weights: dict[str, Tensor] | None, where: str) -> Aligner:
    """``model`` wrapped with the layers ``config`` describes, initialised from ``weights`` (the
    encoder's pretrained ones; None = leave them for a later ``load_state_dict``). A method that
    reads no tokens is returned as it is."""
    if not model.reads_tokens:
        return model
    layers = TextLayers(config)
    if weights is not None:
        result = layers.load_state_dict(weights, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"{where}: does not fit the text layers {config}: missing {result.missing_keys[:4]}, "
                             f"unexpected {result.unexpected_keys[:4]}")
    device = next(model.parameters()).device
    return WithTextLayers(model, layers.to(device))

