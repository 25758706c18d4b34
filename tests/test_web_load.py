"""The served web demo under load and under hostile input: a real Gradio server on 127.0.0.1, driven by
concurrent ``gradio_client`` sessions and raw HTTP.

Checks that the model queue is bounded as configured (``max_concurrency`` calls at once, at most
``max_queue`` waiting, the rest turned away), that concurrent sessions do not mix their results, that
oversized uploads are refused, and that every file the server writes stays inside its cache folder
whatever the upload name, prompt or requested path.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_helpers import tiny_pipeline

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")
httpx = pytest.importorskip("httpx")

from gradio.route_utils import API_PREFIX  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

from cheers.web import launch  # noqa: E402

MAX_CONCURRENCY = 2
HOLD_S = 0.1  # each model call keeps its slot at least this long, so concurrent sessions overlap


class InFlight:
    """Counts model calls running at once (the demo's shared queue should cap them)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = self.peak = self.total = 0

    def __enter__(self) -> None:
        with self.lock:
            self.now += 1
            self.total += 1
            self.peak = max(self.peak, self.now)
        time.sleep(HOLD_S)

    def __exit__(self, *exc) -> None:
        with self.lock:
            self.now -= 1


def counted(pipe, meter: InFlight):
    """Wrap the pipeline's model calls (generate, edit, streamed chat) with the meter."""
    generate, edit, chat = pipe.generate, pipe.edit, pipe.chat

    def timed(fn):
        def call(*args, **kwargs):
            with meter:
                return fn(*args, **kwargs)

        return call

    def streamed(*args, **kwargs):
        with meter:
            yield from chat(*args, **kwargs)

    pipe.generate, pipe.edit, pipe.chat = timed(generate), timed(edit), streamed
    return pipe


@pytest.fixture(scope="module")
def meter():
    return InFlight()


@pytest.fixture(scope="module")
def pipe(meter):
    return counted(tiny_pipeline(), meter)


@pytest.fixture(scope="module")
def server(pipe, meter, tmp_path_factory):
    """A served demo whose Gradio cache sits three folders deep in a fresh temp dir (so an escape shows)."""
    root = tmp_path_factory.mktemp("web-load")
    cache = root / "srv" / "nested" / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(cache))
        demo = launch(
            pipe,
            port=None,
            prevent_thread_lock=True,
            quiet=True,
            max_new_tokens=8,
            max_file_size="1mb",
            max_concurrency=MAX_CONCURRENCY,
            max_queue=16,
        )
        try:
            assert demo.local_url.startswith("http://127.0.0.1:")
            yield {"demo": demo, "url": demo.local_url.rstrip("/"), "root": root, "cache": cache}
        finally:
            demo.close()


def photo(path: Path, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(
        path
    )
    return path


def run_sessions(url: str, jobs: list, download_dir: Path) -> list:
    """Run every job (a function of a fresh Client) in its own thread and session, all released at once
    once every client is connected; returns each job's result or exception."""
    results: list = [None] * len(jobs)
    start = threading.Barrier(len(jobs), timeout=60)

    def one(i: int) -> None:
        try:
            client = Client(url, verbose=False, download_files=str(download_dir / f"s{i}"))
            start.wait()
            results[i] = jobs[i](client)
        except Exception as err:  # noqa: BLE001 - the test inspects what each session got
            results[i] = err

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a session hung"
    return results


@pytest.mark.slow
def test_concurrent_sessions_all_complete_within_the_concurrency_bound(server, meter, tmp_path):
    calls_before = meter.total
    meter.peak = 0
    picture = photo(tmp_path / "in" / "photo.png")

    def generate(seed):
        return lambda c: c.predict("two red circles", "", 1, 2.0, 0.5, seed, 64, 96, api_name="/on_generate")

    def chat(c):
        return c.predict("What is in the picture?", handle_file(str(picture)), 6, 1.0, 3, api_name="/chat")

    def edit(c):
        return c.predict(handle_file(str(picture)), "make it blue", 2, 2.0, 0, api_name="/edit")

    jobs = [generate(7), generate(7), generate(8), chat, chat, edit]
    results = run_sessions(server["url"], jobs, tmp_path / "downloads")
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors

    images = []
    for (path, settings), seed in zip(results[:3], (7, 7, 8)):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (64, 96)
            images.append(np.asarray(im.convert("RGB")))
        assert settings["prompt"] == "two red circles" and settings["seed"] == seed
    assert np.array_equal(images[0], images[1])  # same seed in two concurrent sessions: same image
    assert not np.array_equal(images[0], images[2])  # sessions do not share a generator
    for display, textbox, image in results[3:5]:
        assert (
            [m["role"] for m in display] == ["user", "user", "assistant"] and textbox == "" and image is None
        )
        assert display[-1][
            "content"
        ]  # an answer (or the demo's empty-answer text), never the "…" placeholder
    with Image.open(results[5]) as edited:
        assert edited.size == (128, 128)

    assert meter.total - calls_before == len(jobs)
    assert meter.peak == MAX_CONCURRENCY  # the six sessions overlapped, and never more than the bound ran


@pytest.mark.slow
def test_a_full_queue_turns_visitors_away_and_the_server_recovers(pipe, meter, tmp_path, monkeypatch):
    meter.peak = 0
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "cache"))
    demo = launch(pipe, port=None, prevent_thread_lock=True, quiet=True, max_concurrency=1, max_queue=1)
    try:
        url = demo.local_url.rstrip("/")
        job = lambda c: c.predict("a blue square", "", 1, 2.0, 0.5, 0, 64, 64, api_name="/on_generate")  # noqa: E731
        results = run_sessions(url, [job] * 6, tmp_path / "downloads")
        refused = [r for r in results if isinstance(r, Exception)]
        served = [r for r in results if not isinstance(r, Exception)]
        assert refused and all("Queue is full" in str(r) for r in refused)
        assert served and all(Path(path).is_file() for path, _ in served)
        assert meter.peak == 1
        path, settings = job(Client(url, verbose=False, download_files=str(tmp_path / "after")))
        assert Path(path).is_file() and settings["seed"] == 0  # the burst left the server working
    finally:
        demo.close()


