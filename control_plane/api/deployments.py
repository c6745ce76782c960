"""Deployments: create, upload (the storage endpoint is ours), upload-complete, status, build logs."""

from __future__ import annotations

import asyncio
import hmac
import os
import secrets
import shutil
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, BinaryIO, Literal
from urllib.parse import parse_qsl

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlmodel import Session, col, func, select
from starlette.requests import ClientDisconnect

from control_plane import quotas
from control_plane.api.deps import MAX_SKIP, PlatformDep, PrincipalDep, SessionDep, StreamingPrincipalDep
from control_plane.errors import BadRequest, Conflict, Forbidden, NotFound, TooLarge
from control_plane.models import App, Deployment, Team, utcnow
from control_plane.permissions import Action
from control_plane.platform import Platform
from control_plane.security import Principal, aware, get_app, hash_token
from control_plane.serializers import DeploymentList, DeploymentOut, deployment_out
from control_plane.statuses import DeploymentStatus as S

router = APIRouter()

_MULTIPART_OVERHEAD = 64 * 1024
"""Bytes a storage form may add to its file (boundaries, part headers, the token field)."""
_MAX_FIELDS = 8
_MAX_FIELD_BYTES = 4096


class DeploymentCreate(BaseModel):
    archive_size_bytes: int = Field(0, ge=0)
    fail_on_breaking: bool = False
    """Refuse to switch traffic to the new revision if its API breaks the serving one's (our extension;
    ``fastapi-deploy push --fail-on-breaking``)."""


class UploadTarget(BaseModel):
    """Where to send the archive, as an S3 presigned POST: ``fields`` first, then the ``file`` part."""

    url: str
    fields: dict[str, str]


class BuildLogLine(BaseModel):
    """One NDJSON line of the build-log stream (``id``: resume after it with ``last_id``)."""

    type: Literal["message", "heartbeat", "timeout", "complete", "failed"]
    id: str
    message: str | None = None
    """Only on ``message`` lines."""


class NDJSONResponse(StreamingResponse):
    media_type = "application/x-ndjson"


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


@router.post("/apps/{app_id}/deployments/", status_code=201, response_model=DeploymentOut)
def create_deployment(
    app_id: str, body: DeploymentCreate, platform: PlatformDep, session: SessionDep, principal: PrincipalDep
) -> dict[str, Any]:
    app = get_app(session, principal, app_id, action=Action.DEPLOY)
    if body.archive_size_bytes > platform.settings.max_archive_bytes:
        raise _too_large(platform, body.archive_size_bytes)
    quotas.check_deployment(session, app, _team(session, app), body.archive_size_bytes, platform.settings)
    dep = Deployment(
        app_id=app.id, archive_size_bytes=body.archive_size_bytes, fail_on_breaking=body.fail_on_breaking
    )
    session.add(dep)
    session.commit()
    return _create_out(dep, app, platform)


@router.get("/apps/{app_id}/deployments/", response_model=DeploymentList)
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


@router.get("/deployments/{deployment_id}", response_model=DeploymentOut)
def read_deployment(
    deployment_id: str, platform: PlatformDep, session: SessionDep, principal: PrincipalDep
) -> dict[str, Any]:
    dep, app = _load(session, principal, deployment_id, Action.DEPLOYMENT_READ)
    return deployment_out(dep, app, platform.settings)


@router.post("/deployments/{deployment_id}/upload", response_model=UploadTarget)
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


class _StorageForm:
    """The storage upload's ``multipart/form-data`` body, parsed as it arrives.

    Text fields first (at most ``_MAX_FIELDS``, each under ``_MAX_FIELD_BYTES``), then the ``file`` part,
    whose bytes collect in ``pending`` for the caller to write out chunk by chunk: nothing is buffered
    beyond one network read. ``file_started`` turns true at the file part's headers, before its bytes
    are accepted, so the caller can check the upload token first.
    """

    def __init__(self, boundary: bytes) -> None:
        self.fields: dict[str, str] = {}
        self.file_started = False
        self.file_done = False
        self.ended = False
        self.pending: list[bytes] = []
        self.file_bytes = 0
        self._in_file = False
        self._name = ""
        self._value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._header = bytearray()
        self._header_value = bytearray()
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda d, a, b: self._header.extend(d[a:b]),
                "on_header_value": lambda d, a, b: self._header_value.extend(d[a:b]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )

    def feed(self, chunk: bytes) -> None:
        """Parse ``chunk``. Raises BadRequest for a malformed or unexpected form."""
        try:
            self._parser.write(chunk)
        except FormParserError as exc:
            raise BadRequest(f"The upload is not a valid form: {exc}", title="Upload refused") from exc

    def _part_begin(self) -> None:
        self._headers = {}
        self._name, self._value, self._in_file = "", bytearray(), False

    def _header_end(self) -> None:
        self._headers[bytes(self._header).lower()] = bytes(self._header_value)
        self._header, self._header_value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        _kind, options = parse_options_header(self._headers.get(b"content-disposition"))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if self.file_started:
            raise BadRequest("The `file` part must be the last part of the form.", title="Upload refused")
        if self._name == "file":
            self.file_started = self._in_file = True
        elif len(self.fields) >= _MAX_FIELDS:
            raise BadRequest(f"The form has more than {_MAX_FIELDS} fields.", title="Upload refused")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.pending.append(data[start:end])
            self.file_bytes += end - start
            return
        self._value.extend(data[start:end])
        if len(self._value) > _MAX_FIELD_BYTES:
            raise BadRequest(f"The form field {self._name!r} is too long.", title="Upload refused")

    def _part_end(self) -> None:
        if self._in_file:
            self.file_done = True
        else:
            self.fields[self._name] = self._value.decode("utf-8", "replace")

    def _end(self) -> None:
        self.ended = True


