"""Teams and apps: list, create, get, update, delete; rollback and redeploy (extensions)."""

from __future__ import annotations

import asyncio
import re
from pathlib import PurePosixPath
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field, field_validator
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from control_plane import audit, quotas
from control_plane.api.deps import MAX_SKIP, PlatformDep, PrincipalDep, SessionDep
from control_plane.errors import Conflict, NotFound
from control_plane.models import App, Deployment, EnvVar, utcnow
from control_plane.permissions import Action
from control_plane.platform import Platform
from control_plane.security import get_app, get_team, require_user, team_ids
from control_plane.serializers import AppList, AppOut, DeploymentOut, app_out, deployment_out
from control_plane.statuses import IN_PROGRESS, WENT_LIVE
from control_plane.statuses import DeploymentStatus as S
from runtime.detect import HEALTH_PATH_PATTERN, MAX_HEALTH_PATH, check_health_path

router = APIRouter()

_SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:63].strip("-") or "app"


def validate_directory(v: str | None) -> str | None:
    """The official CLI's rules for ``app.directory``: relative, no ``~`` or ``..``, plain characters."""
    if v is None or not v.strip():
        return None
    v = v.strip()
    if v.startswith("~"):
        raise ValueError("cannot start with '~'")
    path = PurePosixPath(v)
    if path.is_absolute():
        raise ValueError("must be a relative path, not absolute")
    if ".." in path.parts:
        raise ValueError("cannot contain '..' path segments")
    if not re.fullmatch(r"[A-Za-z0-9._/ -]+", path.as_posix()):
        raise ValueError("contains invalid characters (allowed: letters, numbers, space, / . _ -)")
    return path.as_posix()


class AppCreate(BaseModel):
    team_id: str
    name: str
    directory: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        v = v.strip()
        if not v or len(v) > 100:
            raise ValueError("the app name must be 1 to 100 characters")
        return v

    _dir = field_validator("directory")(classmethod(lambda cls, v: validate_directory(v)))


class AppUpdate(BaseModel):
    """What ``PATCH /apps/{id}`` changes: only the fields sent (the official CLI sends ``directory``)."""

    directory: str | None = None
    health_path: str | None = Field(
        None, max_length=MAX_HEALTH_PATH, json_schema_extra={"pattern": HEALTH_PATH_PATTERN}
    )
    """The path verification and health checks ask, from the next deployment on (a project's
    ``[tool.fastapi-deploy] health_path`` overrides it when it is pushed); null: back to ``/``."""

    _dir = field_validator("directory")(classmethod(lambda cls, v: validate_directory(v)))

    @field_validator("health_path")
    @classmethod
    def _health_path(cls, v: str | None) -> str | None:
        return None if v is None else check_health_path(v)


class RollbackRequest(BaseModel):
    deployment_id: str | None = None


def _latest(session: Session, app_id: str) -> Deployment | None:
    return session.exec(
        select(Deployment).where(Deployment.app_id == app_id).order_by(col(Deployment.created_at).desc())
    ).first()


def render_app(platform: Platform, session: Session, app: App) -> dict[str, Any]:
    current = session.get(Deployment, app.current_deployment_id) if app.current_deployment_id else None
    return app_out(
        app,
        platform.settings,
        instances=platform.fleet.instances_of(app.id),
        latest=_latest(session, app.id),
        current=current,
        in_flight=platform.router.in_flight(),
    )


# -- apps ----------------------------------------------------------------------------------------


@router.get("/apps/", response_model=AppList)
def list_apps(
    platform: PlatformDep,
    session: SessionDep,
    principal: PrincipalDep,
    team_id: str | None = None,
    limit: int = Query(1000, ge=1, le=1000),
    skip: int = Query(0, ge=0, le=MAX_SKIP),
) -> dict[str, Any]:
    user = require_user(principal)
    if team_id is not None:
        ids = [get_team(session, principal, team_id, action=Action.TEAM_READ).id]
    else:
        ids = team_ids(session, user)
    query = select(App).where(col(App.team_id).in_(ids))
    count = session.exec(select(func.count()).select_from(query.subquery())).one()
    apps = session.exec(query.order_by(col(App.created_at)).offset(skip).limit(limit)).all()
    return {"data": [render_app(platform, session, a) for a in apps], "count": count}


