"""What one request asks of the model, and how compatible requests become ONE batched pipeline call.

A task is a request already checked and decoded (images are PIL images). Tasks with equal
:meth:`batch_key` can share a call: image tasks with the same size, steps, guidance, shift, solver and
negative-prompt-or-not; edit tasks with the same steps, guidance, shift and solver; chat tasks with the same
sampling settings (greedy answers all together). Each image, and each answer, gets its own
``torch.Generator`` seeded from its request's seed (image ``i`` of a request: ``seed + i``), so a batched
result equals the request run alone (the pipeline batches prompts, and both guidance branches, with
padding and masks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cheers.pipeline import CheersPipeline

FINISH_STOP, FINISH_LENGTH = "stop", "length"


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class ImageSettings:
    """The settings images of one pipeline call must share (a batching key)."""

    width: int
    height: int
    num_inference_steps: int | None
    guidance_scale: float | None
    shift: float | None
    solver: str | None
    negative: bool = False


@dataclass
class ImageTask:
    """``n`` images of ``prompt`` (text-to-image)."""

    prompt: str
    n: int
    seed: int
    settings: ImageSettings
    negative_prompt: str | None = None

    @property
    def rows(self) -> int:
        return self.n

    def batch_key(self) -> tuple:
        return ("image", self.settings)


@dataclass
class EditTask:
    """``n`` edits of ``image`` following ``instruction``."""

    image: Any
    instruction: str
    n: int
    seed: int
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    shift: float | None = None
    solver: str | None = None

    @property
    def rows(self) -> int:
        return self.n

    def batch_key(self) -> tuple:
        return ("edit", self.num_inference_steps, self.guidance_scale, self.shift, self.solver)


@dataclass(frozen=True)
class TextSettings:
    """How answer tokens are chosen; requests share a call only with equal settings."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class ChatTask:
    """``n`` answers to one conversation (pipeline messages with the images inline)."""

    conversation: list[dict]
    n: int
    seed: int
    max_tokens: int
    text: TextSettings = field(default_factory=TextSettings)
    stop: tuple[str, ...] = ()
    stream: bool = False

    @property
    def rows(self) -> int:
        return self.n

    def batch_key(self) -> tuple:
        if self.stream:
            return ("stream", id(self))  # a streamed answer runs alone
        # greedy answers do not depend on temperature / top-p / top-k: they all share one call
        return ("chat", TextSettings() if self.text.greedy else self.text)


@dataclass
class ChatResult:
    text: str
    finish_reason: str
    completion_tokens: int


Task = ImageTask | EditTask | ChatTask


def kind(task: Task) -> str:
    """The metric label of a task: image, edit, chat or stream."""
    return task.batch_key()[0]


def plan_batches(tasks: Sequence[Task], max_rows: int) -> list[list[int]]:
    """Group task indices by :meth:`batch_key` (first come, first planned) and split each group into
    calls of at most ``max_rows`` rows (a task larger than that runs alone)."""
    groups: dict[tuple, list[int]] = {}
    for i, task in enumerate(tasks):
        groups.setdefault(task.batch_key(), []).append(i)
    plan = []
    for members in groups.values():
        chunk, rows = [], 0
        for i in members:
            if chunk and rows + tasks[i].rows > max_rows:
                plan.append(chunk)
                chunk, rows = [], 0
            chunk.append(i)
            rows += tasks[i].rows
        plan.append(chunk)
    return plan


def run_batch(pipe: CheersPipeline, tasks: Sequence[Task]) -> list[Any]:
    """One pipeline call for tasks of one batch key -> per task: its images, or its :class:`ChatResult` s."""
    first = tasks[0]
    if isinstance(first, ImageTask):
        return _run_images(pipe, tasks)
    if isinstance(first, EditTask):
        return _run_edits(pipe, tasks)
    return _run_chats(pipe, tasks)


def _split(items: list[Any], tasks: Sequence[Task]) -> list[list[Any]]:
    out, start = [], 0
    for task in tasks:
        out.append(items[start : start + task.rows])
        start += task.rows
    return out


def _run_images(pipe: CheersPipeline, tasks: Sequence[ImageTask]) -> list[list[Any]]:
    s = tasks[0].settings
    prompts = [t.prompt for t in tasks for _ in range(t.n)]
    negatives = [t.negative_prompt for t in tasks for _ in range(t.n)] if s.negative else None
    out = pipe.generate(
        prompts,
        negative_prompt=negatives,
        height=s.height,
        width=s.width,
        num_inference_steps=s.num_inference_steps,
        guidance_scale=s.guidance_scale,
        shift=s.shift,
        solver=s.solver,
        generator=[seeded(t.seed + i) for t in tasks for i in range(t.n)],
    )
    return _split(out.images, tasks)


