"""A small byte-level BPE tokenizer for ShapesWorld, in the release tokenizer's format.

Same machinery as the release's Qwen2 tokenizer (Qwen2's pre-tokenizer regex, byte-level BPE, NFC),
only with merges learned on ShapesWorld text, so the tiny model runs through the same processor code
as the real one. Byte-level means nothing is ever unknown: any string encodes, and decodes back
exactly. Special tokens sit at the end of the vocabulary, in the release's order:
``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (EOS), ``<image>``, ``<image_gen>``,
``<im_start>``, ``<im_end>``, ``<no_mean>``. The chat template is the release's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from cheers.assets import SHAPES_TOKENIZER_DIR
from cheers.chat_template import RELEASE_CHAT_TEMPLATE

from .glyphs import CHARSET
from .palette import CELL_NAMES, NUMBER_WORDS, OBJECT_COLORS, SHAPES, WORDS, plural
from .samples import CAPTION_PROMPTS, KINDS, make_sample

logger = logging.getLogger(__name__)

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "<image_gen>",
    "<im_start>",
    "<im_end>",
    "<no_mean>",
)
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = RELEASE_CHAT_TEMPLATE  # the release's, verbatim
_ROLE = {"human": "user", "gpt": "assistant"}
ASSET_DIR = SHAPES_TOKENIZER_DIR  # shipped with the package assets (the random-weight fallback model uses it)
"""The shipped build (default arguments), so loading needs no training; tests pin it to a fresh build."""
DEFAULT_VOCAB_SIZE = 1024
"""Byte alphabet (256) + learned merges; the 8 special tokens come on top."""


def corpus(n_samples: int = 3000) -> Iterator[str]:
    """Deterministic ShapesWorld text: every sample kind's turns, captions, vocabulary lists, and the
    chat template's framing, so frequent words become single tokens."""
    for seed in range(n_samples):
        for kind in KINDS:
            s = make_sample(seed, kind, render=False)
            # The chat template's framing around the turns, without its special tokens.
            turns = "".join(f"{_ROLE[t['from']]}\n{t['value']}\n" for t in s["conversations"])
            yield f"system\nYou are a helpful assistant.\n{turns}"
    yield from CAPTION_PROMPTS.values()
    yield " ".join(
        [*SHAPES, *(plural(s) for s in SHAPES), *OBJECT_COLORS, *NUMBER_WORDS, *CELL_NAMES.values()]
    )
    yield " ".join(WORDS) + " " + " ".join(CHARSET)


def _train(vocab_size: int, n_samples: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus(n_samples), trainer=trainer)
    # Added after training so they take the last ids, in the release's order.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def build_shapes_tokenizer(
    out_dir: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE, n_samples: int = 3000
) -> Path:
    """Train the ShapesWorld tokenizer and save tokenizer.json + tokenizer_config.json to ``out_dir``.

    The directory loads with ``transformers.AutoTokenizer.from_pretrained(out_dir)``. Training is
    deterministic (about 5 s with the defaults); the default build ships as ASSET_DIR.

    Args:
        out_dir: destination (created).
        vocab_size: upper bound on the BPE vocabulary before the special tokens (merges stop earlier
            when no pair occurs twice; the default build has 658 + 8 special tokens).
        n_samples: seeds of each sample kind whose text trains the merges.
    Returns:
        ``out_dir`` as a Path.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 bytes + merges), got {vocab_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train(vocab_size, n_samples)
    tok.save(str(out / "tokenizer.json"))
    first = tok.token_to_id(SPECIAL_TOKENS[0])
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(first + i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in enumerate(SPECIAL_TOKENS)
        },
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    logger.info("saved ShapesWorld tokenizer (%d tokens) to %s", tok.get_vocab_size(), out)
    return out


def load_shapes_tokenizer(directory: str | Path | None = None):
    """The ShapesWorld tokenizer as a transformers tokenizer (the shipped build unless ``directory``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory or ASSET_DIR))
