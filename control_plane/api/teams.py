"""Teams: list and read (the FastAPI Cloud shapes), create, rename, delete; members and their roles;
the team's quota and usage.

Who may do what is ``permissions.py``'s table; this module only names the action. Membership rules that
are not a plain "minimum role": only an owner grants, changes or removes the ``owner`` role
(``permissions.may_assign``), and a team always keeps at least one owner.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field, field_validator
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from control_plane import audit, platform_settings, quotas
from control_plane.api.deps import MAX_SKIP, PlatformDep, PrincipalDep, SessionDep
from control_plane.errors import Conflict, Forbidden, NotFound
from control_plane.models import App, Membership, Team, TeamQuota, User
from control_plane.permissions import Action, Role, RoleName, may_assign
from control_plane.platform_settings import QuotaLimits
from control_plane.security import Principal, get_team, require_user, role_in, team_ids

router = APIRouter()

_SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# Team slugs are the first segment of dashboard URLs (``/{team_slug}/apps``): keep the pages' own names.
_RESERVED_SLUGS = {"api", "login", "dashboard", "static", "admin", "healthz", "readyz", "metrics"}


class TeamOut(BaseModel):
    id: str
    slug: str
    name: str
    role: str | None = None
    """The caller's role in the team (a platform admin who is not a member: null)."""


class TeamList(BaseModel):
    data: list[TeamOut]
    count: int


class TeamCreate(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    slug: str | None = Field(None, max_length=63)

    @field_validator("slug")
    @classmethod
    def _slug(cls, v: str | None) -> str | None:
        if v is not None and not _SLUG_RE.match(v):
            raise ValueError("a team slug is lower-case letters, digits and dashes, 1 to 63 characters")
        return v


class TeamUpdate(BaseModel):
    name: str = Field(min_length=1, max_length=100)


class MemberOut(BaseModel):
    user_id: str
    email: str
    name: str
    role: str


class MemberList(BaseModel):
    data: list[MemberOut]
    count: int


class MemberAdd(BaseModel):
    email: str = Field(min_length=3, max_length=320)
    role: RoleName = "member"


class MemberUpdate(BaseModel):
    role: RoleName


class QuotaUsage(BaseModel):
    """What the team uses now (``control_plane/quotas.py``)."""

    apps: int
    instances_floor: int
    """Sum of its apps' ``min_instances + prewarm``."""
    instances_ceiling: int
    """The largest ``max_instances`` of its apps."""
    cpu: float
    memory_mb: int
    build_minutes: float
    """This calendar month (UTC)."""
    storage_bytes: int


class QuotaReport(BaseModel):
    team_id: str
    limits: QuotaLimits
    """The limits in force (the team's own, else the platform default); null: none."""
    overrides: dict[str, float | int | None]
    """The team's own values (null or absent: the platform default)."""
    instance_cap: int | None
    usage: QuotaUsage


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:63].strip("-") or "team"


def team_out(session: Session, team: Team, user: User) -> TeamOut:
    membership = session.get(Membership, (team.id, user.id))
    return TeamOut(id=team.id, slug=team.slug, name=team.name, role=membership.role if membership else None)


def create_team_row(session: Session, name: str, slug: str | None, owner: User | None) -> Team:
    """A new team (committed), ``owner`` its first owner. Conflict when the slug is taken."""
    slug = slug or slugify(name)
    if slug in _RESERVED_SLUGS or not _SLUG_RE.match(slug):
        raise Conflict(f"{slug!r} cannot be a team slug.", title="Invalid team slug", hint="Choose another.")
    if session.exec(select(Team).where(Team.slug == slug)).first() is not None:
        raise Conflict(
            f"A team named {slug!r} already exists.", title="Team slug taken", hint="Choose another slug."
        )
    team = Team(slug=slug, name=name)
    session.add(team)
    try:
        session.flush()
        if owner is not None:
            session.add(Membership(team_id=team.id, user_id=owner.id, role=Role.owner.name))
        session.commit()
    except IntegrityError as exc:  # a concurrent create of the same slug
        session.rollback()
        raise Conflict(f"A team named {slug!r} already exists.", title="Team slug taken") from exc
    return team


def delete_team_row(session: Session, team: Team) -> None:
    """Delete an empty team with its memberships and quota (committed); Conflict while it has apps."""
    apps = session.exec(select(func.count()).select_from(App).where(App.team_id == team.id)).one()
    if apps:
        raise Conflict(
            f"Team {team.slug} still has {apps} app(s).",
            title="Team not empty",
            hint="Delete its apps first (`fastapi-deploy delete APP`).",
        )
    for m in session.exec(select(Membership).where(Membership.team_id == team.id)).all():
        session.delete(m)
    quota = session.get(TeamQuota, team.id)
    if quota is not None:
        session.delete(quota)
    session.flush()
    session.delete(team)
    session.commit()


# -- teams -----------------------------------------------------------------------------------------


@router.get("/teams/")
def list_teams(
    session: SessionDep,
    principal: PrincipalDep,
    limit: int = Query(100, ge=1, le=1000),
    skip: int = Query(0, ge=0, le=MAX_SKIP),
) -> TeamList:
    user = require_user(principal)
    ids = team_ids(session, user)
    teams = session.exec(select(Team).where(col(Team.id).in_(ids)).order_by(col(Team.created_at))).all()
    return TeamList(data=[team_out(session, t, user) for t in teams[skip : skip + limit]], count=len(teams))


@router.post("/teams/", status_code=201)
def create_team(body: TeamCreate, request: Request, session: SessionDep, principal: PrincipalDep) -> TeamOut:
    user = require_user(principal)
    if not user.is_admin and not platform_settings.load(session).users_can_create_teams:
        raise Forbidden(
            "Only platform admins may create teams on this server.",
            title="Team creation disabled",
            hint="Ask a platform admin to create the team and add you to it.",
        )
    team = create_team_row(session, body.name.strip(), body.slug, user)
    audit.note(request, team_id=team.id)
    return team_out(session, team, user)