def _run_edits(pipe: CheersPipeline, tasks: Sequence[EditTask]) -> list[list[Any]]:
    t0 = tasks[0]
    out = pipe.edit(
        [t.image for t in tasks for _ in range(t.n)],
        [t.instruction for t in tasks for _ in range(t.n)],
        num_inference_steps=t0.num_inference_steps,
        guidance_scale=t0.guidance_scale,
        shift=t0.shift,
        solver=t0.solver,
        generator=[seeded(t.seed + i) for t in tasks for i in range(t.n)],
    )
    return _split(out.images, tasks)


def _text_kwargs(text: TextSettings) -> dict[str, Any]:
    # answers are text: one ends where the model would start an image (not sampled: the API returns text)
    if text.greedy:
        return {"do_sample": False, "stop_at_image": True}
    return {
        "do_sample": True,
        "temperature": text.temperature,
        "top_p": text.top_p,
        "top_k": text.top_k,
        "stop_at_image": True,
    }


def _run_chats(pipe: CheersPipeline, tasks: Sequence[ChatTask]) -> list[list[ChatResult]]:
    # one call decodes up to the longest limit; a row's first k tokens are what a run limited to k gives
    limits = [t.max_tokens for t in tasks for _ in range(t.n)]
    out = pipe.chat(
        [t.conversation for t in tasks for _ in range(t.n)],
        max_new_tokens=max(limits),
        generator=[seeded(t.seed + i) for t in tasks for i in range(t.n)],
        **_text_kwargs(tasks[0].text),
    )
    stops = [t.stop for t in tasks for _ in range(t.n)]
    results = [_chat_result(pipe, ids, k, s) for ids, k, s in zip(out.token_ids, limits, stops)]
    return _split(results, tasks)


def _chat_result(pipe: CheersPipeline, ids: list[int], limit: int, stop: tuple[str, ...]) -> ChatResult:
    special = pipe.model.special
    ids = ids[:limit]
    ends = [ids.index(token) for token in (special.eos, special.im_start) if token in ids]
    ended = bool(ends)  # at the end of the answer, or where an image would begin
    if ended:
        ids = ids[: min(ends)]
    text = answer_text(pipe, ids)
    cut = _cut_at_stop(text, stop)
    if cut is not None:
        return ChatResult(cut, FINISH_STOP, len(ids))
    return ChatResult(text, FINISH_STOP if ended or len(ids) < limit else FINISH_LENGTH, len(ids))


def answer_text(pipe: CheersPipeline, ids: list[int]) -> str:
    """Answer ids -> text, as :meth:`CheersPipeline.chat` decodes them (no special tokens, stripped)."""
    special = pipe.model.special
    ids = [i for i in ids if i not in (special.eos, special.pad)]
    return pipe.processor.decode(ids, skip_special_tokens=True).strip()


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return text[: min(hits)] if hits else None


def run_stream(
    pipe: CheersPipeline, task: ChatTask, emit: Callable[[str], None], cancelled: Callable[[], bool]
) -> ChatResult:
    """Stream one answer: ``emit(piece)`` as text is decoded, ending early at a stop string or when
    ``cancelled()`` (closing the pipeline's stream stops decoding at the next token).

    Text that could be the start of a stop string is held back until it is not.
    """
    pieces = pipe.chat(
        task.conversation,
        max_new_tokens=task.max_tokens,
        generator=seeded(task.seed),
        stream=True,
        **_text_kwargs(task.text),
    )
    text, sent, finish = "", 0, None
    hold = max((len(s) for s in task.stop), default=1) - 1
    try:
        for piece in pieces:
            if cancelled():
                break
            text += piece
            cut = _cut_at_stop(text, task.stop)
            if cut is not None:
                text, finish = cut, FINISH_STOP
                break
            if len(text) - hold > sent:
                emit(text[sent : len(text) - hold])
                sent = len(text) - hold
    finally:
        pieces.close()
    if len(text) > sent:
        emit(text[sent:])
    tokens = len(pipe.processor.encode(text)) if text else 0  # the stream gives text: re-tokenised
    if finish is None:
        finish = FINISH_LENGTH if tokens >= task.max_tokens else FINISH_STOP
    return ChatResult(text, finish, tokens)
