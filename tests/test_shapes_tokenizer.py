"""The ShapesWorld tokenizer loads with AutoTokenizer and carries the release's specials and template."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from cheers.data.shapes.tokenizer import (
    ASSET_DIR,
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_shapes_tokenizer,
    load_shapes_tokenizer,
)

REFERENCE = Path(__file__).parent / "fixtures/official/tokenizer_config.json"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_shapes_tokenizer(tmp_path_factory.mktemp("tok"), n_samples=300)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(str(tok_dir))


def test_files_and_special_token_ids_at_the_end(tok_dir, tok):
    assert (tok_dir / "tokenizer.json").is_file() and (tok_dir / "tokenizer_config.json").is_file()
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    n = len(tok)
    assert ids == list(range(n - len(SPECIAL_TOKENS), n))
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == ids[0]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == ids[2]


def test_chat_template_renders_the_release_prompt(tok):
    msgs = [{"role": "user", "content": "two red circles"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\ntwo red circles<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    toks = tok.convert_ids_to_tokens(ids)
    assert toks.count("<|im_start|>") == 3 and toks.count("<|im_end|>") == 2
    assert "Ġcircles" in toks and "Ċ" in toks  # whole words and a newline token


def test_image_markers_are_single_tokens_and_newline_is_a_token(tok):
    ids = tok("<im_start><image><im_end>\nWhat color is the star?")["input_ids"]
    assert ids[:3] == tok.convert_tokens_to_ids(["<im_start>", "<image>", "<im_end>"])
    assert len(tok("\n")["input_ids"]) == 1
    assert len(tok("<im_start><image_gen><im_end>")["input_ids"]) == 3


def test_unknown_text_never_crashes_and_round_trips(tok):
    for text in ("zebra quokka 12345", "héllo wörld 🙂", "A large blue heart at the bottom left."):
        assert tok.decode(tok(text)["input_ids"]) == text
    assert (
        len(tok("A large blue heart at the bottom left.")["input_ids"]) == 9
    )  # one token per word, plus "."


def test_build_is_deterministic(tmp_path, tok_dir):
    again = build_shapes_tokenizer(tmp_path, n_samples=300)
    assert (again / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    with pytest.raises(ValueError, match="vocab_size"):
        build_shapes_tokenizer(tmp_path, vocab_size=100)


@pytest.mark.skipif(not REFERENCE.is_file(), reason="official tokenizer_config.json not available")
def test_chat_template_is_the_releases():
    assert CHAT_TEMPLATE == json.loads(REFERENCE.read_text())["chat_template"]


@pytest.mark.slow
def test_shipped_tokenizer_is_the_default_build(tmp_path):
    fresh = build_shapes_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (fresh / name).read_bytes() == (ASSET_DIR / name).read_bytes(), name
    tok = load_shapes_tokenizer()
    assert tok.convert_ids_to_tokens(len(tok) - 1) == "<no_mean>"
