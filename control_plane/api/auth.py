"""Login (the device flow the official CLI uses, and email + password), logout, who the caller is.

The device endpoints ignore any Authorization header: the official CLI sends a possibly stale token,
and a 401 there would make it delete its config and never log in again. The code is approved on a small
page of the control plane (``/login/device``) with the user's email and password, or by pasting an API
token; the device then gets a token of its own for the same user.

Login, the device flow and the approval page are rate limited per client IP (and login per email):
``429`` with ``Retry-After``. The device-token limit is far above the official CLI's polling rate.
"""

from __future__ import annotations

import html
import secrets
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from sqlmodel import Session, select

from control_plane import audit, passwords
from control_plane.api.deps import LimitsDep, PlatformDep, PrincipalDep, SessionDep, client_ip
from control_plane.errors import APIError, Unauthorized
from control_plane.models import DeviceCode, User, utcnow
from control_plane.ratelimit import RateLimits
from control_plane.security import authenticate, aware, hash_token, issue_user_token, require_user

router = APIRouter()
pages = APIRouter(include_in_schema=False)  # HTML for browsers, not API v1

DEVICE_CODE_TTL = timedelta(minutes=15)
POLL_INTERVAL = 2
_USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"  # no vowels: no words, no 0/O 1/I confusion


def _user_code() -> str:
    chars = "".join(secrets.choice(_USER_CODE_ALPHABET) for _ in range(8))
    return f"{chars[:4]}-{chars[4:]}"


class LoginRequest(BaseModel):
    email: str = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=passwords.MAX_LENGTH)


class Me(BaseModel):
    id: str
    email: str
    name: str
    is_admin: bool


