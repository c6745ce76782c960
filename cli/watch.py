"""Following a deployment: its build log (NDJSON), then its status until it is terminal.

The protocol is the official client's (fastapi-cloud-api.md §4.6-4.7):

* ``GET /deployments/{id}/build-logs`` streams ``message``/``heartbeat`` lines and ends with ``complete``,
  ``failed`` or ``timeout``. ``timeout`` means "reconnect": we do, after 0.5 s, with ``?last_id=`` so
  nothing is repeated. A dropped connection, an early end or a 5xx is retried with backoff (1 s, 2 s),
  at most 3 failed connections in a row. Unlike the official client we keep ``last_id`` across those
  retries too, since the server resumes strictly after it: no duplicated lines.
* After ``complete``, ``GET /deployments/{id}`` every 0.5 s (for up to 180 s) until the status is
  terminal, reporting each change. 5 transport errors in a row, or the deadline, mean ``Unconfirmed``.

Sleeping and the clock are parameters so the policy can be driven without waiting.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import typer
from rich.text import Text

from cli import statuses
from cli.client import Client
from cli.errors import CLIError, TransportError, Unconfirmed
from cli.output import Output

BUILD_LOG_READ_TIMEOUT = 60.0  # the server sends heartbeats well within this
RECONNECT_DELAY = 0.5
MAX_STREAM_FAILURES = 3
POLL_INTERVAL = 0.5
POLL_TIMEOUT = 180.0
MAX_POLL_ERRORS = 5

BuildEnd = Literal["complete", "failed"]
Deployment = dict[str, Any]


def backoff(failures: int) -> float:
    """Seconds to wait after the ``failures``-th consecutive failure: 1, 2, 4, ... capped at 30."""
    return float(min(2 ** max(failures - 1, 0), 30))


def parse_build_line(line: str) -> dict[str, Any] | None:
    """A build-log line as a dict with a string ``type``; None for lines to skip (malformed, untyped)."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        return None
    if data["type"] == "message" and not isinstance(data.get("message"), str):
        return None
    return data


@dataclass
class Watcher:
    client: Client
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    last_id: str | None = field(default=None, init=False)

    def build_log(self, deployment_id: str, on_message: Callable[[str], None]) -> BuildEnd:
        """Stream the build log to ``on_message`` until it says ``complete`` or ``failed``."""
        failures = 0
        while True:
            try:
                end = self._read_build_log(deployment_id, on_message)
            except CLIError as err:
                if not err.retryable:
                    raise
                failures += 1
                if failures >= MAX_STREAM_FAILURES:
                    raise TransportError(
                        "Build log streaming failed",
                        f"{err.title}. {err.message}".strip(),
                        hint=f"Check the deployment with `fastapi-deploy deployments` (id {deployment_id}).",
                    ) from err
                self.sleep(backoff(failures))
                continue
            if end is None:  # timeout: the server capped this connection's lifetime
                failures = 0
                self.sleep(RECONNECT_DELAY)
                continue
            return end

    def _read_build_log(self, deployment_id: str, on_message: Callable[[str], None]) -> BuildEnd | None:
        params = {"last_id": self.last_id} if self.last_id else None
        with self.client.stream_lines(
            f"/deployments/{deployment_id}/build-logs", params=params, read_timeout=BUILD_LOG_READ_TIMEOUT
        ) as lines:
            for line in lines:
                data = parse_build_line(line)
                if data is None:
                    continue
                if isinstance(data.get("id"), str):
                    self.last_id = data["id"]
                kind = data["type"]
                if kind == "message":
                    on_message(data["message"])
                elif kind == "timeout":
                    return None
                elif kind in ("complete", "failed"):
                    end: BuildEnd = kind
                    return end
        raise TransportError("The build log stream ended early", "The server closed it without a final line.")

    def until_terminal(
        self, deployment_id: str, on_status: Callable[[str], None], *, dashboard_url: str | None = None
    ) -> Deployment:
        """Poll the deployment until its status is terminal; returns it. Raises Unconfirmed on timeout."""
        deadline = self.clock() + POLL_TIMEOUT
        errors = 0
        seen: str | None = None
        hint = f"Check the dashboard: {dashboard_url}" if dashboard_url else ""
        while True:
            try:
                deployment: Deployment = self.client.get(f"/deployments/{deployment_id}")
            except CLIError as err:
                if not err.retryable:
                    raise
                errors += 1
                if errors >= MAX_POLL_ERRORS:
                    raise Unconfirmed(
                        "Could not confirm the deployment status", f"{err.title}. {err.message}", hint=hint
                    ) from err
                delay = backoff(errors)
            else:
                errors = 0
                status = str(deployment.get("status"))
                if status != seen:
                    on_status(status)
                    seen = status
                if statuses.is_terminal(status):
                    return deployment
                delay = POLL_INTERVAL
            if self.clock() + delay > deadline:
                raise Unconfirmed(
                    "Could not confirm the deployment status",
                    f"Still {statuses.label(seen or 'unknown')} after {POLL_TIMEOUT:.0f} s.",
                    hint=hint,
                )
            self.sleep(delay)


