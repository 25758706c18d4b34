r"""Serving throughput: requests/s and p50/p95 latency of ``cheers serve`` with batching, against the same
requests served one at a time (a server with ``--max-batch 1``), in one run.

Starts the server as a subprocess on a free port on 127.0.0.1 (the bundled model by default), then for each
kind of request (images, chat with an image) and each number of concurrent clients, every client sends
``--requests-per-client`` requests one after the other; the wall time of the level gives requests/s, each
request's own time the latency percentiles. Then the same with a server that runs one request at a time,
and the ratios. Images are ``--steps`` sampling steps at the model's size; chat answers are greedy,
``--max-tokens`` long at most.

    python bench/bench_serve.py --quick                 # a few minutes on 2 CPU cores
    python bench/bench_serve.py --levels 1,8,32 --steps 4 --requests-per-client 2
    python bench/bench_serve.py --model /path/to/Cheers --device cuda --steps 20 --levels 1,8,32
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import httpx
import numpy as np
from PIL import Image

PROMPTS = ["two red circles", "a blue square at the top left", "three green triangles", "a yellow star"]


@dataclass
class Level:
    kind: str
    clients: int
    requests: int
    seconds: float
    latencies: list[float]
    failed: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m cheers serve`` in a subprocess, up once /health answers."""

    def __init__(self, args: argparse.Namespace, max_batch: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "cheers", "serve", "--model", args.model, "--device", args.device]
        argv += ["--port", str(self.port), "--max-batch", str(max_batch), "--max-queue", "1024"]
        argv += ["--max-steps", str(max(args.steps, 2)), "--max-tokens", str(args.max_tokens)]
        argv += ["--threads", str(args.threads)] if args.threads else []
        argv += [] if args.channels_last else ["--no-channels-last"]
        self.log = tempfile.NamedTemporaryFile(prefix="bench-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.5)
        self.proc.kill()
        raise RuntimeError(f"the server did not come up in 300 s; see {self.log.name}")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()
        os.unlink(self.log.name)


def chat_image_url() -> str:
    pixels = (np.random.default_rng(0).random((128, 128, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request(kind: str, i: int, args: argparse.Namespace, image_url: str) -> tuple[str, dict]:
    if kind == "images":
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "num_inference_steps": args.steps, "seed": i}
        return "/v1/images/generations", body
    question = ["How many shapes are there?", "What colour is the background?", "Describe the image."]
    content = [
        {"type": "text", "text": question[i % 3]},
        {"type": "image_url", "image_url": {"url": image_url}},
    ]
    body = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
    }
    return "/v1/chat/completions", body


async def run_level(url: str, kind: str, clients: int, args: argparse.Namespace, image_url: str) -> Level:
    latencies: list[float] = []
    failed = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(c: int, http: httpx.AsyncClient) -> None:
        nonlocal failed
        for r in range(args.requests_per_client):
            path, body = request(kind, c * args.requests_per_client + r, args, image_url)
            start = time.perf_counter()
            response = await http.post(url + path, json=body)
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                failed += 1

    async with httpx.AsyncClient(limits=limits, timeout=3600) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        seconds = time.perf_counter() - start
    return Level(kind, clients, clients * args.requests_per_client, seconds, latencies, failed)


def measure(args: argparse.Namespace, max_batch: int) -> dict[tuple[str, int], Level]:
    image_url = chat_image_url()
    out = {}
    with Server(args, max_batch) as server:
        for kind in args.kinds:  # warm-up: first calls allocate buffers
            path, body = request(kind, 0, args, image_url)
            httpx.post(server.url + path, json=body, timeout=600).raise_for_status()
        for kind in args.kinds:
            for clients in args.levels:
                level = asyncio.run(run_level(server.url, kind, clients, args, image_url))
                out[kind, clients] = level
                print(
                    f"  max-batch {max_batch:>3} {kind:6s} {clients:>3} clients: {level.rate:7.2f} req/s, "
                    f"p50 {level.percentile(50):6.2f} s, p95 {level.percentile(95):6.2f} s"
                    + (f", {level.failed} failed" if level.failed else ""),
                    flush=True,
                )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=4, help="sampling steps per image")
    ap.add_argument("--max-tokens", type=int, default=16, help="most new tokens per chat answer")
    ap.add_argument("--levels", default="1,8,32", help="concurrent clients, comma-separated")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--kinds", default="images,chat", help="images, chat or both")
    ap.add_argument("--max-batch", type=int, default=32, help="the batched server's --max-batch")
    ap.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    ap.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="both servers' --channels-last (default on, as cheers serve)",
    )
    ap.add_argument("--quick", action="store_true", help="1 request per client, 2 steps, 8 tokens")
    args = ap.parse_args()
    if args.quick:
        args.requests_per_client, args.steps, args.max_tokens = 1, 2, 8
    args.levels = [int(x) for x in args.levels.split(",")]
    args.kinds = [k.strip() for k in args.kinds.split(",")]
    if not set(args.kinds) <= {"images", "chat"}:
        ap.error(f"--kinds takes images and/or chat, got {args.kinds}")
    print(
        f"machine: {os.cpu_count()} CPU cores; model {args.model}, {args.steps} steps/image, "
        f"{args.max_tokens} tokens/answer, {args.requests_per_client} request(s) per client, "
        f"channels-last {'on' if args.channels_last else 'off'}"
    )
    batched = measure(args, args.max_batch)
    single = measure(args, 1)
    print()
    print(
        "| kind | clients | batched req/s | p50 s | p95 s | one-at-a-time req/s | p50 s | p95 s "
        "| req/s ratio | p95 ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind in args.kinds:
        for clients in args.levels:
            b, s = batched[kind, clients], single[kind, clients]
            print(
                f"| {kind} | {clients} | {b.rate:.2f} | {b.percentile(50):.2f} | {b.percentile(95):.2f} "
                f"| {s.rate:.2f} | {s.percentile(50):.2f} | {s.percentile(95):.2f} "
                f"| {b.rate / s.rate:.2f}x | {s.percentile(95) / b.percentile(95):.2f}x |"
            )
    failures = sum(level.failed for level in (*batched.values(), *single.values()))
    if failures:
        print(f"{failures} requests failed")
    print("req/s ratio: batched / one at a time; p95 ratio: one at a time / batched (> 1: batching helps)")


if __name__ == "__main__":
    main()
