"""The server's settings: batching, queueing, timeouts and the limits on what one request may ask for."""

from __future__ import annotations

from dataclasses import dataclass, fields

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
API_KEY_ENV = "CHEERS_API_KEY"


@dataclass
class ServeConfig:
    """Everything ``cheers serve`` can be told, with safe defaults.

    Args:
        model_name: the id ``GET /v1/models`` lists and requests' ``model`` must name (None: any is taken).
        api_key: when set, every endpoint but ``/health`` needs ``Authorization: Bearer <key>``.
        max_batch: most rows (images or answers) in one pipeline call; 1 serves requests one at a time.
        max_queue: most requests waiting for the model; more are answered 429 with ``Retry-After``.
        batch_wait_s: after the first request arrives, how long the worker waits for others to batch with.
        request_timeout_s: a request not answered within this is dropped and answered 504.
        max_body_bytes: larger request bodies are refused with 413.
        max_image_pixels: larger input images (width x height) are refused with 400.
        max_images_per_request: most images in one chat request.
        max_n: most images (or chat choices) one request may ask for.
        max_size: largest image side, in pixels, a request may ask for.
        max_steps: most sampling steps a request may ask for.
        max_tokens: most new tokens a chat answer may ask for.
        default_max_tokens: new tokens when a request does not say.
        max_prompt_chars: longest prompt, instruction or message text.
    """

    model_name: str | None = None
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    batch_wait_s: float = 0.002
    request_timeout_s: float = 300.0
    max_body_bytes: int = 20 * 2**20
    max_image_pixels: int = 16_000_000
    max_images_per_request: int = 4
    max_n: int = 4
    max_size: int = 1024
    max_steps: int = 100
    max_tokens: int = 1024
    default_max_tokens: int = 256
    max_prompt_chars: int = 8000

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("model_name", "api_key"):
                if value is not None and (not isinstance(value, str) or not value):
                    raise ValueError(f"{f.name} must be a non-empty string or None, got {value!r}")
                continue
            if f.name.endswith("_s"):  # durations: a positive number of seconds (no lingering: 0)
                ok = isinstance(value, (int, float)) and (
                    value > 0 or (f.name == "batch_wait_s" and value == 0)
                )
                kind = "a number of seconds > 0" if f.name != "batch_wait_s" else "a number of seconds >= 0"
            else:
                ok, kind = isinstance(value, int) and value >= 1, "an integer >= 1"
            if isinstance(value, bool) or not ok:
                raise ValueError(f"{f.name} must be {kind}, got {value!r}")
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must not exceed "
                f"max_tokens ({self.max_tokens})"
            )
