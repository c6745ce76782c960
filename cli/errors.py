"""Errors the CLI shows to its user.

Every error carries what the API's error object carries (``code``, ``title``, ``message``, ``hint``), so the
CLI shows the server's words unchanged. ``main()`` is the one place that renders them (``Error: <title>`` on
stderr, or ``{"error": {...}}`` on stdout with ``--json``) and turns them into an exit status.

    CLIError                     base: code, title, message, hint, exit_code
    ├── APIError                 the server answered 4xx/5xx; ``status`` is the HTTP status
    ├── TransportError           no usable answer: connection refused, timeout, dropped stream
    │   └── ServerUnreachable    could not connect at all (hint: start the server)
    └── Unconfirmed              the build finished but the final status never came (exit 3, as the
                                 official client does, so scripts can tell "unknown" from "failed")

``retryable`` tells the streaming and polling loops which errors deserve another attempt: transport
failures and 5xx answers, never 4xx.
"""

from __future__ import annotations

from typing import Any


class CLIError(Exception):
    """A failure with a user-facing title, message and hint."""

    code: str = "error"
    exit_code: int = 1
    retryable: bool = False

    def __init__(self, title: str, message: str = "", *, hint: str = "", code: str | None = None) -> None:
        super().__init__(message or title)
        self.title = title
        self.message = message
        self.hint = hint
        if code is not None:
            self.code = code

    def as_json(self) -> dict[str, Any]:
        """The ``{"error": {...}}`` object printed on stdout in ``--json`` mode."""
        return {"error": {"code": self.code, "title": self.title, "message": self.message, "hint": self.hint}}


class APIError(CLIError):
    """The server answered with an error status."""

    code = "api_error"

    def __init__(
        self, status: int, title: str, message: str = "", *, hint: str = "", code: str | None = None
    ) -> None:
        super().__init__(title, message, hint=hint, code=code)
        self.status = status
        self.retryable = status >= 500


class TransportError(CLIError):
    """The request got no usable answer (timeout, dropped connection)."""

    code = "network_error"
    retryable = True


class ServerUnreachable(TransportError):
    """Nothing listens at the configured URL."""

    def __init__(self, url: str) -> None:
        super().__init__(
            "Cannot reach the server",
            f"Could not connect to {url}.",
            hint="Is the server running? Start it with `fastapi-deploy server`",
        )
        self.url = url


class Unconfirmed(CLIError):
    """The deployment's final status could not be read."""

    code = "unconfirmed"
    exit_code = 3
