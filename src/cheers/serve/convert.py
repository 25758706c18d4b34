"""Checked request bodies -> engine tasks: the server's limits, the model's accepted sizes, decoded images.

Every refusal is an :class:`APIError` with status 400 naming the field (``param``); schema-level checks
(types, ranges) happen before, in :mod:`cheers.serve.schemas` (422).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from cheers.sampling import SOLVERS
from cheers.serve.config import ServeConfig
from cheers.serve.errors import APIError
from cheers.serve.media import image_from_data_url, parse_size
from cheers.serve.schemas import ChatCompletionRequest, ImageOptions, ImagePart
from cheers.serve.tasks import ChatTask, EditTask, ImageSettings, ImageTask, TextSettings

MAX_STOPS = 4  # as OpenAI


@dataclass(frozen=True)
class ModelInfo:
    """What the server needs to know of the served model."""

    name: str
    image_size: int  # default (and editing) side in pixels
    size_multiple: int  # generated sides must be multiples of this (2 x patch size)
    tokens_per_image: int  # LLM tokens one input image takes
    reserved: tuple[str, ...] = ()  # the tokenizer's special tokens: refused in client text (forged turns)

    @classmethod
    def of(cls, pipe: Any, name: str) -> ModelInfo:
        size, patch = pipe.processor.image_size, pipe.model.config.patch_size
        reserved = tuple(sorted(pipe.processor.tokenizer.get_added_vocab()))
        return cls(name, size, 2 * patch, (size // patch) ** 2 // 4, reserved)


def _seed(seed: int | None) -> int:
    return secrets.randbelow(2**31) if seed is None else seed


def _check_n(n: int, config: ServeConfig) -> None:
    if n > config.max_n:
        raise APIError(400, f"n must be at most {config.max_n}, got {n}", param="n", code="invalid_value")


def _check_reserved(text: str, param: str, model: ModelInfo) -> None:
    found = [token for token in model.reserved if token in text]
    if found:
        raise APIError(
            400,
            f"{param} contains the model's special token {found[0]!r}",
            param=param,
            code="reserved_token",
        )


def _check_text(text: str, param: str, config: ServeConfig, model: ModelInfo) -> None:
    if not text.strip():
        raise APIError(400, f"{param} must not be empty", param=param, code="invalid_value")
    _check_reserved(text, param, model)
    if len(text) > config.max_prompt_chars:
        raise APIError(
            400,
            f"{param} is {len(text):,} characters, more than the {config.max_prompt_chars:,} allowed",
            param=param,
            code="too_long",
        )


def _sampler(body: ImageOptions, config: ServeConfig) -> dict[str, Any]:
    """The shared image options: response format, n, steps, solver -> the sampler's settings."""
    if body.response_format == "url":
        raise APIError(
            400,
            "response_format 'url' is not offered (this server stores no files); use 'b64_json'",
            param="response_format",
            code="unsupported_value",
        )
    _check_n(body.n, config)
    if body.num_inference_steps is not None and body.num_inference_steps > config.max_steps:
        raise APIError(
            400,
            f"num_inference_steps must be at most {config.max_steps}, got {body.num_inference_steps}",
            param="num_inference_steps",
            code="invalid_value",
        )
    if body.solver is not None and body.solver not in SOLVERS:
        raise APIError(400, f"solver must be one of {list(SOLVERS)}, got {body.solver!r:.40}", param="solver")
    return dict(
        num_inference_steps=body.num_inference_steps,
        guidance_scale=body.guidance_scale,
        shift=body.shift,
        solver=body.solver,
    )


def image_task(body: Any, config: ServeConfig, model: ModelInfo) -> ImageTask:
    """``/v1/images/generations`` -> an :class:`ImageTask` (``body``: ``ImageGenerationRequest``)."""
    _check_text(body.prompt, "prompt", config, model)
    sampler = _sampler(body, config)
    width, height = parse_size(body.size, model.image_size, model.size_multiple, config.max_size)
    negative = body.negative_prompt if body.negative_prompt and body.negative_prompt.strip() else None
    if negative is not None:
        _check_text(negative, "negative_prompt", config, model)
    settings = ImageSettings(width=width, height=height, negative=negative is not None, **sampler)
    return ImageTask(body.prompt, body.n, _seed(body.seed), settings, negative)


