"""Database rows → the API's JSON shapes (FastAPI Cloud's, plus our extension fields)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from control_plane.config import Settings
from control_plane.models import App, Deployment, Team
from control_plane.security import aware
from runtime.backends.base import Instance


def ts(value: datetime | None) -> str | None:
    return aware(value).isoformat(timespec="microseconds") if value else None


def team_out(team: Team) -> dict[str, Any]:
    return {"id": team.id, "slug": team.slug, "name": team.name}


def deployment_out(dep: Deployment, app: App, settings: Settings) -> dict[str, Any]:
    failure = None
    if dep.error_code:
        failure = {
            "error_code": dep.error_code,
            "error_title": dep.error_title or "",
            "error_message": dep.error_message or "",
            "error_hint": dep.error_hint or "",
        }
    duration = None
    if dep.finished_at is not None:
        duration = round((aware(dep.finished_at) - aware(dep.created_at)).total_seconds(), 3)
    return {
        "id": dep.id,
        "app_id": dep.app_id,
        "slug": dep.slug,
        "status": dep.status,
        "created_at": ts(dep.created_at),
        "updated_at": ts(dep.updated_at),
        "finished_at": ts(dep.finished_at),
        "duration_seconds": duration,
        "url": settings.app_url(app.slug),
        "dashboard_url": f"{settings.api_url}/dashboard/apps/{app.slug}/deployments/{dep.id}",
        "failure": failure,
        "kind": dep.kind,
        "source_deployment_id": dep.source_deployment_id,
        "entrypoint": dep.entrypoint,
        "environment_key": dep.environment_key,
        "is_current": app.current_deployment_id == dep.id,
    }


def app_status(app: App, latest: Deployment | None, instances: list[Instance]) -> str:
    from control_plane.statuses import FAILED, IN_PROGRESS

    if latest is not None and latest.status in IN_PROGRESS:
        return "deploying"
    if app.current_deployment_id and any(i.state.value == "serving" for i in instances):
        return "serving"
    if app.current_deployment_id:
        return "degraded"
    if latest is not None and latest.status in FAILED:
        return "failed"
    return "new"


def app_out(
    app: App,
    settings: Settings,
    *,
    instances: list[Instance] | None = None,
    latest: Deployment | None = None,
    in_flight: dict[str, int] | None = None,
) -> dict[str, Any]:
    instances = instances or []
    in_flight = in_flight or {}
    return {
        "id": app.id,
        "slug": app.slug,
        "name": app.name,
        "team_id": app.team_id,
        "directory": app.directory,
        "url": settings.app_url(app.slug),
        "region": None,
        "created_at": ts(app.created_at),
        "updated_at": ts(app.updated_at),
        "github_repository": None,
        "status": app_status(app, latest, instances),
        "current_deployment_id": app.current_deployment_id,
        "latest_deployment": (
            {"id": latest.id, "status": latest.status, "created_at": ts(latest.created_at)}
            if latest
            else None
        ),
        "health_path": app.health_path,
        "min_instances": app.min_instances,
        "instances": [i.as_dict() | {"in_flight": in_flight.get(i.id, 0)} for i in instances],
    }
