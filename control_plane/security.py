"""Tokens and who may act on what: the one place access is decided.

Tokens are 256-bit random strings shown once and stored as SHA-256 digests (a KDF adds nothing for
secrets with that much entropy). A *user* token acts as its user on every team the user belongs to, with
the user's role there; a *deploy* token acts only on its one app, and only for the actions
``permissions.py`` marks ``deploy_token`` (the deploy endpoints).

Every endpoint reaches a team or an app through :func:`get_team` / :func:`get_app`, naming its
:class:`~control_plane.permissions.Action`. The answers:

    not a member of the resource's team (or a deploy token of another app)   404  (never learn it exists)
    a member whose role is below the action's minimum                       403  (with the role needed)
    a deploy token, action not a deploy action                               403
    a platform admin (``User.is_admin``)                                     allowed, every team
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlmodel import Session, select

from control_plane.errors import Forbidden, NotFound, Unauthorized
from control_plane.models import ApiToken, App, Membership, Team, User, utcnow
from control_plane.permissions import PERMISSIONS, Action, Role, allows, deploy_token_allows

TOKEN_PREFIX = "fdp_"
_LAST_USED_RESOLUTION = timedelta(minutes=1)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def aware(dt: datetime) -> datetime:
    """SQLite hands back naive datetimes for aware columns in some paths; treat them as UTC."""
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token, its user (None for deploy tokens) and the app a deploy token is for."""

    token: ApiToken
    user: User | None

    @property
    def is_deploy_token(self) -> bool:
        return self.token.kind == "deploy"

    @property
    def is_admin(self) -> bool:
        return self.user is not None and self.user.is_admin


def authenticate(session: Session, authorization: str | None) -> Principal:
    """The principal behind an ``Authorization: Bearer`` header, or :class:`Unauthorized`."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Unauthorized(
            "This call needs an API token.",
            hint="Log in with `fastapi-deploy login --url URL --token TOKEN`.",
        )
    raw = authorization[7:].strip()
    token = session.exec(select(ApiToken).where(ApiToken.token_hash == hash_token(raw))).first()
    now = utcnow()
    if token is None or token.revoked_at is not None:
        raise Unauthorized("The token is not valid.", hint="Log in again to get a new token.")
    if token.expires_at is not None and aware(token.expires_at) <= now:
        raise Unauthorized("The token has expired.", hint="Log in again, or create a new deploy token.")
    user = session.get(User, token.user_id) if token.kind == "user" and token.user_id else None
    if token.kind == "user" and user is None:
        raise Unauthorized("The token's user no longer exists.")
    if user is not None and user.disabled:
        raise Unauthorized("This account is disabled.", hint="Ask a platform admin to enable it again.")
    if token.last_used_at is None or now - aware(token.last_used_at) > _LAST_USED_RESOLUTION:
        token.last_used_at = now
        session.add(token)
        session.commit()
    return Principal(token=token, user=user)


_DEPLOY_TOKEN_HINT = "Use a user token (`fastapi-deploy login`) for this command."


def require_user(principal: Principal) -> User:
    if principal.user is None:
        raise Forbidden("Deploy tokens can only deploy their app.", hint=_DEPLOY_TOKEN_HINT)
    return principal.user


def require_platform_admin(principal: Principal) -> User:
    user = require_user(principal)
    if not user.is_admin:
        raise Forbidden(
            "Only platform admins may use the admin API.",
            title="Platform admins only",
            hint="Ask a platform admin (`fastapi-deploy admin users` lists them).",
        )
    return user


def team_ids(session: Session, user: User) -> list[str]:
    """The teams ``user`` can see: their memberships (every team for a platform admin)."""
    if user.is_admin:
        return list(session.exec(select(Team.id)).all())
    return list(session.exec(select(Membership.team_id).where(Membership.user_id == user.id)).all())


def role_in(session: Session, user: User, team_id: str) -> Role | None:
    """``user``'s role in the team; None when not a member. Platform admins count as owners."""
    if user.is_admin:
        return Role.owner
    membership = session.get(Membership, (team_id, user.id))
    return Role.parse(membership.role) if membership is not None else None


def _check(role: Role, action: Action, team: str) -> None:
    rule = PERMISSIONS[action]
    if not allows(role, action):
        raise Forbidden(
            f"Your role in team {team} ({role.name}) cannot {rule.what}; it needs {rule.minimum.name} "
            "or higher.",
            title="Permission denied",
            hint=f"Ask an owner or admin of team {team} for the {rule.minimum.name} role.",
        )


def get_team(session: Session, principal: Principal, team_id: str, *, action: Action) -> Team:
    """The team, if the caller may perform ``action`` on it. 404 for non-members, 403 for a role too low."""
    user = require_user(principal)
    team = session.get(Team, team_id)
    role = role_in(session, user, team_id) if team is not None else None
    if team is None or role is None:
        raise NotFound(f"Team {team_id} not found.", title="Team not found")
    _check(role, action, team.slug)
    return team


def get_app(session: Session, principal: Principal, app_id: str, *, action: Action) -> App:
    """The app, if the caller may perform ``action`` on it; 404 when it is not theirs (never reveal
    another team's app), 403 when it is theirs but their role (or deploy token) does not allow it."""
    app = session.get(App, app_id)
    not_found = NotFound(
        f"App {app_id} not found.", title="App not found", hint="`fastapi-deploy apps` lists your apps."
    )
    if app is None:
        raise not_found
    if principal.is_deploy_token:
        if principal.token.app_id != app.id:
            raise not_found
        if not deploy_token_allows(action):
            raise Forbidden("Deploy tokens can only deploy their app.", hint=_DEPLOY_TOKEN_HINT)
        return app
    user = require_user(principal)
    role = role_in(session, user, app.team_id)
    if role is None:
        raise not_found
    team = session.get(Team, app.team_id)
    _check(role, action, team.slug if team is not None else app.team_id)
    return app


def issue_user_token(session: Session, user: User, name: str, ttl: timedelta | None = None) -> str:
    """A new user token (added to the session, not committed); the raw value, to be shown once."""
    raw = new_token()
    session.add(
        ApiToken(
            token_hash=hash_token(raw),
            kind="user",
            user_id=user.id,
            name=name,
            expires_at=(utcnow() + ttl) if ttl else None,
        )
    )
    return raw


def revoke_user_tokens(session: Session, user: User) -> int:
    """Revoke every live user token of ``user`` (not committed); how many."""
    now = utcnow()
    rows = session.exec(select(ApiToken).where(ApiToken.user_id == user.id, ApiToken.kind == "user")).all()
    live = [r for r in rows if r.revoked_at is None]
    for row in live:
        row.revoked_at = now
        session.add(row)
    return len(live)
