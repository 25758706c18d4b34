"""The Ray Serve deployment answers like ``cheers serve`` (skipped where ray is not installed)."""

from __future__ import annotations

import socket

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from cheers.serve.config import ServeConfig  # noqa: E402
from cheers.serve.ray_app import build_app  # noqa: E402

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_serve_deployment_answers_health_and_an_image():
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(model_name="cheers-tiny-shapes", max_steps=4)
        serve.run(build_app("default", config=config, device="cpu"), route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/health", timeout=60).json()["status"] == "ok"
        out = httpx.post(
            f"{url}/v1/images/generations",
            json={"prompt": "a red circle", "num_inference_steps": 2},
            timeout=120,
        )
        assert out.status_code == 200 and len(out.json()["data"]) == 1
    finally:
        serve.shutdown()
        ray.shutdown()
