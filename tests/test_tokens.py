"""Special tokens resolved from the tokenizer; CFG id rewrites."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from cheers.tokens import (
    IMAGE_GEN_MARKER,
    IMAGE_MARKER,
    SpecialTokens,
    add_cheers_special_tokens,
    cfg_dropout_ids,
    unconditional_ids,
)

from tiny_tokenizer import CHEERS_TOKENS, make_tiny_tokenizer

RELEASE_DIR = Path(
    os.environ.get(
        "CHEERS_RELEASE_TOKENIZER_DIR", str(Path(__file__).resolve().parents[2] / "shared/reference/official")
    )
)


@pytest.fixture
def special() -> SpecialTokens:
    return SpecialTokens.from_tokenizer(make_tiny_tokenizer())


def test_from_tokenizer_resolves_each_token_by_its_string(special):
    tok = make_tiny_tokenizer()
    expected = {
        "image": "<image>",
        "image_gen": "<image_gen>",
        "im_start": "<im_start>",
        "im_end": "<im_end>",
        "no_mean": "<no_mean>",
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "chat_start": "<|im_start|>",
        "chat_end": "<|im_end|>",
    }
    for name, string in expected.items():
        assert tok.convert_ids_to_tokens(getattr(special, name)) == string, name
    assert tok.encode("\n", add_special_tokens=False) == [special.newline]
    assert (special.image_marker, special.image_gen_marker) == (-200, -300)
    assert special.vocab_size == len(tok)
    assert special.eos == special.chat_end


def test_missing_tokens_are_all_named():
    tok = make_tiny_tokenizer(with_cheers_tokens=False)
    with pytest.raises(ValueError) as info:
        SpecialTokens.from_tokenizer(tok)
    for string in CHEERS_TOKENS:
        assert string in str(info.value)
    assert "add_cheers_special_tokens" in str(info.value)


def test_add_cheers_special_tokens_appends_in_order_and_is_idempotent():
    tok = make_tiny_tokenizer(with_cheers_tokens=False)
    base = len(tok)
    assert add_cheers_special_tokens(tok) == 5
    assert tok.convert_tokens_to_ids(list(CHEERS_TOKENS)) == list(range(base, base + 5))
    assert add_cheers_special_tokens(tok) == 0
    assert len(tok) == base + 5
    # Added as special tokens: one id each, skipped when decoding with skip_special_tokens.
    ids = tok.encode("a<image>b<no_mean>", add_special_tokens=False)
    assert base in ids and base + 4 in ids
    assert "<image>" not in tok.decode(ids, skip_special_tokens=True)


def test_string_overrides(special):
    tok = make_tiny_tokenizer()
    other = SpecialTokens.from_tokenizer(tok, strings={"eos": "<|endoftext|>"})
    assert other.eos == special.pad
    with pytest.raises(ValueError, match="unknown special token field"):
        SpecialTokens.from_tokenizer(tok, strings={"bogus": "<x>"})


def test_dict_round_trip(special):
    data = special.to_dict()
    assert data["image_marker"] == IMAGE_MARKER and data["image_gen_marker"] == IMAGE_GEN_MARKER
    assert SpecialTokens.from_dict(data) == special
    with pytest.raises(ValueError, match="unknown"):
        SpecialTokens.from_dict({**data, "extra": 1})
    missing = dict(data)
    del missing["no_mean"]
    with pytest.raises(ValueError, match="no_mean"):
        SpecialTokens.from_dict(missing)


def test_markers_default_to_the_release_conventions(special):
    assert SpecialTokens.IMAGE_MARKER == -200 and SpecialTokens.IMAGE_GEN_MARKER == -300
    assert special.markers == {special.image: -200, special.image_gen: -300}
    assert special.prompt_label_ids == {
        special.newline,
        special.chat_start,
        special.chat_end,
        special.im_start,
        special.im_end,
        special.no_mean,
    }


@pytest.mark.parametrize(
    "change, message",
    [
        ({"im_end": "IM_START"}, "im_start and im_end share"),
        ({"no_mean": -5}, "no_mean=-5 is negative"),
        ({"image": 10_000}, "not below vocab_size"),
        ({"image_marker": 7}, "must be negative"),
        ({"image_gen_marker": -200}, "both -200"),
        ({"eos": "IMAGE"}, "eos="),
        ({"pad": 1.5}, "not an int"),
    ],
)
def test_validation_names_the_bad_values(special, change, message):
    values = dataclasses.asdict(special)
    for key, value in change.items():
        values[key] = getattr(special, value.lower()) if isinstance(value, str) else value
    with pytest.raises(ValueError, match=message):
        SpecialTokens(**values)


def test_eos_may_alias_chat_end_or_pad(special):
    assert dataclasses.replace(special, eos=special.pad).eos == special.pad
    assert dataclasses.replace(special, eos=special.chat_end).eos == special.chat_end


def test_unconditional_ids_keep_only_image_block_tokens(special):
    s = special
    ids = torch.tensor(
        [
            [s.chat_start, 5, s.newline, s.im_start, -200, s.im_end, s.chat_end, s.im_start],
            [s.chat_start, 6, s.im_start, -300, s.im_end, s.no_mean, s.pad, s.pad],
        ]
    )
    nm = s.no_mean
    assert unconditional_ids(ids, s).tolist() == [
        [nm, nm, nm, s.im_start, -200, s.im_end, nm, s.im_start],
        [nm, nm, s.im_start, nm, s.im_end, nm, nm, nm],
    ]
    assert cfg_dropout_ids(ids, s).tolist() == [
        [nm, nm, nm, s.im_start, -200, s.im_end, nm, s.im_start],
        [nm, nm, s.im_start, -300, s.im_end, nm, nm, nm],
    ]
    assert unconditional_ids(ids[0], s).shape == ids[0].shape
    assert unconditional_ids(ids.int(), s).dtype == torch.int32
    with pytest.raises(ValueError):
        unconditional_ids(ids.float(), s)


@pytest.mark.skipif(not (RELEASE_DIR / "vocab.json").is_file(), reason="release tokenizer files not present")
def test_release_tokenizer_gives_the_released_ids():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(RELEASE_DIR), trust_remote_code=False)
    assert add_cheers_special_tokens(tok) == 5
    s = SpecialTokens.from_tokenizer(tok)
    # The released ids, documented in reference §10.2 (the only place they appear as literals).
    assert (s.image, s.image_gen, s.im_start, s.im_end, s.no_mean) == (151665, 151666, 151667, 151668, 151669)
    assert (s.eos, s.pad, s.chat_start, s.chat_end, s.newline) == (151645, 151643, 151644, 151645, 198)
