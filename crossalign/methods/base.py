"""The interface every alignment method implements, and the registry that names them.

A method is an ``nn.Module`` (an :class:`Aligner`) that first projects both modalities into one
embedding space, then either embeds (ranking by similarity), scores pairs (ranking by exhaustive
matching), or both (similarity shortlist, then matching re-rank). It never computes its loss:
``forward`` returns named outputs and a loss module (``crossalign.methods.losses``) turns them into named
terms. Training, evaluation and tracking only use this interface, never a method's name.

States: ``encode_images`` / ``encode_texts`` return a :data:`State`, a dict of tensors that all
have the batch as their first dimension, so callers can slice, index and concatenate states of
any method with :func:`index_state` / :func:`cat_states` to tile all-pairs scoring in blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

State = dict[str, Tensor]


@dataclass
class Batch:
    """A training/evaluation batch of frozen features (float, on the model's device)."""

    image_tokens: Tensor  # (B, R, Di)
    image_pooled: Tensor  # (B, Di)
    text_tokens: Tensor  # (B, L, Dt)
    text_mask: Tensor  # (B, L) bool, True = real token
    text_pooled: Tensor  # (B, Dt)
    image_index: Tensor  # (B,) long: image row of each pair's caption; equal rows = same image
    # binding negatives (None = off: the batch holds the pairs alone):
    twin: Tensor | None = None  # (B,) long: batch position of the pair whose image is this pair's binding
    #                             twin and whose caption is the twin's same-plan caption; -1 = none in the batch
    neg_text_tokens: Tensor | None = None  # (Bn, Ln, Dt) perturbed captions (train.caption_negatives)
    neg_text_mask: Tensor | None = None  # (Bn, Ln) bool
    neg_text_pooled: Tensor | None = None  # (Bn, Dt)
    neg_owner: Tensor | None = None  # (Bn,) long: batch position of the pair whose caption was perturbed

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(**{k: None if v is None else v.to(device, non_blocking=non_blocking) for k, v in vars(self).items()})

    @property
    def has_caption_negatives(self) -> bool:
        return self.neg_owner is not None and self.neg_owner.numel() > 0


@dataclass(frozen=True)
class Rerank:
    """How a method that embeds *and* matches ranks: shortlist top-k by similarity, then
    re-rank the shortlist by ``alpha * match + (1 - alpha) * similarity`` (ALBEF)."""

    k: int
    alpha: float


class Aligner(nn.Module):
    """Base class of every method. Subclasses set ``embeds`` / ``matches`` and implement the
    corresponding methods; ``rerank`` is set by methods that do both."""

    embeds: ClassVar[bool] = False
    matches: ClassVar[bool] = False
    # whether encode_* read the token states (False: pooled only; training and evaluation then pass
    # empty (B, 0, D) token tensors and never read the token arrays)
    reads_tokens: ClassVar[bool] = True
    rerank: Rerank | None = None

    def encode_images(self, tokens: Tensor, pooled: Tensor) -> State:
        """tokens (B, R, Di), pooled (B, Di) -> state with batch-first tensors."""
        raise NotImplementedError

    def encode_texts(self, tokens: Tensor, mask: Tensor, pooled: Tensor) -> State:
        """tokens (B, L, Dt), mask (B, L) bool, pooled (B, Dt) -> state with batch-first tensors."""
        raise NotImplementedError

    def similarity(self, images: State, texts: State) -> Tensor:
        """All-pairs embedding similarity (Bi, Bt). Only for ``embeds`` methods."""
        raise NotImplementedError

    def match(self, images: State, texts: State) -> Tensor:
        """Matching score (logit) of aligned pairs: images[i] with texts[i] -> (P,).
        Only for ``matches`` methods."""
        raise NotImplementedError

    def match_block(self, images: State, texts: State) -> Tensor:
        """Matching scores of every image with every text in the block -> (Bi, Bt).
        Default: expand to pairs and call :meth:`match`; methods may override with a cheaper
        exact computation."""
        bi = next(iter(images.values())).shape[0]
        bt = next(iter(texts.values())).shape[0]
        ii = torch.arange(bi, device=next(iter(images.values())).device).repeat_interleave(bt)
        tt = torch.arange(bt, device=ii.device).repeat(bi)
        return self.match(index_state(images, ii), index_state(texts, tt)).view(bi, bt)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Training outputs consumed by the method's loss module (named tensors)."""
        raise NotImplementedError


def index_state(state: State, index: Tensor | slice) -> State:
    return {k: v[index] for k, v in state.items()}


def cat_states(states: list[State]) -> State:
    return {k: torch.cat([s[k] for s in states]) for k in states[0]}


@dataclass(frozen=True)
class Dim:
    """One dimension of a method's hyper-parameter search space (``crossalign.train.tuning``).

    ``key`` is a dotted params.yaml key (``train.lr``, ``methods.contrastive.temperature``); the
    value is drawn from [low, high] (log-uniform when ``log``; an integer when ``integer``)."""

    key: str
    low: float
    high: float
    log: bool = False
    integer: bool = False

    def __post_init__(self) -> None:
        if not self.low < self.high or (self.log and self.low <= 0):
            raise ValueError(f"search dimension {self.key}: need 0 < low < high for log, low < high otherwise; "
                             f"got [{self.low}, {self.high}] (log={self.log})")


# What every method tunes: the optimiser's step size and weight decay.
OPTIMISER_SPACE = (Dim("train.lr", 2e-4, 5e-3, log=True), Dim("train.weight_decay", 1e-4, 0.1, log=True))


@dataclass(frozen=True)
class MethodSpec:
    """A registry entry: how to build a method's model and its loss from the config, and the
    hyper-parameters an equal-budget search may change (``search_space``)."""

    name: str
    build_model: Callable[..., Aligner]  # (cfg: Config, image_dim: int, text_dim: int) -> Aligner
    build_loss: Callable[..., nn.Module]  # (cfg: Config) -> loss module returning dict[str, Tensor]
    description: str = ""
    search_space: tuple[Dim, ...] = ()


REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"method {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(REGISTRY)}") from None
