"""(text or chat messages, images) -> Cheers model inputs; training labels; the CFG prompt.

Placeholders in text are the release's strings: ``<im_start><image><im_end>`` for an understanding image
and ``<im_start><image_gen><im_end>`` for a generated / target image. After tokenisation the ``<image>``
and ``<image_gen>`` ids become the markers -200 / -300 (:class:`~cheers.tokens.SpecialTokens`), which
the model replaces with image tokens.

Images are matched to placeholders in order, row by row. A row without any placeholder gets a *prefix
image* (the model prepends its tokens, reference §5 rule 2); by default the release's random dummy image
(:func:`~cheers.image_ops.dummy_image`), drawn from the caller's ``generator``.

Differences from the release's processor, all for batches or reproducibility: the dummy image comes from
a generator; in generation mode ``<im_start>`` is written at each row's real end and that row's mask is
extended (the release masks it out in shorter rows); rows can be left-padded on request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from cheers import image_ops
from cheers.chat_template import RELEASE_CHAT_TEMPLATE  # used when the tokenizer has none
from cheers.models.sequence import IGNORE_INDEX
from cheers.tokens import SpecialTokens, add_cheers_special_tokens, cfg_dropout_ids, unconditional_ids

logger = logging.getLogger(__name__)


IMAGE_PLACEHOLDER = "<im_start><image><im_end>"
IMAGE_GEN_PLACEHOLDER = "<im_start><image_gen><im_end>"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
_ROLE_ALIASES = {"human": "user", "gpt": "assistant"}

Mode = Literal["understand", "generate", "edit"]


class CheersProcessor:
    """Turns prompts and images into ``input_ids``, ``attention_mask``, ``pixel_values``, ``grid_hws``.

    Args:
        tokenizer: a ``transformers`` tokenizer holding the Qwen2 chat tokens and the five Cheers tokens
            (see :func:`~cheers.tokens.add_cheers_special_tokens`). If it has no chat template, the
            release's is installed on it.
        special: the special-token ids; resolved from ``tokenizer`` when None.
        image_size: R, the side of every preprocessed image (the release's ``scale_resolution``, 512).
        patch_size: p, the ViT patch size; ``grid_hws = (R/p, R/p)``.
    """

    def __init__(
        self,
        tokenizer: Any,
        special: SpecialTokens | None = None,
        image_size: int = 512,
        patch_size: int = 16,
    ) -> None:
        image_ops.check_resolution(image_size, patch_size)
        self.tokenizer = tokenizer
        self.special = special if special is not None else SpecialTokens.from_tokenizer(tokenizer)
        self.image_size = image_size
        self.patch_size = patch_size
        if getattr(tokenizer, "chat_template", None) is None:
            logger.info("tokenizer has no chat template; installing the release's")
            tokenizer.chat_template = RELEASE_CHAT_TEMPLATE

    # ---------------------------------------------------------------------------------------------
    # persistence

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> CheersProcessor:
        """Load the tokenizer (adding the Cheers tokens, as the release does) and preprocessor config.

        Args:
            path: a local directory with tokenizer files and optionally ``preprocessor_config.json``
                (``scale_resolution``, ``patch_size``, and ``cheers_special_tokens`` if we wrote it).
            **kwargs: ``image_size`` / ``patch_size`` overrides.
        """
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"processor path {str(path)!r} is not a directory")
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # AutoTokenizer reads config.json and warns about model_type "umm"
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        finally:
            hf_logging.set_verbosity(verbosity)
        add_cheers_special_tokens(tokenizer)
        config: dict[str, Any] = {}
        if (path / PREPROCESSOR_CONFIG).is_file():
            config = json.loads((path / PREPROCESSOR_CONFIG).read_text())
        special = SpecialTokens.from_tokenizer(tokenizer)
        recorded = config.get("cheers_special_tokens")
        if recorded is not None and SpecialTokens.from_dict(recorded) != special:
            raise ValueError(
                f"{path / PREPROCESSOR_CONFIG} records special tokens {recorded} but the tokenizer "
                f"gives {special.to_dict()}"
            )
        kwargs.setdefault("image_size", int(config.get("scale_resolution", 512)))
        kwargs.setdefault("patch_size", int(config.get("patch_size", 16)))
        return cls(tokenizer, special=special, **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the tokenizer files and ``preprocessor_config.json`` (with the special-token ids)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(path))
        config = {
            "processor_class": type(self).__name__,
            "scale_resolution": self.image_size,
            "patch_size": self.patch_size,
            "cheers_special_tokens": self.special.to_dict(),
        }
        (path / PREPROCESSOR_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    # ---------------------------------------------------------------------------------------------
    # images

    @property
    def grid_hw(self) -> tuple[int, int]:
        """(h, w) = (R/p, R/p): the ViT and latent grid of every image."""
        return self.image_size // self.patch_size, self.image_size // self.patch_size

    def preprocess_understanding(self, image: Any) -> torch.Tensor:
        """Fit inside R×R, black-pad, centre. Returns (3, R, R) float32 in [0, 1]."""
        return image_ops.preprocess_understanding(image, self.image_size)

    def preprocess_generation(self, image: Any) -> torch.Tensor:
        """Short side to R, centre-crop. Returns (3, R, R) float32 in [0, 1]."""
        return image_ops.preprocess_generation(image, self.image_size)

    def dummy_image(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """The release's random prefix image for image-less prompts. Returns (3, R, R)."""
        return image_ops.dummy_image(generator, self.image_size)

    # ---------------------------------------------------------------------------------------------
    # text

    def apply_chat_template(self, messages: Any, add_generation_prompt: bool = True) -> str:
        """Render one conversation with the tokenizer's chat template.

        Args:
            messages: a list of ``{"role", "content"}`` (or the release's ``{"from", "value"}``) dicts;
                ``content`` is a string with the release's placeholders, or a list of items
                ``{"type": "text", "text": ...}``, ``{"type": "image"}``, ``{"type": "image_gen"}``
                (joined with newlines; an image item becomes ``<im_start><image><im_end>``).
            add_generation_prompt: end with ``<|im_start|>assistant\\n``.

        Raises:
            ValueError: naming the message at fault: not a dict, no role, a role that is not one word (or
                holds ``<|...|>``), content neither a str nor a list of items, text that is not valid Unicode.

        Returns:
            The prompt text, e.g. ``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
            <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`` (without the line break).
        """
        conversation, _ = _normalise_conversation(messages)
        return self._render(conversation, add_generation_prompt)

    def _render(self, conversation: list[dict[str, str]], add_generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        if not isinstance(text, str):
            raise ValueError(f"the chat template rendered {type(text).__name__}, expected str")
        return text

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with ``<image>`` / ``<image_gen>`` replaced by their markers."""
        markers = self.special.markers
        ids = self.tokenizer.encode(_valid_unicode(text, "the text"), add_special_tokens=False)
        return [markers.get(i, i) for i in ids]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Decode ids, dropping markers (they are not tokens)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tokenizer.decode([i for i in ids if i >= 0], skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------------------------------------
    # model inputs

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        messages: Any = None,
        *,
        mode: Mode = "understand",
        add_im_start: bool | None = None,
        prefix_image: Any = "dummy",
        generator: torch.Generator | None = None,
        return_tensors: str = "pt",
        padding_side: Literal["right", "left"] = "right",
    ) -> dict[str, torch.Tensor | None]:
        """Build a batch of model inputs.

        Args:
            text: prompt text(s) already in chat format (see :meth:`apply_chat_template`).
            images: one image, a list of images (``None`` entries -- the release's ``images=[None]`` --
                are ignored) or an (n, C, H, W) tensor; matched to the ``<image>`` / ``<image_gen>``
                placeholders in order. ``<image>`` images get understanding preprocessing,
                ``<image_gen>`` images generation preprocessing.
            messages: instead of ``text``: one conversation or a list of conversations, rendered with
                the chat template (with the generation prompt); image items may carry the image under
                ``"image"`` when ``images`` is not given.
            mode: ``"understand"``, ``"generate"`` (text-to-image) or ``"edit"`` (exactly one ``<image>``
                per row, the image to edit).
            add_im_start: append ``<im_start>`` at each row's end so that sampling starts at once
                (default: True for "generate" and "edit"). Rows already ending with it are left alone.
            prefix_image: image of rows without placeholders: ``"dummy"`` (the release: random noise
                from ``generator``), ``None`` (no image; the model then needs ``prefix_image=None`` too),
                or an image / (3, R, R) tensor.
            generator: source of the dummy images.
            return_tensors: only ``"pt"``.
            padding_side: ``"right"`` (the release) or ``"left"``.

        Returns:
            ``input_ids`` (B, L) int64 with markers; ``attention_mask`` (B, L) int64 (0 on padding, pad
            id ``special.pad``); ``pixel_values`` (n_img, 3, R, R) float32 in pixel-consumption order
            (row by row, the prefix image of a placeholder-less row in its place) or None; ``grid_hws``
            (n_img, 2) int64 = (R/p, R/p) or None.

        Raises:
            ValueError: bad arguments, or placeholder and image counts that differ.
        """
        # 1. check arguments
        if mode not in ("understand", "generate", "edit"):
            raise ValueError(f"mode must be 'understand', 'generate' or 'edit', got {mode!r}")
        if return_tensors != "pt":
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if add_im_start is None:
            add_im_start = mode in ("generate", "edit")
        # 2. texts (rendering messages) and tokenisation
        texts, inline_images = self._prompt_texts(text, messages)
        if images is None and inline_images:
            images = inline_images
        elif images is not None and inline_images:
            raise ValueError("images were given both inside messages and as images=; give them once")
        rows = [self.encode(t) for t in texts]
        for i, row in enumerate(rows):
            if not row:
                raise ValueError(f"prompt {i} encodes to zero tokens")
        # 3. images, matched to placeholders
        pixel_values = self._match_images(rows, _image_list(images), mode, prefix_image, generator)
        # 4. the image-block start that makes generation begin
        if add_im_start:
            rows = [
                row if row[-1] == self.special.im_start else [*row, self.special.im_start] for row in rows
            ]
        # 5. pad
        input_ids, attention_mask = _pad(rows, self.special.pad, padding_side)
        n_img = 0 if pixel_values is None else pixel_values.shape[0]
        grid_hws = torch.tensor([self.grid_hw] * n_img, dtype=torch.int64) if n_img else None  # (n_img, 2)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "grid_hws": grid_hws,
        }

    def _prompt_texts(self, text: Any, messages: Any) -> tuple[list[str], list[Any]]:
        if (text is None) == (messages is None):
            raise ValueError("give exactly one of text= and messages=")
        if text is not None:
            texts = [text] if isinstance(text, str) else text
            if not (isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts)):
                raise ValueError(f"text must be a str or a non-empty list of str, got {text!r:.80}")
            return list(texts), []
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError(f"messages must be a non-empty list, got {messages!r:.80}")
        batch = messages if all(isinstance(m, (list, tuple)) for m in messages) else [messages]
        texts, inline = [], []
        for conversation in batch:
            normalised, found = _normalise_conversation(conversation)
            texts.append(self._render(normalised, add_generation_prompt=True))
            inline.extend(found)
        return texts, inline

    def _match_images(
        self,
        rows: list[list[int]],
        images: list[Any],
        mode: str,
        prefix_image: Any,
        generator: torch.Generator | None,
    ) -> torch.Tensor | None:
        und, gen = self.special.image_marker, self.special.image_gen_marker
        n_und = sum(row.count(und) for row in rows)
        n_gen = sum(row.count(gen) for row in rows)
        if len(images) != n_und + n_gen:
            raise ValueError(
                f"the text has {n_und} <image> and {n_gen} <image_gen> placeholders "
                f"({n_und + n_gen} in all) but {len(images)} images were given"
            )
        if mode == "edit":
            bad = [i for i, row in enumerate(rows) if row.count(und) != 1 or row.count(gen) != 0]
            if bad:
                raise ValueError(
                    f"mode='edit' needs exactly one <image> and no <image_gen> per row; rows {bad} differ"
                )
        pixels: list[torch.Tensor] = []
        remaining = iter(images)
        for i, row in enumerate(rows):
            markers = [t for t in row if t in (und, gen)]
            if not markers and prefix_image is not None:
                pixels.append(self._prefix_pixels(prefix_image, generator))
            for marker in markers:
                position = len(pixels)
                try:
                    pre = self.preprocess_understanding if marker == und else self.preprocess_generation
                    pixels.append(pre(next(remaining)))
                except ValueError as err:
                    raise ValueError(f"image {position} (prompt {i}): {err}") from err
            _warn_unwrapped(row, (und, gen), self.special, i)
        return torch.stack(pixels) if pixels else None  # (n_img, 3, R, R)

    def _prefix_pixels(self, prefix_image: Any, generator: torch.Generator | None) -> torch.Tensor:
        if isinstance(prefix_image, str):
            if prefix_image != "dummy":
                raise ValueError(f"prefix_image must be 'dummy', None or an image, got {prefix_image!r}")
            return self.dummy_image(generator)
        try:
            return self.preprocess_understanding(prefix_image)
        except ValueError as err:
            raise ValueError(f"prefix_image: {err}") from err

    # ---------------------------------------------------------------------------------------------
    # training labels and CFG prompts

    def encode_conversation(self, record: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and unshifted labels of one training record (reference §11).

        The conversation is rendered with the chat template (no generation prompt) turn by turn.
        Assistant turns, from ``<|im_start|>assistant\\n`` to ``<|im_end|>\\n``, are labelled with their
        ids (a ``<image_gen>`` marker keeps -300). System and user turns are -100 except newline,
        ``<|im_start|>``, ``<|im_end|>``, ``<im_start>``, ``<im_end>`` and ``<no_mean>``, which keep their
        ids (so an ``<image>`` marker in a user turn is -100).

        Args:
            record: ``{"id", "image": path | "src, target" | absent, "conversations": [{"from": "human" |
                "gpt", "value": str}, ...]}``.

        Returns:
            ``(input_ids, labels)``, both (L,) int64, ids with markers.
        """
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise ValueError(f"record must be a dict with a 'conversations' list, got {record!r:.120}")
        conversation, _ = _normalise_conversation(record["conversations"])
        keep = self.special.prompt_label_ids
        ids: list[int] = []
        labels: list[int] = []
        rendered = ""
        for k, message in enumerate(conversation):
            text = self._render(conversation[: k + 1], add_generation_prompt=False)
            if not text.startswith(rendered):
                raise ValueError("the chat template does not render turn by turn (prefixes differ)")
            segment = self.encode(text[len(rendered) :])
            rendered = text
            ids.extend(segment)
            if message["role"] == "assistant":
                labels.extend(segment)
            else:
                labels.extend(t if t in keep else IGNORE_INDEX for t in segment)
        _check_record_images(record, ids, self.special)
        return torch.tensor(ids, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64)

    def unconditional_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Inference CFG prompt: all but ``<im_start>``, ``<im_end>``, -200 become ``<no_mean>``."""
        return unconditional_ids(input_ids, self.special)

    def cfg_dropout_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Training CFG dropout: like :meth:`unconditional_ids` but -300 is kept too."""
        return cfg_dropout_ids(input_ids, self.special)


# ------------------------------------------------------------------------------------------------------
# helpers


def _normalise_conversation(messages: Any) -> tuple[list[dict[str, str]], list[Any]]:
    """Messages -> ``[{"role", "content": str}]`` plus the images found inline, in order."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"a conversation must be a non-empty list of messages, got {messages!r:.80}")
    out, images = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} must be a dict, got {type(message).__name__}")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {i} needs a non-empty 'role' (or 'from') string, got {role!r:.80}")
        if (
            any(c.isspace() for c in role) or "<|" in role or "|>" in role
        ):  # it would forge turns in the prompt
            raise ValueError(f"message {i} role must be one word without <|...|> tokens, got {role!r:.80}")
        text = _valid_unicode(_content_text(content, i, images), f"message {i} content")
        out.append(
            {"role": _valid_unicode(_ROLE_ALIASES.get(role, role), f"message {i} role"), "content": text}
        )
    return out, images


def _valid_unicode(text: str, what: str) -> str:
    """Tokenizers take UTF-8 only: a lone surrogate (e.g. from a bad decode) is refused, with its position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{what} is not valid Unicode: {text[err.start]!r} at position {err.start} ({err.reason})"
        ) from None
    return text


def _content_text(content: Any, index: int, images: list[Any]) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"message {index} content must be a str or a list of items, got {content!r:.80}")
    parts = []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if isinstance(item, str):
            parts.append(item)
        elif kind == "text" and isinstance(item.get("text"), str):
            parts.append(item["text"])
        elif kind in ("image", "image_gen"):
            parts.append(IMAGE_PLACEHOLDER if kind == "image" else IMAGE_GEN_PLACEHOLDER)
            if item.get("image") is not None:
                images.append(item["image"])
        else:
            raise ValueError(
                f"message {index}: content items must be str or {{'type': 'text'|'image'|'image_gen'}}, "
                f"got {item!r:.80}"
            )
    return "\n".join(parts)


