"""Deployments: create, upload (the storage endpoint is ours), upload-complete, status, build logs."""

from __future__ import annotations

import asyncio
import hmac
import os
import secrets
import shutil
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlmodel import Session, col, func, select

from control_plane import quotas
from control_plane.api.deps import MAX_SKIP, PlatformDep, PrincipalDep, SessionDep
from control_plane.errors import BadRequest, Conflict, Forbidden, NotFound, TooLarge
from control_plane.models import App, Deployment, Team, utcnow
from control_plane.permissions import Action
from control_plane.platform import Platform
from control_plane.security import Principal, aware, get_app, hash_token
from control_plane.serializers import deployment_out
from control_plane.statuses import DeploymentStatus as S

router = APIRouter()

_MULTIPART_OVERHEAD = 64 * 1024


class DeploymentCreate(BaseModel):
    archive_size_bytes: int = Field(0, ge=0)


def _create_out(dep: Deployment, app: App, platform: Platform) -> dict[str, Any]:
    out = deployment_out(dep, app, platform.settings)
    # CreateDeployment: all six fields required and non-null.
    return {k: out[k] for k in ("id", "app_id", "slug", "status", "dashboard_url", "url")} | out


def _load(
    session: Session, principal: Principal, deployment_id: str, action: Action
) -> tuple[Deployment, App]:
    dep = session.get(Deployment, deployment_id)
    if dep is None:
        raise NotFound(f"Deployment {deployment_id} not found.", title="Deployment not found")
    app = get_app(session, principal, dep.app_id, action=action)  # 404 when not the caller's
    return dep, app


def _team(session: Session, app: App) -> Team:
    team = session.get(Team, app.team_id)
    assert team is not None  # app.team_id is a foreign key
    return team


def _too_large(platform: Platform, size: int) -> TooLarge:
    limit = platform.settings.max_archive_bytes
    return TooLarge(
        f"The app source code ({size / 1e6:.1f} MB compressed) exceeds the maximum allowed size "
        f"({limit / 1e6:.0f} MB).",
        title="Upload too large",
        hint="Exclude build output, data and virtualenvs with a .fastapicloudignore file.",
    )


@router.post("/apps/{app_id}/deployments/", status_code=201)
def create_deployment(
    app_id: str, body: DeploymentCreate, platform: PlatformDep, session: SessionDep, principal: PrincipalDep
) -> dict[str, Any]:
    app = get_app(session, principal, app_id, action=Action.DEPLOY)
    if body.archive_size_bytes > platform.settings.max_archive_bytes:
        raise _too_large(platform, body.archive_size_bytes)
    quotas.check_deployment(session, app, _team(session, app), body.archive_size_bytes, platform.settings)
    dep = Deployment(app_id=app.id, archive_size_bytes=body.archive_size_bytes)
    session.add(dep)
    session.commit()
    return _create_out(dep, app, platform)


@router.get("/apps/{app_id}/deployments/")
def list_deployments(
    app_id: str,
    platform: PlatformDep,
    session: SessionDep,
    principal: PrincipalDep,
    limit: int = Query(100, ge=1, le=1000),
    skip: int = Query(0, ge=0, le=MAX_SKIP),
) -> dict[str, Any]:
    app = get_app(session, principal, app_id, action=Action.APP_MONITOR)
    query = select(Deployment).where(Deployment.app_id == app.id)
    count = session.exec(select(func.count()).select_from(query.subquery())).one()
    rows = session.exec(query.order_by(col(Deployment.created_at).desc()).offset(skip).limit(limit)).all()
    return {"data": [deployment_out(d, app, platform.settings) for d in rows], "count": count}


@router.get("/deployments/{deployment_id}")
def read_deployment(
    deployment_id: str, platform: PlatformDep, session: SessionDep, principal: PrincipalDep
) -> dict[str, Any]:
    dep, app = _load(session, principal, deployment_id, Action.DEPLOYMENT_READ)
    return deployment_out(dep, app, platform.settings)


@router.post("/deployments/{deployment_id}/upload")
def upload_url(
    deployment_id: str, platform: PlatformDep, session: SessionDep, principal: PrincipalDep
) -> dict[str, Any]:
    dep, _app = _load(session, principal, deployment_id, Action.DEPLOY)
    if dep.status != S.WAITING_UPLOAD:
        raise Conflict(f"Deployment {dep.slug} is not waiting for an upload (it is {dep.status}).")
    token = secrets.token_urlsafe(32)
    dep.upload_token_hash = hash_token(token)
    dep.upload_expires_at = utcnow() + timedelta(seconds=platform.settings.upload_token_ttl)
    session.add(dep)
    session.commit()
    return {
        "url": f"{platform.settings.api_url}/api/v1/deployments/{dep.id}/archive",
        "fields": {"upload_token": token},
    }