@router.post("/apps/", status_code=201, response_model=AppOut)
def create_app(
    body: AppCreate, request: Request, platform: PlatformDep, session: SessionDep, principal: PrincipalDep
) -> dict[str, Any]:
    team = get_team(session, principal, body.team_id, action=Action.APP_CREATE)
    cap = quotas.check_new_app(session, team, platform.settings)
    slug = slugify(body.name)
    if not _SLUG_RE.match(slug):
        raise Conflict(
            f"The name {body.name!r} does not make a valid app slug.", hint="Use letters, digits, dashes."
        )
    if session.exec(select(App).where(App.slug == slug)).first() is not None:
        raise Conflict(
            f"An app named {slug!r} already exists.",
            title="App name taken",
            hint="App names are unique on the platform (they are the host name); choose another with --app.",
        )
    app = App(team_id=team.id, slug=slug, name=body.name, directory=body.directory)
    if cap is not None:
        app.max_instances = max(1, min(app.max_instances, cap))
    session.add(app)
    try:
        session.commit()
    except IntegrityError as exc:  # a concurrent create of the same slug
        raise Conflict(f"An app named {slug!r} already exists.", title="App name taken") from exc
    audit.note(request, team_id=team.id, app_id=app.id)
    return render_app(platform, session, app)


@router.get("/apps/{app_id}", response_model=AppOut)
def read_app(
    app_id: str, platform: PlatformDep, session: SessionDep, principal: PrincipalDep
) -> dict[str, Any]:
    return render_app(platform, session, get_app(session, principal, app_id, action=Action.APP_READ))


@router.patch("/apps/{app_id}", response_model=AppOut)
def update_app(
    app_id: str, body: AppUpdate, platform: PlatformDep, session: SessionDep, principal: PrincipalDep
) -> dict[str, Any]:
    app = get_app(session, principal, app_id, action=Action.APP_UPDATE)
    if "directory" in body.model_fields_set:
        app.directory = body.directory
    if "health_path" in body.model_fields_set:
        app.health_path = body.health_path or "/"
    app.updated_at = utcnow()
    session.add(app)
    session.commit()
    return render_app(platform, session, app)


@router.delete("/apps/{app_id}", status_code=204)
async def delete_app(app_id: str, platform: PlatformDep, principal: PrincipalDep) -> Response:
    def load() -> App:
        with platform.db.session() as s:
            return get_app(s, principal, app_id, action=Action.APP_DELETE)

    app = await asyncio.to_thread(load)
    await platform.fleet.remove(app.id)

    def delete() -> None:
        from control_plane.models import ApiToken, BuildLogLine

        with platform.db.session() as s:
            deps = s.exec(select(Deployment).where(Deployment.app_id == app.id)).all()
            for dep in deps:
                for line in s.exec(select(BuildLogLine).where(BuildLogLine.deployment_id == dep.id)).all():
                    s.delete(line)
                s.delete(dep)
            for var in s.exec(select(EnvVar).where(EnvVar.app_id == app.id)).all():
                s.delete(var)
            from control_plane.models import Alert, Slo, Webhook

            for table in (Slo, Webhook, Alert):
                for owned in s.exec(select(table).where(table.app_id == app.id)).all():
                    s.delete(owned)
            for tok in s.exec(select(ApiToken).where(ApiToken.app_id == app.id)).all():
                tok.revoked_at = utcnow()
                s.add(tok)
            row = s.get(App, app.id)
            if row is not None:
                s.delete(row)
            s.commit()
        import shutil

        for dep in deps:
            shutil.rmtree(platform.paths.deployments / dep.id, ignore_errors=True)
        platform.logstore.delete_app(app.id)
        platform.rollups.delete_app(app.id)
        platform.traces.delete_app(app.id)

    await asyncio.to_thread(delete)
    return Response(status_code=204)


# -- rollback / redeploy ---------------------------------------------------------------------------


