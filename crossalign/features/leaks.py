"""Split leaks the features stage refuses, before it writes anything: two splits that share an image
(by id, by file name, or -- synthetic data -- a binding twin's scene: the objects' centres, colours
and shapes, which a swap keeps) would make val choose on train images, or the test numbers and the
binding probe measure memory instead of generalisation.
"""
from __future__ import annotations

from itertools import combinations

import numpy as np


def scene_key(record: dict) -> tuple[tuple, np.ndarray] | None:
    """What a binding swap keeps of a synthetic scene -> ((sorted colours, sorted shapes), object
    centres (k, 2) from the COCO bboxes). None for records without ``objects`` (COCO)."""
    objects = record.get("objects")
    if not objects:
        return None
    centres = np.array([(o["bbox"][0] + o["bbox"][2] / 2, o["bbox"][1] + o["bbox"][3] / 2) for o in objects])
    return (tuple(sorted(o["colour"] for o in objects)), tuple(sorted(o["shape"] for o in objects))), centres


def same_scene(a: tuple[tuple, np.ndarray] | None, b: tuple[tuple, np.ndarray] | None, tol: float = 1.0) -> bool:
    """Same colours, same shapes and every centre within ``tol`` px of one of the other's (bboxes
    are rounded to 0.1 px, so twins' centres agree to about that)."""
    if a is None or b is None or a[0] != b[0] or len(a[1]) != len(b[1]):
        return False
    dist = np.linalg.norm(a[1][:, None, :] - b[1][None, :, :], axis=-1)  # (k, k)
    return bool((dist.min(axis=1) < tol).all() and (dist.min(axis=0) < tol).all())


def scene_index(records: list[dict]) -> dict[tuple, list]:
    """The records' scene keys grouped by (colours, shapes), the part :func:`same_scene` needs equal."""
    scenes: dict[tuple, list] = {}
    for key in map(scene_key, records):
        if key is not None:
            scenes.setdefault(key[0], []).append(key)
    return scenes


def twin_leaks(test_records: list[dict], twins: list[dict], train_records: list[dict]) -> list[str]:
    """Every test twin pair (``twins``: rows into ``test_records``) whose image id, or whose scene
    (:func:`same_scene`), is also in ``train_records``, described; empty when the probe is clean."""
    train_ids = {int(r["id"]) for r in train_records}
    train_scenes = scene_index(train_records)
    leaks, seen = [], set()
    for twin in twins:
        pair = frozenset((int(twin["image"]), int(twin["twin"])))
        if pair in seen:  # listed once from each side
            continue
        seen.add(pair)
        for row in sorted(pair):
            record, key = test_records[row], scene_key(test_records[row])
            if int(record["id"]) in train_ids:
                leaks.append(f"test image {record['id']} (twin pair {twin['image']}/{twin['twin']}) is in train")
            elif key is not None and any(same_scene(key, k) for k in train_scenes.get(key[0], [])):
                leaks.append(f"test image {record['id']}'s scene (twin pair {twin['image']}/{twin['twin']}) "
                             f"is also a train scene")
    return leaks


def split_leaks(records: dict[str, list[dict]], twins: dict[str, list[dict]]) -> list[tuple[str, str]]:
    """Every image two splits share -> ``(splits, description)``, e.g. ``("train/test", "image id 42
    (42.png) in train and test")``: by image id, by ``file_name``, and by binding-twin scene (a
    twin pair's image, listed in ``twins[split]`` as rows into ``records[split]``, whose scene
    (:func:`same_scene`) is also an image of another split). ``records``: split -> image records
    (``id``, optional ``file_name`` and ``objects``), in split order. Empty when the splits are
    disjoint."""
    names = list(records)
    where_id: dict[int, list[str]] = {}
    where_file: dict[str, list[str]] = {}
    file_of: dict[int, str] = {}
    for split in names:
        for record in records[split]:
            image = int(record["id"])
            if split not in where_id.setdefault(image, []):
                where_id[image].append(split)
            file_of.setdefault(image, str(record.get("file_name")))
            name = record.get("file_name")
            if isinstance(name, str) and split not in where_file.setdefault(name, []):
                where_file[name].append(split)
    leaks = []
    for a, b in combinations(names, 2):
        pair = f"{a}/{b}"
        leaks += [(pair, f"image id {i} ({file_of[i]}) in {a} and {b}") for i, s in where_id.items() if {a, b} <= set(s)]
        leaks += [(pair, f"file {f} in {a} and {b}") for f, s in where_file.items() if {a, b} <= set(s)]
        for x, y in ((a, b), (b, a)):
            leaks += [(pair, text) for text in _scene_leaks(x, records[x], twins.get(x, []), y, records[y])]
    return leaks


def _scene_leaks(name: str, records: list[dict], twins: list[dict], other: str, other_records: list[dict]) -> list[str]:
    """The twin-pair images of split ``name`` whose scene is an image of split ``other`` under another id."""
    ids = {int(r["id"]) for r in other_records}
    scenes = scene_index(other_records)
    if not scenes:
        return []
    leaks, seen = [], set()
    for twin in twins:
        for row in sorted((int(twin["image"]), int(twin["twin"]))):
            record, key = records[row], scene_key(records[row])
            if row in seen or key is None or int(record["id"]) in ids:
                continue
            seen.add(row)
            if any(same_scene(key, k) for k in scenes.get(key[0], [])):
                leaks.append(f"{name} image {record['id']}'s scene (twin pair {twin['image']}/{twin['twin']}) "
                             f"is also a {other} scene")
    return leaks
