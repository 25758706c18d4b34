"""Every failure as OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``.

Request validation (pydantic), unknown routes, wrong methods and unexpected exceptions all answer in this
shape with a fitting status; no traceback reaches a client (it is logged on the server).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)

# OpenAI's error types by status
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """A failure to answer with ``status`` and OpenAI's error body.

    Args:
        status: the HTTP status.
        message: what went wrong, for the client.
        param: the request field at fault, if any.
        code: a machine-readable code (e.g. ``"invalid_api_key"``, ``"queue_full"``).
        type: the error type (default: by status, as OpenAI names them).
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error(errors: list[dict[str, Any]], status: int = 422) -> APIError:
    """Pydantic errors -> one APIError naming the first bad field (``messages.0.content``) and the
    messages."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    parts, param = [], None
    for e in errors[:5]:
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "form")]
        where = ".".join(loc)
        param = param or where or None
        parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid")))
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return APIError(status, "; ".join(parts) + more, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure of ``app`` with the error JSON."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, err: RequestValidationError) -> JSONResponse:
        return validation_error(list(err.errors())).response()

    @app.exception_handler(ValidationError)
    async def _validation(request: Request, err: ValidationError) -> JSONResponse:
        return validation_error(list(err.errors())).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException) -> JSONResponse:
        message = str(err.detail) if err.detail else "error"
        if err.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif err.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return APIError(err.status_code, message, headers=dict(err.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error ({type(err).__name__})").response()
