"""Errors of the control plane's API.

    APIError(status, code, title, message, hint)      rendered as {"detail": message, "error": {...}}
    ├── NotFound          404  (also "not yours": other teams never learn a resource exists)
    ├── Unauthorized      401  (missing, unknown, expired or revoked token)
    ├── Forbidden         403  (authenticated, but this token may not do this)
    │   └── QuotaExceeded 403  (the team's quota does not allow it; 403 because the official CLI
    │                           prints ``detail`` for 403 but only a generic text for 429)
    ├── Conflict          409  (the resource is not in a state that allows it)
    ├── TooLarge          413  (an upload over the server's or the team's limit)
    ├── TooManyRequests   429  (rate limited; ``Retry-After`` says when to try again)
    └── BadRequest        400

``detail`` keeps the official FastAPI Cloud CLI working (it prints ``detail``); ``error`` carries the
title and hint our own CLI and dashboard show.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    status_code = 400
    code = "bad_request"
    title = "Bad request"

    def __init__(
        self,
        message: str,
        *,
        hint: str = "",
        title: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.headers = headers
        if title is not None:
            self.title = title
        if code is not None:
            self.code = code

    def body(self) -> dict[str, object]:
        return {
            "detail": self.message,
            "error": {"code": self.code, "title": self.title, "message": self.message, "hint": self.hint},
        }


class BadRequest(APIError):
    pass


class NotFound(APIError):
    status_code = 404
    code = "not_found"
    title = "Not found"


class Unauthorized(APIError):
    status_code = 401
    code = "invalid_token"
    title = "Not signed in"


class Forbidden(APIError):
    status_code = 403
    code = "permission_denied"
    title = "Permission denied"


class QuotaExceeded(Forbidden):
    code = "quota_exceeded"
    title = "Quota exceeded"


class Conflict(APIError):
    status_code = 409
    code = "conflict"
    title = "Conflict"


class TooLarge(APIError):
    status_code = 413
    code = "too_large"
    title = "Too large"


class TooManyRequests(APIError):
    status_code = 429
    code = "rate_limited"
    title = "Too many requests"

    def __init__(self, message: str, *, retry_after: float, hint: str = "", title: str | None = None) -> None:
        seconds = max(1, int(retry_after + 0.999))
        super().__init__(
            message,
            hint=hint or f"Try again in {seconds} s.",
            title=title,
            headers={"Retry-After": str(seconds)},
        )
        self.retry_after = seconds


class ErrorInfo(BaseModel):
    code: str
    title: str
    message: str
    hint: str


class ErrorBody(BaseModel):
    """What every error of ours looks like (the OAuth device-token errors carry ``error`` as a string)."""

    detail: str
    error: ErrorInfo | str


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, all with :class:`ErrorBody`."""
    return {status: {"model": ErrorBody} for status in statuses}


async def api_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


_HTTP_ERRORS = {
    400: (
        "bad_request",
        "Bad request",
        "Check the request body: it must be valid JSON of the documented shape.",
    ),
    404: ("not_found", "Not found", "Check the path; API paths match exactly, trailing slashes included."),
    405: ("method_not_allowed", "Method not allowed", "See /api/docs for the methods of this path."),
}


async def http_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (unknown path, wrong method, unreadable body) in our error shape too."""
    assert isinstance(exc, StarletteHTTPException)
    code, title, hint = _HTTP_ERRORS.get(exc.status_code, ("http_error", f"HTTP {exc.status_code}", ""))
    message = exc.detail if isinstance(exc.detail, str) else title
    body = {"detail": message, "error": {"code": code, "title": title, "message": message, "hint": hint}}
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))
