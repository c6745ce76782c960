"""Deployment history, one deployment with its build log (streamed live while it builds), rollback
and redeploy.

Rollback and redeploy call the API's own handlers (``POST /apps/{id}/rollback``, ``/redeploy``): the same
checks (``app:release``), the same conflicts (nothing to roll back to, a build no longer kept, a
deployment in progress), the same new deployment. The live log is the API's NDJSON stream
(``BuildLogs.stream``: ``last_id`` resume, heartbeats, ``complete``/``failed``) behind the session.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlmodel import Session, col, select

from control_plane import audit
from control_plane.api import apps as apps_api
from control_plane.errors import NotFound
from control_plane.models import App, BuildLogLine, Deployment
from control_plane.permissions import Action
from control_plane.platform import Platform
from control_plane.security import get_app
from control_plane.serializers import deployment_out
from control_plane.statuses import IN_PROGRESS
from control_plane.statuses import DeploymentStatus as S
from dashboard.pages._common import app_header
from dashboard.web import (
    DashboardRoute,
    DashDep,
    FormDep,
    Visitor,
    VisitorDep,
    app_by_slug,
    field_str,
    load_app,
    render,
    see_other,
)

router = APIRouter(route_class=DashboardRoute, include_in_schema=False)

MAX_LOG_LINES = 20_000
"""Lines a deployment page renders (the rest: the API's stream, ``fastapi-deploy deployments``)."""
LIVE = {S.WAITING_UPLOAD.value, *(s.value for s in IN_PROGRESS)}


def _deployment(session: Session, who: Visitor, deployment_id: str, action: Action) -> tuple[Deployment, App]:
    """As the API's ``_load``: 404 for an unknown deployment or another team's."""
    dep = session.get(Deployment, deployment_id)
    if dep is None:
        raise NotFound(f"Deployment {deployment_id} not found.", title="Deployment not found")
    return dep, get_app(session, who.principal, dep.app_id, action=action)


def _log_lines(platform: Platform, deployment_id: str) -> tuple[list[BuildLogLine], bool]:
    """The stored build log, oldest first, and whether it was cut at :data:`MAX_LOG_LINES`."""
    lines: list[BuildLogLine] = []
    after = 0
    while len(lines) < MAX_LOG_LINES:
        batch = platform.buildlogs.lines(deployment_id, after)
        if not batch:
            break
        lines += batch
        after = batch[-1].id or after
        if len(batch) < 500:
            break
    return lines[:MAX_LOG_LINES], len(lines) >= MAX_LOG_LINES


def _rollback_targets(deployments: list[dict[str, Any]]) -> set[str]:
    """Deployments a rollback may name: successful, not serving, build still kept."""
    return {
        d["id"]
        for d in deployments
        if d["status"] == S.SUCCESS and not d["is_current"] and not d["artifact_pruned"]
    }


@router.get("/dashboard/apps/{app_slug}/deployments")
def deployments(request: Request, app_slug: str, who: VisitorDep, dash: DashDep) -> Response:
    """Every deployment, newest first (``GET /apps/{id}/deployments/``), with rollback buttons."""
    platform = dash.platform
    with platform.db.session() as s:
        app = app_by_slug(s, who, app_slug, Action.APP_MONITOR)
        ctx = app_header(platform, s, who, app, "deployments")
        rows = s.exec(
            select(Deployment)
            .where(Deployment.app_id == app.id)
            .order_by(col(Deployment.created_at).desc())
            .limit(200)
        ).all()
        out = [deployment_out(d, app, platform.settings) for d in rows]
        targets = _rollback_targets(out)
    return render(
        request,
        "app/deployments.html",
        deployments=out,
        targets=targets,
        release=who.can(Action.RELEASE, app.team_id),
        **ctx,
    )


@router.get("/dashboard/apps/{app_slug}/deployments/{deployment_id}")
def deployment(
    request: Request, app_slug: str, deployment_id: str, who: VisitorDep, dash: DashDep
) -> Response:
    """One deployment: status, duration, failure, its build log (live while it runs), rollback."""
    platform = dash.platform
    with platform.db.session() as s:
        dep, app = _deployment(s, who, deployment_id, Action.DEPLOYMENT_READ)
        if app.slug != app_slug:
            return see_other(f"/dashboard/apps/{app.slug}/deployments/{dep.id}")
        ctx = app_header(platform, s, who, app, "deployments")
        out = deployment_out(dep, app, platform.settings)
        source = s.get(Deployment, dep.source_deployment_id) if dep.source_deployment_id else None
    lines, cut = _log_lines(platform, dep.id)
    can_roll_back = (
        out["status"] == S.SUCCESS and not out["is_current"] and not out["artifact_pruned"]
    ) and who.can(Action.RELEASE, app.team_id)
    return render(
        request,
        "app/deployment.html",
        dep=out,
        source=source,
        lines=lines,
        cut=cut,
        live=out["status"] in LIVE,
        can_roll_back=can_roll_back,
        **ctx,
    )


@router.get("/dashboard/deployments/{deployment_id}/status.json")
def deployment_status(deployment_id: str, who: VisitorDep, dash: DashDep) -> JSONResponse:
    """The deployment as ``GET /deployments/{id}`` answers it (the page updates its header from it)."""
    with dash.platform.db.session() as s:
        dep, app = _deployment(s, who, deployment_id, Action.DEPLOYMENT_READ)
        return JSONResponse(deployment_out(dep, app, dash.platform.settings))


@router.get("/dashboard/deployments/{deployment_id}/build-log.ndjson")
async def build_log(
    deployment_id: str, who: VisitorDep, dash: DashDep, last_id: str | None = None
) -> StreamingResponse:
    """The build log as the API streams it (NDJSON: ``message``, ``heartbeat``, ``timeout``,
    ``complete``, ``failed``), resumed after ``last_id``. Access is checked once, up front; no database
    session stays open while the stream does."""

    def check() -> None:
        with dash.platform.db.session() as s:
            _deployment(s, who, deployment_id, Action.DEPLOYMENT_READ)

    await asyncio.to_thread(check)
    return StreamingResponse(
        dash.platform.buildlogs.stream(deployment_id, last_id),
        media_type="application/x-ndjson",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _release(
    request: Request, who: Visitor, platform: Platform, app_slug: str, kind: str, target: str
) -> Response:
    app = await load_app(platform, who, app_slug, Action.APP_READ)
    audit.note(request, team_id=app.team_id, app_id=app.id)
    if kind == "rollback":
        body = apps_api.RollbackRequest(deployment_id=target or None)
        dep = await apps_api.rollback(app.id, platform, who.principal, body)
    else:
        dep = await apps_api.redeploy(app.id, platform, who.principal)
    return see_other(f"/dashboard/apps/{app.slug}/deployments/{dep['id']}")


@router.post("/dashboard/apps/{app_slug}/rollback")
async def rollback(
    request: Request, app_slug: str, who: VisitorDep, form: FormDep, dash: DashDep
) -> Response:
    """``POST /apps/{id}/rollback`` with the form's ``deployment_id`` (empty: the one before)."""
    return await _release(request, who, dash.platform, app_slug, "rollback", field_str(form, "deployment_id"))


@router.post("/dashboard/apps/{app_slug}/redeploy")
async def redeploy(
    request: Request, app_slug: str, who: VisitorDep, _form: FormDep, dash: DashDep
) -> Response:
    """``POST /apps/{id}/redeploy``: the current build with the current environment."""
    return await _release(request, who, dash.platform, app_slug, "redeploy", "")
