"""Login (the device flow the official CLI uses), logout, and who the caller is.

The device endpoints ignore any Authorization header: the official CLI sends a possibly stale token,
and a 401 there would make it delete its config and never log in again. The code is approved on a small
page of the control plane (``/login/device``) by pasting an API token; the device then gets a token of
its own for the same user.
"""

from __future__ import annotations

import html
import secrets
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Form
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlmodel import select

from control_plane.api.deps import PlatformDep, PrincipalDep, SessionDep
from control_plane.errors import APIError
from control_plane.models import DeviceCode, utcnow
from control_plane.security import authenticate, aware, hash_token, issue_user_token, require_user

router = APIRouter()
pages = APIRouter()

DEVICE_CODE_TTL = timedelta(minutes=15)
POLL_INTERVAL = 2
_USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"  # no vowels: no words, no 0/O 1/I confusion


def _user_code() -> str:
    chars = "".join(secrets.choice(_USER_CODE_ALPHABET) for _ in range(8))
    return f"{chars[:4]}-{chars[4:]}"


@router.post("/login/device/authorization")
def device_authorization(
    platform: PlatformDep, session: SessionDep, client_id: Annotated[str, Form()] = "fastapi-cli"
) -> dict[str, Any]:
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


@router.post("/login/device/token", response_model=None)
def device_token(
    session: SessionDep,
    device_code: Annotated[str, Form()],
    client_id: Annotated[str, Form()] = "",
    grant_type: Annotated[str, Form()] = "",
) -> dict[str, Any] | JSONResponse:
    row = session.get(DeviceCode, hash_token(device_code))
    if row is None or row.used:
        return _oauth_error("invalid_grant", "This login code is unknown or was already used. Log in again.")
    if aware(row.expires_at) <= utcnow():
        return _oauth_error("expired_token", "This login code expired. Log in again.")
    if row.denied:
        return _oauth_error("access_denied", "Login authorization was declined.")
    if row.approved_user_id is None:
        return _oauth_error("authorization_pending", "Waiting for approval in the browser.")
    from control_plane.models import User

    user = session.get(User, row.approved_user_id)
    if user is None:
        return _oauth_error("access_denied", "The approving user no longer exists.")
    token = issue_user_token(
        session, user, f"device login ({row.client_id or 'cli'})", ttl=timedelta(days=90)
    )
    row.used = True
    session.add(row)
    session.commit()
    return {
        "access_token": token,
        "token_type": "bearer",
        "expires_in": int(timedelta(days=90).total_seconds()),
    }


@router.post("/logout", status_code=204)
def logout(session: SessionDep, principal: PrincipalDep) -> Response:
    token = principal.token
    token.revoked_at = utcnow()
    session.add(token)
    session.commit()
    return Response(status_code=204)


@router.get("/users/me")
def me(principal: PrincipalDep) -> dict[str, Any]:
    user = require_user(principal)
    return {"id": user.id, "email": user.email, "name": user.name, "is_admin": user.is_admin}


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
<label for="token">Your API token</label><input id="token" name="token" type="password" required
 autocomplete="current-password">
<button name="action" value="approve">Approve</button> <button name="action" value="deny">Deny</button>
</form>"""
    )


@pages.post("/login/device", response_class=HTMLResponse)
def device_approve(
    session: SessionDep,
    user_code: Annotated[str, Form()],
    token: Annotated[str, Form()],
    action: Annotated[str, Form()] = "approve",
) -> HTMLResponse:
    try:
        principal = authenticate(session, f"Bearer {token.strip()}")
        user = require_user(principal)
    except APIError as exc:
        return _page(
            f'<p class="msg">{html.escape(exc.message)}</p><p><a href="/login/device">Try again</a></p>', 403
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
