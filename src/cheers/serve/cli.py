"""The ``cheers serve`` command: the OpenAI-compatible server on uvicorn.

Registering the command imports nothing heavy: it only checks that the ``serve`` extra is installed (so
``cheers --help`` stays fast, and without the extra ``cheers serve`` says how to install it).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from pathlib import Path

from cheers.choices import QUANTIZATIONS
from cheers.cli import add_lora_argument  # light: no torch, no peft
from cheers.serve.config import API_KEY_ENV, DEFAULT_HOST, DEFAULT_PORT, ServeConfig

logger = logging.getLogger(__name__)

REQUIRED = ("fastapi", "uvicorn", "multipart", "prometheus_client")
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def served_name(model: str) -> str:
    """The id a model is served under: the bundled model's name, a hub id as is, a directory's name."""
    if model == "default":
        return "cheers-tiny-shapes"
    path = Path(model)
    return path.resolve().name if path.is_dir() else model


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        model_name=args.served_model_name or served_name(args.model),
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        batch_wait_s=args.batch_wait_ms / 1000,
        request_timeout_s=args.timeout,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_image_pixels=args.max_image_pixels,
        max_n=args.max_n,
        max_size=args.max_size,
        max_steps=args.max_steps,
        max_tokens=args.max_tokens,
        default_max_tokens=min(args.default_max_tokens, args.max_tokens),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from cheers.serve.app import create_app, engine_loader

    config = config_from_args(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.host not in _LOCAL_HOSTS:
        logger.warning(
            "serving beyond this machine (host=%s)%s",
            args.host,
            "" if config.api_key else f" WITHOUT an API key: set --api-key or {API_KEY_ENV}",
        )
    app = create_app(
        config,
        load_engine=engine_loader(
            args.model,
            config,
            device=args.device,
            dtype=args.dtype,
            quantization=args.quantization,
            loras=args.lora,
            channels_last=args.channels_last,
        ),
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        access_log=args.verbose,
        timeout_graceful_shutdown=5,
    )
    return 0


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in [0, 65535], got {value}")
    return value


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``cheers serve``; raises ``ModuleNotFoundError`` when the ``serve`` extra is missing (the CLI
    then lists the command as unavailable, naming the fix)."""
    for name in REQUIRED:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    d = ServeConfig()
    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server for chat and images (batched), on 127.0.0.1",
        description="Serve one model over an OpenAI-compatible API: /v1/chat/completions, "
        "/v1/images/generations, /v1/images/edits, /v1/models, /health, /metrics. Concurrent requests "
        "are batched onto the model. See docs/serving.md.",
    )
    p.add_argument(
        "--model", default="default", help="checkpoint directory or hub id (default: the bundled model)"
    )
    p.add_argument("--device", default="auto", help="cpu | cuda | mps | auto")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=None,
        help="store the LLM's and flow heads' weights in fewer bits (torchao; default: float): int8 on any "
        "device, float8 on CUDA >= 8.9, int4 on CUDA >= 8.0 with bfloat16",
    )
    add_lora_argument(p)
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="NHWC memory format for the VAE decoders' and ViT's convolutions (default on: faster with "
        "oneDNN / cuDNN, above all for batches; same outputs within the parity tolerance)",
    )
    p.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}; 0.0.0.0: the network)"
    )
    p.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set; /health stays open)",
    )
    p.add_argument(
        "--served-model-name", default=None, help="the model id clients name (default: from --model)"
    )
    g = p.add_argument_group("batching and queueing")
    g.add_argument(
        "--max-batch", type=_positive(int), default=d.max_batch, help="rows (images/answers) per model call"
    )
    g.add_argument(
        "--max-queue", type=_positive(int), default=d.max_queue, help="waiting requests; more get 429"
    )
    g.add_argument(
        "--batch-wait-ms",
        type=float,
        default=d.batch_wait_s * 1000,
        help="after a request arrives, wait this long for others to batch with it",
    )
    g.add_argument(
        "--timeout",
        type=_positive(float),
        default=d.request_timeout_s,
        help="seconds before a request gets 504",
    )
    g.add_argument(
        "--threads", type=_positive(int), default=None, help="torch CPU threads (default: torch's)"
    )
    g = p.add_argument_group("limits (each refused with an OpenAI-style error)")
    g.add_argument(
        "--max-body-mb",
        type=_positive(float),
        default=d.max_body_bytes / 2**20,
        help="request body cap (413)",
    )
    g.add_argument(
        "--max-image-pixels",
        type=_positive(int),
        default=d.max_image_pixels,
        help="input image width x height",
    )
    g.add_argument("--max-n", type=_positive(int), default=d.max_n, help="images or choices per request")
    g.add_argument("--max-size", type=_positive(int), default=d.max_size, help="largest generated side (px)")
    g.add_argument("--max-steps", type=_positive(int), default=d.max_steps, help="sampling steps per request")
    g.add_argument("--max-tokens", type=_positive(int), default=d.max_tokens, help="new tokens per answer")
    g.add_argument(
        "--default-max-tokens",
        type=_positive(int),
        default=d.default_max_tokens,
        help="new tokens when a request does not say",
    )
    p.set_defaults(func=cmd_serve)
    return p