@router.post("/deployments/{deployment_id}/archive", status_code=204)
async def receive_archive(deployment_id: str, request: Request, platform: PlatformDep) -> None:
    """The storage target (like an S3 presigned POST): no Bearer token, a single-use upload token in the
    form fields, then the ``file`` part. Stores the bytes and answers at once; the build starts on
    upload-complete."""
    limit = platform.settings.max_archive_bytes
    declared = int(request.headers.get("content-length") or 0)
    if declared > limit + _MULTIPART_OVERHEAD:
        raise _too_large(platform, declared)

    def check_deployment() -> tuple[Deployment, Team, int | None]:
        with platform.db.session() as s:
            dep = s.get(Deployment, deployment_id)
            app = s.get(App, dep.app_id) if dep is not None else None
            if dep is None or app is None:
                raise NotFound("Unknown upload target.", title="Upload not found")
            team = _team(s, app)
            return dep, team, quotas.limits(s, team.id, platform.settings).max_archive_bytes

    dep, team, team_limit = await asyncio.to_thread(check_deployment)
    form = await request.form(max_files=1, max_fields=8)
    try:
        token = form.get("upload_token")
        expected = dep.upload_token_hash
        if (
            not isinstance(token, str)
            or expected is None
            or not hmac.compare_digest(hash_token(token), expected)
        ):
            raise Forbidden("The upload token is not valid for this deployment.", title="Upload refused")
        if dep.upload_expires_at is not None and aware(dep.upload_expires_at) <= utcnow():
            raise Forbidden("The upload URL expired.", title="Upload refused", hint="Push again.")
        if dep.status != S.WAITING_UPLOAD:
            raise Conflict(f"Deployment {dep.slug} is not waiting for an upload (it is {dep.status}).")
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise BadRequest("The form has no `file` part.", title="Upload refused")
        target = platform.paths.archive(dep.id)

        def store() -> int:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".part")
            with open(tmp, "wb") as out:
                upload.file.seek(0)
                shutil.copyfileobj(upload.file, out, 1024 * 1024)
                out.flush()
                os.fsync(out.fileno())
            size = tmp.stat().st_size
            tmp.replace(target)
            return size

        size = await asyncio.to_thread(store)
        if team_limit is not None and size > team_limit:
            # The size declared at create time was checked; this is what was actually sent.
            platform.paths.archive(dep.id).unlink(missing_ok=True)
            quotas.check_archive_size(team_limit, size, team)
    finally:
        await form.close()

    def record() -> None:
        with platform.db.session() as s:
            row = s.get(Deployment, dep.id)
            if row is None:
                return
            row.archive_size_bytes = size
            row.upload_token_hash = None  # single use
            s.add(row)
            s.commit()

    await asyncio.to_thread(record)


@router.post("/deployments/{deployment_id}/upload-complete")
async def upload_complete(
    deployment_id: str, platform: PlatformDep, principal: PrincipalDep
) -> dict[str, Any]:
    def mark() -> tuple[Deployment, App]:
        with platform.db.session() as s:
            dep, app = _load(s, principal, deployment_id, Action.DEPLOY)
            if dep.status != S.WAITING_UPLOAD:
                raise Conflict(f"Deployment {dep.slug} was already submitted (it is {dep.status}).")
            if not platform.paths.archive(dep.id).is_file():
                raise BadRequest(
                    "No archive was uploaded for this deployment.",
                    title="Nothing uploaded",
                    hint="Upload the archive to the URL from /upload first.",
                )
            dep.status = S.READY_FOR_BUILD
            dep.updated_at = utcnow()
            s.add(dep)
            s.commit()
            return dep, app

    dep, app = await asyncio.to_thread(mark)
    platform.deployer.submit(dep.id)
    return _create_out(dep, app, platform)


@router.post("/deployments/{deployment_id}/upload-cancelled")
def upload_cancelled(
    deployment_id: str, platform: PlatformDep, session: SessionDep, principal: PrincipalDep
) -> dict[str, Any]:
    dep, app = _load(session, principal, deployment_id, Action.DEPLOY)
    if dep.status == S.WAITING_UPLOAD:
        dep.status = S.UPLOAD_CANCELLED
        dep.finished_at = dep.updated_at = utcnow()
        session.add(dep)
        session.commit()
        shutil.rmtree(platform.paths.deployments / dep.id, ignore_errors=True)
    platform.buildlogs.notify(dep.id)
    return deployment_out(dep, app, platform.settings)


@router.get("/deployments/{deployment_id}/build-logs")
async def build_logs(
    deployment_id: str, platform: PlatformDep, principal: PrincipalDep, last_id: str | None = None
) -> StreamingResponse:
    def check() -> None:
        with platform.db.session() as s:
            _load(s, principal, deployment_id, Action.DEPLOYMENT_READ)

    await asyncio.to_thread(check)
    return StreamingResponse(
        platform.buildlogs.stream(deployment_id, last_id),
        media_type="application/x-ndjson",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
