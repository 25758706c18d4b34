"""Request and response bodies, mirroring OpenAI's chat-completions and images APIs (pydantic).

Requests ignore fields they do not know (OpenAI clients send more than a server uses, e.g.
``frequency_penalty``); fields they know are checked (types and ranges: a 422 naming the field). The image
requests carry documented extension fields: ``num_inference_steps``, ``guidance_scale``,
``negative_prompt``, ``shift`` and ``solver``; chat requests also take ``top_k``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**62  # seeds of a request's images are seed, seed + 1, ...: keep them in range


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- chat ----------------------------------------------------------------------------------------------------
class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImageURL(_Request):
    url: str = Field(description="a data URL: data:image/png;base64,... (remote URLs are refused)")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name of max_tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy; default 1 (as OpenAI)")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="extension: sample among the k likeliest (0: all)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# -- images --------------------------------------------------------------------------------------------------
class ImageOptions(_Request):
    n: int = Field(1, ge=1)
    size: str | None = Field(
        None, description="'WxH' in pixels, each a multiple the model accepts; or 'auto'"
    )
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png"] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    # extensions (Cheers' sampler settings; default: the model's)
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    shift: float | None = Field(None, ge=1e-3, le=1e3)
    solver: str | None = None
    user: str | None = None


class ImageGenerationRequest(ImageOptions):
    prompt: str = Field(min_length=1)
    model: str | None = None
    negative_prompt: str | None = None


class ImageEditForm(ImageOptions):
    """The non-file fields of a multipart ``/v1/images/edits`` request (numbers arrive as text)."""

    prompt: str = Field(min_length=1)
    model: str | None = None


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: Literal["png"] = "png"
    size: str


# -- models, errors ------------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cheers"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
