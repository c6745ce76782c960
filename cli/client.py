"""A thin httpx wrapper around the control plane's ``/api/v1``.

It adds the base URL and the Bearer token, decodes JSON, and is the boundary where httpx's exceptions
and error responses become ``cli.errors`` (see ``error_from_response``). Redirects are not followed: the
API never redirects, and a 307 would mean a wrong path.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx

from cli.config import Config
from cli.errors import APIError, CLIError, ServerUnreachable, TransportError

TIMEOUT = httpx.Timeout(20.0)

_DEFAULT_TITLES = {
    400: "Invalid request",
    401: "Not logged in",
    403: "Permission denied",
    404: "Not found",
    409: "Conflict",
    413: "Too large",
    422: "Invalid input",
}
_DEFAULT_CODES = {
    400: "invalid_input",
    401: "invalid_token",
    403: "permission_denied",
    404: "not_found",
    409: "invalid_input",
    413: "too_large",
    422: "invalid_input",
}
LOGIN_HINT = "Run `fastapi-deploy login --url URL --token TOKEN`"


def error_from_response(status: int, body: Any) -> APIError:
    """Map an error answer to an APIError.

    Prefers our ``error`` object (title, message, hint); falls back to FastAPI's ``detail`` (a string, or
    the 422 list whose first ``msg`` is used, as the official client does).
    """
    error = body.get("error") if isinstance(body, dict) else None
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0].get("msg")
        detail = first.removeprefix("Value error, ") if isinstance(first, str) else None
    message = detail if isinstance(detail, str) else ""

    title = _DEFAULT_TITLES.get(status, "Server error" if status >= 500 else f"HTTP {status}")
    code = _DEFAULT_CODES.get(status, "api_error")
    hint = LOGIN_HINT if status == 401 else ""
    if isinstance(error, dict):
        title = _str(error.get("title")) or title
        message = _str(error.get("message")) or message
        hint = _str(error.get("hint")) or hint
        code = _str(error.get("code")) or code
    if not message and status >= 500:
        message = "The server failed to handle the request."
    return APIError(status, title, message, hint=hint, code=code)


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


class Client:
    """Calls ``<url>/api/v1``. Every method raises CLIError subclasses, never httpx exceptions."""

    def __init__(self, config: Config, *, transport: httpx.BaseTransport | None = None) -> None:
        self.url = config.url
        headers = {"User-Agent": f"fastapi-deploy/{_version()}"}
        if config.token:
            headers["Authorization"] = f"Bearer {config.token}"
        self._http = httpx.Client(
            base_url=f"{config.url}/api/v1",
            headers=headers,
            timeout=TIMEOUT,
            follow_redirects=False,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, path: str, *, params: Mapping[str, Any] | None = None) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, *, json: Any = None, timeout: float | None = None) -> Any:
        return self.request("POST", path, json=json, timeout=timeout)

    def put(self, path: str, *, json: Any = None) -> Any:
        return self.request("PUT", path, json=json)

    def patch(self, path: str, *, json: Any = None) -> Any:
        return self.request("PATCH", path, json=json)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        timeout: float | None = None,
    ) -> Any:
        """Send one request; returns the decoded JSON body (``None`` for an empty one)."""
        with self._translate():
            response = self._http.request(
                method,
                path,
                params=params,
                json=json,
                timeout=httpx.Timeout(timeout) if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        if response.is_error or response.is_redirect:
            raise error_from_response(response.status_code, _decode(response))
        return _decode(response)

    @contextmanager
    def stream_lines(
        self, path: str, *, params: Mapping[str, Any] | None = None, read_timeout: float = 60.0
    ) -> Iterator[Iterator[str]]:
        """Open a streaming GET and yield an iterator over its non-blank lines (NDJSON).

        Errors while connecting and while reading are translated the same way as ``request``'s.
        """
        timeout = httpx.Timeout(TIMEOUT.connect, read=read_timeout)
        with self._translate(), self._http.stream("GET", path, params=params, timeout=timeout) as response:
            if response.is_error or response.is_redirect:
                response.read()
                raise error_from_response(response.status_code, _decode(response))
            yield self._lines(response)

    def _lines(self, response: httpx.Response) -> Iterator[str]:
        with self._translate():
            for line in response.iter_lines():
                if line.strip():
                    yield line

    @contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except httpx.ConnectError as exc:
            raise ServerUnreachable(self.url) from exc
        except httpx.TimeoutException as exc:
            raise TransportError(
                "The server timed out", f"No answer from {self.url} in time.", hint="Try again later."
            ) from exc
        except httpx.TransportError as exc:
            raise TransportError("Connection to the server failed", str(exc) or type(exc).__name__) from exc


def _version() -> str:
    try:
        return importlib.metadata.version("fastapi-deploy")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


def _decode(response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        if response.is_error:
            return None
        raise CLIError(
            "Unexpected answer from the server",
            f"{response.request.method} {response.request.url} did not return JSON.",
            hint="Check that the URL points at a fastapi-deploy control plane.",
            code="api_error",
        ) from None
