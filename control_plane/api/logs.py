"""App logs: the NDJSON stream the official CLI reads (``tail``, ``since``, ``follow``), plus filters."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict

from control_plane.api.deps import PlatformDep, PrincipalDep, StreamingPrincipalDep
from control_plane.errors import BadRequest
from control_plane.logstore import LogFilter
from control_plane.models import utcnow
from control_plane.permissions import Action
from control_plane.security import get_app
from runtime.logparse import LEVEL_RANK

router = APIRouter()

HEARTBEAT_SECONDS = 15.0
_SINCE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_SINCE = timedelta(days=30)


def parse_since(value: str) -> timedelta:
    match = _SINCE.match(value.strip())
    if not match:
        raise BadRequest(
            f"Invalid time range {value!r}.",
            title="Invalid --since",
            hint="Use a number and a unit: 30s, 5m, 2h, 1d.",
        )
    delta = timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
    if delta > MAX_SINCE:
        raise BadRequest(
            f"Logs are kept for at most {MAX_SINCE.days} days.",
            title="Time range too long",
            hint="Try a shorter time range (e.g. `--since 1d`).",
        )
    return delta


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


class LogLine(BaseModel):
    """One NDJSON line of the log stream: an entry, or ``{"type": "heartbeat"}`` every 15 s."""

    model_config = ConfigDict(extra="allow")
    timestamp: str | None = None
    message: str | None = None
    level: str | None = None
    stream: str | None = None
    instance_id: str | None = None
    deployment_id: str | None = None
    type: str | None = None


class _NDJSON(StreamingResponse):
    media_type = "application/x-ndjson"


@router.get(
    "/apps/{app_id}/logs/stream",
    response_class=_NDJSON,
    responses={
        200: {
            "description": "The app's log lines as NDJSON, oldest first; with `follow`, new ones "
            "as they come.",
            "content": {"application/x-ndjson": {"schema": LogLine.model_json_schema()}},
        },
        # Errors are JSON, not the stream's media type.
        **{
            status: {
                "description": "Error",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
            }
            for status in (400, 401, 403, 404, 409, 413, 429)
        },
    },
)
async def stream_logs(
    app_id: str,
    platform: PlatformDep,
    principal: StreamingPrincipalDep,
    tail: int = Query(100, ge=1, le=10_000),
    since: str = "5m",
    follow: bool = False,
    level: str | None = None,
    grep: str | None = Query(None, max_length=200),
) -> StreamingResponse:
    def check() -> str:
        with platform.db.session() as s:
            return get_app(s, principal, app_id, action=Action.LOGS_READ).id

    app = await asyncio.to_thread(check)
    if level is not None and level.lower() not in LEVEL_RANK:
        raise BadRequest(f"Unknown level {level!r}.", hint="Use one of: " + ", ".join(LEVEL_RANK))
    match = LogFilter(since=utcnow() - parse_since(since), level=level, grep=grep)
    store = platform.logstore
    # Subscribe before reading the tail so nothing falls between the two.
    queue = store.follow(app) if follow else None

    async def body() -> AsyncIterator[bytes]:
        try:
            entries = await asyncio.to_thread(store.tail, app, tail, match)
            last = entries[-1]["timestamp"] if entries else ""
            for entry in entries:
                yield _line(entry)
            if queue is None:
                return
            while True:
                try:
                    entry = await asyncio.wait_for(queue.get(), HEARTBEAT_SECONDS)
                except TimeoutError:
                    yield _line({"type": "heartbeat"})
                    continue
                if entry["timestamp"] <= last and entry in entries:
                    continue
                if match(entry):
                    yield _line(entry)
        finally:
            if queue is not None:
                store.unfollow(app, queue)

    return _NDJSON(body(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/apps/{app_id}/logs")
async def search_logs(
    app_id: str,
    platform: PlatformDep,
    principal: PrincipalDep,
    q: str | None = Query(None, max_length=200, description="A substring of the message (any case)"),
    level: str | None = Query(None, description="The lowest level: debug, info, warning, error, critical"),
    since: str = Query("1d", description="How far back: 30s, 5m, 2h, 1d"),
    until: datetime | None = Query(None, description="Only lines before this time"),
    request_id: str | None = Query(None, max_length=128),
    trace_id: str | None = Query(None, max_length=32),
    instance_id: str | None = Query(None, max_length=64),
    deployment_id: str | None = Query(None, max_length=64),
    stream: str | None = Query(None, pattern="^(stdout|stderr|platform|build)$"),
    limit: int = Query(200, ge=1, le=5000),
) -> dict[str, Any]:
    """Search the app's logs (instances and builds): the newest ``limit`` matching lines, oldest first.
    ``request_id`` and ``trace_id`` find the access-log line of one request."""

    def run() -> list[dict[str, Any]]:
        with platform.db.session() as s:
            app = get_app(s, principal, app_id, action=Action.LOGS_READ)
        if level is not None and level.lower() not in LEVEL_RANK:
            raise BadRequest(f"Unknown level {level!r}.", hint="Use one of: " + ", ".join(LEVEL_RANK))
        match = LogFilter(
            since=utcnow() - parse_since(since),
            level=level,
            grep=q,
            until=until,
            fields={
                "request_id": request_id or "",
                "trace_id": (trace_id or "").lower(),
                "instance_id": instance_id or "",
                "deployment_id": deployment_id or "",
                "stream": stream or "",
            },
        )
        return platform.logstore.tail(app.id, limit, match)

    return {"data": await asyncio.to_thread(run)}
