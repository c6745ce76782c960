"""An app's kept traces, filtered (slow, errors, route, minimum duration), and one trace as a waterfall.

Traces carry paths and attributes (SQL statements among them), so they need what logs need
(``app:logs``), as in the API. One trace shows only the spans of apps the visitor may read the logs of
(``GET /traces/{id}``'s own rule; it is the API's handler that loads it).
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlmodel import col, select

from control_plane.api import telemetry as telemetry_api
from control_plane.errors import BadRequest
from control_plane.models import App
from control_plane.permissions import Action
from dashboard import format as fmt
from dashboard.pages._common import app_header
from dashboard.web import DashboardRoute, DashDep, VisitorDep, app_by_slug, render

router = APIRouter(route_class=DashboardRoute, include_in_schema=False)

PAGE = 50


def _float(value: str, what: str) -> float | None:
    if not value.strip():
        return None
    try:
        number = float(value)
    except ValueError:
        raise BadRequest(f"{what} must be a number.", title="Invalid filter") from None
    if number < 0:
        raise BadRequest(f"{what} cannot be negative.", title="Invalid filter")
    return number


@router.get("/dashboard/apps/{app_slug}/traces")
def traces_page(
    request: Request,
    app_slug: str,
    who: VisitorDep,
    dash: DashDep,
    slow: str = "",
    status: str = "",
    route: str = "",
    min_ms: str = "",
    before: str = "",
) -> Response:
    """``GET /apps/{id}/traces`` with the filters as a form: newest first, ``before`` pages back."""
    platform = dash.platform
    if status not in ("", "error", "ok"):
        raise BadRequest("Status is error or ok.", title="Invalid filter")
    threshold = _float(min_ms, "The minimum duration")
    if slow:
        threshold = max(threshold or 0.0, platform.settings.trace_slow_ms)
    try:
        until = datetime.fromisoformat(before) if before else None
    except ValueError:
        raise BadRequest("Not a time.", title="Invalid filter") from None
    with platform.db.session() as s:
        app = app_by_slug(s, who, app_slug, Action.LOGS_READ)
        ctx = app_header(platform, s, who, app, "traces")
    rows = platform.traces.list(
        app.id,
        min_duration_ms=threshold,
        status=status or None,
        route=route or None,
        limit=PAGE,
        before=until,
    )
    longest = max((r["duration_ms"] for r in rows), default=0.0)
    routes = sorted(
        {r["route"].partition(" ")[2] or r["route"] for r in platform.rollups.series(app.id, 3600)["routes"]}
    )
    return render(
        request,
        "app/traces.html",
        traces=rows,
        longest=longest,
        routes=routes,
        filters={"slow": bool(slow), "status": status, "route": route, "min_ms": min_ms},
        slow_ms=platform.settings.trace_slow_ms,
        older=rows[-1]["started_at"] if len(rows) == PAGE else None,
        **ctx,
    )


@router.get("/dashboard/traces/{trace_id}")
async def trace_page(request: Request, trace_id: str, who: VisitorDep, dash: DashDep) -> Response:
    """One trace: every visible span as a row of the waterfall, its attributes and events a click away."""
    platform = dash.platform
    trace: dict[str, Any] = await telemetry_api.get_trace(trace_id, platform, who.principal)

    def context() -> dict[str, Any]:
        with platform.db.session() as s:
            apps = s.exec(select(App).where(col(App.id).in_(trace["apps"]))).all()
            slugs = {a.id: a.slug for a in apps}
            first = next((a for a in apps if a.id == trace["spans"][0]["app_id"]), apps[0] if apps else None)
            ctx = app_header(platform, s, who, first, "traces") if first is not None else {"section": "apps"}
        return {"slugs": slugs, **ctx}

    ctx = await asyncio.to_thread(context)
    rows = fmt.waterfall(trace["spans"], trace["duration_ms"])
    return render(request, "trace.html", trace=trace, rows=rows, **ctx)
