"""Split leaks the features stage refuses: a test binding twin pair whose image, or whose scene
(the objects' centres, colours and shapes, which a binding swap keeps), is also in train would
make the binding probe measure memory, not binding.
"""
from __future__ import annotations

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


def twin_leaks(test_records: list[dict], twins: list[dict], train_records: list[dict]) -> list[str]:
    """Every test twin pair (``twins``: rows into ``test_records``) whose image id, or whose scene
    (:func:`same_scene`), is also in ``train_records``, described; empty when the probe is clean."""
    train_ids = {int(r["id"]) for r in train_records}
    train_scenes: dict[tuple, list] = {}
    for key in map(scene_key, train_records):
        if key is not None:
            train_scenes.setdefault(key[0], []).append(key)
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
