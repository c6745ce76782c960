"""Database rows → the API's JSON shapes (FastAPI Cloud's, plus our extension fields).

The functions build plain dicts; the models below are those shapes as the API declares them
(``response_model=``): FastAPI checks every answer against them, and the OpenAPI schema (what the
official CLI's pydantic models and Schemathesis hold us to) says exactly what comes back. The shapes
allow fields they do not list (``extra="allow"``), as FastAPI Cloud's clients ignore them: a field added
to a dict here is passed on, not silently dropped.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from control_plane.config import Settings
from control_plane.models import App, Deployment, Team
from control_plane.security import aware
from control_plane.statuses import DeploymentStatus
from runtime.backends.base import Instance, InstanceState

AppStatus = Literal["new", "deploying", "serving", "degraded", "failed"]
DeploymentKind = Literal["upload", "rollback", "redeploy"]


class Shape(BaseModel):
    """An answer's shape: the fields listed are required and typed; others pass through."""

    model_config = ConfigDict(extra="allow")


class InstanceOut(Shape):
    id: str
    state: InstanceState
    deployment_id: str
    host: str
    port: int
    pid: int
    started_at: str
    exit_code: int | None
    """Once it exited: its status, or minus the signal that killed it."""
    oom: bool
    """Killed at its memory limit."""
    in_flight: int
    """Requests the router has in flight to it right now."""


class LatestDeployment(Shape):
    id: str
    status: DeploymentStatus
    created_at: str


class AppOut(Shape):
    """FastAPI Cloud's App (``id``, ``slug``, ``directory``, ``team_id``, ``name``, ``url``, ``region``,
    ``updated_at``, ``github_repository``) plus ours."""

    id: str
    slug: str
    name: str
    team_id: str
    directory: str | None
    url: str
    region: str | None
    created_at: str
    updated_at: str
    github_repository: str | None
    status: AppStatus
    current_deployment_id: str | None
    latest_deployment: LatestDeployment | None
    health_path: str
    min_instances: int
    instances: list[InstanceOut]


class AppList(BaseModel):
    data: list[AppOut]
    count: int
    """All the apps that match, whatever ``limit`` and ``skip``."""


class Failure(BaseModel):
    """Why a deployment failed: all four strings, as the official CLI requires (``error_hint`` may be
    empty)."""

    error_code: str
    error_title: str
    error_message: str
    error_hint: str


class DeploymentOut(Shape):
    """FastAPI Cloud's Deployment, and its CreateDeployment (``id``, ``app_id``, ``slug``, ``status``,
    ``url``, ``dashboard_url``: never null), plus ours."""

    id: str
    app_id: str
    slug: str
    status: DeploymentStatus
    created_at: str
    updated_at: str
    finished_at: str | None
    duration_seconds: float | None
    """From creation to the end (seconds); null until it ended."""
    url: str
    dashboard_url: str
    failure: Failure | None
    kind: DeploymentKind
    source_deployment_id: str | None
    """The deployment whose build a rollback or redeploy runs."""
    entrypoint: str | None
    environment_key: str | None
    is_current: bool
    """It is what the app serves now."""
    artifact_pruned: bool
    """Its build was removed by retention (``keep_deployments``): it cannot be rolled back to."""


class DeploymentList(BaseModel):
    data: list[DeploymentOut]
    count: int


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
        "artifact_pruned": dep.artifact_pruned,
    }


def app_status(
    app: App, latest: Deployment | None, instances: list[Instance], current: Deployment | None = None
) -> str:
    from control_plane.statuses import DEGRADED, FAILED, IN_PROGRESS

    if latest is not None and latest.status in IN_PROGRESS:
        return "deploying"
    if current is not None and current.status in DEGRADED:
        return "degraded"  # serving, but crash-looping or with a stuck rollout
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
    current: Deployment | None = None,
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
        "status": app_status(app, latest, instances, current),
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
