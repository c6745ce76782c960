"""The admin API (``/api/v1/admin/...``), platform admins only: users, teams, quotas, every app, the
platform's status and settings, the audit log, and secret-key rotation.

Every route depends on :func:`admin_user` (``security.require_platform_admin``): any other caller gets
403. Every mutating call lands in the audit log like any other API call (``audit.py``).
"""

from __future__ import annotations

import asyncio
import os
import platform as pyplatform
import shutil
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field
from sqlmodel import Session, col, func, select

from control_plane import audit, passwords, platform_settings, quotas
from control_plane.api.apps import render_app
from control_plane.api.deps import MAX_SKIP, PlatformDep, PrincipalDep, SessionDep
from control_plane.api.teams import QuotaReport, TeamOut, create_team_row, delete_team_row
from control_plane.errors import Conflict, NotFound
from control_plane.models import ApiToken, App, AuditEntry, EnvVar, Membership, Team, TeamQuota, User, utcnow
from control_plane.permissions import Role, RoleName
from control_plane.platform_settings import PlatformSettings, PlatformSettingsUpdate, QuotaLimits
from control_plane.security import hash_token, issue_user_token, require_platform_admin, revoke_user_tokens
from control_plane.serializers import AppOut, Shape, ts


def admin_user(principal: PrincipalDep) -> User:
    return require_platform_admin(principal)


AdminDep = Annotated[User, Depends(admin_user)]
router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(admin_user)])


# -- shapes ----------------------------------------------------------------------------------------------


class MembershipOut(BaseModel):
    team_id: str
    team_slug: str
    role: str


class AdminUserOut(BaseModel):
    id: str
    email: str
    name: str
    is_admin: bool
    disabled: bool
    has_password: bool
    created_at: str | None
    last_login_at: str | None
    teams: list[MembershipOut]


class AdminUserList(BaseModel):
    data: list[AdminUserOut]
    count: int


