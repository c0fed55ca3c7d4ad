"""The matcher's text side for position binding: caption token indices (``methods.text_positions``)
and the relation geometry of the late matcher (``methods.relation_geometry``)."""
from __future__ import annotations

import math

import pytest
import torch

from crossalign.methods import build_aligner, load_aligner, method_params, save_aligner
from crossalign.methods.late import LateEncoder
from crossalign.methods.positions import TextPositions, sincos_1d
from conftest import tiny_config

torch.set_num_threads(1)


def test_sincos_1d_by_hand():
    # dim 4: frequencies 1 and 1/100 -> [sin t, sin t/100, cos t, cos t/100]
    t = sincos_1d(2, 4)
    expect = [[0, 0, 1, 1], [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]]
    torch.testing.assert_close(t, torch.tensor(expect, dtype=torch.float32))


def test_text_positions_kinds():
    x = torch.zeros(2, 3, 4)
    assert torch.equal(TextPositions("none", 4)(x), x)
    assert torch.equal(TextPositions("learned", 4)(x), x)  # zero at init: today's model until trained
    assert len(list(TextPositions("learned", 4).parameters())) == 1
    torch.testing.assert_close(TextPositions("sincos", 4)(x)[1], sincos_1d(3, 4))
    assert TextPositions("sincos", 4)(torch.zeros(2, 0, 4)).shape == (2, 0, 4)
    with pytest.raises(ValueError, match="text_positions = 'reverse'"):
        TextPositions("reverse", 4)
    with pytest.raises(ValueError, match="must be even"):
        TextPositions("sincos", 5)


def test_token_order_reaches_the_late_matcher_only_with_text_positions():
    torch.manual_seed(0)
    cells, tokens = torch.randn(1, 4, 8), torch.randn(1, 3, 8)
    mask = torch.ones(1, 3, dtype=torch.bool)
    swapped = tokens[:, [2, 1, 0]]  # "A left of B" -> "B left of A": the same token states, reordered
    for kind, order_matters in (("none", False), ("sincos", True)):
        enc = LateEncoder(8, 2, 0.0, text_positions=kind).eval()
        im = enc.image_state(cells)
        a, b = enc.score(im, enc.text_state(tokens, mask)), enc.score(im, enc.text_state(swapped, mask))
        assert (not torch.allclose(a, b)) == order_matters, kind


class Through(torch.nn.Module):
    def forward(self, x, mask=None):
        return x


def geometry_encoder() -> LateEncoder:
    """A late matcher whose tokens and cells are their inputs, and whose token's wanted x offset is
    its 3rd channel."""
    enc = LateEncoder(4, 1, 0.0, relation=True).eval()
    enc.text, enc.cell = Through(), Through()
    with torch.no_grad():
        enc.where.weight.zero_()
        enc.where.weight[0, 2] = 1.0  # x offset wanted = the token's 3rd channel
    return enc


