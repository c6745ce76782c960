"""Signing in (email and password, or an API token), signing out, and the visitor's own account.

Password checks are the API's (``api.auth.check_password``: argon2id, the same rate limits per IP and
per email, one message for a wrong email or password); a pasted token is checked by
``security.authenticate`` and must be a user token. Either way the browser gets a new session of its
own (``dashboard/sessions.py``), never the pasted token.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError
from sqlmodel import col, select

from control_plane import audit
from control_plane.api import tokens as tokens_api
from control_plane.api.auth import check_password
from control_plane.api.deps import LimitsDep, client_ip
from control_plane.errors import APIError, BadRequest, Forbidden, Unauthorized
from control_plane.models import ApiToken, User
from control_plane.security import authenticate, require_user
from dashboard import sessions
from dashboard.web import (
    CSRF_FIELD,
    Dashboard,
    DashboardRoute,
    DashDep,
    FormDep,
    Visitor,
    VisitorDep,
    cookie_name,
    field_str,
    is_secure,
    render,
    safe_next,
    same_origin,
    see_other,
    visitor,
)

router = APIRouter(route_class=DashboardRoute, include_in_schema=False)

LOGIN_COOKIE = "fdp_login"
LOGIN_PATH = "/dashboard/login"


def _login_page(
    request: Request,
    keys: sessions.Keys,
    *,
    status: int = 200,
    error: APIError | None = None,
    email: str = "",
    next_url: str = "",
    notice: str = "",
) -> Response:
    nonce = request.cookies.get(LOGIN_COOKIE) or sessions.login_nonce()
    response = render(
        request,
        "login.html",
        status,
        login_csrf=sessions.login_csrf(keys, nonce),
        error=error,
        email=email,
        next_url=safe_next(next_url),
        notice=notice,
    )
    platform = request.app.state.platform
    response.set_cookie(
        LOGIN_COOKIE,
        nonce,
        max_age=3600,
        path=LOGIN_PATH,
        httponly=True,
        samesite="lax",
        secure=is_secure(request, platform),
    )
    if error is not None and error.headers:
        response.headers.update(error.headers)
    return response


@router.get("/dashboard/login")
def login_page(request: Request, dash: DashDep, next: str = "", logged_out: str = "") -> Response:
    """The sign-in form; a visitor already signed in goes straight on."""
    try:
        visitor(request, dash)
    except Unauthorized:
        pass
    else:
        return see_other(safe_next(next))
    request.state.visitor = None
    notice = "You are signed out." if logged_out else ""
    return _login_page(request, dash.keys(), next_url=next, notice=notice)


@router.post("/dashboard/login")
async def login(request: Request, dash: DashDep, limits: LimitsDep) -> Response:
    """Check the credentials, start a session, go to ``next``."""
    form = await request.form()
    keys = await asyncio.to_thread(dash.keys)
    platform = dash.platform
    email, password, token = (
        field_str(form, "email"),
        str(form.get("password") or ""),
        field_str(form, "token"),
    )
    next_url = field_str(form, "next")
    given = form.get(CSRF_FIELD)
    if not same_origin(request, platform) or not sessions.check_login_csrf(
        keys, request.cookies.get(LOGIN_COOKIE), given if isinstance(given, str) else None
    ):
        error = Forbidden("The sign-in form expired.", title="Form expired", hint="Send it again.")
        return _login_page(request, keys, status=403, error=error, email=email, next_url=next_url)
    ip = client_ip(request)

    def sign_in() -> tuple[str, User]:
        with platform.db.session() as s:
            if token:
                limits.check(limits.login_ip, ip, "login attempts")
                principal = authenticate(s, f"Bearer {token}")
                if principal.is_deploy_token:
                    raise Forbidden(
                        "A deploy token cannot sign in to the dashboard.",
                        title="Not a user token",
                        hint="Use your email and password, or a user token (`fastapi-deploy login`).",
                    )
                user = require_user(principal)
            elif email and password:
                user = check_password(s, limits, ip, email, password)
            else:
                raise BadRequest(
                    "Enter your email and password, or an API token.",
                    title="Nothing to sign in with",
                )
            value, _row = sessions.create(s, keys, user)  # commits check_password's last-login time too
            return value, user

    try:
        value, user = await asyncio.to_thread(sign_in)
    except APIError as exc:
        status = exc.status_code if exc.status_code in (400, 403, 429) else 401
        return _login_page(request, keys, status=status, error=exc, email=email, next_url=next_url)
    audit.note(request, user=user)
    response = see_other(safe_next(next_url))
    response.set_cookie(
        cookie_name(request, platform),
        value,
        max_age=int(sessions.SESSION_TTL.total_seconds()),
        path="/",
        httponly=True,
        samesite="lax",
        secure=is_secure(request, platform),
    )
    response.delete_cookie(LOGIN_COOKIE, path=LOGIN_PATH)
    return response


@router.post("/dashboard/logout")
def logout(request: Request, who: VisitorDep, _form: FormDep, dash: DashDep) -> Response:
    """End the session (its token is revoked: the cookie is refused from now on), forget the cookie."""
    with dash.platform.db.session() as s:
        sessions.revoke(s, who.principal.token)
    response = see_other(f"{LOGIN_PATH}?logged_out=1")
    response.delete_cookie(
        cookie_name(request, dash.platform),
        path="/",
        httponly=True,
        samesite="lax",
        secure=is_secure(request, dash.platform),
    )
    return response


# -- the visitor's account: memberships, sessions and personal tokens ---------------------------------------


def _account(request: Request, who: Visitor, dash: Dashboard, status: int = 200, **extra: Any) -> Response:
    with dash.platform.db.session() as s:
        tokens = tokens_api.list_user_tokens(s, who.principal).data
        user = s.get(User, who.user.id)
        kinds = {
            r.id: r.name
            for r in s.exec(select(ApiToken).where(col(ApiToken.id).in_([t.id for t in tokens]))).all()
        }
    sessions_: list[tokens_api.UserTokenOut] = []
    personal: list[tokens_api.UserTokenOut] = []
    for t in tokens:
        (sessions_ if kinds.get(t.id) == sessions.SESSION_NAME else personal).append(t)
    return render(
        request,
        "account.html",
        status,
        section="account",
        account=user,
        browser_sessions=sessions_,
        tokens=personal,
        **extra,
    )


@router.get("/dashboard/account")
def account(request: Request, who: VisitorDep, dash: DashDep) -> Response:
    return _account(request, who, dash)


@router.post("/dashboard/account/tokens")
def create_token(
    request: Request, who: VisitorDep, form: FormDep, dash: DashDep, limits: LimitsDep
) -> Response:
    """A personal token (``POST /api/v1/tokens/``): shown once, on the page this answers with."""
    days = field_str(form, "expires_in_days", "90")
    try:
        body = tokens_api.UserTokenCreate(
            name=field_str(form, "name"), expires_in_days=int(days) if days and days != "never" else None
        )
    except (ValidationError, ValueError):
        error = BadRequest("Give the token a name (1 to 200 characters) and a lifetime of 1 to 3650 days.")
        return _account(request, who, dash, 400, token_error=error)
    with dash.platform.db.session() as s:
        created = tokens_api.create_user_token(body, s, who.principal, limits)
    return _account(request, who, dash, 201, created=created)


@router.post("/dashboard/account/tokens/{token_id}/revoke")
def revoke_token(token_id: str, who: VisitorDep, _form: FormDep, dash: DashDep) -> Response:
    """Revoke one of the visitor's tokens or sessions (``DELETE /api/v1/tokens/{id}``)."""
    with dash.platform.db.session() as s:
        tokens_api.delete_user_token(token_id, s, who.principal)
    if token_id == who.principal.token.id:
        return see_other(f"{LOGIN_PATH}?logged_out=1")
    return see_other("/dashboard/account?revoked=1")