@router.get("/teams/{team_id}")
def read_team(team_id: str, session: SessionDep, principal: PrincipalDep) -> TeamOut:
    team = get_team(session, principal, team_id, action=Action.TEAM_READ)
    return team_out(session, team, require_user(principal))


@router.patch("/teams/{team_id}")
def update_team(team_id: str, body: TeamUpdate, session: SessionDep, principal: PrincipalDep) -> TeamOut:
    team = get_team(session, principal, team_id, action=Action.TEAM_UPDATE)
    team.name = body.name.strip()
    session.add(team)
    session.commit()
    return team_out(session, team, require_user(principal))


@router.delete("/teams/{team_id}", status_code=204)
def delete_team(team_id: str, session: SessionDep, principal: PrincipalDep) -> Response:
    delete_team_row(session, get_team(session, principal, team_id, action=Action.TEAM_DELETE))
    return Response(status_code=204)


@router.get("/teams/{team_id}/quota")
def read_quota(
    team_id: str, platform: PlatformDep, session: SessionDep, principal: PrincipalDep
) -> QuotaReport:
    team = get_team(session, principal, team_id, action=Action.TEAM_READ)
    return QuotaReport.model_validate(quotas.report(session, team, platform.settings))


# -- members ---------------------------------------------------------------------------------------


def _members(session: Session, team: Team) -> MemberList:
    rows = session.exec(
        select(Membership, User)
        .join(User, col(User.id) == col(Membership.user_id))
        .where(Membership.team_id == team.id)
        .order_by(col(User.email))
    ).all()
    data = [MemberOut(user_id=u.id, email=u.email, name=u.name, role=m.role) for m, u in rows]
    return MemberList(data=data, count=len(data))


def _owners(session: Session, team_id: str) -> int:
    return session.exec(
        select(func.count())
        .select_from(Membership)
        .where(Membership.team_id == team_id, Membership.role == Role.owner.name)
    ).one()


def _assign(session: Session, principal: Principal, team: Team, old: Role | None, new: Role | None) -> None:
    actor = role_in(session, require_user(principal), team.id)
    assert actor is not None  # get_team let the caller in
    if not may_assign(actor, old, new):
        raise Forbidden(
            "Only an owner can grant, change or remove the owner role.",
            hint=f"Ask an owner of team {team.slug}.",
        )
    if old is Role.owner and new is not Role.owner and _owners(session, team.id) <= 1:
        raise Conflict(
            f"Team {team.slug} must keep at least one owner.",
            title="Last owner",
            hint="Make someone else an owner first.",
        )


@router.get("/teams/{team_id}/members")
def list_members(team_id: str, session: SessionDep, principal: PrincipalDep) -> MemberList:
    return _members(session, get_team(session, principal, team_id, action=Action.TEAM_READ))


@router.post("/teams/{team_id}/members", status_code=201)
def add_member(team_id: str, body: MemberAdd, session: SessionDep, principal: PrincipalDep) -> MemberOut:
    team = get_team(session, principal, team_id, action=Action.MEMBERS_MANAGE)
    user = session.exec(select(User).where(User.email == body.email.strip().lower())).first()
    if user is None:
        raise NotFound(
            f"No user with the email {body.email!r}.",
            title="User not found",
            hint="A platform admin creates accounts (`fastapi-deploy admin users create`).",
        )
    if session.get(Membership, (team.id, user.id)) is not None:
        raise Conflict(f"{user.email} is already a member of {team.slug}.", title="Already a member")
    _assign(session, principal, team, None, Role[body.role])
    session.add(Membership(team_id=team.id, user_id=user.id, role=body.role))
    session.commit()
    return MemberOut(user_id=user.id, email=user.email, name=user.name, role=body.role)


def _membership(session: Session, team: Team, user_id: str) -> tuple[Membership, User]:
    membership = session.get(Membership, (team.id, user_id))
    user = session.get(User, user_id)
    if membership is None or user is None:
        raise NotFound(f"User {user_id} is not a member of {team.slug}.", title="Member not found")
    return membership, user


@router.patch("/teams/{team_id}/members/{user_id}")
def update_member(
    team_id: str, user_id: str, body: MemberUpdate, session: SessionDep, principal: PrincipalDep
) -> MemberOut:
    team = get_team(session, principal, team_id, action=Action.MEMBERS_MANAGE)
    membership, user = _membership(session, team, user_id)
    _assign(session, principal, team, Role.parse(membership.role), Role[body.role])
    membership.role = body.role
    session.add(membership)
    session.commit()
    return MemberOut(user_id=user.id, email=user.email, name=user.name, role=membership.role)


@router.delete("/teams/{team_id}/members/{user_id}", status_code=204)
def remove_member(team_id: str, user_id: str, session: SessionDep, principal: PrincipalDep) -> Response:
    """Remove a member (admins), or leave the team (anyone, for themselves)."""
    me = require_user(principal)
    leaving = user_id == me.id
    team = get_team(
        session, principal, team_id, action=Action.TEAM_READ if leaving else Action.MEMBERS_MANAGE
    )
    membership, _user = _membership(session, team, user_id)
    old = Role.parse(membership.role)
    if leaving:
        if old is Role.owner and _owners(session, team.id) <= 1:
            raise Conflict(
                f"You are the last owner of {team.slug}.",
                title="Last owner",
                hint="Make someone else an owner first, or delete the team.",
            )
    else:
        _assign(session, principal, team, old, None)
    session.delete(membership)
    session.commit()
    return Response(status_code=204)
