"""Autoscaling settings per app, what the autoscaler decided and why, and the app's event history."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from control_plane import quotas
from control_plane.api.deps import PlatformDep, PrincipalDep, SessionDep
from control_plane.deployer import scaling_settings
from control_plane.errors import BadRequest
from control_plane.models import App, Team, utcnow
from control_plane.permissions import Action
from control_plane.platform import Platform
from control_plane.security import get_app
from control_plane.serializers import Shape, ts

router = APIRouter()


class ScalingUpdate(BaseModel):
    min_instances: int | None = Field(None, ge=0, le=1000)
    max_instances: int | None = Field(None, ge=1, le=1000)
    target_concurrency: float | None = Field(None, gt=0, le=100_000)
    prewarm: int | None = Field(None, ge=0, le=100)
    scale_to_zero_after: float | None = Field(None, ge=1, le=7 * 86400)
    max_concurrency: int | None = Field(
        None,
        ge=0,
        le=100_000,
        description="Requests in flight per instance before the router queues (0: none)",
    )


class ScalingNow(Shape):
    """What the autoscaler sees and decided for the serving revision."""

    deployment_id: str
    serving: int
    warm: int
    starting: int
    desired_serving: int | None
    desired_warm: int | None
    panic: bool
    reason: str | None
    """The policy's own sentence for its last decision."""
    stable_concurrency: float | None
    panic_concurrency: float | None
    forecast_concurrency: float | None
    """The weekly forecast's concurrency for now (null: no history yet)."""
    predicted_instances: float | None
    pool_hits: int
    instances_started: int
    instances_stopped: int
    cold_starts: int
    queued_total: int
    queue_wait_seconds: float


class ScalingOut(Shape):
    min_instances: int
    max_instances: int
    target_concurrency: float
    prewarm: int
    scale_to_zero_after: float
    max_concurrency: int
    """Requests in flight per instance before the router queues the rest (0: no limit)."""
    stable_window: float
    panic_window: float
    current: ScalingNow | None
    """Null while no revision serves."""


class EventOut(BaseModel):
    id: str
    at: str
    kind: str
    """``instance``, ``scale`` or ``deploy``."""
    message: str
    data: dict[str, Any]


class EventList(BaseModel):
    data: list[EventOut]


def scaling_out(platform: Platform, app: App) -> dict[str, Any]:
    settings = scaling_settings(app)
    revision = platform.fleet.serving.get(app.id)
    current: dict[str, Any] | None = None
    if revision is not None:
        d = revision.decision
        stats = platform.router.stats.get(app.id)
        target = settings.target_concurrency
        current = {
            "deployment_id": revision.deployment_id,
            "serving": len(revision.serving),
            "warm": len(revision.warm),
            "starting": revision.starting_serving + revision.starting_warm,
            "desired_serving": d.serving if d else None,
            "desired_warm": d.warm if d else None,
            "panic": d.panic if d else False,
            "reason": d.reason if d else None,
            "stable_concurrency": round(d.stable_concurrency, 3) if d else None,
            "panic_concurrency": round(d.panic_concurrency, 3) if d else None,
            "forecast_concurrency": revision.forecast,
            "predicted_instances": None if revision.forecast is None else -(-revision.forecast // target),
            "pool_hits": revision.pool_hits,
            "instances_started": revision.started,
            "instances_stopped": revision.stopped,
            "cold_starts": getattr(stats, "cold_starts", 0),
            "queued_total": getattr(stats, "queued_total", 0),
            "queue_wait_seconds": round(float(getattr(stats, "queue_wait_seconds", 0.0)), 4),
        }
    return {
        "min_instances": settings.min_instances,
        "max_instances": settings.max_instances,
        "target_concurrency": settings.target_concurrency,
        "prewarm": settings.prewarm,
        "scale_to_zero_after": settings.scale_to_zero_after,
        "max_concurrency": settings.max_concurrency,
        "stable_window": settings.stable_window,
        "panic_window": settings.panic_window,
        "current": current,
    }


@router.get("/apps/{app_id}/scaling", response_model=ScalingOut)
def read_scaling(
    app_id: str, platform: PlatformDep, session: SessionDep, principal: PrincipalDep
) -> dict[str, Any]:
    return scaling_out(platform, get_app(session, principal, app_id, action=Action.APP_MONITOR))


@router.patch("/apps/{app_id}/scaling", response_model=ScalingOut)
async def update_scaling(
    app_id: str, body: ScalingUpdate, platform: PlatformDep, principal: PrincipalDep
) -> dict[str, Any]:
    def apply() -> App:
        with platform.db.session() as s:
            app = get_app(s, principal, app_id, action=Action.SCALE)
            for name, value in body.model_dump(exclude_unset=True).items():
                if value is not None:
                    setattr(app, name, value)
            try:
                scaling_settings(app)  # the policy validates the combination (min <= max, ...)
            except ValueError as exc:
                raise BadRequest(
                    str(exc), title="Invalid scaling settings", hint="Check min <= max."
                ) from exc
            team = s.get(Team, app.team_id)
            assert team is not None  # a foreign key
            quotas.check_scaling(s, app, team, platform.settings)
            app.updated_at = utcnow()
            s.add(app)
            s.commit()
            return app

    app = await asyncio.to_thread(apply)
    settings = scaling_settings(app)
    platform.fleet.update_settings(app.id, settings)
    platform.events.emit(app.id, "scale", "Scaling settings changed", **body.model_dump(exclude_unset=True))
    return scaling_out(platform, app)


@router.get("/apps/{app_id}/events", response_model=EventList)
async def list_events(
    app_id: str,
    platform: PlatformDep,
    principal: PrincipalDep,
    limit: int = Query(100, ge=1, le=1000),
    kind: str | None = None,
) -> dict[str, Any]:
    def load() -> list[dict[str, Any]]:
        with platform.db.session() as s:
            app = get_app(s, principal, app_id, action=Action.APP_MONITOR)
        return [
            {
                "id": str(e.id),
                "at": ts(e.at),
                "kind": e.kind,
                "message": e.message,
                "data": json.loads(e.data),
            }
            for e in platform.events.list(app.id, limit, kind)
        ]

    return {"data": await asyncio.to_thread(load)}
