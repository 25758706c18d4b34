"""Cheers special tokens, by name, resolved from the tokenizer (never literals).

Cheers extends the Qwen2 chat tokenizer with five tokens, added in this order by
:func:`add_cheers_special_tokens` (the release's processor does the same, which gives the released
ids 151665..151669 on top of the Qwen2.5 vocabulary):

* ``<image>``     -- placeholder of an understanding image; replaced by :attr:`SpecialTokens.image_marker`
* ``<image_gen>`` -- placeholder of an image to generate;  replaced by :attr:`SpecialTokens.image_gen_marker`
* ``<im_start>``  -- opens an image block (``<im_start><image><im_end>``); sampling starts when it is emitted
* ``<im_end>``    -- closes an image block
* ``<no_mean>``   -- the "meaningless" id of the classifier-free-guidance (unconditional) prompt

The chat tokens come from Qwen2: ``<|im_start|>``, ``<|im_end|>`` (also the EOS), ``<|endoftext|>``
(padding) and the newline ``"\\n"``.

The markers -200 and -300 are the release's conventions: negative so that they can never collide with
a vocabulary id. They are not tokens; the model splices image features in at their positions.

This module also holds the two id rewrites used by classifier-free guidance (reference §10.2 and §11,
last bullet): :func:`unconditional_ids` and :func:`cfg_dropout_ids`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

logger = logging.getLogger(__name__)

IMAGE_MARKER = -200
IMAGE_GEN_MARKER = -300
CHEERS_TOKENS: tuple[str, ...] = ("<image>", "<image_gen>", "<im_start>", "<im_end>", "<no_mean>")
"""The five tokens Cheers adds to the Qwen2 tokenizer, in the release's order."""

# Field name -> the token string it is resolved from.
TOKEN_STRINGS: Mapping[str, str] = {
    "image": "<image>",
    "image_gen": "<image_gen>",
    "im_start": "<im_start>",
    "im_end": "<im_end>",
    "no_mean": "<no_mean>",
    "eos": "<|im_end|>",
    "pad": "<|endoftext|>",
    "chat_start": "<|im_start|>",
    "chat_end": "<|im_end|>",
    "newline": "\n",
}


@dataclass(frozen=True)
class SpecialTokens:
    """The ids of every token Cheers treats specially.

    Build it with :meth:`from_tokenizer`; the released tokenizer gives ``image=151665``,
    ``image_gen=151666``, ``im_start=151667``, ``im_end=151668``, ``no_mean=151669``, ``eos=151645``,
    ``pad=151643``, ``chat_start=151644``, ``chat_end=151645``, ``newline=198``.

    Args:
        image: id of the ``<image>`` text token (replaced by ``image_marker`` in ``input_ids``).
        image_gen: id of ``<image_gen>`` (replaced by ``image_gen_marker``).
        im_start: id of ``<im_start>``, the image-block start.
        im_end: id of ``<im_end>``, the image-block end.
        no_mean: id of ``<no_mean>``, the filler of unconditional prompts.
        eos: id that ends generation (``<|im_end|>`` in the release; may equal ``chat_end`` or ``pad``).
        pad: padding id (``<|endoftext|>``).
        chat_start: ``<|im_start|>``.
        chat_end: ``<|im_end|>``.
        newline: id of ``"\\n"``.
        image_marker: negative id standing for an understanding image in ``input_ids`` (-200).
        image_gen_marker: negative id standing for an image to generate (-300).
        vocab_size: if given, every token id must be below it.

    Raises:
        ValueError: naming the offending fields when ids are negative, out of the vocabulary, or collide.
    """

    IMAGE_MARKER: ClassVar[int] = IMAGE_MARKER
    IMAGE_GEN_MARKER: ClassVar[int] = IMAGE_GEN_MARKER

    image: int
    image_gen: int
    im_start: int
    im_end: int
    no_mean: int
    eos: int
    pad: int
    chat_start: int
    chat_end: int
    newline: int
    image_marker: int = IMAGE_MARKER
    image_gen_marker: int = IMAGE_GEN_MARKER
    vocab_size: int | None = None

    # Token fields that must be pairwise distinct; eos is checked separately (it aliases chat_end or pad).
    _DISTINCT: ClassVar[tuple[str, ...]] = (
        "image",
        "image_gen",
        "im_start",
        "im_end",
        "no_mean",
        "pad",
        "chat_start",
        "chat_end",
        "newline",
    )

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name in (*TOKEN_STRINGS, "image_marker", "image_gen_marker"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{name}={value!r} is not an int")
        if problems:
            raise ValueError("invalid special token ids: " + "; ".join(problems))
        if self.vocab_size is not None and (isinstance(self.vocab_size, bool) or self.vocab_size <= 0):
            raise ValueError(f"vocab_size must be a positive int or None, got {self.vocab_size!r}")
        for name in TOKEN_STRINGS:
            value = getattr(self, name)
            if value < 0:
                problems.append(f"{name}={value} is negative")
            elif self.vocab_size is not None and value >= self.vocab_size:
                problems.append(f"{name}={value} is not below vocab_size={self.vocab_size}")
        for name in ("image_marker", "image_gen_marker"):
            if getattr(self, name) >= 0:
                problems.append(f"{name}={getattr(self, name)} must be negative (it must not be a vocab id)")
        if self.image_marker == self.image_gen_marker:
            problems.append(f"image_marker and image_gen_marker are both {self.image_marker}")
        seen: dict[int, str] = {}
        for name in self._DISTINCT:
            value = getattr(self, name)
            if value in seen:
                problems.append(f"{seen[value]} and {name} share the id {value}")
            seen.setdefault(value, name)
        clash = seen.get(self.eos)
        if clash is not None and clash not in ("chat_end", "pad"):
            problems.append(f"eos={self.eos} collides with {clash}")
        if problems:
            raise ValueError("invalid special token ids: " + "; ".join(problems))

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, strings: Mapping[str, str] | None = None) -> SpecialTokens:
        """Resolve every id from ``tokenizer`` by its token string.

        Args:
            tokenizer: a ``transformers`` tokenizer (needs ``convert_tokens_to_ids``,
                ``convert_ids_to_tokens``, ``encode`` and ``len()``).
            strings: overrides of :data:`TOKEN_STRINGS` (field name -> token string).

        Returns:
            The validated :class:`SpecialTokens`, with ``vocab_size = len(tokenizer)``.

        Raises:
            ValueError: naming every token the tokenizer lacks (call :func:`add_cheers_special_tokens`
                first for the five Cheers tokens).
        """
        table = dict(TOKEN_STRINGS)
        for name, string in (strings or {}).items():
            if name not in table:
                raise ValueError(f"unknown special token field {name!r}; known: {sorted(table)}")
            table[name] = string
        ids: dict[str, int] = {}
        missing: list[str] = []
        for name, string in table.items():
            token_id = _resolve(tokenizer, string)
            if token_id is None:
                missing.append(f"{name} ({string!r})")
            else:
                ids[name] = token_id
        if missing:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} lacks the special tokens: {', '.join(missing)}; "
                "add the Cheers tokens with cheers.tokens.add_cheers_special_tokens(tokenizer)"
            )
        return cls(**ids, vocab_size=len(tokenizer))

    def to_dict(self) -> dict[str, int | None]:
        """All fields as a JSON-ready dict (the inverse of :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpecialTokens:
        """Rebuild from :meth:`to_dict` output; unknown or missing token keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SpecialTokens keys {unknown}; known: {sorted(known)}")
        absent = sorted(set(TOKEN_STRINGS) - set(data))
        if absent:
            raise ValueError(f"SpecialTokens dict lacks the keys {absent}")
        return cls(**data)

    @property
    def prompt_label_ids(self) -> frozenset[int]:
        """Ids that keep their own value as labels inside system and user turns (reference §11)."""
        return frozenset(
            (self.newline, self.chat_start, self.chat_end, self.im_start, self.im_end, self.no_mean)
        )

    @property
    def markers(self) -> dict[int, int]:
        """Token id -> the marker that replaces it in ``input_ids``."""
        return {self.image: self.image_marker, self.image_gen: self.image_gen_marker}