class LoginResponse(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int
    """Seconds until the token expires."""
    user: Me


class DeviceAuthorization(BaseModel):
    """RFC 8628's device authorization response, as the official CLI reads it."""

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str
    """The approval page with the code filled in: what the CLI opens."""
    expires_in: int
    interval: int
    """Seconds between polls."""


class DeviceToken(BaseModel):
    access_token: str
    token_type: str
    expires_in: int
    """Seconds until the token expires (the official CLI stores the moment)."""


class OAuthError(BaseModel):
    """A device-token 400: ``error`` is ``authorization_pending``, ``access_denied``, ``expired_token``
    or ``invalid_grant``."""

    error: str
    detail: str


def _user_out(user: User) -> dict[str, Any]:
    return {"id": user.id, "email": user.email, "name": user.name, "is_admin": user.is_admin}


def check_password(session: Session, limits: RateLimits, ip: str, email: str, password: str) -> User:
    """The user whose email and password these are (rate limited per IP and per email); 401 otherwise.

    One message for unknown email and wrong password, and the same cost (a hash either way)."""
    email = email.strip().lower()
    limits.check(limits.login_ip, ip, "login attempts")
    limits.check(limits.login_email, email, "login attempts for this account")
    user = session.exec(select(User).where(User.email == email)).first()
    if not passwords.verify_password(user.password_hash if user else None, password) or user is None:
        raise Unauthorized(
            "The email or the password is not right.",
            title="Login failed",
            hint="Check both; a platform admin can reset the password (`fastapi-deploy admin users reset`).",
        )
    if user.disabled:
        raise Unauthorized("This account is disabled.", hint="Ask a platform admin to enable it again.")
    assert user.password_hash is not None
    if passwords.needs_rehash(user.password_hash):
        user.password_hash = passwords.hash_password(password)
    user.last_login_at = utcnow()
    session.add(user)
    return user


@router.post("/auth/login")
def login(
    body: LoginRequest, request: Request, platform: PlatformDep, session: SessionDep, limits: LimitsDep
) -> LoginResponse:
    """Email and password → a user token (``expires_in`` seconds), shown once."""
    user = check_password(session, limits, client_ip(request), body.email, body.password)
    audit.note(request, user=user)
    ttl = timedelta(seconds=platform.settings.login_token_ttl)
    token = issue_user_token(session, user, "password login", ttl=ttl)
    session.commit()
    return LoginResponse(
        access_token=token, expires_in=int(ttl.total_seconds()), user=Me.model_validate(_user_out(user))
    )


@router.post("/login/device/authorization", response_model=DeviceAuthorization)
def device_authorization(
    request: Request,
    platform: PlatformDep,
    session: SessionDep,
    limits: LimitsDep,
    client_id: Annotated[str, Form()] = "fastapi-cli",
) -> dict[str, Any]:
    limits.check(limits.device, client_ip(request), "login requests")
    device_code = secrets.token_urlsafe(32)
    user_code = _user_code()
    session.add(
        DeviceCode(
            device_code_hash=hash_token(device_code),
            user_code=user_code,
            client_id=client_id,
            expires_at=utcnow() + DEVICE_CODE_TTL,
        )
    )
    session.commit()
    uri = f"{platform.settings.api_url}/login/device"
    return {
        "device_code": device_code,
        "user_code": user_code,
        "verification_uri": uri,
        "verification_uri_complete": f"{uri}?user_code={user_code}",
        "expires_in": int(DEVICE_CODE_TTL.total_seconds()),
        "interval": POLL_INTERVAL,
    }


def _oauth_error(error: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=400)


@router.post("/login/device/token", response_model=DeviceToken, responses={400: {"model": OAuthError}})
def device_token(
    request: Request,
    platform: PlatformDep,
    session: SessionDep,
    limits: LimitsDep,
    device_code: Annotated[str, Form()],
    client_id: Annotated[str, Form()] = "",
    grant_type: Annotated[str, Form()] = "",
) -> dict[str, Any] | JSONResponse:
    limits.check(limits.device, client_ip(request), "login polls")
    row = session.get(DeviceCode, hash_token(device_code))
    if row is None or row.used:
        return _oauth_error("invalid_grant", "This login code is unknown or was already used. Log in again.")
    if aware(row.expires_at) <= utcnow():
        return _oauth_error("expired_token", "This login code expired. Log in again.")
    if row.denied:
        return _oauth_error("access_denied", "Login authorization was declined.")
    if row.approved_user_id is None:
        return _oauth_error("authorization_pending", "Waiting for approval in the browser.")
    user = session.get(User, row.approved_user_id)
    if user is None or user.disabled:
        return _oauth_error("access_denied", "The approving user no longer exists or is disabled.")
    audit.note(request, user=user)
    ttl = timedelta(seconds=platform.settings.device_token_ttl)
    token = issue_user_token(session, user, f"device login ({row.client_id or 'cli'})", ttl=ttl)
    row.used = True
    session.add(row)
    session.commit()
    return {"access_token": token, "token_type": "bearer", "expires_in": int(ttl.total_seconds())}


@router.post("/logout", status_code=204)
def logout(session: SessionDep, principal: PrincipalDep) -> Response:
    token = principal.token
    token.revoked_at = utcnow()
    session.add(token)
    session.commit()
    return Response(status_code=204)


@router.get("/users/me")
def me(principal: PrincipalDep) -> Me:
    return Me.model_validate(_user_out(require_user(principal)))


# -- the approval page (outside /api/v1) -------------------------------------------------------------

_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Approve login · fastapi-deploy</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem;color:#111}}
input{{font:inherit;padding:.5rem;width:100%;box-sizing:border-box;margin:.25rem 0 1rem}}
button{{font:inherit;padding:.5rem 1rem}}
.msg{{padding:.75rem;border-radius:.25rem;background:#eef}}</style></head>
<body><h1>Approve a CLI login</h1>{body}</body></html>"""


def _page(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(_PAGE.format(body=body), status_code=status)


@pages.get("/login/device", response_class=HTMLResponse)
def device_page(user_code: str = "") -> HTMLResponse:
    code = html.escape(user_code)
    return _page(
        f"""<p>A command-line client asks to act as you. Check that the code matches what it shows.</p>
<form method="post" action="/login/device">
<label for="user_code">Code</label><input id="user_code" name="user_code" value="{code}" required>
<label for="email">Email</label><input id="email" name="email" type="email" autocomplete="username">
<label for="password">Password</label><input id="password" name="password" type="password"
 autocomplete="current-password">
<details><summary>Or sign in with an API token</summary>
<label for="token">API token</label><input id="token" name="token" type="password" autocomplete="off">
</details>
<button name="action" value="approve">Approve</button> <button name="action" value="deny">Deny</button>
</form>"""
    )


@pages.post("/login/device", response_class=HTMLResponse)
def device_approve(
    request: Request,
    session: SessionDep,
    limits: LimitsDep,
    user_code: Annotated[str, Form()],
    token: Annotated[str, Form()] = "",
    email: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    action: Annotated[str, Form()] = "approve",
) -> HTMLResponse:
    """Approve (or deny) a device login as the user of ``email`` + ``password``, or of ``token``."""
    try:
        if email.strip() and password:
            user = check_password(session, limits, client_ip(request), email, password)
            audit.note(request, user=user)
        else:
            limits.check(limits.login_ip, client_ip(request), "login attempts")
            principal = authenticate(session, f"Bearer {token.strip()}")
            user = require_user(principal)
            audit.note(request, principal=principal)
    except APIError as exc:
        status = exc.status_code if exc.status_code == 429 else 403
        return _page(
            f'<p class="msg">{html.escape(exc.message)}</p><p><a href="/login/device">Try again</a></p>',
            status,
        )
    row = session.exec(select(DeviceCode).where(DeviceCode.user_code == user_code.strip().upper())).first()
    if row is None or row.used or aware(row.expires_at) <= utcnow():
        return _page('<p class="msg">This code is unknown or expired. Start the login again.</p>', 404)
    if action == "deny":
        row.denied = True
        message = "Login denied. You can close this window."
    else:
        row.approved_user_id = user.id
        message = (
            f"Approved: the CLI is now logged in as {html.escape(user.email)}. You can close this window."
        )
    session.add(row)
    session.commit()
    return _page(f'<p class="msg">{message}</p>')
