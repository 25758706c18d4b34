"""Plain ASGI middleware: per-endpoint metrics (outermost), then bearer auth and the body-size cap.

Auth and the size cap run before any route reads the body, so an unauthenticated or oversized request is
refused without the server holding it in memory (a declared ``Content-Length`` over the cap is refused
before a byte of the body is read).
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from cheers.serve.errors import APIError
from cheers.serve.metrics import Metrics

OPEN_PATHS = ("/health",)  # answered without a key (load balancers probe it)


async def _send_error(send: Any, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class GuardMiddleware:
    """Bearer auth (``hmac.compare_digest``) when ``api_key`` is set, and at most ``max_body_bytes`` of body.

    The body is read here in full (it is capped) and handed on to the app; what the client sends after it
    (its disconnect) still reaches the app.
    """

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.key is not None and scope.get("path") not in OPEN_PATHS:
            error = self._check_key(_header(scope, b"authorization"))
            if error is not None:
                return await _send_error(send, error)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await _send_error(send, self._too_large())
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None  # the client left before its body arrived: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await _send_error(send, self._too_large())
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _check_key(self, authorization: str | None) -> APIError | None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return APIError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                code="missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(token.strip().encode(), self.key or b""):
            return APIError(
                401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
            )
        return None

    def _too_large(self) -> APIError:
        return APIError(
            413, f"the request body is larger than {self.max_body_bytes:,} bytes", code="body_too_large"
        )


class MetricsMiddleware:
    """Counts every response by endpoint and status and times it to its last byte."""

    def __init__(self, app: Any, *, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), 0
        observed = False

        async def timed_send(message: dict) -> None:
            nonlocal status, observed
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                observed = True
                self.metrics.observe_response(scope["path"], status, time.monotonic() - start)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, timed_send)
        finally:
            self.metrics.in_flight.dec()
            if not observed:  # the client left before the response ended: nginx's 499
                self.metrics.observe_response(scope["path"], 499, time.monotonic() - start)