@dataclass(frozen=True)
class Finished:
    """Where a followed deployment ended."""

    deployment: Deployment
    """Its last ``GET /deployments/{id}``."""
    build_failed: bool = False
    """The build log ended with ``failed`` (the status may lag behind; the build did fail)."""

    @property
    def ok(self) -> bool:
        return not self.build_failed and statuses.is_success(str(self.deployment.get("status")))


def follow(client: Client, out: Output, deployment: Deployment, *, build_log: bool) -> Finished:
    """Print a deployment's build log (when it builds) and status changes until it is terminal."""
    watcher = Watcher(client)
    deployment_id = str(deployment["id"])
    if build_log:
        out.say("Waiting for the build…", style="dim")
        end = watcher.build_log(deployment_id, lambda message: out.say(Text.from_ansi(message.rstrip())))
        if end == "failed":
            return Finished(client.get(f"/deployments/{deployment_id}"), build_failed=True)
        out.say("Build complete.", style="bold")

    def on_status(status: str) -> None:
        if not statuses.is_terminal(status):
            out.say(f"{statuses.label(status)}…", style="dim")

    final = watcher.until_terminal(deployment_id, on_status, dashboard_url=deployment.get("dashboard_url"))
    return Finished(final)


def result(deployment: Deployment, *, app_slug: str, fallback_url: str | None = None) -> dict[str, Any]:
    """The one JSON object ``push --json`` and ``rollback --json`` print."""
    return {
        "deployment_id": deployment.get("id"),
        "app_id": deployment.get("app_id"),
        "app": app_slug,
        "status": deployment.get("status"),
        "url": deployment.get("url") or fallback_url,
        "dashboard_url": deployment.get("dashboard_url"),
        "failure": deployment.get("failure"),
    }


def failure_error(deployment: Deployment) -> CLIError:
    """The deployment's ``failure`` (title, message, hint) as an error; a generic one when it has none."""
    status = str(deployment.get("status"))
    failure = deployment.get("failure")
    dashboard = deployment.get("dashboard_url")
    fallback_hint = f"Build logs: {dashboard}" if dashboard else ""
    if isinstance(failure, dict):
        return CLIError(
            str(failure.get("error_title") or f"Deployment failed: {statuses.label(status)}"),
            str(failure.get("error_message") or ""),
            hint=str(failure.get("error_hint") or fallback_hint),
            code=str(failure.get("error_code") or status),
        )
    return CLIError(
        f"Deployment failed: {statuses.label(status)}",
        f"Deployment {deployment.get('id')} ended in status {status}.",
        hint=fallback_hint,
        code=status,
    )


def report(out: Output, finished: Finished, *, app_slug: str, fallback_url: str | None = None) -> None:
    """Finish ``push``/``rollback``: the JSON object, or "Live at ..." / the failure. Exit 1 on failure."""
    deployment = finished.deployment
    if out.json_mode:
        out.emit(result(deployment, app_slug=app_slug, fallback_url=fallback_url))
        if not finished.ok:
            raise typer.Exit(1)
        return
    if not finished.ok:
        raise failure_error(deployment)
    out.say(Text.assemble("Live at ", (str(deployment.get("url") or fallback_url), "bold green")))
