"""Observability API: an app's metric series, its traces, one trace's waterfall; the OTLP receiver.

    GET  /api/v1/apps/{id}/metrics?range=1h&step=10s&route=   series (control_plane/rollups.py)
    GET  /api/v1/apps/{id}/traces?min_duration_ms=&status=&route=&limit=&before=
    GET  /api/v1/traces/{trace_id}                            the spans the caller may see, depth-first
    POST /v1/traces                                           OTLP/HTTP (protobuf or JSON) from instances

Metrics are readable by every member (``app:monitor``); traces carry request paths and attributes (SQL
statements among them), so they need what logs need (``app:logs``).
"""

from __future__ import annotations

import asyncio
import re
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response

from control_plane.api.deps import PlatformDep, PrincipalDep
from control_plane.errors import APIError, BadRequest, NotFound, TooLarge
from control_plane.otlp import MAX_BODY
from control_plane.permissions import Action
from control_plane.receiver import receive, receive_metrics
from control_plane.rollups import RANGES
from control_plane.security import get_app

router = APIRouter()
receiver = APIRouter()

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(value: str, what: str) -> int:
    match = _DURATION.match(value.strip())
    if match is None:
        raise BadRequest(
            f"Invalid {what} {value!r}.", title=f"Invalid {what}", hint="Use e.g. 10s, 5m, 1h, 7d."
        )
    return int(match.group(1)) * _UNITS[match.group(2)]


@router.get("/apps/{app_id}/metrics")
async def app_metrics(
    app_id: str,
    platform: PlatformDep,
    principal: PrincipalDep,
    range: str = Query("1h", description="How far back: " + ", ".join(RANGES)),
    step: str | None = Query(None, description="Seconds per point, e.g. 10s, 1m (default: by range)"),
    route: str | None = Query(
        None, max_length=300, description='Only this route, e.g. "GET /items/{item_id}"'
    ),
) -> dict[str, Any]:
    """Requests/s, error rate, p50/p95/p99, instances and concurrency, overall and per route."""
    if range not in RANGES:
        raise BadRequest(
            f"Unknown range {range!r}.", title="Invalid range", hint="Use one of: " + ", ".join(RANGES)
        )
    step_s = _seconds(step, "step") if step else None

    def load() -> dict[str, Any]:
        with platform.db.session() as s:
            app = get_app(s, principal, app_id, action=Action.APP_MONITOR)
        try:
            return platform.rollups.series(app.id, RANGES[range], step_s, route)
        except ValueError as exc:
            raise BadRequest(
                str(exc), title="Invalid step", hint="Use a larger step for this range."
            ) from exc

    return await asyncio.to_thread(load)


@router.get("/apps/{app_id}/traces")
async def list_traces(
    app_id: str,
    platform: PlatformDep,
    principal: PrincipalDep,
    min_duration_ms: float | None = Query(None, ge=0),
    slow: bool = Query(False, description="Only traces at least as slow as the platform's slow threshold"),
    status: str | None = Query(None, pattern="^(error|ok)$"),
    route: str | None = Query(None, max_length=300, description="A route template, e.g. /items/{item_id}"),
    limit: int = Query(50, ge=1, le=500),
    before: datetime | None = Query(None, description="Only traces that started before this time"),
) -> dict[str, Any]:
    """The app's kept traces, newest first (errors and slow ones are always kept)."""

    threshold = min_duration_ms
    if slow:
        threshold = max(threshold or 0.0, platform.settings.trace_slow_ms)

    def load() -> list[dict[str, Any]]:
        with platform.db.session() as s:
            app = get_app(s, principal, app_id, action=Action.LOGS_READ)
        return platform.traces.list(
            app.id, min_duration_ms=threshold, status=status, route=route, limit=limit, before=before
        )

    return {"data": await asyncio.to_thread(load)}


@router.get("/traces/{trace_id}")
async def get_trace(trace_id: str, platform: PlatformDep, principal: PrincipalDep) -> dict[str, Any]:
    """One trace, as far as the caller may see it: spans of apps whose logs they may read."""
    if not re.fullmatch(r"[0-9a-fA-F]{32}", trace_id):
        raise NotFound(
            f"Trace {trace_id} not found.", title="Trace not found", hint="Trace ids are 32 hex digits."
        )

    def load() -> dict[str, Any] | None:
        everything = platform.traces.get(trace_id, None)
        if everything is None:
            return None
        visible = []
        with platform.db.session() as s:
            for app_id in everything["apps"]:
                try:
                    get_app(s, principal, app_id, action=Action.LOGS_READ)
                except APIError:
                    continue
                visible.append(app_id)
        return platform.traces.get(trace_id, visible) if visible else None

    trace = await asyncio.to_thread(load)
    if trace is None:
        raise NotFound(
            f"Trace {trace_id} not found.",
            title="Trace not found",
            hint="Traces are kept for errors, slow requests and a sample of the rest; "
            "`fastapi-deploy traces APP` lists them.",
        )
    return trace


@receiver.post("/v1/traces", include_in_schema=False)
async def otlp_traces(
    request: Request,
    platform: PlatformDep,
    authorization: str | None = Header(None),
    content_type: str | None = Header(None),
    content_encoding: str | None = Header(None),
) -> Response:
    """OTLP/HTTP traces from the platform's instances (control_plane/receiver.py)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise TooLarge(f"OTLP requests are limited to {MAX_BODY} bytes.", hint="Send smaller batches.")
    answer = receive(platform, authorization, content_type, content_encoding, await request.body())
    return Response(answer.body, status_code=answer.status, media_type=answer.content_type)


@receiver.post("/v1/metrics", include_in_schema=False)
async def otlp_metrics(
    request: Request,
    platform: PlatformDep,
    authorization: str | None = Header(None),
    content_type: str | None = Header(None),
    content_encoding: str | None = Header(None),
) -> Response:
    """The instances' event-loop lag and thread-pool readings, as OTLP/HTTP protobuf metrics."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise TooLarge(f"OTLP requests are limited to {MAX_BODY} bytes.", hint="Send smaller batches.")
    answer = receive_metrics(platform, authorization, content_type, content_encoding, await request.body())
    return Response(answer.body, status_code=answer.status, media_type=answer.content_type)
