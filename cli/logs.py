"""``fastapi-deploy logs APP``: an app's log lines, optionally followed live.

``GET /apps/{id}/logs/stream`` answers NDJSON: entries ``{timestamp, level, message, ...}``, heartbeats
(skipped) and ``{"type": "error"}`` (fatal). A connection that fails before the first entry is retried
(1 s, 2 s; 3 attempts, as the official client); once lines were printed, a retry would print the tail again,
so a lost connection is reported instead.
"""

from __future__ import annotations

import enum
import json
import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.text import Text

from cli.errors import CLIError, TransportError
from cli.output import JsonOption, Output
from cli.resolve import AppArgument, resolve_app
from cli.session import use
from cli.watch import backoff

app = typer.Typer()

MAX_ATTEMPTS = 3
_SINCE = re.compile(r"^\d+[smhd]$")
LEVEL_STYLES = {
    "debug": "blue",
    "info": "cyan",
    "warning": "yellow",
    "warn": "yellow",
    "error": "red",
    "critical": "magenta",
    "fatal": "magenta",
}


class Level(enum.StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"
    critical = "critical"


def _check_since(value: str) -> str:
    if not _SINCE.match(value):
        raise typer.BadParameter("use a number followed by s, m, h or d (e.g. 30s, 5m, 1h, 2d)")
    return value


@app.command()
def logs(
    ctx: typer.Context,
    app_ref: AppArgument,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming new lines.")] = False,
    tail: Annotated[int, typer.Option("--tail", "-t", min=1, max=1000, help="Lines to show first.")] = 100,
    since: Annotated[
        str, typer.Option("--since", "-s", callback=_check_since, help="How far back: 30s, 5m, 1h, 2d.")
    ] = "5m",
    level: Annotated[Level | None, typer.Option("--level", "-l", help="Minimum level.")] = None,
    grep: Annotated[str | None, typer.Option("--grep", "-g", help="Only lines containing this text.")] = None,
    request_id: Annotated[
        str | None, typer.Option("--request-id", help="Only the lines of this request (X-Request-ID).")
    ] = None,
    trace_id: Annotated[
        str | None, typer.Option("--trace-id", help="Only the lines of this trace (X-Trace-Id).")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Show an app's logs (timestamp, level, message); --json prints the NDJSON entries."""
    session = use(ctx, json_output)
    client, out = session.client, session.output
    app_id = str(resolve_app(client, app_ref)["id"])
    if request_id or trace_id:  # a search, not a stream: the lines of one request or trace
        if follow:
            raise typer.BadParameter("--follow does not go with --request-id or --trace-id")
        search: dict[str, Any] = {"since": since, "limit": tail}
        for key, value in (("request_id", request_id), ("trace_id", trace_id), ("q", grep)):
            if value:
                search[key] = value
        if level is not None:
            search["level"] = level.value
        for entry in client.get(f"/apps/{app_id}/logs", params=search)["data"]:
            print_entry(out, json.dumps(entry))
        return
    params: dict[str, Any] = {"tail": tail, "since": since, "follow": "true" if follow else "false"}
    if level is not None:
        params["level"] = level.value
    if grep:
        params["grep"] = grep

    printed = 0
    attempt = 0
    while True:
        attempt += 1
        try:
            with client.stream_lines(
                f"/apps/{app_id}/logs/stream", params=params, read_timeout=120.0 if follow else 30.0
            ) as lines:
                for line in lines:
                    if print_entry(out, line):
                        printed += 1
            return
        except KeyboardInterrupt:
            return
        except CLIError as err:
            if getattr(err, "status", None) == 400 and not err.hint:
                err.hint = "Try a shorter time range (e.g. `--since 1d`)."
            if not err.retryable:
                raise
            if printed or attempt >= MAX_ATTEMPTS:
                raise TransportError(
                    "Lost connection to the log stream", err.message, hint="Try again."
                ) from err
            time.sleep(backoff(attempt))


def print_entry(out: Output, line: str) -> bool:
    """Print one NDJSON line if it is a log entry; True when it was. Raises on ``{"type": "error"}``."""
    try:
        entry = json.loads(line)
    except ValueError:
        return False
    if not isinstance(entry, dict) or entry.get("type") == "heartbeat":
        return False
    if entry.get("type") == "error":
        raise CLIError("Log stream error", str(entry.get("message") or "The server reported an error."))
    if not isinstance(entry.get("message"), str):
        return False
    if out.json_mode:
        out.emit(entry)
    else:
        out.say(format_entry(entry))
    return True


def format_entry(entry: dict[str, Any]) -> Text:
    """``2024-05-01T12:00:00.123Z INFO    message``, the level coloured (colour only shows in a terminal)."""
    level = str(entry.get("level") or "").lower()
    return Text.assemble(
        (format_timestamp(str(entry.get("timestamp") or "")), "dim"),
        " ",
        (f"{level.upper():<8} ", LEVEL_STYLES.get(level, "dim")),
        str(entry.get("message", "")).rstrip("\n"),
    )


def format_timestamp(value: str) -> str:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC)
    return parsed.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