@dataclass(frozen=True)
class _UploadLimits:
    """What one upload may weigh: the server's limit, the team's upload limit and what is left of the
    team's storage quota (None: no such limit)."""

    server: int
    team_archive: int | None
    storage_left: int | None
    team: Team

    @property
    def bytes(self) -> int:
        return min(x for x in (self.server, self.team_archive, self.storage_left) if x is not None)

    def error(self, size: int, *, stopped: bool = False) -> TooLarge:
        """The 413 for an upload of ``size`` bytes (``stopped``: reading stopped there, unfinished)."""
        hint = "Exclude build output, data and virtualenvs with a .fastapicloudignore file."
        stop = f": the upload was stopped after {_mb(size)}" if stopped else ""
        if self.storage_left is not None and self.bytes == self.storage_left:
            what = "The upload" if stopped else f"The upload ({_mb(size)} compressed)"
            return TooLarge(
                f"{what} does not fit in team {self.team.slug}'s storage quota "
                f"({_mb(self.storage_left)} left){stop}.",
                title="Storage quota exceeded",
                hint=hint + " Or delete apps you no longer need, or ask a platform admin for more.",
            )
        team = f" for team {self.team.slug}" if self.bytes != self.server else ""
        what = "The app source code" if stopped else f"The app source code ({_mb(size)} compressed)"
        return TooLarge(
            f"{what} exceeds the maximum allowed size ({_mb(self.bytes)}){team}{stop}.",
            title="Upload too large",
            hint=hint,
        )


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.0f} kB"


def _upload_limits(session: Session, platform: Platform, dep: Deployment, team: Team) -> _UploadLimits:
    quota = quotas.limits(session, team.id, platform.settings)
    storage_left = None
    if quota.max_storage_bytes is not None:
        # Usage counts this deployment with the size declared at create time: count what arrives instead.
        used = quotas.usage(session, team.id).storage_bytes - dep.archive_size_bytes
        storage_left = max(0, quota.max_storage_bytes - used)
    return _UploadLimits(platform.settings.max_archive_bytes, quota.max_archive_bytes, storage_left, team)


def _refuse_upload(platform: Platform, deployment_id: str, error: TooLarge) -> None:
    """Fail the deployment over an oversize upload (as extraction would: the same status and fields),
    with the reason in its build log, and remove what was received."""
    platform.buildlogs.append(deployment_id, f"{error.title}: {error.message}")
    platform.buildlogs.append(deployment_id, f"Hint: {error.hint}")
    with platform.db.session() as s:
        row = s.get(Deployment, deployment_id)
        if row is not None and row.status == S.WAITING_UPLOAD:
            row.status = row.error_code = S.EXTRACTING_FAILED_ARCHIVE_TOO_LARGE
            row.error_title, row.error_message, row.error_hint = error.title, error.message, error.hint
            row.upload_token_hash = None
            row.updated_at = row.finished_at = utcnow()
            s.add(row)
            s.commit()
    shutil.rmtree(platform.paths.deployments / deployment_id, ignore_errors=True)
    platform.buildlogs.notify(deployment_id)


_STORAGE_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["upload_token", "file"],
                    "properties": {
                        "upload_token": {"type": "string", "description": "From `fields` of /upload."},
                        "file": {"type": "string", "format": "binary", "description": "The archive, last."},
                    },
                }
            }
        },
    }
}


