"""Evaluation-only controls: two separately trained methods composed into one ranker.

``contrastive+cross_attention`` is the control of ``joint``: the trained ``contrastive`` dual
encoder makes the similarity shortlist, the trained ``cross_attention`` matcher re-ranks it, with
joint's ``shortlist_k`` (``methods.joint.*``) and its alpha chosen on val as joint's is
(``evaluate.fusion_alphas``; joint's ``fusion_alpha`` when that grid is empty), i.e. exactly joint's
ranking (``alpha * match + (1 - alpha) * similarity`` on the top-k) with nothing trained together.
What joint scores above it is what joint *training* adds beyond ensembling two models.

:class:`Ensemble` is an ordinary :class:`~crossalign.methods.base.Aligner` (embeds and matches,
``rerank`` set), so ``crossalign.evaluate.stage.run`` scores it unchanged through :func:`loader`.
It is never trained and never registered; ``select`` lists it as a control.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from crossalign.config import CONTROL_PARTS, Config
from crossalign.methods import load_aligner
from crossalign.methods.base import Aligner, Rerank, State

# control name -> (method that embeds and shortlists, method that matches and re-ranks)
CONTROLS: dict[str, tuple[str, str]] = CONTROL_PARTS
EMBED, MATCH = "e.", "m."  # prefixes of each part's tensors in the composite state


def _part(state: State, prefix: str) -> State:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _join(embed: State, match: State) -> State:
    return {**{EMBED + k: v for k, v in embed.items()}, **{MATCH + k: v for k, v in match.items()}}


class Ensemble(Aligner):
    """``embedder``'s similarity shortlist re-ranked by ``matcher``'s match logit (fused by ``rerank``)."""

    embeds = True
    matches = True

    def __init__(self, embedder: Aligner, matcher: Aligner, rerank: Rerank):
        super().__init__()
        if not embedder.embeds or not matcher.matches:
            raise ValueError(f"an ensemble needs an embedding method and a matching method; got "
                             f"{type(embedder).__name__} (embeds={embedder.embeds}) and "
                             f"{type(matcher).__name__} (matches={matcher.matches})")
        self.embedder, self.matcher, self.rerank = embedder, matcher, rerank

    def encode_images(self, tokens: Tensor, pooled: Tensor) -> State:
        """tokens (B, R, Di), pooled (B, Di) -> both parts' states, keys prefixed ``e.`` / ``m.``."""
        return _join(self.embedder.encode_images(tokens, pooled), self.matcher.encode_images(tokens, pooled))

    def encode_texts(self, tokens: Tensor, mask: Tensor, pooled: Tensor) -> State:
        """tokens (B, L, Dt), mask (B, L), pooled (B, Dt) -> both parts' states, prefixed."""
        return _join(self.embedder.encode_texts(tokens, mask, pooled),
                     self.matcher.encode_texts(tokens, mask, pooled))

    def similarity(self, images: State, texts: State) -> Tensor:
        return self.embedder.similarity(_part(images, EMBED), _part(texts, EMBED))  # (Bi, Bt)

    def match(self, images: State, texts: State) -> Tensor:
        return self.matcher.match(_part(images, MATCH), _part(texts, MATCH))  # (P,)

    def match_block(self, images: State, texts: State) -> Tensor:
        return self.matcher.match_block(_part(images, MATCH), _part(texts, MATCH))  # (Bi, Bt)

    def forward(self, batch: Any) -> dict[str, Tensor]:
        raise TypeError("an ensemble control is evaluation-only: train its parts instead")


def parts(control: str) -> tuple[str, str]:
    try:
        return CONTROLS[control]
    except KeyError:
        raise KeyError(f"unknown control {control!r}; known: {sorted(CONTROLS)}") from None


def build(cfg: Config, embedder: Aligner, matcher: Aligner) -> Ensemble:
    """The composite with joint's shortlist size and fusion weight (the evaluation re-chooses the
    weight on val unless ``evaluate.fusion_alphas`` is empty)."""
    j = cfg.methods.joint
    return Ensemble(embedder, matcher, Rerank(j.shortlist_k, j.fusion_alpha))


def loader(cfg: Config, root: str | Path, control: str) -> Callable[[Path], tuple[Ensemble, dict]]:
    """A loader for ``evaluation.run(cfg, control, root, loader=...)``: the seed directory it is
    given (``models/<control>/final/seed-<s>``, never written) names the seed; the parts are the
    two methods' trained models of that seed."""
    embed_name, match_name = parts(control)
    root = Path(root)

    def load(path: Path) -> tuple[Ensemble, dict]:
        seed_dir = Path(path).name  # seed-<s>
        embedder, e_meta = load_aligner(root / "models" / embed_name / "final" / seed_dir)
        matcher, m_meta = load_aligner(root / "models" / match_name / "final" / seed_dir)
        model = build(cfg, embedder, matcher).eval()
        meta = {"method": control, "control": True, "seed": e_meta.get("seed"),
                "parts": {embed_name: e_meta.get("methods"), match_name: m_meta.get("methods")},
                "rerank": {"k": model.rerank.k, "alpha": model.rerank.alpha}}
        return model, meta

    return load
