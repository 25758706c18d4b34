"""The serving engine on a fake pipeline: grouping into batched calls, the bounded queue, cancellation,
failures that do not take the worker down, streams that stop at a stop string (fast, no server)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from cheers.serve.engine import Engine  # noqa: E402
from cheers.serve.errors import APIError  # noqa: E402
from cheers.serve.tasks import (  # noqa: E402
    ChatTask,
    EditTask,
    ImageSettings,
    ImageTask,
    TextSettings,
    plan_batches,
    run_stream,
)

from model_helpers import tiny_pipeline  # noqa: E402
from serve_fakes import FakePipe  # noqa: E402

SETTINGS = ImageSettings(
    width=128, height=128, num_inference_steps=2, guidance_scale=3.0, shift=1.0, solver=None
)


@pytest.fixture(scope="module")
def base():
    return tiny_pipeline(seed=5)


@pytest.fixture
def held(base):
    """An engine whose pipeline holds every call until released; stopped afterwards."""
    pipe = FakePipe(base, hold=True)
    engine = Engine(pipe, max_batch=8, max_queue=8, batch_wait_s=0).start()
    yield engine, pipe
    pipe.release()
    engine.stop()


def image(prompt: str, n: int = 1, seed: int = 0, **changes) -> ImageTask:
    settings = ImageSettings(**{**SETTINGS.__dict__, **changes})
    return ImageTask(prompt, n, seed, settings, "blurry" if settings.negative else None)


def pile_up(engine: Engine, pipe: FakePipe, tasks) -> list:
    """Occupy the worker with one call, queue ``tasks`` behind it, then let everything run."""
    blocker = engine.submit(image("blocker"))
    assert pipe.entered.wait(10)
    jobs = [engine.submit(t) for t in tasks]
    pipe.release()
    blocker.future.result(10)
    return [j.future.result(10) for j in jobs]


def test_compatible_image_requests_become_one_pipeline_call_with_a_generator_per_image(held):
    engine, pipe = held
    results = pile_up(engine, pipe, [image("a", n=2, seed=10), image("b", seed=20), image("c", n=3, seed=30)])
    assert [len(r) for r in results] == [2, 1, 3]
    assert len(pipe.calls) == 2  # the blocker, then ONE call for the three requests
    name, call = pipe.calls[1]
    assert name == "generate" and call["prompts"] == ["a", "a", "b", "c", "c", "c"]
    assert call["seeds"] == [10, 11, 20, 30, 31, 32]  # image i of a request: its seed + i
    assert [im.getpixel((0, 0))[0] for im in results[2]] == [30, 31, 32]  # each request gets its own images


def test_incompatible_settings_make_separate_calls(held):
    engine, pipe = held
    pile_up(
        engine,
        pipe,
        [
            image("a"),
            image("b", width=256),
            image("c", num_inference_steps=3),
            image("d", negative=True),
            image("e"),
            EditTask(None, "make it blue", 1, 0, num_inference_steps=2),
            EditTask(None, "make it red", 1, 1, num_inference_steps=2),
        ],
    )
    calls = pipe.calls[1:]
    assert [c[0] for c in calls] == ["generate"] * 4 + ["edit"]
    assert calls[0][1]["prompts"] == ["a", "e"] and calls[3][1]["negative"] == ["blurry"]
    assert calls[4][1]["instructions"] == ["make it blue", "make it red"]


def test_chat_requests_batch_by_sampling_settings(held):
    engine, pipe = held
    greedy = [ChatTask([{"role": "user", "content": "hi"}], 1, s, max_tokens=m) for s, m in ((1, 3), (2, 5))]
    hot = TextSettings(temperature=0.7)
    sampled = [ChatTask([{"role": "user", "content": "hi"}], 2, 7, max_tokens=4, text=hot)]
    cold = [
        ChatTask([{"role": "user", "content": "hi"}], 1, 9, max_tokens=4, text=TextSettings(temperature=0.2))
    ]
    results = pile_up(engine, pipe, [*greedy, *sampled, *cold])
    calls = pipe.calls[1:]
    assert [c[1]["n"] for c in calls] == [2, 2, 1]
    assert calls[0][1]["max_new_tokens"] == 5 and calls[0][1]["do_sample"] is False
    assert calls[1][1]["temperature"] == 0.7 and calls[1][1]["seeds"] == [7, 8]
    first, second = results[0][0], results[1][0]
    assert first.completion_tokens == 3 and first.finish_reason == "length"  # cut to its own limit
    assert second.completion_tokens == 5 and len(first.text) < len(second.text)


def test_plan_batches_caps_rows_and_keeps_arrival_order():
    tasks = [image("a", n=3), image("b", n=3), image("c", width=256), image("d", n=3), image("e", n=9)]
    assert plan_batches(tasks, max_rows=6) == [[0, 1], [3], [4], [2]]
    assert plan_batches(tasks, max_rows=1) == [[0], [1], [3], [4], [2]]


def test_a_full_queue_refuses_with_429_and_retry_after(held):
    engine, pipe = held
    engine.submit(image("blocker"))
    assert pipe.entered.wait(10)
    for i in range(engine.queue.capacity):
        engine.submit(image(f"waiting {i}"))
    with pytest.raises(APIError) as info:
        engine.submit(image("one too many"))
    assert info.value.status == 429 and int(info.value.headers["Retry-After"]) >= 1
    assert info.value.body()["error"]["code"] == "queue_full"


def test_a_cancelled_request_leaves_the_queue_and_never_runs(held):
    engine, pipe = held
    engine.submit(image("blocker"))
    assert pipe.entered.wait(10)
    gone, kept = engine.submit(image("gone")), engine.submit(image("kept"))
    engine.cancel(gone, "client_gone")
    assert len(engine.queue) == 1
    with pytest.raises(APIError) as info:
        gone.future.result(1)
    assert info.value.status == 499
    pipe.release()
    kept.future.result(10)
    assert all("gone" not in c[1].get("prompts", []) for c in pipe.calls)


def test_a_failing_request_fails_alone_and_the_worker_carries_on(held):
    engine, pipe = held
    engine.submit(image("blocker"))
    assert pipe.entered.wait(10)
    jobs = [engine.submit(image(p)) for p in ("fine", "boom", "invalid", "also fine")]
    pipe.release()
    outcomes = []
    for job in jobs:
        try:
            outcomes.append(len(job.future.result(10)))
        except APIError as err:
            outcomes.append(err.status)
    assert outcomes == [1, 500, 400, 1]  # the batch failed, was retried one by one
    assert engine.alive and len(engine.submit(image("later")).future.result(10)) == 1


def test_stop_answers_waiting_requests_with_503(held):
    engine, pipe = held
    engine.submit(image("blocker"))
    assert pipe.entered.wait(10)
    waiting = engine.submit(image("waiting"))
    engine.stop(timeout=0)  # the worker is still in the blocker's call
    for job in (waiting, None):
        with pytest.raises(APIError) as info:
            waiting.future.result(1) if job else engine.submit(image("after"))
        assert info.value.status == 503


def test_stream_ends_at_a_stop_string_without_sending_any_of_it(base):
    pipe = FakePipe(base)
    sent = []
    task = ChatTask([{"role": "user", "content": "hi"}], 1, 0, max_tokens=50, stop=("END",), stream=True)
    result = run_stream(pipe, task, sent.append, lambda: False)
    assert "".join(sent) == "Hello " == result.text and result.finish_reason == "stop"
