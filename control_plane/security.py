"""Tokens and who may act on what: the one place access is decided.

Tokens are 256-bit random strings shown once and stored as SHA-256 digests (a KDF adds nothing for
secrets with that much entropy). A *user* token acts as its user on every team the user belongs to;
a *deploy* token acts only on its one app, and only on the deploy endpoints.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlmodel import Session, select

from control_plane.errors import Forbidden, NotFound, Unauthorized
from control_plane.models import ApiToken, App, Membership, Team, User, utcnow

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
    if token.last_used_at is None or now - aware(token.last_used_at) > _LAST_USED_RESOLUTION:
        token.last_used_at = now
        session.add(token)
        session.commit()
    return Principal(token=token, user=user)


def require_user(principal: Principal) -> User:
    if principal.user is None:
        raise Forbidden(
            "Deploy tokens can only deploy their app.",
            hint="Use a user token (`fastapi-deploy login`) for this command.",
        )
    return principal.user


def team_ids(session: Session, user: User) -> list[str]:
    if user.is_admin:
        return list(session.exec(select(Team.id)).all())
    return list(session.exec(select(Membership.team_id).where(Membership.user_id == user.id)).all())


def get_team(session: Session, principal: Principal, team_id: str) -> Team:
    user = require_user(principal)
    team = session.get(Team, team_id)
    if team is None or team.id not in team_ids(session, user):
        raise NotFound(f"Team {team_id} not found.", title="Team not found")
    return team


def get_app(session: Session, principal: Principal, app_id: str, *, deploy_ok: bool = False) -> App:
    """The app, if the caller may act on it; 404 otherwise (never reveal another team's app)."""
    app = session.get(App, app_id)
    not_found = NotFound(
        f"App {app_id} not found.", title="App not found", hint="`fastapi-deploy apps` lists your apps."
    )
    if app is None:
        raise not_found
    if principal.is_deploy_token:
        if principal.token.app_id != app.id:
            raise not_found
        if not deploy_ok:
            raise Forbidden(
                "Deploy tokens can only deploy their app.",
                hint="Use a user token (`fastapi-deploy login`) for this command.",
            )
        return app
    user = require_user(principal)
    if app.team_id not in team_ids(session, user):
        raise not_found
    return app


def issue_user_token(session: Session, user: User, name: str, ttl: timedelta | None = None) -> str:
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
