"""What the platform found inside an app: blocking calls in async code (at build time), the API
contract against the revision before, and the instances' event-loop lag (``GET /apps/{id}/insights``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from control_plane import audit
from control_plane.api import insights as insights_api
from control_plane.models import App
from control_plane.permissions import Action
from dashboard.pages._common import app_header
from dashboard.web import (
    DashboardRoute,
    DashDep,
    FormDep,
    VisitorDep,
    app_by_slug,
    field_str,
    render,
    see_other,
)

router = APIRouter(route_class=DashboardRoute, include_in_schema=False)


@router.get("/dashboard/apps/{app_slug}/insights")
async def insights_page(request: Request, app_slug: str, who: VisitorDep, dash: DashDep) -> Response:
    platform = dash.platform

    def load() -> tuple[App, dict[str, Any]]:
        with platform.db.session() as s:
            app = app_by_slug(s, who, app_slug, Action.APP_MONITOR)
            return app, app_header(platform, s, who, app, "insights")

    app, ctx = await asyncio.to_thread(load)
    data = await insights_api.app_insights(app.id, platform, who.principal)
    return render(
        request,
        "app/insights.html",
        data=data,
        can_update=who.can(Action.APP_UPDATE, app.team_id),
        saved=bool(request.query_params.get("saved")),
        **ctx,
    )


@router.post("/dashboard/apps/{app_slug}/insights")
async def insights_settings(
    request: Request, app_slug: str, who: VisitorDep, form: FormDep, dash: DashDep
) -> Response:
    """``PATCH /apps/{id}/insights`` ``{"fail_on_blocking"}`` (``app:update``)."""
    platform = dash.platform

    def load() -> tuple[str, str]:
        with platform.db.session() as s:
            app = app_by_slug(s, who, app_slug, Action.APP_READ)
            return app.id, app.team_id

    app_id, team_id = await asyncio.to_thread(load)
    audit.note(request, team_id=team_id, app_id=app_id)
    body = insights_api.InsightsSettings(fail_on_blocking=field_str(form, "fail_on_blocking") == "on")
    await insights_api.update_insights(app_id, body, platform, who.principal)
    return see_other(f"/dashboard/apps/{app_slug}/insights?saved=1")
