"""The embedded ``synthetic`` dataset: binding scenes in COCO caption format, offline and deterministic.

Each image shows 2-4 objects (colour x shape x size) on a textured background. Objects 0 and 1 are
the *focal pair*: every caption names both and the spatial relation between them; the others are
distractors that a caption may also name. About ``twin_fraction`` of the images come in *binding
twin* pairs: the same scene (same background, same positions) with one swap between the focal
objects -- their colours, their sizes, or their places -- and captions rendered from the same
plans, so both twins' captions hold the same words bound differently. A model that only counts
words cannot tell twins apart; one that binds attributes to regions can.

Determinism: every group (a twin pair or a single image) draws from its own generator seeded by
``(seed, split, group)``, so the bytes do not depend on the number of worker processes. Images
are PNG: lossless, so the pixels downstream are exactly the rendered ones (no JPEG ringing on
the sharp, saturated edges the binding probe depends on) and byte-stable for a given Pillow;
compress level 1 keeps encoding fast.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from crossalign.config import DataParams, SyntheticParams
from crossalign.data import cocofmt
from crossalign.data.captions import Described, plan_captions, render
from crossalign.data.render import COLOURS, SHAPES, SceneObject, background, draw_scene

SPLITS = ("train", "val", "test")
INFO = {"description": "crossalign synthetic binding scenes", "url": "", "version": "1.0", "year": 2025,
        "contributor": "crossalign", "date_created": ""}
LICENSES = [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}]
PNG_COMPRESS_LEVEL = 1


@dataclass(frozen=True)
class Group:
    """One unit of generation: a single image (``swap`` None) or a twin pair."""

    split: str
    split_index: int
    index: int  # within the split; seeds the group's generator
    swap: str | None
    first_id: int


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` lies relative to ``b``, along the axis on which they are further apart."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _attributes(rng: np.random.Generator, p: SyntheticParams, k: int) -> list[tuple[str, str]]:
    """``k`` distinct (colour, shape) pairs; the focal two differ in both colour and shape."""
    colours, shapes = list(COLOURS)[:p.n_colours], SHAPES[:p.n_shapes]
    for _ in range(1000):
        cs = rng.choice(len(colours), size=k, replace=k > len(colours))
        ss = rng.choice(len(shapes), size=k, replace=k > len(shapes))
        pairs = [(colours[c], shapes[s]) for c, s in zip(cs, ss)]
        if len(set(pairs)) == k and pairs[0][0] != pairs[1][0] and pairs[0][1] != pairs[1][1]:
            return pairs
    raise ValueError(f"data.synthetic: cannot draw {k} distinct objects from {p.n_colours} colours x "
                     f"{p.n_shapes} shapes")


def _positions(rng: np.random.Generator, p: SyntheticParams, k: int) -> list[tuple[float, float]]:
    """Centres for ``k`` objects that never overlap, even at the largest radius (so a size swap
    stays valid); the focal pair is clearly apart along one axis, so its relation is unambiguous.
    Distractors that find no room are dropped (at least the focal pair is always placed)."""
    size = p.image_size
    r_max = p.large_size * size * (1 + p.size_jitter)
    lo, hi = r_max + 1.0, size - r_max - 1.0
    gap = 2 * r_max + 2.0
    for _ in range(10_000):
        a, b = rng.uniform(lo, hi, size=2), rng.uniform(lo, hi, size=2)
        d = np.abs(a - b)
        if d.max() >= gap and d.min() <= 0.5 * d.max():
            break
    else:
        raise ValueError(f"data.synthetic: image_size {size} is too small for large_size {p.large_size}")
    placed = [tuple(a), tuple(b)]
    for _ in range(k - 2):
        for _ in range(200):
            c = rng.uniform(lo, hi, size=2)
            if all(np.hypot(c[0] - q[0], c[1] - q[1]) >= gap for q in placed):
                placed.append(tuple(c))
                break
    return [(float(x), float(y)) for x, y in placed]


def sample_scene(rng: np.random.Generator, p: SyntheticParams, swap: str | None) -> list[SceneObject]:
    """Objects of one scene (focal pair first). For a size swap the focal sizes differ."""
    k = int(rng.integers(p.min_objects, p.max_objects + 1))
    positions = _positions(rng, p, k)
    attrs = _attributes(rng, p, len(positions))
    sizes = [("small", "large")[int(rng.integers(2))] for _ in positions]
    if swap == "size" and sizes[0] == sizes[1]:
        sizes[1] = "small" if sizes[0] == "large" else "large"
    objects = []
    for (x, y), (colour, shape), size in zip(positions, attrs, sizes):
        base = (p.small_size if size == "small" else p.large_size) * p.image_size
        objects.append(SceneObject(
            colour=colour, shape=shape, size=size, x=x, y=y,
            radius=float(base * (1 + rng.uniform(-p.size_jitter, p.size_jitter))),
            angle=float(rng.uniform(-p.rotation_jitter, p.rotation_jitter)),
            tint=tuple(float(t) for t in rng.normal(0.0, p.colour_noise, size=3))))
    return objects


def swap_pair(objects: list[SceneObject], kind: str) -> list[SceneObject]:
    """The binding twin: objects 0 and 1 exchange their colours, their sizes, or their places."""
    a, b = objects[0], objects[1]
    if kind == "colour":
        a2, b2 = replace(a, colour=b.colour, tint=b.tint), replace(b, colour=a.colour, tint=a.tint)
    elif kind == "size":
        a2, b2 = replace(a, size=b.size, radius=b.radius), replace(b, size=a.size, radius=a.radius)
    elif kind == "position":
        a2, b2 = replace(b, x=a.x, y=a.y), replace(a, x=b.x, y=b.y)
    else:
        raise ValueError(f"swap kind {kind!r} is not one of colour, size, position")
    return [a2, b2, *objects[2:]]


def _record(group: Group, image_id: int, objects: list[SceneObject], size: int, twin_id: int | None) -> dict:
    return {"id": image_id, "file_name": f"{group.split}/{image_id:06d}.png", "width": size, "height": size,
            "license": 1, "date_captured": "", "twin_id": twin_id,
            "swap": group.swap if twin_id is not None else None,
            "relation": relation(objects[0], objects[1]),
            "objects": [{"colour": o.colour, "shape": o.shape, "size": o.size, "bbox": o.bbox()} for o in objects]}


def render_group(group: Group, p: SyntheticParams, seed: int, out: Path) -> list[tuple[dict, list[str]]]:
    """Draw and write the group's image(s) under ``out/images``; return (record, captions) each."""
    rng = np.random.default_rng([seed, group.split_index, group.index])
    objects = sample_scene(rng, p, group.swap)
    bg = background(rng, p.image_size, p.textured_background, p.texture_strength)  # (S, S, 3)
    noise = (p.pixel_noise * rng.standard_normal(size=bg.shape, dtype=np.float32)
             if p.pixel_noise > 0 else None)  # (S, S, 3), shared by twins
    plans = plan_captions(rng, p.captions_per_image, always_sizes=group.swap == "size",
                          size_prob=p.size_mention, distractor_prob=p.distractor_mention)
    scenes = [objects] if group.swap is None else [objects, swap_pair(objects, group.swap)]
    ids = [group.first_id + i for i in range(len(scenes))]
    results = []
    for i, (scene, image_id) in enumerate(zip(scenes, ids)):
        twin_id = ids[1 - i] if len(scenes) == 2 else None
        record = _record(group, image_id, scene, p.image_size, twin_id)
        pixels = draw_scene(bg, scene, noise)  # (S, S, 3) uint8
        path = out / "images" / record["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        described = [Described(o.colour, o.shape, o.size) for o in scene]
        rel = relation(scene[0], scene[1])
        results.append((record, [render(plan, described, rel) for plan in plans]))
    return results


def plan_groups(p: SyntheticParams, seed: int) -> list[Group]:
    """Every group of every split, with image ids 1.. in split order. Per split,
    round(n * twin_fraction / 2) twin pairs, their swap kinds balanced over ``swap_kinds``, in a
    seeded order among the single images."""
    groups: list[Group] = []
    next_id = 1
    for k, (split, n) in enumerate(zip(SPLITS, (p.n_train, p.n_val, p.n_test))):
        n_pairs = min(int(round(n * p.twin_fraction / 2)), n // 2)
        kinds: list[str | None] = [p.swap_kinds[i % len(p.swap_kinds)] for i in range(n_pairs)]
        kinds += [None] * (n - 2 * n_pairs)
        order = np.random.default_rng([seed, k, 1_000_003]).permutation(len(kinds))
        for index, j in enumerate(order):
            groups.append(Group(split, k, index, kinds[j], next_id))
            next_id += 1 if kinds[j] is None else 2
    return groups


def generate(p: SyntheticParams, seed: int, out: Path) -> dict[str, int]:
    """Write ``out/images/<split>/*.png`` and ``out/annotations/captions_<split>.json``; returns
    the number of images per split. ``out`` is expected to be a fresh (atomic) directory."""
    groups = plan_groups(p, seed)
    workers = p.workers or os.cpu_count() or 1
    work = partial(render_group, p=p, seed=seed, out=out)
    if workers == 1:
        rendered = [work(g) for g in groups]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            rendered = list(pool.map(work, groups, chunksize=16))
    by_split: dict[str, tuple[list, list]] = {s: ([], []) for s in SPLITS}
    next_ann = 1
    for group, results in zip(groups, rendered):
        images, anns = by_split[group.split]
        for record, captions in results:
            images.append(record)
            for caption in captions:
                anns.append({"id": next_ann, "image_id": record["id"], "caption": caption})
                next_ann += 1
    parts = {}
    for split, (images, anns) in by_split.items():
        images.sort(key=lambda r: r["id"])
        anns.sort(key=lambda a: a["id"])
        parts[split] = cocofmt.caption_file(images, anns, INFO, LICENSES)
    cocofmt.write_splits(out, parts, "synthetic")
    return {s: len(by_split[s][0]) for s in SPLITS}


def build(data: DataParams, root: Path, out: Path) -> None:
    """``data`` stage builder for ``synthetic`` (``root`` unused: nothing is read)."""
    generate(data.synthetic, data.seed, out)