def _resolve(tokenizer: Any, string: str) -> int | None:
    """The single id of ``string`` in ``tokenizer``, or None when it is not one token."""
    if string == "\n":
        ids = tokenizer.encode(string, add_special_tokens=False)
        return int(ids[0]) if len(ids) == 1 else None
    token_id = tokenizer.convert_tokens_to_ids(string)
    if token_id is None or isinstance(token_id, list):
        return None
    # An unknown token maps to the unk id (or None); the round trip tells them apart.
    if tokenizer.convert_ids_to_tokens(int(token_id)) != string:
        return None
    return int(token_id)


def add_cheers_special_tokens(tokenizer: Any) -> int:
    """Add ``<image>``, ``<image_gen>``, ``<im_start>``, ``<im_end>``, ``<no_mean>`` (that order) if absent.

    On the Qwen2.5 tokenizer (151665 entries) this yields the released ids 151665..151669. Tokens the
    tokenizer already has are left alone, so the call is idempotent.

    Args:
        tokenizer: a ``transformers`` tokenizer; it is modified in place.

    Returns:
        The number of tokens added.
    """
    from tokenizers import AddedToken

    absent = [s for s in CHEERS_TOKENS if _resolve(tokenizer, s) is None]
    if not absent:
        return 0
    added = tokenizer.add_tokens(
        [AddedToken(s, special=True, normalized=False, lstrip=False, rstrip=False) for s in absent],
        special_tokens=True,
    )
    logger.info("added Cheers special tokens %s (tokenizer now has %d entries)", absent, len(tokenizer))
    return int(added)


def unconditional_ids(input_ids: torch.Tensor, special: SpecialTokens) -> torch.Tensor:
    """The inference-time unconditional (CFG) prompt (reference §10.2).

    Every id except ``im_start``, ``im_end`` and the understanding marker becomes ``no_mean`` -- chat
    tokens, role words, newlines, padding and the generation marker included.

    Args:
        input_ids: (B, L) or (L,) integer ids with markers.
        special: the special tokens.

    Returns:
        Same shape and dtype as ``input_ids``.
    """
    keep = (special.im_start, special.im_end, special.image_marker)
    return _keep_only(input_ids, keep, special.no_mean)


def cfg_dropout_ids(input_ids: torch.Tensor, special: SpecialTokens) -> torch.Tensor:
    """The training-time CFG-dropout rewrite of a generation sample's input ids (reference §11).

    Like :func:`unconditional_ids` but the generation marker survives too: every id except
    ``image_gen_marker``, ``image_marker``, ``im_start`` and ``im_end`` becomes ``no_mean``.
    Only the input ids are rewritten; the labels stay as they were.

    Args:
        input_ids: (B, L) or (L,) integer ids with markers.
        special: the special tokens.

    Returns:
        Same shape and dtype as ``input_ids``.
    """
    keep = (special.im_start, special.im_end, special.image_marker, special.image_gen_marker)
    return _keep_only(input_ids, keep, special.no_mean)


def _keep_only(input_ids: torch.Tensor, keep: tuple[int, ...], fill: int) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer torch.Tensor, got {type(input_ids).__name__}")
    kept = torch.isin(input_ids, torch.tensor(keep, dtype=input_ids.dtype, device=input_ids.device))
    return torch.where(kept, input_ids, torch.full_like(input_ids, fill))