def test_relation_geometry_tells_a_scene_from_its_position_twin_by_hand():
    enc = geometry_encoder()
    # 2x2 grid, cells (x, y): 0 (-1,-1), 1 (1,-1), 2 (-1,1), 3 (1,1). Object A in cell 0, B in cell 1.
    a, b, empty = torch.tensor([1., 0, 0, 0]), torch.tensor([0., 1, 0, 0]), torch.tensor([0., 0, 0, 1])
    scene = torch.stack([a, b, empty, empty])[None]  # A left, B right
    twin = torch.stack([b, a, empty, empty])[None]  # the places swapped
    caption = torch.stack([torch.tensor([1., 0, -1, 0]), torch.tensor([0., 1, 1, 0])])[None]  # A wants left, B right
    tx = enc.text_state(caption, torch.ones(1, 2, dtype=torch.bool))
    s_scene, s_twin = enc.score(enc.image_state(scene), tx), enc.score(enc.image_state(twin), tx)
    # content terms are equal (each token finds its object in both images); the geometry term is
    # sum_j w_j * wanted_j * (x_j - centre), x_j the softmax(10 * cos)-weighted x of the cells
    enc.relation = False
    base_scene, base_twin = enc.score(enc.image_state(scene), tx), enc.score(enc.image_state(twin), tx)
    torch.testing.assert_close(base_scene, base_twin)  # without geometry, a twin is indistinguishable
    w = tx["x_weight"][0].detach().tolist()
    # token A = (1, 0, -1, 0)/sqrt 2: cos with cell A (1, 0, 0, 0) is 1/sqrt 2, with B and the empty cells 0
    c = 10 / math.sqrt(2)
    p = math.exp(c) / (math.exp(c) + 3)  # attention on the token's own cell
    x_a = p * -1 + (1 - p) / 3 * (1 - 1 + 1)  # own cell x = -1; B's cell x = 1, the empty ones -1 and 1
    x_b = p * 1 + (1 - p) / 3 * (-1 - 1 + 1)
    centre = w[0] * x_a + w[1] * x_b
    gap = w[0] * (-1) * (x_a - centre) + w[1] * 1 * (x_b - centre)
    torch.testing.assert_close(float((s_scene - base_scene).detach()), gap, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(float((s_twin - base_twin).detach()), -gap, rtol=1e-4, atol=1e-5)
    assert gap > 0.9


def test_relation_geometry_is_off_at_init_and_only_in_the_late_matcher(tmp_path):
    torch.manual_seed(0)
    enc, plain = LateEncoder(8, 2, 0.0, relation=True).eval(), LateEncoder(8, 2, 0.0).eval()
    plain.load_state_dict({k: v for k, v in enc.state_dict().items() if not k.startswith("where.")})
    cells, tokens, mask = torch.randn(3, 4, 8), torch.randn(5, 3, 8), torch.ones(5, 3, dtype=torch.bool)
    torch.testing.assert_close(enc.grid(enc.image_state(cells), enc.text_state(tokens, mask)),
                               plain.grid(plain.image_state(cells), plain.text_state(tokens, mask)))
    cfg = tiny_config(tmp_path, methods={"embed_dim": 16, "relation_geometry": True,
                                         "joint": {"heads": 2, "matcher": "cross"}, "cross_attention": {"heads": 2}})
    assert not hasattr(build_aligner(cfg, "joint", 12, 10).encoder, "where")  # the cross matcher pools: no geometry
    assert build_aligner(cfg, "cross_attention", 12, 10).encoder.relation  # the late one (its default) has it


@pytest.mark.parametrize("method", ["joint", "cross_attention"])
def test_models_with_the_text_side_save_and_load(tmp_path, method):
    torch.manual_seed(0)
    cfg = tiny_config(tmp_path, methods={"embed_dim": 16, "text_positions": "learned", "relation_geometry": True,
                                         "joint": {"heads": 2, "hard_k": 4, "shortlist_k": 4, "layers": 2},
                                         "cross_attention": {"heads": 2, "layers": 2}})
    model = build_aligner(cfg, method, 12, 10).eval()
    assert len(model.encoder.text_more) == 1  # layers: 2 -> two text self-attention blocks
    with torch.no_grad():
        model.encoder.text_positions.table.normal_()
        model.encoder.where.weight.normal_()
    save_aligner(model, tmp_path / "m", {"method": method, "image_dim": 12, "text_dim": 10,
                                          "methods": method_params(cfg, method)})
    loaded, meta = load_aligner(tmp_path / "m")
    assert meta["methods"]["text_positions"] == "learned" and meta["methods"]["relation_geometry"] is True
    img, txt = model.encode_images(torch.randn(3, 4, 12), torch.randn(3, 12)), None
    mask = torch.ones(5, 6, dtype=torch.bool)
    tokens, pooled = torch.randn(5, 6, 10), torch.randn(5, 10)
    with torch.no_grad():
        a = model.match_block(model.encode_images(torch.ones(3, 4, 12), torch.ones(3, 12)),
                              model.encode_texts(tokens, mask, pooled))
        b = loaded.match_block(loaded.encode_images(torch.ones(3, 4, 12), torch.ones(3, 12)),
                               loaded.encode_texts(tokens, mask, pooled))
    torch.testing.assert_close(a, b)
