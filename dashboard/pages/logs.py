"""An app's logs: the newest lines matching a level, a search and a time range, then a live tail.

The page renders the newest matching lines (``LogStore.tail``, as ``GET /apps/{id}/logs`` searches);
``static/dashboard.js`` then follows ``logs/stream.ndjson`` from the last line shown, with the same
filters (``LogStore.follow``, as ``GET /apps/{id}/logs/stream?follow=true``). Logs need ``app:logs``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from control_plane.api.logs import HEARTBEAT_SECONDS, parse_since
from control_plane.errors import BadRequest
from control_plane.logstore import LogFilter
from control_plane.models import utcnow
from control_plane.permissions import Action
from dashboard.pages._common import app_header
from dashboard.web import DashboardRoute, DashDep, VisitorDep, app_by_slug, load_app, render
from runtime.logparse import LEVEL_RANK

router = APIRouter(route_class=DashboardRoute, include_in_schema=False)

LINES = 300
SINCE = ("15m", "1h", "6h", "1d", "7d")
LEVELS = ("debug", "info", "warning", "error", "critical")


def _filter(level: str, q: str, trace_id: str, request_id: str, since: datetime | None) -> LogFilter:
    if level and level.lower() not in LEVEL_RANK:
        raise BadRequest(f"Unknown level {level!r}.", hint="Use one of: " + ", ".join(LEVELS))
    if len(q) > 200:
        raise BadRequest("The search is limited to 200 characters.", title="Search too long")
    return LogFilter(
        since=since,
        level=level or None,
        grep=q or None,
        fields={"trace_id": trace_id.lower(), "request_id": request_id},
    )


@router.get("/dashboard/apps/{app_slug}/logs")
def logs_page(
    request: Request,
    app_slug: str,
    who: VisitorDep,
    dash: DashDep,
    level: str = "",
    q: str = "",
    since: str = "1h",
    trace_id: str = "",
    request_id: str = "",
) -> Response:
    platform = dash.platform
    with platform.db.session() as s:
        app = app_by_slug(s, who, app_slug, Action.LOGS_READ)
        ctx = app_header(platform, s, who, app, "logs")
    match = _filter(level, q, trace_id, request_id, utcnow() - parse_since(since))
    entries = platform.logstore.tail(app.id, LINES, match)
    return render(
        request,
        "app/logs.html",
        entries=entries,
        filters={"level": level, "q": q, "since": since, "trace_id": trace_id, "request_id": request_id},
        levels=LEVELS,
        since_choices=SINCE,
        after=entries[-1]["timestamp"] if entries else utcnow().isoformat(timespec="microseconds"),
        **ctx,
    )


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


@router.get("/dashboard/apps/{app_slug}/logs/stream.ndjson")
async def logs_stream(
    app_slug: str,
    who: VisitorDep,
    dash: DashDep,
    after: str = "",
    level: str = "",
    q: str = "",
    trace_id: str = "",
    request_id: str = "",
) -> StreamingResponse:
    """NDJSON: the matching lines newer than ``after`` (an entry's timestamp), then new ones as they are
    written; ``{"type": "heartbeat"}`` every 15 s of silence."""
    platform = dash.platform
    app_id = (await load_app(platform, who, app_slug, Action.LOGS_READ)).id
    try:
        since = datetime.fromisoformat(after) if after else utcnow()
    except ValueError:
        raise BadRequest("`after` is a timestamp of a log line.", title="Invalid position") from None
    match = _filter(level, q, trace_id, request_id, None)
    backlog_filter = _filter(level, q, trace_id, request_id, since)
    store = platform.logstore
    mark = backlog_filter.since or ""

    async def body() -> AsyncIterator[bytes]:
        # Subscribed before the backlog is read (nothing falls in between), and only once the response
        # runs: a client gone before then leaves no follower behind.
        queue = store.follow(app_id)
        try:
            backlog = await asyncio.to_thread(store.tail, app_id, 1000, backlog_filter)
            sent = [e for e in backlog if str(e.get("timestamp", "")) > mark]
            for entry in sent:
                yield _line(entry)
            newest = sent[-1]["timestamp"] if sent else mark
            while True:
                try:
                    entry = await asyncio.wait_for(queue.get(), HEARTBEAT_SECONDS)
                except TimeoutError:
                    yield _line({"type": "heartbeat"})
                    continue
                stamp = str(entry.get("timestamp", ""))
                if stamp <= mark or (stamp <= newest and entry in sent):
                    continue
                if match(entry):
                    yield _line(entry)
        finally:
            store.unfollow(app_id, queue)

    return StreamingResponse(
        body(),
        media_type="application/x-ndjson",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
