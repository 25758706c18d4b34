"""A tiny Qwen2-like tokenizer built in-process for fast tests (no vocabulary files).

Byte-level BPE (every byte is a token, so any text encodes) with a few merges learnt from a small corpus,
the Qwen2 chat tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` and, unless asked not to, the
five Cheers tokens in the release's order. The chat template is the release's, copied verbatim from its
``tokenizer_config.json`` (it is data).

Usage: ``from tiny_tokenizer import make_tiny_tokenizer``.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

RELEASE_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN_CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHEERS_TOKENS = ("<image>", "<image_gen>", "<im_start>", "<im_end>", "<no_mean>")

_CORPUS = [
    "system\nYou are a helpful assistant.",
    "user\nassistant\nDescribe the image.",
    "An apple.\nBased on the above description, generate an image.",
    "A red cube on a blue sphere. What color is the cube? The cube is red.",
    "Make the sky green. Edit the picture. There are two cats and a dog.",
]


@functools.lru_cache(maxsize=1)
def _base_json() -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(QWEN_CHAT_TOKENS),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    return tokenizer.to_str()


def make_tiny_tokenizer(
    with_cheers_tokens: bool = True, chat_template: str | None = RELEASE_CHAT_TEMPLATE
) -> PreTrainedTokenizerFast:
    """A fresh tiny tokenizer (callers may mutate it).

    Args:
        with_cheers_tokens: add ``<image>``, ``<image_gen>``, ``<im_start>``, ``<im_end>``, ``<no_mean>``.
        chat_template: the Jinja chat template to install (None: none).
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_base_json()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    if with_cheers_tokens:
        from tokenizers import AddedToken

        tokenizer.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in CHEERS_TOKENS], special_tokens=True
        )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
