"""Insights API: what the platform found inside an app (``control_plane/insights.py``).

    GET   /api/v1/apps/{id}/insights               the serving revision's findings, contract, loop lag
    PATCH /api/v1/apps/{id}/insights               {"fail_on_blocking": bool}
    GET   /api/v1/deployments/{id}/insights        one deployment's findings and contract diff
    GET   /api/v1/deployments/{id}/openapi.json    the OpenAPI document its revision served

Readable by team members who see the app's deployments (``app:monitor``; the OpenAPI document, like
the deployment, ``deployment:read``); the setting is the app's (``app:update``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from control_plane import insights
from control_plane.api.deps import PlatformDep, PrincipalDep
from control_plane.errors import NotFound
from control_plane.models import Deployment, utcnow
from control_plane.permissions import Action
from control_plane.platform import Platform
from control_plane.security import Principal, get_app

router = APIRouter()


class InsightsSettings(BaseModel):
    fail_on_blocking: bool | None = None


def _artifact(dep: Deployment) -> str:
    return dep.source_deployment_id if dep.kind != "upload" and dep.source_deployment_id else dep.id


def _deployment_insights(platform: Platform, dep: Deployment) -> dict[str, Any]:
    root = platform.paths.deployments
    return {
        "deployment_id": dep.id,
        "blocking": insights.read(root / _artifact(dep) / insights.INSIGHTS_FILE),
        "contract": insights.read(root / dep.id / insights.CONTRACT_FILE),
        "has_openapi": (root / _artifact(dep) / insights.OPENAPI_FILE).is_file(),
    }


def _load_deployment(
    platform: Platform, principal: Principal, deployment_id: str, action: Action
) -> Deployment:
    with platform.db.session() as s:
        dep = s.get(Deployment, deployment_id)
        if dep is None:
            raise NotFound(f"Deployment {deployment_id} not found.", title="Deployment not found")
        get_app(s, principal, dep.app_id, action=action)
        return dep


@router.get("/apps/{app_id}/insights")
async def app_insights(app_id: str, platform: PlatformDep, principal: PrincipalDep) -> dict[str, Any]:
    """The serving revision's blocking calls and contract diff, the app's setting, its instances' loop."""

    def load() -> dict[str, Any]:
        with platform.db.session() as s:
            app = get_app(s, principal, app_id, action=Action.APP_MONITOR)
            dep = s.get(Deployment, app.current_deployment_id) if app.current_deployment_id else None
        out: dict[str, Any] = {"app_id": app.id, "fail_on_blocking": app.fail_on_blocking}
        out.update(
            _deployment_insights(platform, dep)
            if dep is not None
            else {"deployment_id": None, "blocking": None, "contract": None, "has_openapi": False}
        )
        out["runtime"] = platform.metrics.loop_lag_of(app.id)
        return out

    return await asyncio.to_thread(load)


@router.patch("/apps/{app_id}/insights")
async def update_insights(
    app_id: str, body: InsightsSettings, platform: PlatformDep, principal: PrincipalDep
) -> dict[str, Any]:
    """``fail_on_blocking``: refuse builds whose async code calls blocking APIs (from the next push)."""

    def apply() -> dict[str, Any]:
        with platform.db.session() as s:
            app = get_app(s, principal, app_id, action=Action.APP_UPDATE)
            if body.fail_on_blocking is not None:
                app.fail_on_blocking = body.fail_on_blocking
                app.updated_at = utcnow()
                s.add(app)
                s.commit()
            return {"app_id": app.id, "fail_on_blocking": app.fail_on_blocking}

    return await asyncio.to_thread(apply)


@router.get("/deployments/{deployment_id}/insights")
async def deployment_insights(
    deployment_id: str, platform: PlatformDep, principal: PrincipalDep
) -> dict[str, Any]:
    def load() -> dict[str, Any]:
        dep = _load_deployment(platform, principal, deployment_id, Action.DEPLOYMENT_READ)
        return _deployment_insights(platform, dep)

    return await asyncio.to_thread(load)


@router.get("/deployments/{deployment_id}/openapi.json", response_model=None)
async def deployment_openapi(
    deployment_id: str, platform: PlatformDep, principal: PrincipalDep
) -> JSONResponse:
    """The OpenAPI document the deployment's revision served (fetched during its verification)."""

    def load() -> dict[str, Any] | None:
        dep = _load_deployment(platform, principal, deployment_id, Action.DEPLOYMENT_READ)
        return insights.read(platform.paths.deployments / _artifact(dep) / insights.OPENAPI_FILE)

    schema = await asyncio.to_thread(load)
    if schema is None:
        raise NotFound(
            f"Deployment {deployment_id} has no OpenAPI document.",
            title="No OpenAPI document",
            hint="It is fetched from /openapi.json while a revision is verified; apps without one have none.",
        )
    return JSONResponse(schema)
