"""Errors of the control plane's API.

    APIError(status, code, title, message, hint)      rendered as {"detail": message, "error": {...}}
    ├── NotFound          404  (also "not yours": other teams never learn a resource exists)
    ├── Unauthorized      401  (missing, unknown, expired or revoked token)
    ├── Forbidden         403  (authenticated, but this token may not do this)
    ├── Conflict          409  (the resource is not in a state that allows it)
    ├── TooLarge          413
    └── BadRequest        400

``detail`` keeps the official FastAPI Cloud CLI working (it prints ``detail``); ``error`` carries the
title and hint our own CLI and dashboard show.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse


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


class Conflict(APIError):
    status_code = 409
    code = "conflict"
    title = "Conflict"


class TooLarge(APIError):
    status_code = 413
    code = "too_large"
    title = "Too large"


async def api_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)