def edit_task(body: Any, image: Any, config: ServeConfig, model: ModelInfo) -> EditTask:
    """``/v1/images/edits`` -> an :class:`EditTask` (``body``: ``ImageEditForm``; ``image`` decoded)."""
    _check_text(body.prompt, "prompt", config, model)
    sampler = _sampler(body, config)
    if sampler["num_inference_steps"] == 1:
        raise APIError(400, "editing needs num_inference_steps >= 2", param="num_inference_steps")
    side = model.image_size
    if parse_size(body.size, side, model.size_multiple, max(config.max_size, side)) != (side, side):
        raise APIError(
            400, f"edits are made at the model's size: size must be {side}x{side} or 'auto'", param="size"
        )
    return EditTask(image, body.prompt, body.n, _seed(body.seed), **sampler)


def chat_task(
    body: ChatCompletionRequest, config: ServeConfig, model: ModelInfo, processor: Any
) -> tuple[ChatTask, int]:
    """``/v1/chat/completions`` -> (:class:`ChatTask`, prompt token count). Decodes the images (data URLs
    only) and checks the conversation with the model's chat template.
    """
    _check_n(body.n, config)
    if body.stream and body.n != 1:
        raise APIError(400, "stream=true answers with n=1 only", param="n", code="invalid_value")
    max_tokens = body.max_completion_tokens or body.max_tokens or config.default_max_tokens
    if max_tokens > config.max_tokens:
        raise APIError(
            400, f"max_tokens must be at most {config.max_tokens}, got {max_tokens}", param="max_tokens"
        )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > MAX_STOPS or any(not s for s in stop):
        raise APIError(400, f"stop takes at most {MAX_STOPS} non-empty strings", param="stop")
    conversation, n_images, chars = [], 0, 0
    for i, message in enumerate(body.messages):
        content = message.content if message.content is not None else ""
        parts: list[dict] = []
        for j, part in enumerate([content] if isinstance(content, str) else content):
            if isinstance(part, str):
                parts.append({"type": "text", "text": part})
            elif isinstance(part, ImagePart):
                n_images += 1
                if n_images > config.max_images_per_request:
                    raise APIError(
                        400,
                        f"at most {config.max_images_per_request} images per request",
                        param="messages",
                        code="too_many_images",
                    )
                where = f"messages.{i}.content.{j}.image_url.url"
                parts.append(
                    {
                        "type": "image",
                        "image": image_from_data_url(part.image_url.url, config.max_image_pixels, where),
                    }
                )
            else:
                parts.append({"type": "text", "text": part.text})
            if "text" in parts[-1]:
                chars += len(parts[-1]["text"])
                _check_reserved(parts[-1]["text"], f"messages.{i}.content", model)
        role = "system" if message.role == "developer" else message.role
        conversation.append({"role": role, "content": parts})
    if chars > config.max_prompt_chars:
        raise APIError(
            400,
            f"the messages hold {chars:,} characters, more than the {config.max_prompt_chars:,} allowed",
            param="messages",
            code="too_long",
        )
    try:
        prompt = processor.apply_chat_template(conversation)
    except ValueError as err:
        raise APIError(400, str(err), param="messages", code="invalid_value") from None
    prompt_tokens = len(processor.encode(prompt)) + n_images * (model.tokens_per_image - 1)
    temperature = 1.0 if body.temperature is None else body.temperature
    text = TextSettings(temperature, 1.0 if body.top_p is None else body.top_p, body.top_k or 0)
    task = ChatTask(conversation, body.n, _seed(body.seed), max_tokens, text, stop, stream=body.stream)
    return task, prompt_tokens