class UserCreate(BaseModel):
    email: str = Field(min_length=3, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")
    name: str = Field("", max_length=200)
    password: str | None = Field(None, max_length=passwords.MAX_LENGTH)
    """None: a random one is generated and returned once."""
    is_admin: bool = False
    team_id: str | None = None
    """Add the new user to this team..."""
    role: RoleName = "member"
    """...with this role."""


class UserCreated(AdminUserOut):
    password: str | None = None
    """The generated password (only when none was given): shown once."""


class UserUpdate(BaseModel):
    name: str | None = Field(None, max_length=200)
    is_admin: bool | None = None
    disabled: bool | None = None
    """True disables the account: its tokens and password are refused until enabled again."""


class PasswordReset(BaseModel):
    password: str | None = Field(None, max_length=passwords.MAX_LENGTH)
    """None: a random one is generated and returned once."""


class PasswordResetOut(BaseModel):
    password: str | None
    revoked_tokens: int
    """Every user token of the account is revoked by a reset."""


class ImpersonationToken(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    expires_in_days: int = Field(1, ge=1, le=365)


class TokenValue(BaseModel):
    id: str
    name: str
    expires_at: str | None
    value: str


class AdminTeamCreate(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    slug: str | None = Field(None, max_length=63)
    owner_email: str | None = None
    """Its first owner (an existing user); none: the team starts without members."""


class AdminTeamOut(BaseModel):
    id: str
    slug: str
    name: str
    created_at: str | None
    members: int
    apps: int


class AdminTeamList(BaseModel):
    data: list[AdminTeamOut]
    count: int


class AuditOut(BaseModel):
    id: str
    at: str | None
    method: str
    path: str
    route: str
    status_code: int
    actor_kind: str | None
    actor_user_id: str | None
    actor_email: str | None
    actor_token_id: str | None
    team_id: str | None
    app_id: str | None
    client_ip: str | None
    user_agent: str
    duration_ms: float


class AuditList(BaseModel):
    data: list[AuditOut]
    count: int
    """How many entries match the filters in all."""
    next_before_id: str | None
    """Pass as ``before_id`` for the next (older) page; null on the last page."""


class RotationOut(BaseModel):
    rotated: int
    keys: int


class AdminAppOut(AppOut):
    team_slug: str | None


class AdminAppList(BaseModel):
    data: list[AdminAppOut]
    count: int


class NodeOut(Shape):
    """One machine the backend runs instances on."""

    hostname: str
    os: str
    python: str
    cpus: int | None
    load_average: list[float] | None
    """1, 5 and 15 minutes."""
    memory_total_bytes: int | None
    memory_available_bytes: int | None
    disk_total_bytes: int
    """Of the data directory's file system (so are the free bytes)."""
    disk_free_bytes: int


class BackendStatus(Shape):
    name: str
    instances: dict[str, int]
    """Instances by state."""
    nodes: list[NodeOut]


class RemoteRouterStatus(Shape):
    name: str
    report_age_seconds: float | None
    in_flight: int
    queued: int
    acked: int
    """The last route change it applied (a sequence number)."""


class RouterStatus(Shape):
    host: str
    port: int
    remote: list[RemoteRouterStatus]
    """Remote routers (``fastapi-deploy router``) connected to this control plane."""


class PlatformStatus(Shape):
    ready: bool
    backend: BackendStatus
    router: RouterStatus
    database: Literal["sqlite", "postgresql"]
    apps: int
    apps_serving: int
    teams: int
    users: int
    env_vars: int
    secret_keys: int
    """Keys that decrypt env values (the first encrypts)."""
    data_dir: str


# -- users -----------------------------------------------------------------------------------------------


def _user_out(session: Session, user: User) -> AdminUserOut:
    rows = session.exec(
        select(Membership, Team)
        .join(Team, col(Team.id) == col(Membership.team_id))
        .where(Membership.user_id == user.id)
        .order_by(col(Team.slug))
    ).all()
    return AdminUserOut(
        id=user.id,
        email=user.email,
        name=user.name,
        is_admin=user.is_admin,
        disabled=user.disabled,
        has_password=user.password_hash is not None,
        created_at=ts(user.created_at),
        last_login_at=ts(user.last_login_at),
        teams=[MembershipOut(team_id=t.id, team_slug=t.slug, role=m.role) for m, t in rows],
    )


def _get_user(session: Session, user_id: str) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"User {user_id} not found.", title="User not found")
    return user


def _new_password(given: str | None) -> tuple[str, str | None]:
    """(the password to set, the one to show once: only a generated one)."""
    if given is None:
        generated = passwords.generate_password()
        return generated, generated
    try:
        passwords.check_strength(given)
    except ValueError as exc:
        raise Conflict(str(exc).capitalize() + ".", title="Password too weak") from exc
    return given, None


@router.get("/users")
def list_users(
    session: SessionDep,
    email: str | None = Query(None, description="Substring of the email."),
    disabled: bool | None = None,
    limit: int = Query(100, ge=1, le=1000),
    skip: int = Query(0, ge=0, le=MAX_SKIP),
) -> AdminUserList:
    q = select(User)
    if email:
        q = q.where(col(User.email).contains(email.lower(), autoescape=True))
    if disabled is not None:
        q = q.where(User.disabled == disabled)
    count = session.exec(select(func.count()).select_from(q.subquery())).one()
    rows = session.exec(q.order_by(col(User.created_at)).offset(skip).limit(limit)).all()
    return AdminUserList(data=[_user_out(session, u) for u in rows], count=count)


@router.post("/users", status_code=201)
def create_user(body: UserCreate, session: SessionDep) -> UserCreated:
    email = body.email.strip().lower()
    if session.exec(select(User).where(User.email == email)).first() is not None:
        raise Conflict(f"A user with the email {email!r} exists.", title="Email taken")
    team = None
    if body.team_id is not None:
        team = session.get(Team, body.team_id)
        if team is None:
            raise NotFound(f"Team {body.team_id} not found.", title="Team not found")
    password, shown = _new_password(body.password)
    user = User(
        email=email, name=body.name, is_admin=body.is_admin, password_hash=passwords.hash_password(password)
    )
    session.add(user)
    session.flush()
    if team is not None:
        session.add(Membership(team_id=team.id, user_id=user.id, role=body.role))
    session.commit()
    return UserCreated(**_user_out(session, user).model_dump(), password=shown)


@router.get("/users/{user_id}")
def read_user(user_id: str, session: SessionDep) -> AdminUserOut:
    return _user_out(session, _get_user(session, user_id))


@router.patch("/users/{user_id}")
def update_user(user_id: str, body: UserUpdate, session: SessionDep, me: AdminDep) -> AdminUserOut:
    user = _get_user(session, user_id)
    if user.id == me.id and (body.disabled or body.is_admin is False):
        raise Conflict(
            "You cannot disable yourself or drop your own admin rights.",
            title="Would lock you out",
            hint="Ask another platform admin.",
        )
    if body.name is not None:
        user.name = body.name
    if body.is_admin is not None:
        user.is_admin = body.is_admin
    if body.disabled is not None:
        user.disabled = body.disabled
    session.add(user)
    session.commit()
    return _user_out(session, user)


@router.post("/users/{user_id}/reset")
def reset_user(user_id: str, session: SessionDep, body: PasswordReset | None = None) -> PasswordResetOut:
    """Set a new password (given, or generated and shown once) and revoke every user token."""
    user = _get_user(session, user_id)
    password, shown = _new_password(body.password if body else None)
    user.password_hash = passwords.hash_password(password)
    session.add(user)
    revoked = revoke_user_tokens(session, user)
    session.commit()
    return PasswordResetOut(password=shown, revoked_tokens=revoked)


@router.post("/users/{user_id}/tokens", status_code=201)
def issue_token(user_id: str, body: ImpersonationToken, session: SessionDep) -> TokenValue:
    """A user token for the account (a service account's first token; support work). Audited."""
    user = _get_user(session, user_id)
    raw = issue_user_token(session, user, body.name, ttl=timedelta(days=body.expires_in_days))
    session.commit()
    row = session.exec(select(ApiToken).where(ApiToken.token_hash == hash_token(raw))).one()
    return TokenValue(id=row.id, name=row.name, expires_at=ts(row.expires_at), value=raw)


class AdminTokenOut(BaseModel):
    id: str
    kind: Literal["user", "deploy"]
    name: str
    user_id: str | None
    user_email: str | None
    app_id: str | None
    app_slug: str | None
    created_at: str | None
    expires_at: str | None
    last_used_at: str | None
    current: bool
    """True for the token of this very request."""


class AdminTokenList(BaseModel):
    data: list[AdminTokenOut]
    count: int


@router.get("/tokens")
def list_all_tokens(
    session: SessionDep,
    principal: PrincipalDep,
    kind: Literal["user", "deploy"] | None = None,
    user_id: str | None = None,
    app_id: str | None = None,
    limit: int = Query(500, ge=1, le=2000),
) -> AdminTokenList:
    """Every live token (user tokens: sessions, logins, personal; deploy tokens), newest first. Values
    are never stored, only their hashes."""
    query = select(ApiToken).where(col(ApiToken.revoked_at).is_(None))
    if kind is not None:
        query = query.where(ApiToken.kind == kind)
    if user_id is not None:
        query = query.where(ApiToken.user_id == user_id)
    if app_id is not None:
        query = query.where(ApiToken.app_id == app_id)
    now = utcnow()
    live = (col(ApiToken.expires_at).is_(None)) | (col(ApiToken.expires_at) > now)
    rows = session.exec(query.where(live).order_by(col(ApiToken.created_at).desc()).limit(limit)).all()
    emails = dict(session.exec(select(User.id, User.email)).all())
    slugs = dict(session.exec(select(App.id, App.slug)).all())
    data = [
        AdminTokenOut(
            id=r.id,
            kind="deploy" if r.kind == "deploy" else "user",
            name=r.name,
            user_id=r.user_id,
            user_email=emails.get(r.user_id) if r.user_id else None,
            app_id=r.app_id,
            app_slug=slugs.get(r.app_id) if r.app_id else None,
            created_at=ts(r.created_at),
            expires_at=ts(r.expires_at),
            last_used_at=ts(r.last_used_at),
            current=r.id == principal.token.id,
        )
        for r in rows
    ]
    return AdminTokenList(data=data, count=len(data))


@router.delete("/tokens/{token_id}", status_code=204)
def revoke_any_token(token_id: str, request: Request, session: SessionDep) -> Response:
    """Revoke one token, whoever's it is: a user's session or personal token, an app's deploy token."""
    row = session.get(ApiToken, token_id)
    if row is None or row.revoked_at is not None:
        raise NotFound(
            f"Token {token_id} not found.",
            title="Token not found",
            hint="GET /api/v1/admin/tokens lists the live ones.",
        )
    if row.app_id:
        audit.note(request, app_id=row.app_id)
    row.revoked_at = utcnow()
    session.add(row)
    session.commit()
    return Response(status_code=204)


# -- teams and quotas --------------------------------------------------------------------------------------


def _get_team(session: Session, team_id: str) -> Team:
    team = session.get(Team, team_id)
    if team is None:
        raise NotFound(f"Team {team_id} not found.", title="Team not found")
    return team


@router.get("/teams")
def list_all_teams(
    session: SessionDep, limit: int = Query(100, ge=1, le=1000), skip: int = Query(0, ge=0, le=MAX_SKIP)
) -> AdminTeamList:
    count = session.exec(select(func.count()).select_from(Team)).one()
    teams = session.exec(select(Team).order_by(col(Team.created_at)).offset(skip).limit(limit)).all()
    members = dict(
        session.exec(select(Membership.team_id, func.count()).group_by(col(Membership.team_id))).all()
    )
    apps = dict(session.exec(select(App.team_id, func.count()).group_by(col(App.team_id))).all())
    return AdminTeamList(
        data=[
            AdminTeamOut(
                id=t.id,
                slug=t.slug,
                name=t.name,
                created_at=ts(t.created_at),
                members=members.get(t.id, 0),
                apps=apps.get(t.id, 0),
            )
            for t in teams
        ],
        count=count,
    )


@router.post("/teams", status_code=201)
def create_any_team(body: AdminTeamCreate, request: Request, session: SessionDep) -> TeamOut:
    owner = None
    if body.owner_email:
        owner = session.exec(select(User).where(User.email == body.owner_email.strip().lower())).first()
        if owner is None:
            raise NotFound(f"No user with the email {body.owner_email!r}.", title="User not found")
    team = create_team_row(session, body.name.strip(), body.slug, owner)
    audit.note(request, team_id=team.id)
    return TeamOut(id=team.id, slug=team.slug, name=team.name, role=Role.owner.name if owner else None)


@router.delete("/teams/{team_id}", status_code=204)
def delete_any_team(team_id: str, session: SessionDep) -> Response:
    delete_team_row(session, _get_team(session, team_id))
    return Response(status_code=204)


@router.get("/teams/{team_id}/quota")
def read_team_quota(team_id: str, platform: PlatformDep, session: SessionDep) -> QuotaReport:
    team = _get_team(session, team_id)
    return QuotaReport.model_validate(quotas.report(session, team, platform.settings))


@router.put("/teams/{team_id}/quota")
def set_team_quota(
    team_id: str, body: QuotaLimits, platform: PlatformDep, session: SessionDep
) -> QuotaReport:
    """Replace the team's own limits; a null field falls back to the platform default."""
    team = _get_team(session, team_id)
    row = session.get(TeamQuota, team.id) or TeamQuota(team_id=team.id)
    for name, value in body.model_dump().items():
        setattr(row, name, value)
    row.updated_at = utcnow()
    session.add(row)
    session.commit()
    return QuotaReport.model_validate(quotas.report(session, team, platform.settings))


# -- apps, status, settings ----------------------------------------------------------------------------------


@router.get("/apps", response_model=AdminAppList)
def list_all_apps(
    platform: PlatformDep,
    session: SessionDep,
    team_id: str | None = None,
    limit: int = Query(100, ge=1, le=1000),
    skip: int = Query(0, ge=0, le=MAX_SKIP),
) -> dict[str, Any]:
    """Every app on the platform (or of one team), with its team's slug."""
    q = select(App)
    if team_id:
        q = q.where(App.team_id == team_id)
    count = session.exec(select(func.count()).select_from(q.subquery())).one()
    apps = session.exec(q.order_by(col(App.created_at)).offset(skip).limit(limit)).all()
    slugs = dict(session.exec(select(Team.id, Team.slug)).all())
    return {
        "data": [render_app(platform, session, a) | {"team_slug": slugs.get(a.team_id)} for a in apps],
        "count": count,
    }


def _node(data_dir: str) -> dict[str, Any]:
    disk = shutil.disk_usage(data_dir)
    memory: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    memory[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return {
        "hostname": pyplatform.node(),
        "os": f"{pyplatform.system()} {pyplatform.release()}",
        "python": pyplatform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "memory_total_bytes": memory.get("MemTotal"),
        "memory_available_bytes": memory.get("MemAvailable"),
        "disk_total_bytes": disk.total,
        "disk_free_bytes": disk.free,
    }


@router.get("/status", response_model=PlatformStatus)
async def status(platform: PlatformDep) -> dict[str, Any]:
    """The backend, this node, the database and what runs: instances by state, apps serving."""

    def load() -> tuple[list[str], int, int, int]:
        with platform.db.session() as s:
            app_ids = list(s.exec(select(App.id)).all())
            users = s.exec(select(func.count()).select_from(User)).one()
            teams = s.exec(select(func.count()).select_from(Team)).one()
            secrets = s.exec(select(func.count()).select_from(EnvVar)).one()
        return app_ids, users, teams, secrets

    app_ids, users, teams, env_vars = await asyncio.to_thread(load)
    states: dict[str, int] = {}
    for app_id in app_ids:
        for instance in platform.fleet.instances_of(app_id):
            states[instance.state.value] = states.get(instance.state.value, 0) + 1
    settings = platform.settings
    node = await asyncio.to_thread(_node, str(settings.data_dir))
    return {
        "ready": platform.ready.is_set(),
        "backend": {"name": settings.backend, "instances": states, "nodes": [node]},
        "router": {
            "host": settings.router_host,
            "port": platform.router.port,
            "remote": platform.router.remotes,
        },
        "database": "postgresql" if settings.database_url else "sqlite",
        "apps": len(app_ids),
        "apps_serving": len(platform.fleet.serving),
        "teams": teams,
        "users": users,
        "env_vars": env_vars,
        "secret_keys": platform.secrets.key_count,
        "data_dir": str(settings.data_dir.resolve()),
    }


@router.get("/settings")
def read_settings(session: SessionDep) -> PlatformSettings:
    return platform_settings.load(session)


@router.patch("/settings")
def update_settings(body: PlatformSettingsUpdate, session: SessionDep) -> PlatformSettings:
    current = platform_settings.load(session)
    updated = current.model_copy(update=body.model_dump(exclude_unset=True, exclude_none=True))
    updated = PlatformSettings.model_validate(updated.model_dump())
    platform_settings.save(session, updated)
    session.commit()
    return updated


# -- audit log, secrets ---------------------------------------------------------------------------------


def _audit_out(e: AuditEntry) -> AuditOut:
    return AuditOut(
        id=str(e.id),
        at=ts(e.at),
        method=e.method,
        path=e.path,
        route=e.route,
        status_code=e.status_code,
        actor_kind=e.actor_kind,
        actor_user_id=e.actor_user_id,
        actor_email=e.actor_email,
        actor_token_id=e.actor_token_id,
        team_id=e.team_id,
        app_id=e.app_id,
        client_ip=e.client_ip,
        user_agent=e.user_agent,
        duration_ms=e.duration_ms,
    )


@router.get("/audit")
def read_audit(
    session: SessionDep,
    actor: str | None = Query(None, description="User id, email or token id."),
    team_id: str | None = None,
    app_id: str | None = None,
    method: str | None = Query(None, description="POST, PUT, PATCH or DELETE."),
    path: str | None = Query(None, description="Path prefix, e.g. /api/v1/apps/"),
    status: int | None = Query(None, ge=100, le=599),
    since: datetime | None = None,
    until: datetime | None = None,
    before_id: int | None = Query(None, ge=1, le=2**62),
    limit: int = Query(100, ge=1, le=1000),
) -> AuditList:
    """The audit log, newest first, filtered; page back with ``before_id``."""
    rows, count = audit.query(
        session,
        actor=actor,
        team_id=team_id,
        app_id=app_id,
        method=method,
        path=path,
        status=status,
        since=since,
        until=until,
        before_id=before_id,
        limit=limit,
    )
    last = rows[-1].id if len(rows) == limit else None
    return AuditList(
        data=[_audit_out(e) for e in rows], count=count, next_before_id=str(last) if last else None
    )


@router.post("/secrets/rotate")
def rotate_secrets(platform: PlatformDep, session: SessionDep) -> RotationOut:
    """Re-encrypt every stored environment value with the first configured key (one transaction: all or
    nothing). Then the old keys can be removed from ``FASTAPI_DEPLOY_SECRET_KEY``."""
    rows = session.exec(select(EnvVar)).all()
    for row in rows:
        try:
            row.value = platform.secrets.rotate(row.value)
        except ValueError as exc:
            raise Conflict(
                f"The value of {row.name} (app {row.app_id}) cannot be decrypted with the configured keys.",
                title="Unknown key",
                hint="Keep every key still in use in FASTAPI_DEPLOY_SECRET_KEY (new first), then rotate.",
            ) from exc
        session.add(row)
    session.commit()
    return RotationOut(rotated=len(rows), keys=platform.secrets.key_count)
