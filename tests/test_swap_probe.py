"""The caption-swap probe (crossalign/evaluate/swap.py) and the fusion alpha chosen on val
(crossalign/evaluate/stage.py), on toy models whose every score is set by hand: a table of
similarities and one of match scores, looked up by ids written into the pooled features."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config

from crossalign.evaluate import stage as evaluation
from crossalign.evaluate import swap
from crossalign.features import hardneg
from crossalign.io import load_features, read_json, write_features, write_json
from crossalign.methods.base import Aligner, Rerank
from crossalign.retrieval.scoring import encode_split
from crossalign.select.report import swap_lines

torch.set_num_threads(1)
TABLE = 32  # ids 0..31: image and caption ids index the tables


class Table(Aligner):
    """Similarity ``sim[image id, caption id]`` and match ``match[image id, caption id]`` read
    from two hand-set tables; the ids are the first pooled feature. Counts the pairs ``match`` scores."""

    embeds, matches, reads_tokens = True, True, False

    def __init__(self, sim: np.ndarray, match: np.ndarray, rerank: Rerank | None = None):
        super().__init__()
        self.register_buffer("sim_table", torch.as_tensor(sim, dtype=torch.float32))
        self.register_buffer("match_table", torch.as_tensor(match, dtype=torch.float32))
        self.rerank = rerank
        self.matched = 0

    def encode_images(self, tokens, pooled):
        return {"id": pooled[:, 0].round().long()}

    def encode_texts(self, tokens, mask, pooled):
        return {"id": pooled[:, 0].round().long()}

    def similarity(self, images, texts):
        return self.sim_table[images["id"]][:, texts["id"]]  # (Bi, Bt)

    def match(self, images, texts):
        self.matched += int(images["id"].shape[0])
        return self.match_table[images["id"], texts["id"]]  # (P,)


class SimTable(Table):
    matches = False  # an embedding method: ranks by similarity


class MatchTable(Table):
    embeds = False  # a matcher: ranks by the pair's match score


def write_split(root, image_ids: list[int], caption_ids: list[int], caption_image: list[int],
                swaps: list[tuple[int, str, int]] | None = ()) -> None:
    """A feature split whose pooled features carry the table ids; ``swaps``: (caption row, kind,
    table id of the perturbed caption), rows ascending; None: no perturbation arrays at all."""
    n, m = len(image_ids), len(caption_ids)
    pooled_i = np.zeros((n, 2), np.float32)
    pooled_i[:, 0] = image_ids
    pooled_t = np.zeros((m, 2), np.float32)
    pooled_t[:, 0] = caption_ids
    write_features(root, image_tokens=pooled_i[:, None, :], image_pooled=pooled_i, text_tokens=pooled_t[:, None, :],
                   text_lengths=np.ones(m, np.int32), text_pooled=pooled_t, image_ids=np.arange(100, 100 + n),
                   caption_image_index=np.asarray(caption_image), caption_ids=np.arange(m),
                   meta={"image_encoder": {"name": "ids"}, "text_encoder": {"name": "ids"},
                         "image_dim": 2, "text_dim": 2})
    if swaps is None:
        return
    neg = np.zeros((len(swaps), 2), np.float32)
    neg[:, 0] = [s[2] for s in swaps]
    hardneg.write(root, twin_row=np.full(n, -1), tokens=neg.astype(np.float16), offsets=np.arange(len(swaps) + 1),
                  pooled=neg.astype(np.float16), source=np.array([s[0] for s in swaps], np.int64),
                  kind=np.array([("colour", "size", "number", "position").index(s[1]) for s in swaps], np.int8),
                  per_caption=2)


# Four images (ids 0-3), two captions each (ids 10-17, rows 0-7); every true pair has similarity 1
# and match 1. Eight perturbed captions (ids 20-27): (caption row, kind, swap's similarity, match).
SWAPS = [(0, "colour", 0.0, 2.0), (0, "position", 2.0, 0.0), (1, "colour", 0.0, 2.0), (2, "size", 1.0, 1.0),
         (3, "position", 2.0, 0.0), (4, "size", 0.6, 1.6), (5, "colour", 0.5, 0.5), (6, "position", 1.5, 1.5)]


def _swap_tables() -> tuple[np.ndarray, np.ndarray]:
    sim, match = np.full((TABLE, TABLE), -5.0), np.full((TABLE, TABLE), -5.0)
    for row in range(8):
        sim[row // 2, 10 + row] = match[row // 2, 10 + row] = 1.0
    for p, (row, _, s, m) in enumerate(SWAPS):
        sim[row // 2, 20 + p], match[row // 2, 20 + p] = s, m
    return sim, match


# Expected i2t accuracy, true caption (1.0) vs its swap, ties half, by hand from SWAPS:
# - similarity: colour 0<1 win, 0 win, 0.5 win -> 100; position 2, 2, 1.5 all lose -> 0;
#   size 1 tie, 0.6 win -> 75; overall (3 + 0 + 1.5) / 8 = 56.25
# - match: colour 2 lose, 2 lose, 0.5 win -> 33.3; position 0, 0 win, 1.5 lose -> 66.7;
#   size 1 tie, 1.6 lose -> 25; overall (1 + 2 + 0.5) / 8 = 43.75
# - fused at alpha 0.5 (0.5 * match + 0.5 * sim; true pair 1.0): colour 1.0 tie, 1.0 tie, 0.5 win
#   -> 66.7; position 1.0 tie, 1.0 tie, 1.5 lose -> 33.3; size 1.0 tie, 1.1 lose -> 25; overall 3.5 / 8
EXPECTED = {
    "similarity": {"overall": 56.25, "colour": 100.0, "position": 0.0, "size": 75.0},
    "match": {"overall": 43.75, "colour": 100 / 3, "position": 200 / 3, "size": 25.0},
    "fused": {"overall": 43.75, "colour": 200 / 3, "position": 100 / 3, "size": 25.0},
}


@pytest.mark.parametrize("kind", ["similarity", "match", "fused"])
def test_accuracy_per_kind_is_the_methods_own_score_by_hand(tmp_path, kind):
    write_split(tmp_path, [0, 1, 2, 3], list(range(10, 18)), [0, 0, 1, 1, 2, 2, 3, 3],
                [(row, k, 20 + p) for p, (row, k, _, _) in enumerate(SWAPS)])
    split = load_features(tmp_path)
    sim, match = _swap_tables()
    model = {"similarity": SimTable(sim, match), "match": MatchTable(sim, match),
             "fused": Table(sim, match, Rerank(k=2, alpha=0.5))}[kind]
    model, images, texts = encode_split(model, split)
    pairs = swap.score_pairs(model, images, texts, split, hardneg.load(tmp_path), pair_chunk=3)  # chunks of 3 pairs
    record = swap.probe(pairs, swap.tallies(pairs.wins(model)))

    want = EXPECTED[kind]
    assert record["overall"]["i2t"] == pytest.approx(want["overall"])
    for name in ("colour", "position", "size"):
        assert record["per_kind"][name]["i2t"] == pytest.approx(want[name]), name
    # counts: pairs and the images they come from (captions rows 2r, 2r+1 belong to image r)
    assert (record["overall"]["pairs"], record["overall"]["images"]) == (8, 4)
    assert {k: (v["pairs"], v["images"]) for k, v in record["per_kind"].items() if k != "number"} == {
        "colour": (3, 2), "position": (3, 3), "size": (2, 2)}
    # no caption offered a number swap: absent, not 0 %
    assert record["per_kind"]["number"] == {"absent": True, "images": 0, "pairs": 0, "comparisons": 0}
    assert record["unit"] == "image" and record["chance"] == 50.0


def test_the_ci_resamples_images_each_with_all_its_pairs():
    """Image 0 carries ten lost pairs, images 1-9 one won pair each: pooled 9 / 19. Resampling
    images, a draw without image 0 (chance 0.9 ** 10 = 35 %) scores 100 %, so the upper end is 100;
    resampling pairs one by one, nineteen draws without one of the ten losses almost never happen."""
    image = np.array([0] * 10 + list(range(1, 10)))
    wins = np.array([0.0] * 10 + [1.0] * 9)
    got = swap.summarise(image, swap.tallies(wins))
    assert got["i2t"] == pytest.approx(100 * 9 / 19)
    assert (got["images"], got["pairs"]) == (10, 19)
    assert got["ci95"][1] == 100.0

    def percentile_ci(groups: list[np.ndarray]) -> list[float]:  # the bootstrap written out: 2000 draws, seed 0
        draws = np.random.default_rng(0).integers(0, len(groups), size=(2000, len(groups)))
        rates = [100 * sum(groups[j].sum() for j in d) / sum(groups[j].size for j in d) for d in draws]
        return np.percentile(rates, [2.5, 97.5]).tolist()

    by_image = [wins[image == i] for i in range(10)]
    assert got["ci95"] == pytest.approx(percentile_ci(by_image))
    by_pair = percentile_ci([wins[j:j + 1] for j in range(19)])
    assert by_pair[1] < 90 and got["ci95"][0] < by_pair[0]  # pair resampling: a far narrower interval


def _run_tables() -> tuple[np.ndarray, np.ndarray]:
    """val: images 0, 1 with captions 10, 11; test: images 2, 3 with captions 12, 13, and 14, a
    colour swap of caption 12."""
    sim, match = np.full((TABLE, TABLE), -5.0), np.full((TABLE, TABLE), -5.0)
    # val: similarity ranks every pair wrong, the matcher every pair right
    sim[np.ix_([0, 1], [10, 11])] = [[0.0, 1.0], [1.0, 0.0]]
    match[np.ix_([0, 1], [10, 11])] = [[1.0, 0.0], [0.0, 1.0]]
    # test: similarity right, the matcher slightly wrong
    sim[np.ix_([2, 3], [12, 13])] = [[1.0, 0.0], [0.0, 1.0]]
    match[np.ix_([2, 3], [12, 13])] = [[0.0, 0.3], [0.3, 0.0]]
    sim[2, 14], match[2, 14] = 0.5, 0.1
    return sim, match


def _write_run_project(root) -> None:
    write_split(root / "data" / "features" / "val", [0, 1], [10, 11], [0, 1], [])  # no perturbation at all
    write_split(root / "data" / "features" / "test", [2, 3], [12, 13], [0, 1], [(0, "colour", 14)])
    for split in ("val", "test"):
        f = load_features(root / "data" / "features" / split)
        write_json(root / "eval" / f"{split}_index.json", {
            "image_ids": f.image_ids.tolist(), "caption_image_ids": f.image_ids[f.caption_image_index].tolist(),
            "captions": ["c"] * f.n_captions, "twins": []})


def _table_loader(path):
    return Table(*_run_tables(), Rerank(k=2, alpha=1.0)), {"method": "joint"}  # its own alpha: 1.0


def test_alpha_is_chosen_on_val_ties_to_the_smaller_and_ranks_test(tmp_path):
    """By hand: on val the fused score of a true pair is a, of a false one 1 - a: all right when
    a > 0.5, else all wrong (a tie counts against the query). With two images and one caption each,
    R@5 = R@10 = 100 always, so RSUM = 400 + i2t R@1 + t2i R@1: 400 at alpha 0, 0.25, 0.5 and 600 at
    0.75 and 1 -> 0.75 (tie with 1: the smaller). On test at 0.75 a true pair scores 0.25 > 0.225
    (all right: 600; at the model's own alpha 1.0: 0 < 0.3, 400), and caption 12 (0.25) beats its
    colour swap (0.75 * 0.1 + 0.25 * 0.5 = 0.2; at 1.0: 0 < 0.1 loses)."""
    _write_run_project(tmp_path)
    cfg = tiny_config(tmp_path)  # evaluate.fusion_alphas: the default grid 0, 0.25, 0.5, 0.75, 1
    result = evaluation.run(cfg, "joint", tmp_path, loader=_table_loader)

    assert result["fusion"]["val_rsum"] == {"0": 400.0, "0.25": 400.0, "0.5": 400.0, "0.75": 600.0, "1": 600.0}
    assert result["fusion"]["alpha"] == 0.75 and result["fusion"]["per_seed"]["0"]["alpha"] == 0.75
    assert result["val"]["rsum"] == 600.0 and result["test"]["rsum"] == 600.0  # test ranked at 0.75
    assert "re-rank alpha=0.75, chosen on val" in result["protocol"]
    assert "at alpha 0, the shortlist's own similarity ranking: 400.0; at 0.75: 600.0" in result["protocol"]
    assert result["test"]["swap_probe"]["per_kind"]["colour"]["i2t"] == 100.0
    assert result["val"]["swap_probe"]["overall"]["absent"]  # val has no perturbation: absent, not 0 %
    summary = read_json(tmp_path / "metrics" / "joint.json")
    assert summary["swap"] == 100.0 and summary["colour"] == 100.0  # no twins: the swap kinds are the binding keys
    assert "size" not in summary and "number" not in summary and "bind" not in summary

    # the fixed-alpha switch: an empty grid ranks at the model's own alpha (1.0), nothing chosen
    fixed = evaluation.run(tiny_config(tmp_path, evaluate={"fusion_alphas": []}), "joint", tmp_path,
                           loader=_table_loader)
    assert "fusion" not in fixed and fixed["test"]["rsum"] == 400.0 and "alpha=1.0;" in fixed["protocol"]
    assert fixed["test"]["swap_probe"]["per_kind"]["colour"]["i2t"] == 0.0


def test_the_grid_runs_the_matcher_once(tmp_path):
    """Five alphas cost one pass of the matcher over the shortlists: 2 images x k=2 (i2t) + k=2 x 2
    captions (t2i) = 8 pairs, as one alpha does."""
    _write_run_project(tmp_path)
    val = load_features(tmp_path / "data" / "features" / "val")
    for grid in ([0.0, 0.25, 0.5, 0.75, 1.0], [0.3]):
        model = _table_loader(None)[0]
        evaluation.evaluate_split(model, val, tiny_config(tmp_path), torch.device("cpu"), grid)
        assert model.matched == 8, grid


def test_report_table_marks_absent_kinds_and_says_when_there_are_no_twins():
    cell = {"i2t": 71.25, "ci95": [60.0, 80.5], "images": 40, "pairs": 1200, "comparisons": 1200}
    probe = {"resamples": 2000, "overall": cell,
             "per_kind": {"colour": cell, "size": cell, "number": {"absent": True, "images": 0, "pairs": 0}}}
    lines = swap_lines({"joint": {"test": {"swap_probe": probe}}, "contrastive": {"test": {}}})
    text = "\n".join(lines)
    assert "| method | **overall** | colour | size | number |" in text
    shown = "71.2 [60.0, 80.5], n 1,200"
    assert f"| joint | {shown} | {shown} | {shown} | absent |" in text
    assert "contrastive" not in text  # no probe recorded: no row
    assert "No caption-swap pairs" in "\n".join(swap_lines({"joint": {"test": {}}}))


def test_several_seeds_pool_each_pairs_comparisons_images_stay_the_unit(tmp_path):
    _write_run_project(tmp_path)
    result = evaluation.run(tiny_config(tmp_path, train={"seeds": [0, 1]}), "joint", tmp_path, loader=_table_loader)
    pooled = result["test"]["swap_probe"]["overall"]
    assert (pooled["pairs"], pooled["images"], pooled["comparisons"]) == (1, 1, 2)  # one pair, scored by two seeds
    assert pooled["i2t"] == 100.0 and result["test"]["per_seed"]["1"]["swap_probe"]["overall"]["comparisons"] == 1
    assert result["fusion"]["per_seed"].keys() == {"0", "1"} and result["fusion"]["alpha"] == 0.75
