"""The audit log: every mutating API call — who, what, when, from where — in an append-only table.

:class:`AuditMiddleware` (plain ASGI) wraps the app. For each POST/PUT/PATCH/DELETE under ``/api/v1``
(and the device-approval form) it records method, path, route template, status, the actor (user, token),
the team and app concerned, the client IP and the duration, after the response is sent — whatever the
outcome, 401s and 404s included. It never records bodies or query strings (they can carry secrets).

The actor comes from the auth dependency (:func:`note`); the team and app from the path's ids, looked up
before the call (so a delete still knows what it deleted), or from :func:`note` where a handler creates
something. The table refuses UPDATE and DELETE (triggers, migration 0003); nothing in the API edits it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, func, select
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control_plane.db import Database
from control_plane.models import App, AuditEntry, Deployment, Team, User
from control_plane.security import Principal

log = logging.getLogger("fastapi_deploy.audit")

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_STATE_KEY = "audit"


def note(
    request: Request,
    *,
    principal: Principal | None = None,
    user: User | None = None,
    team_id: str | None = None,
    app_id: str | None = None,
) -> None:
    """Tell the audit middleware who is acting (and on what, when the path does not say)."""
    info: dict[str, Any] = request.scope.setdefault("state", {}).setdefault(_STATE_KEY, {})
    if principal is not None:
        info["token_id"] = principal.token.id
        info["kind"] = principal.token.kind
        user = principal.user or user
    if user is not None:
        info["user_id"] = user.id
        info["email"] = user.email
        info.setdefault("kind", "user")
    if team_id is not None:
        info["team_id"] = team_id
    if app_id is not None:
        info["app_id"] = app_id


def _audited(scope: Scope) -> bool:
    if scope["type"] != "http" or scope["method"] not in MUTATING:
        return False
    path: str = scope["path"]
    return path.startswith("/api/v1/") or path == "/login/device"


def _targets(db: Database, path: str) -> tuple[str | None, str | None]:
    """(team_id, app_id) named by an API path's ids, looked up in the database."""
    parts = path.removeprefix("/api/v1/").split("/")
    if parts and parts[0] == "admin":
        parts = parts[1:]
    if len(parts) < 2 or not parts[1]:
        return None, None
    kind, ident = parts[0], parts[1]
    with db.session() as s:
        if kind == "teams":
            return (ident if s.get(Team, ident) is not None else None), None
        if kind == "deployments":
            dep = s.get(Deployment, ident)
            ident = dep.app_id if dep is not None else ""
            kind = "apps"
        if kind == "apps" and ident:
            app = s.get(App, ident)
            return (app.team_id, app.id) if app is not None else (None, None)
    return None, None


class AuditMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _audited(scope):
            await self.app(scope, receive, send)
            return
        db: Database = scope["app"].state.platform.db
        started = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})
        try:
            team_id, app_id = await asyncio.to_thread(_targets, db, scope["path"])
        except SQLAlchemyError:
            team_id = app_id = None
        status = 500  # what the client sees if the app raises before answering

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            info: dict[str, Any] = state.get(_STATE_KEY, {})
            client = scope.get("client")
            headers = dict(scope.get("headers") or [])
            entry = AuditEntry(
                method=scope["method"],
                path=scope["path"][:2000],
                route=_template(scope) if "route" in scope else "",
                status_code=status,
                actor_kind=info.get("kind"),
                actor_user_id=info.get("user_id"),
                actor_email=info.get("email"),
                actor_token_id=info.get("token_id"),
                team_id=info.get("team_id") or team_id,
                app_id=info.get("app_id") or app_id,
                client_ip=client[0] if client else None,
                user_agent=headers.get(b"user-agent", b"").decode("latin-1")[:300],
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
            )
            await asyncio.to_thread(_write, db, entry)


def _template(scope: Scope) -> str:
    """The route template of the call (``/api/v1/apps/{app_id}``): the path with its parameters named."""
    by_value = {str(v): k for k, v in (scope.get("path_params") or {}).items()}
    parts = scope["path"].split("/")
    return "/".join("{" + by_value[p] + "}" if p in by_value else p for p in parts)


def _write(db: Database, entry: AuditEntry) -> None:
    try:
        with db.session() as s:
            s.add(entry)
            s.commit()
    except SQLAlchemyError:
        log.exception("could not write the audit entry for %s %s", entry.method, entry.path)


# -- reading ------------------------------------------------------------------------------------------


def query(
    session: Session,
    *,
    actor: str | None = None,
    team_id: str | None = None,
    app_id: str | None = None,
    method: str | None = None,
    path: str | None = None,
    status: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> tuple[list[AuditEntry], int]:
    """Entries matching every given filter, newest first, and how many match in all. ``actor`` is a user
    id, an email or a token id; ``path`` a prefix; ``before_id`` pages backwards."""
    q = select(AuditEntry)
    if actor:
        q = q.where(
            (col(AuditEntry.actor_user_id) == actor)
            | (col(AuditEntry.actor_email) == actor.lower())
            | (col(AuditEntry.actor_token_id) == actor)
        )
    if team_id:
        q = q.where(AuditEntry.team_id == team_id)
    if app_id:
        q = q.where(AuditEntry.app_id == app_id)
    if method:
        q = q.where(AuditEntry.method == method.upper())
    if path:
        q = q.where(col(AuditEntry.path).startswith(path, autoescape=True))
    if status is not None:
        q = q.where(AuditEntry.status_code == status)
    if since is not None:
        q = q.where(col(AuditEntry.at) >= since)
    if until is not None:
        q = q.where(col(AuditEntry.at) < until)
    count = session.exec(select(func.count()).select_from(q.subquery())).one()
    if before_id is not None:
        q = q.where(col(AuditEntry.id) < before_id)
    rows = session.exec(q.order_by(col(AuditEntry.id).desc()).limit(limit)).all()
    return list(rows), int(count)
