"""The platform admins' pages: the platform's status, users, teams, every app, every token, the audit
log. Anyone else gets the API's 403 (``security.require_platform_admin``).

The forms call the admin API's own handlers (``api/admin.py``) with bodies built by its request models:
creating a user, disabling or promoting one, resetting a password, issuing a token for an account,
creating and deleting teams, listing and revoking any token. Generated passwords and tokens are shown
once, on the page the form answers with.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError
from sqlmodel import col, select

from control_plane import audit
from control_plane.api import admin as admin_api
from control_plane.errors import APIError, BadRequest
from control_plane.models import Team, User
from control_plane.security import require_platform_admin
from dashboard.web import (
    DashboardRoute,
    DashDep,
    FormDep,
    Visitor,
    VisitorDep,
    field_str,
    messages,
    render,
    see_other,
)

router = APIRouter(route_class=DashboardRoute, include_in_schema=False)


def _admin(who: Visitor) -> User:
    return require_platform_admin(who.principal)


@router.get("/dashboard/admin")
async def status_page(request: Request, who: VisitorDep, dash: DashDep) -> Response:
    """``GET /admin/status`` and ``/admin/settings``: backend, nodes, database, what runs."""
    _admin(who)
    platform = dash.platform
    status: dict[str, Any] = await admin_api.status(platform)

    def settings() -> Any:
        with platform.db.session() as s:
            return admin_api.read_settings(s)

    return render(
        request,
        "admin/status.html",
        section="admin",
        tab="status",
        platform_status=status,
        platform_settings=await asyncio.to_thread(settings),
    )


# -- users ---------------------------------------------------------------------------------------------


def _users_page(request: Request, who: Visitor, dash: DashDep, status: int = 200, **extra: Any) -> Response:
    _admin(who)
    email = request.query_params.get("email", "")
    state = request.query_params.get("state", "")
    with dash.platform.db.session() as s:
        users = admin_api.list_users(
            s, email or None, {"disabled": True, "enabled": False}.get(state), 1000, 0
        )
        teams = s.exec(select(Team).order_by(col(Team.slug))).all()
    return render(
        request,
        "admin/users.html",
        status,
        section="admin",
        tab="users",
        users=users.data,
        count=users.count,
        teams=teams,
        filters={"email": email, "state": state},
        **extra,
    )


@router.get("/dashboard/admin/users")
def users_page(request: Request, who: VisitorDep, dash: DashDep) -> Response:
    return _users_page(request, who, dash)


@router.post("/dashboard/admin/users")
def create_user(request: Request, who: VisitorDep, form: FormDep, dash: DashDep) -> Response:
    """``POST /admin/users``; a generated password is shown once."""
    _admin(who)
    data: dict[str, Any] = {
        "email": field_str(form, "email"),
        "name": field_str(form, "name"),
        "password": str(form.get("password") or "") or None,
        "is_admin": field_str(form, "is_admin") == "on",
        "team_id": field_str(form, "team_id") or None,
        "role": field_str(form, "role", "member") or "member",
    }
    try:
        body = admin_api.UserCreate.model_validate(data)
        with dash.platform.db.session() as s:
            created = admin_api.create_user(body, s)
    except ValidationError as exc:
        return _users_page(request, who, dash, 422, create_errors=messages(exc), typed=data)
    except APIError as exc:
        return _users_page(request, who, dash, exc.status_code, create_error=exc, typed=data)
    return _users_page(request, who, dash, 201, created=created)


@router.post("/dashboard/admin/users/{user_id}")
def change_user(request: Request, user_id: str, who: VisitorDep, form: FormDep, dash: DashDep) -> Response:
    """Disable, enable, promote or demote (``PATCH /admin/users/{id}``); reset the password
    (``POST .../reset``: every token revoked); issue a token for the account (``POST .../tokens``)."""
    me = _admin(who)
    action = field_str(form, "action")
    with dash.platform.db.session() as s:
        if action == "reset":
            reset = admin_api.reset_user(user_id, s, admin_api.PasswordReset(password=None))
            user = s.get(User, user_id)
            return _users_page(request, who, dash, 200, reset=reset, reset_email=user.email if user else "")
        if action == "token":
            try:
                body = admin_api.ImpersonationToken.model_validate(
                    {
                        "name": field_str(form, "name"),
                        "expires_in_days": field_str(form, "expires_in_days") or 1,
                    }
                )
            except ValidationError:
                raise BadRequest("Name the token; it lives 1 to 365 days.", title="Invalid token") from None
            issued = admin_api.issue_token(user_id, body, s)
            user = s.get(User, user_id)
            return _users_page(
                request, who, dash, 201, issued=issued, issued_email=user.email if user else ""
            )
        changes = {
            "disable": {"disabled": True},
            "enable": {"disabled": False},
            "promote": {"is_admin": True},
            "demote": {"is_admin": False},
        }.get(action)
        if changes is None:
            raise BadRequest(f"Unknown action {action!r}.")
        admin_api.update_user(user_id, admin_api.UserUpdate.model_validate(changes), s, me)
    return see_other("/dashboard/admin/users")


# -- teams and apps -------------------------------------------------------------------------------------


def _teams_page(request: Request, who: Visitor, dash: DashDep, status: int = 200, **extra: Any) -> Response:
    _admin(who)
    with dash.platform.db.session() as s:
        teams = admin_api.list_all_teams(s, 1000, 0)
    return render(
        request, "admin/teams.html", status, section="admin", tab="teams", teams=teams.data, **extra
    )


@router.get("/dashboard/admin/teams")
def teams_page(request: Request, who: VisitorDep, dash: DashDep) -> Response:
    return _teams_page(request, who, dash)


@router.post("/dashboard/admin/teams")
def create_team(request: Request, who: VisitorDep, form: FormDep, dash: DashDep) -> Response:
    """``POST /admin/teams``."""
    _admin(who)
    data = {
        "name": field_str(form, "name"),
        "slug": field_str(form, "slug") or None,
        "owner_email": field_str(form, "owner_email") or None,
    }
    try:
        body = admin_api.AdminTeamCreate.model_validate(data)
        with dash.platform.db.session() as s:
            admin_api.create_any_team(body, request, s)
    except ValidationError as exc:
        return _teams_page(request, who, dash, 422, create_errors=messages(exc), typed=data)
    except APIError as exc:
        return _teams_page(request, who, dash, exc.status_code, create_error=exc, typed=data)
    return see_other("/dashboard/admin/teams")


@router.post("/dashboard/admin/teams/{team_id}/delete")
def delete_team(request: Request, team_id: str, who: VisitorDep, _form: FormDep, dash: DashDep) -> Response:
    """``DELETE /admin/teams/{id}`` (409 while it has apps: said on the page)."""
    _admin(who)
    audit.note(request, team_id=team_id)
    try:
        with dash.platform.db.session() as s:
            admin_api.delete_any_team(team_id, s)
    except APIError as exc:
        return _teams_page(request, who, dash, exc.status_code, delete_error=exc)
    return see_other("/dashboard/admin/teams")


@router.get("/dashboard/admin/apps")
def apps_page(request: Request, who: VisitorDep, dash: DashDep, team_id: str = "") -> Response:
    """``GET /admin/apps``: every app of every team."""
    _admin(who)
    with dash.platform.db.session() as s:
        apps = admin_api.list_all_apps(dash.platform, s, team_id or None, 1000, 0)
        teams = s.exec(select(Team).order_by(col(Team.slug))).all()
    return render(
        request,
        "admin/apps.html",
        section="admin",
        tab="apps",
        apps=apps["data"],
        teams=teams,
        team_id=team_id,
    )


# -- tokens ---------------------------------------------------------------------------------------------


@router.get("/dashboard/admin/tokens")
def tokens_page(request: Request, who: VisitorDep, dash: DashDep, kind: str = "") -> Response:
    """Every live token (``GET /admin/tokens``): user tokens (sessions, logins, personal) and deploy
    tokens, with their owner."""
    _admin(who)
    kinds: dict[str, Literal["user", "deploy"]] = {"user": "user", "deploy": "deploy"}
    chosen = kinds.get(kind)
    with dash.platform.db.session() as s:
        listed = admin_api.list_all_tokens(s, who.principal, chosen, None, None, 2000)
    tokens = [
        {
            "id": t.id,
            "kind": t.kind,
            "name": t.name,
            "user": t.user_email or "",
            "app": t.app_slug or "",
            "created_at": t.created_at,
            "expires_at": t.expires_at,
            "last_used_at": t.last_used_at,
            "current": t.current,
        }
        for t in listed.data
    ]
    return render(request, "admin/tokens.html", section="admin", tab="tokens", tokens=tokens, kind=kind)


@router.post("/dashboard/admin/tokens/{token_id}/revoke")
def revoke_token(request: Request, token_id: str, who: VisitorDep, _form: FormDep, dash: DashDep) -> Response:
    """Revoke one token, whoever's it is (``DELETE /admin/tokens/{id}``; audited)."""
    _admin(who)
    with dash.platform.db.session() as s:
        admin_api.revoke_any_token(token_id, request, s)
    return see_other("/dashboard/admin/tokens")


# -- audit log ------------------------------------------------------------------------------------------


@router.get("/dashboard/admin/audit")
def audit_page(
    request: Request,
    who: VisitorDep,
    dash: DashDep,
    actor: str = "",
    path: str = "",
    status: str = "",
    before_id: str = "",
) -> Response:
    """``GET /admin/audit``, newest first, filtered by actor, path prefix and status."""
    _admin(who)
    try:
        code = int(status) if status else None
        before = int(before_id) if before_id else None
    except ValueError:
        raise BadRequest("Status and position are numbers.", title="Invalid filter") from None
    with dash.platform.db.session() as s:
        page = admin_api.read_audit(
            s, actor or None, None, None, None, path or None, code, None, None, before, 100
        )
    return render(
        request,
        "admin/audit.html",
        section="admin",
        tab="audit",
        entries=page.data,
        count=page.count,
        next_before_id=page.next_before_id,
        filters={"actor": actor, "path": path, "status": status},
    )
