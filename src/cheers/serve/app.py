"""The FastAPI app: OpenAI-compatible routes over an :class:`cheers.serve.engine.Engine`.

Routes: ``GET /health`` (open), ``GET /v1/models``, ``POST /v1/chat/completions`` (JSON, or server-sent
events with ``stream: true``), ``POST /v1/images/generations``, ``POST /v1/images/edits`` (multipart),
``GET /metrics`` (Prometheus). A route checks its request (:mod:`cheers.serve.convert`), queues a task and
waits for it; while it waits it watches for the client leaving (the task is dropped) and for the timeout
(504). Streams wait for their first event before answering, so a refusal is still a plain error status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from cheers.serve.config import ServeConfig
from cheers.serve.convert import ModelInfo, chat_task, edit_task, image_task
from cheers.serve.engine import Engine, Job, StreamSink
from cheers.serve.errors import APIError, install_error_handlers
from cheers.serve.media import image_from_bytes, png_base64
from cheers.serve.metrics import Metrics
from cheers.serve.middleware import GuardMiddleware, MetricsMiddleware
from cheers.serve.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ErrorResponse,
    ImageData,
    ImageEditForm,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    Usage,
)
from cheers.serve.tasks import ChatResult

logger = logging.getLogger(__name__)

POLL_S = 0.2  # how often a waiting request checks whether its client is still there
DEFAULT_MODEL_NAME = "cheers"
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 413, 422, 429, 500, 503, 504)}


def engine_loader(
    model: str,
    config: ServeConfig,
    *,
    device: str = "auto",
    dtype: str | None = None,
    quantization: str | None = None,
    loras: Sequence[tuple[str, float]] = (),
    channels_last: bool = True,
) -> Callable[[Metrics], Engine]:
    """A function that loads ``model`` and returns an engine over it (run when the app starts, so every
    replica, a Ray Serve one included, loads its own). ``loras``: (adapter directory, scale) pairs loaded
    into the pipeline (``cheers serve --lora PATH[:SCALE]``); ``channels_last``: the pipeline's
    :meth:`~cheers.pipeline.CheersPipeline.optimize` memory format for the convolutions (same outputs within
    the parity tolerance; batches gain more from it than single requests)."""

    def load(metrics: Metrics) -> Engine:
        from cheers.pipeline import CheersPipeline

        pipe = CheersPipeline.from_pretrained(
            model, device=device, dtype=dtype, progress=False, quantization=quantization
        )
        for path, scale in loras:
            pipe.load_lora_weights(path, scale=scale)
        if channels_last:
            pipe.optimize(channels_last=True)
        return Engine(
            pipe,
            max_batch=config.max_batch,
            max_queue=config.max_queue,
            batch_wait_s=config.batch_wait_s,
            metrics=metrics,
        )

    return load


def create_app(
    config: ServeConfig | None = None,
    *,
    engine: Engine | None = None,
    load_engine: Callable[[Metrics], Engine] | None = None,
) -> FastAPI:
    """The server app over ``engine`` (started with the app), or over the engine ``load_engine`` returns
    when the app starts; exactly one of the two. The engine is stopped when the app shuts down."""
    if (engine is None) == (load_engine is None):
        raise ValueError("give exactly one of engine= and load_engine=")
    config = config or ServeConfig()
    metrics = engine.metrics if engine is not None else Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        running = engine if engine is not None else await run_in_threadpool(load_engine, metrics)
        running.start()
        app.state.engine = running
        app.state.model = ModelInfo.of(running.pipe, config.model_name or DEFAULT_MODEL_NAME)
        app.state.started = int(time.time())
        logger.info("serving %s", app.state.model.name)
        try:
            yield
        finally:
            await run_in_threadpool(running.stop)

    app = FastAPI(
        title="Cheers", summary="OpenAI-compatible chat and images from one Cheers model", lifespan=lifespan
    )
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last: outermost, sees every answer
    app.state.config = config

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        running: Engine = request.app.state.engine
        body = {
            "status": "ok" if running.alive else "unavailable",
            "model": request.app.state.model.name,
            "queue_depth": len(running.queue),
        }
        return JSONResponse(body, status_code=200 if running.alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        content, media_type = metrics.render()
        return Response(content, media_type=media_type)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def models(request: Request) -> ModelList:
        card = ModelCard(id=request.app.state.model.name, created=request.app.state.started)
        return ModelList(data=[card])

    @app.post("/v1/images/generations", response_model=ImagesResponse, responses=_ERRORS)
    async def images_generations(body: ImageGenerationRequest, request: Request) -> ImagesResponse:
        model = _model(request, body.model)
        task = image_task(body, config, model)
        images = await _answer(request, task)
        size = f"{task.settings.width}x{task.settings.height}"
        return await run_in_threadpool(_images_response, images, size)

    @app.post("/v1/images/edits", response_model=ImagesResponse, responses=_ERRORS)
    async def images_edits(request: Request) -> ImagesResponse:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise APIError(400, "send /v1/images/edits as multipart/form-data", code="bad_content_type")
        async with request.form(max_files=4, max_fields=64) as form:  # uploads are closed on exit
            files = [v for k, v in form.multi_items() if k in ("image", "image[]")]
            if "mask" in form:
                raise APIError(400, "masks are not supported: the whole image is edited", param="mask")
            if len(files) != 1 or not isinstance(files[0], UploadFile):
                raise APIError(400, "send exactly one image file, as the 'image' field", param="image")
            fields = {
                k: v for k, v in form.multi_items() if isinstance(v, str) and k not in ("image", "image[]")
            }
            raw = await files[0].read()
        body = ImageEditForm.model_validate(fields)
        model = _model(request, body.model)
        image = await run_in_threadpool(image_from_bytes, raw, config.max_image_pixels, "image")
        task = edit_task(body, image, config, model)
        images = await _answer(request, task)
        return await run_in_threadpool(_images_response, images, f"{model.image_size}x{model.image_size}")

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        model = _model(request, body.model)
        processor = request.app.state.engine.pipe.processor
        task, prompt_tokens = await run_in_threadpool(chat_task, body, config, model, processor)
        reply = _Reply(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model.name, prompt_tokens)
        if not body.stream:
            results: list[ChatResult] = await _answer(request, task)
            return reply.completion(results)
        engine: Engine = request.app.state.engine
        sink = StreamSink(asyncio.get_running_loop())
        job = engine.submit(task, sink)
        deadline = time.monotonic() + config.request_timeout_s
        # the first event decides the status: an error before the stream starts is a plain error answer
        first = await _next_event(engine, job, request, deadline, config.request_timeout_s)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _sse(engine, job, first, reply, deadline, config.request_timeout_s, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


def _model(request: Request, asked: str | None) -> ModelInfo:
    model: ModelInfo = request.app.state.model
    config: ServeConfig = request.app.state.config
    if asked and config.model_name and asked != model.name:
        raise APIError(
            404,
            f"the model {asked!r:.80} is not served here; GET /v1/models lists {model.name!r}",
            param="model",
            code="model_not_found",
        )
    return model


def _images_response(images: list[Any], size: str) -> ImagesResponse:
    return ImagesResponse(
        created=int(time.time()), data=[ImageData(b64_json=png_base64(im)) for im in images], size=size
    )


async def _answer(request: Request, task: Any) -> Any:
    """Queue ``task`` and wait for its result, dropping it if the client leaves or the timeout passes."""
    engine: Engine = request.app.state.engine
    timeout = request.app.state.config.request_timeout_s
    job = engine.submit(task)
    future = asyncio.wrap_future(job.future)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        done, _ = await asyncio.wait({future}, timeout=max(0.0, min(POLL_S, left)))
        if done:
            return future.result()  # an APIError from the worker is raised here
        if await request.is_disconnected():
            engine.cancel(job, "client_gone")
            future.cancel()  # nobody will read its error
            raise APIError(499, "the client closed the request", code="client_gone")
        if left <= 0:
            engine.cancel(job, "timeout")
            future.cancel()
            raise _timeout(timeout)


def _timeout(seconds: float) -> APIError:
    return APIError(504, f"the request was not answered within {seconds:g} s", code="timeout")


async def _next_event(
    engine: Engine, job: Job, request: Request | None, deadline: float, timeout_s: float
) -> tuple[str, Any]:
    """The next event of a stream; raises the stream's error, 499 if the client left, 504 at the deadline."""
    assert job.sink is not None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            engine.cancel(job, "timeout")
            raise _timeout(timeout_s)
        try:
            event = await asyncio.wait_for(job.sink.events.get(), min(POLL_S, left))
        except asyncio.TimeoutError:
            if request is not None and await request.is_disconnected():
                engine.cancel(job, "client_gone")
                raise APIError(499, "the client closed the request", code="client_gone") from None
            continue
        if event[0] == "error":
            raise event[1]
        return event