def new_release(platform: Platform, session: Session, app: App, kind: str, source: Deployment) -> Deployment:
    """A deployment that reuses ``source``'s build (no upload, no rebuild), queued at once."""
    busy = session.exec(
        select(Deployment).where(Deployment.app_id == app.id, col(Deployment.status).in_(list(IN_PROGRESS)))
    ).first()
    if busy is not None and kind == "rollback":
        raise Conflict(
            f"Deployment {busy.slug} of this app is still in progress.",
            title="Deployment in progress",
            hint="Wait for it to finish, then roll back.",
        )
    artifact = source.source_deployment_id if source.kind != "upload" else source.id
    dep = Deployment(
        app_id=app.id,
        kind=kind,
        status=S.READY_FOR_BUILD,
        source_deployment_id=artifact,
        entrypoint=source.entrypoint,
        import_dir=source.import_dir,
        workdir=source.workdir,
        environment_key=source.environment_key,
    )
    session.add(dep)
    session.commit()
    return dep


@router.post("/apps/{app_id}/rollback", response_model=DeploymentOut)
async def rollback(
    app_id: str, platform: PlatformDep, principal: PrincipalDep, body: RollbackRequest | None = None
) -> dict[str, Any]:
    target_id = body.deployment_id if body else None

    def create() -> tuple[Deployment, App]:
        with platform.db.session() as s:
            app = get_app(s, principal, app_id, action=Action.RELEASE)
            if target_id:
                target = s.get(Deployment, target_id)
                if target is None or target.app_id != app.id:
                    raise NotFound(
                        f"Deployment {target_id} not found in this app.", title="Deployment not found"
                    )
                if target.status not in WENT_LIVE:
                    raise Conflict(
                        f"Deployment {target.slug} did not succeed ({target.status}); "
                        "only ones that went live can serve.",
                        title="Cannot roll back to a failed deployment",
                        hint="`fastapi-deploy deployments APP` lists them with their status.",
                    )
                artifact = s.get(Deployment, target.source_deployment_id or target.id)
                if target.artifact_pruned or artifact is None or artifact.artifact_pruned:
                    keep = platform.settings.keep_deployments
                    raise Conflict(
                        f"The build of deployment {target.slug} is no longer kept: only the newest {keep} "
                        "successful builds of an app are kept for rollback.",
                        title="Build no longer kept",
                        hint="Roll back to a newer deployment (`fastapi-deploy deployments APP` shows which "
                        "are kept), or push that version of the code again.",
                    )
            else:
                candidates = s.exec(
                    select(Deployment)
                    .where(Deployment.app_id == app.id, Deployment.status == S.SUCCESS)
                    .where(Deployment.id != (app.current_deployment_id or ""))
                    .where(col(Deployment.artifact_pruned).is_(False))
                    .order_by(col(Deployment.created_at).desc())
                ).all()
                current = s.get(Deployment, app.current_deployment_id or "")
                current_artifact = (current.source_deployment_id or current.id) if current else None
                target = next(
                    (c for c in candidates if (c.source_deployment_id or c.id) != current_artifact), None
                )
                if target is None:
                    raise Conflict(
                        "There is no earlier successful deployment to roll back to.",
                        title="Nothing to roll back to",
                        hint="Push a new version instead.",
                    )
            if target.id == app.current_deployment_id:
                raise Conflict(f"Deployment {target.slug} is already serving.", title="Already serving")
            dep = new_release(platform, s, app, "rollback", target)
            return dep, app

    dep, app = await asyncio.to_thread(create)
    platform.deployer.submit(dep.id)
    return deployment_out(dep, app, platform.settings)


@router.post("/apps/{app_id}/redeploy", response_model=DeploymentOut)
async def redeploy(app_id: str, platform: PlatformDep, principal: PrincipalDep) -> dict[str, Any]:
    def create() -> tuple[Deployment, App]:
        with platform.db.session() as s:
            app = get_app(s, principal, app_id, action=Action.RELEASE)
            current = s.get(Deployment, app.current_deployment_id or "")
            if current is None:
                raise Conflict(
                    "The app has never been deployed.", title="Nothing to redeploy", hint="Push it first."
                )
            return new_release(platform, s, app, "redeploy", current), app

    dep, app = await asyncio.to_thread(create)
    platform.deployer.submit(dep.id)
    return deployment_out(dep, app, platform.settings)