def _image_list(images: Any) -> list[Any]:
    if images is None:
        return []
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images.unbind(0))
    elif not isinstance(images, (list, tuple)):
        images = [images]
    return [image for image in images if image is not None]


def _pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.int64)  # (B, L)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.int64)  # (B, L)
    for i, row in enumerate(rows):
        cols = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
        input_ids[i, cols] = torch.tensor(row, dtype=torch.int64)
        attention_mask[i, cols] = 1
    return input_ids, attention_mask


def _warn_unwrapped(row: list[int], markers: tuple[int, int], special: SpecialTokens, index: int) -> None:
    padded = [None, *row, None]
    for j in (j for j, token in enumerate(row) if token in markers):
        if (padded[j], padded[j + 2]) != (special.im_start, special.im_end):
            logger.warning("prompt %d: image placeholder at %d is not inside <im_start>..<im_end>", index, j)


def _check_record_images(record: dict[str, Any], ids: list[int], special: SpecialTokens) -> None:
    image = record.get("image")
    if image is None:
        return
    if not isinstance(image, str):
        raise ValueError(f"record {record.get('id')!r}: 'image' must be a string, got {image!r:.80}")
    paths = [p for p in (s.strip() for s in image.split(",")) if p]
    n_markers = sum(1 for t in ids if t in (special.image_marker, special.image_gen_marker))
    if len(paths) != n_markers:
        raise ValueError(
            f"record {record.get('id')!r} names {len(paths)} image paths but its text has "
            f"{n_markers} <image>/<image_gen> placeholders"
        )