class _Reply:
    """Builds one chat answer's bodies: the completion, or its stream's chunks."""

    def __init__(self, id: str, created: int, model: str, prompt_tokens: int) -> None:
        self.id, self.created, self.model, self.prompt_tokens = id, created, model, prompt_tokens

    def usage(self, results: list[ChatResult]) -> Usage:
        completion = sum(r.completion_tokens for r in results)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )

    def completion(self, results: list[ChatResult]) -> ChatCompletion:
        choices = [
            Choice(index=i, message=AssistantMessage(content=r.text), finish_reason=r.finish_reason)
            for i, r in enumerate(results)
        ]
        return ChatCompletion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage(results)
        )

    def chunk(self, delta: Delta, finish_reason: str | None = None, usage: Usage | None = None) -> str:
        choices = [] if usage is not None else [ChunkChoice(delta=delta, finish_reason=finish_reason)]
        body = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )
        return f"data: {body.model_dump_json(exclude_none=usage is None)}\n\n"


async def _sse(
    engine: Engine,
    job: Job,
    first: tuple[str, Any],
    reply: _Reply,
    deadline: float,
    timeout_s: float,
    include_usage: bool,
) -> AsyncIterator[str]:
    """The stream in OpenAI's chunk format, ending with ``data: [DONE]``; an error after the start is sent
    as an ``{"error": ...}`` event. If the client leaves, the engine stops decoding its answer."""
    finished = False
    try:
        yield reply.chunk(Delta(role="assistant", content=""))
        event = first
        while True:
            kind, value = event
            if kind == "piece":
                yield reply.chunk(Delta(content=value))
            elif kind == "done":
                yield reply.chunk(Delta(), finish_reason=value.finish_reason)
                if include_usage:
                    yield reply.chunk(Delta(), usage=reply.usage([value]))
                break
            try:
                event = await _next_event(engine, job, None, deadline, timeout_s)
            except APIError as err:
                yield f"data: {json.dumps(err.body())}\n\n"
                break
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        if not finished:
            engine.cancel(job, "client_gone")