def test_oversized_uploads_are_refused(server, tmp_path):
    url, cache = server["url"], server["cache"]
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * (2 << 20))
    client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # the client checks first
        client.predict(handle_file(str(big)), "make it blue", 2, 2.0, 0, api_name="/edit")
    refused = httpx.post(
        f"{url}{API_PREFIX}/upload", files={"files": ("big.png", big.read_bytes())}, timeout=30
    )
    assert refused.status_code == 413  # a client that does not check is refused by the server
    assert not any(
        p.stat().st_size > 1 << 20 for p in cache.rglob("*") if p.is_file()
    )  # nothing partial kept
    small = photo(tmp_path / "small.png")
    edited = client.predict(handle_file(str(small)), "make it blue", 2, 2.0, 0, api_name="/edit")
    assert Image.open(edited).size == (128, 128)  # the server still works


def _call(url: str, api: str, data: list) -> str:
    """Run an endpoint over Gradio's plain HTTP API; returns the event stream's text."""
    started = httpx.post(f"{url}{API_PREFIX}/call/{api}", json={"data": data}, timeout=30)
    assert started.status_code == 200, started.text
    return httpx.get(f"{url}{API_PREFIX}/call/{api}/{started.json()['event_id']}", timeout=60).text


def test_no_file_is_written_or_read_outside_the_cache(server, tmp_path):
    url, root, cache = server["url"], server["root"], server["cache"]
    escape = "escaped-3f9c"
    png = photo(tmp_path / "p.png").read_bytes()

    # an upload named to climb out of the cache lands inside it, under its base name
    uploaded = httpx.post(
        f"{url}{API_PREFIX}/upload", files={"files": (f"../../../{escape}.png", png)}, timeout=30
    )
    assert uploaded.status_code == 200, uploaded.text
    stored = Path(uploaded.json()[0]).resolve()
    assert stored.is_relative_to(cache.resolve()) and stored.name == f"{escape}.png"

    # that upload can be edited; paths outside the cache are refused, and nothing of theirs comes back
    file = lambda path: {"path": str(path), "meta": {"_type": "gradio.FileData"}}  # noqa: E731
    ok = _call(url, "edit", [file(stored), "make it blue", 2, 2.0, 0])
    assert "event: complete" in ok
    secret = tmp_path / "secret.png"
    secret.write_bytes(png)
    for path in (
        "/etc/passwd",
        secret,
        cache / ".." / ".." / ".." / "secret.png",
        f"{cache}/../../{escape}.png",
    ):
        answer = _call(url, "edit", [file(path), "make it blue", 2, 2.0, 0])
        assert "event: error" in answer and "event: complete" not in answer, path
        assert "root:" not in answer

    # a prompt shaped like a path names no file: generated images get gradio's hashed names in the cache
    prompt = f"../../../{escape}\x00/../../etc/{escape}.png"
    answer = _call(url, "on_generate", [prompt, f"../{escape}", 1, 2.0, 0.5, 0, 64, 64])
    assert "event: complete" in answer

    written = [p for p in root.rglob("*") if p.is_file()]
    assert written and all(p.resolve().is_relative_to(cache.resolve()) for p in written), written
    outside = [
        p for p in tmp_path.parent.rglob(f"*{escape}*") if not p.resolve().is_relative_to(cache.resolve())
    ]
    assert not outside, outside
    assert not Path(f"/etc/{escape}.png").exists() and not Path(os.sep, f"{escape}.png").exists()