@router.post("/deployments/{deployment_id}/archive", status_code=204, openapi_extra=_STORAGE_FORM)
async def receive_archive(deployment_id: str, request: Request, platform: PlatformDep) -> None:
    """The storage target (like an S3 presigned POST): no Bearer token, a single-use upload token in the
    form fields, then the ``file`` part. Stores the bytes as they arrive and answers at once; the build
    starts on upload-complete.

    The size limits (the server's, the team's upload limit and storage quota) hold for the bytes
    actually received, whatever ``Content-Length`` says or when there is none (chunked): past the limit
    reading stops, the partial file is deleted, the deployment fails with
    ``extracting_failed_archive_too_large`` and the answer is 413. A bad token: 403, nothing stored.
    """

    def load() -> tuple[Deployment, _UploadLimits]:
        with platform.db.session() as s:
            dep = s.get(Deployment, deployment_id)
            app = s.get(App, dep.app_id) if dep is not None else None
            if dep is None or app is None:
                raise NotFound("Unknown upload target.", title="Upload not found")
            return dep, _upload_limits(s, platform, dep, _team(s, app))

    dep, limits = await asyncio.to_thread(load)
    kind, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        fields = await _small_form(request) if kind == b"application/x-www-form-urlencoded" else {}
        _check_upload_token(dep, fields)  # who may not upload learns nothing more
        raise BadRequest(
            "The upload must be multipart/form-data: the fields, then the `file` part.",
            title="Upload refused",
            hint="Send it as an S3 presigned POST would be sent.",
        )
    length = request.headers.get("content-length", "")
    declared = int(length) if length.isdigit() else 0  # none (chunked): only what arrives counts
    form = _StorageForm(boundary)
    target = platform.paths.archive(dep.id)
    tmp = target.with_name(f"archive.{secrets.token_hex(4)}.part")
    out: BinaryIO | None = None

    async def refuse(error: TooLarge) -> TooLarge:
        await asyncio.to_thread(_refuse_upload, platform, dep.id, error)
        return error

    try:
        async for chunk in request.stream():
            form.feed(chunk)
            if form.file_started and out is None:
                _check_upload_token(dep, form.fields)  # before a single byte of the file is kept
                if declared > limits.bytes + _MULTIPART_OVERHEAD:
                    raise await refuse(limits.error(declared))
                target.parent.mkdir(parents=True, exist_ok=True)
                out = await asyncio.to_thread(open, tmp, "wb")
            if form.file_bytes > limits.bytes:
                raise await refuse(limits.error(form.file_bytes, stopped=not form.file_done))
            if out is not None and form.pending:
                data = b"".join(form.pending)
                form.pending.clear()
                await asyncio.to_thread(out.write, data)
            if form.ended:
                break
        if not form.file_done or out is None:
            if not form.file_started:
                _check_upload_token(dep, form.fields)
            raise BadRequest(
                "The form has no complete `file` part.",
                title="Upload refused",
                hint="Upload the archive again.",
            )

        def finish(handle: BinaryIO) -> None:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            tmp.replace(target)

        await asyncio.to_thread(finish, out)
    except ClientDisconnect:
        raise BadRequest("The upload was interrupted.", title="Upload interrupted") from None
    finally:
        if out is not None and not out.closed:
            out.close()
        tmp.unlink(missing_ok=True)
    size = form.file_bytes

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


async def _small_form(request: Request) -> dict[str, str]:
    """An urlencoded form of at most ``_MAX_FIELDS`` x ``_MAX_FIELD_BYTES`` bytes (read no further)."""
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > _MAX_FIELDS * _MAX_FIELD_BYTES:
            raise BadRequest("The form is too long.", title="Upload refused")
    return dict(parse_qsl(body.decode("latin-1"))[:_MAX_FIELDS])


def _check_upload_token(dep: Deployment, fields: dict[str, str]) -> None:
    """Forbidden unless ``fields`` carry the deployment's live upload token; Conflict once uploaded."""
    token = fields.get("upload_token")
    expected = dep.upload_token_hash
    if token is None or expected is None or not hmac.compare_digest(hash_token(token), expected):
        raise Forbidden("The upload token is not valid for this deployment.", title="Upload refused")
    if dep.upload_expires_at is not None and aware(dep.upload_expires_at) <= utcnow():
        raise Forbidden("The upload URL expired.", title="Upload refused", hint="Push again.")
    if dep.status != S.WAITING_UPLOAD:
        raise Conflict(f"Deployment {dep.slug} is not waiting for an upload (it is {dep.status}).")


@router.post("/deployments/{deployment_id}/upload-complete", response_model=DeploymentOut)
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


@router.post("/deployments/{deployment_id}/upload-cancelled", response_model=DeploymentOut)
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


@router.get(
    "/deployments/{deployment_id}/build-logs",
    response_class=NDJSONResponse,
    responses={
        200: {
            "description": "The build log as NDJSON, one line per object, until `complete`, `failed` "
            "or `timeout` (reconnect with `last_id`).",
            "content": {"application/x-ndjson": {"schema": BuildLogLine.model_json_schema()}},
        },
        # Errors are JSON, not the stream's media type (a model here would be documented as NDJSON).
        **{
            status: {
                "description": "Error",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
            }
            for status in (400, 401, 403, 404, 409, 413, 429)
        },
    },
)
async def build_logs(
    deployment_id: str, platform: PlatformDep, principal: StreamingPrincipalDep, last_id: str | None = None
) -> StreamingResponse:
    def check() -> None:
        with platform.db.session() as s:
            _load(s, principal, deployment_id, Action.DEPLOYMENT_READ)

    await asyncio.to_thread(check)
    return NDJSONResponse(
        platform.buildlogs.stream(deployment_id, last_id),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
