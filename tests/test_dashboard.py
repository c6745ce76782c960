"""The dashboard in process (httpx.ASGITransport against ``create_app``): sign-in, sessions, CSRF,
permissions exactly as the API's, secrets, audit, headers, assets, and the small pure parts.

The browser tier (``test_dashboard_browser.py``) drives the same pages in Chromium against a real
server; this tier checks the rules one by one, fast.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from markupsafe import escape
from sqlmodel import col, select

from control_plane import insights
from control_plane.app import create_app
from control_plane.config import Settings
from control_plane.models import Alert, ApiToken, AuditEntry, Deployment, Membership, Team, TraceSummary, User
from control_plane.models import App as AppRow
from control_plane.passwords import hash_password
from control_plane.permissions import Action, Role, allows
from control_plane.platform import Platform
from control_plane.security import hash_token
from dashboard import format as fmt
from dashboard import sessions
from dashboard.assets import STATIC, Assets
from tests.dbs import database
from tests.test_insights_e2e import BLOCKING

ADMIN = "fdp_test_admin_token"
PASSWORD = "a long enough password"
BASE = "http://testserver"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Env:
    platform: Platform
    app: Any
    transport: httpx.ASGITransport
    client: httpx.AsyncClient

    def browser(self) -> httpx.AsyncClient:
        """Another browser: its own cookie jar."""
        return httpx.AsyncClient(transport=self.transport, base_url=BASE)

    async def api(self, method: str, path: str, token: str = ADMIN, **kw: Any) -> httpx.Response:
        return await self.client.request(
            method, f"/api/v1{path}", headers={"Authorization": f"Bearer {token}"}, **kw
        )

    def team(self, slug: str = "default") -> Team:
        with self.platform.db.session() as s:
            team = s.exec(select(Team).where(Team.slug == slug)).first()
            if team is None:
                team = Team(slug=slug, name=slug.title())
                s.add(team)
                s.commit()
            return team

    def user(
        self, email: str, *, role: str | None = "member", team: str = "default", password: str = PASSWORD
    ) -> User:
        """A user with a password, a member of ``team`` with ``role`` (None: of no team)."""
        team_id = self.team(team).id
        with self.platform.db.session() as s:
            user = User(email=email, name=email.split("@")[0], password_hash=hash_password(password))
            s.add(user)
            s.flush()
            if role is not None:
                s.add(Membership(team_id=team_id, user_id=user.id, role=role))
            s.commit()
            return user

    def session_for(self, user: User) -> str:
        """A session cookie for ``user``, as signing in would make one."""
        keys = sessions.load_keys(self.platform.db)
        with self.platform.db.session() as s:
            value, _row = sessions.create(s, keys, user)
        return value

    async def signed_in(self, user: User) -> httpx.AsyncClient:
        client = self.browser()
        client.cookies.set("fdp_session", self.session_for(user))
        return client

    async def create_app(self, name: str, team: str = "default") -> dict[str, Any]:
        r = await self.api("POST", "/apps/", json={"team_id": self.team(team).id, "name": name})
        assert r.status_code == 201, r.text
        out: dict[str, Any] = r.json()
        return out


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Env]:
    platform = Platform(settings)
    app = create_app(settings, platform)
    await platform.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            yield Env(platform, app, transport, client)
    finally:
        await platform.stop()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    settings = Settings(data_dir=tmp_path / "data", router_port=0, admin_token=ADMIN, admin_password=PASSWORD)
    async with running(settings) as e:
        yield e


def csrf_of(html: str) -> str:
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', html) or re.search(
        r'name="csrf_token" value="([^"]+)"', html
    )
    assert match, html[:2000]
    return match.group(1)


async def sign_in(
    client: httpx.AsyncClient, email: str = "admin@localhost", password: str = PASSWORD, **extra: str
) -> httpx.Response:
    page = await client.get("/dashboard/login")
    return await client.post(
        "/dashboard/login",
        data={"csrf_token": csrf_of(page.text), "email": email, "password": password, **extra},
    )


async def page_csrf(client: httpx.AsyncClient, path: str = "/dashboard/") -> str:
    r = await client.get(path)
    assert r.status_code == 200, (path, r.status_code, r.text[:500])
    return csrf_of(r.text)


# -- signing in and out ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_signed_out_visitors_are_sent_to_sign_in(env: Env) -> None:
    r = await env.client.get("/dashboard/apps/demo/settings?x=1")
    assert r.status_code == 303
    assert r.headers["location"] == "/dashboard/login?next=/dashboard/apps/demo/settings%3Fx%3D1"
    live = await env.client.get("/dashboard/apps/demo/live.json")
    assert live.status_code == 401 and live.json()["error"]["code"] == "invalid_token"
    assert (await env.client.get("/")).headers["location"] == "/dashboard/"


@pytest.mark.anyio
async def test_password_sign_in_sets_a_hardened_session_cookie(env: Env) -> None:
    r = await sign_in(env.client, next="/dashboard/account")
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/account"
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("fdp_session="))
    attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "path", "samesite", "max-age"} <= attrs and "secure" not in attrs
    assert "samesite=lax" in cookie.lower() and "path=/" in cookie.lower()
    me = await env.client.get("/dashboard/account")
    assert me.status_code == 200 and "admin@localhost" in me.text
    with env.platform.db.session() as s:
        rows = s.exec(select(ApiToken).where(ApiToken.name == sessions.SESSION_NAME)).all()
        admin = s.exec(select(User).where(User.email == "admin@localhost")).one()
    assert len(rows) == 1 and rows[0].expires_at is not None and admin.last_login_at is not None
    # The cookie is not a bearer token: the API refuses it.
    raw = env.client.cookies["fdp_session"]
    for value in (raw, raw.split(".")[0]):
        assert (await env.api("GET", "/users/me", token=value)).status_code == 401


@pytest.mark.anyio
async def test_sign_in_goes_only_to_dashboard_pages(env: Env) -> None:
    for target in (
        "https://evil.example/",
        "//evil.example/x",
        "/api/v1/users/me",
        "/dashboard//evil.example",
    ):
        async with env.browser() as client:
            r = await sign_in(client, next=target)
            assert r.headers["location"] == "/dashboard/", target


@pytest.mark.anyio
async def test_wrong_credentials_and_token_sign_in(env: Env) -> None:
    wrong = await sign_in(env.client, password="not the password")
    unknown = await sign_in(env.client, email="nobody@example.com")
    assert wrong.status_code == unknown.status_code == 401
    assert "The email or the password is not right." in wrong.text and "fdp_session" not in env.client.cookies
    empty = await sign_in(env.client, email="", password="")
    assert empty.status_code == 400
    app = await env.create_app("web")
    deploy = await env.api("POST", f"/apps/{app['id']}/tokens", json={"name": "ci"})
    page = await env.client.get("/dashboard/login")
    r = await env.client.post(
        "/dashboard/login", data={"csrf_token": csrf_of(page.text), "token": deploy.json()["value"]}
    )
    assert r.status_code == 403 and "A deploy token cannot sign in" in r.text
    r = await env.client.post("/dashboard/login", data={"csrf_token": csrf_of(page.text), "token": ADMIN})
    assert r.status_code == 303
    assert ADMIN not in env.client.cookies["fdp_session"]  # a session of its own, not the pasted token


@pytest.mark.anyio
async def test_sign_in_form_needs_its_csrf_token_and_our_origin(env: Env) -> None:
    await env.client.get("/dashboard/login")
    forged = await env.client.post(
        "/dashboard/login", data={"email": "admin@localhost", "password": PASSWORD}
    )
    assert forged.status_code == 403 and "fdp_session" not in env.client.cookies
    page = await env.client.get("/dashboard/login")
    cross = await env.client.post(
        "/dashboard/login",
        data={"csrf_token": csrf_of(page.text), "email": "admin@localhost", "password": PASSWORD},
        headers={"Origin": "https://evil.example"},
    )
    assert cross.status_code == 403 and "fdp_session" not in env.client.cookies


@pytest.mark.anyio
async def test_sign_in_is_rate_limited(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", router_port=0, admin_token=ADMIN, rate_limit_login=(3, 60.0)
    )
    async with running(settings) as env:
        statuses = [(await sign_in(env.client, password="wrong")).status_code for _ in range(4)]
        assert statuses[0] == 401 and statuses[-1] == 429  # per IP, and per email (half the burst)
        r = await sign_in(env.client, password="wrong")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1


@pytest.mark.anyio
async def test_https_gets_a_secure_host_only_cookie(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        router_port=0,
        admin_token=ADMIN,
        admin_password=PASSWORD,
        public_url="https://deploy.example.com",
    )
    async with (
        running(settings) as env,
        httpx.AsyncClient(transport=env.transport, base_url="https://testserver") as client,
    ):
        page = await client.get("/dashboard/login")
        assert "secure" in page.headers["set-cookie"].lower()  # the login form's nonce too
        r = await client.post(
            "/dashboard/login",
            data={"csrf_token": csrf_of(page.text), "email": "admin@localhost", "password": PASSWORD},
            headers={"Origin": "https://deploy.example.com"},
        )
        assert r.status_code == 303
        cookie = next(h for h in r.headers.get_list("set-cookie") if "fdp_session" in h)
        assert cookie.startswith("__Host-fdp_session=") and "secure" in cookie.lower()
        assert "domain" not in cookie.lower() and "path=/" in cookie.lower()


@pytest.mark.anyio
async def test_a_tampered_or_foreign_cookie_is_refused(env: Env) -> None:
    await sign_in(env.client)
    good = env.client.cookies["fdp_session"]
    raw, sig = good.split(".")
    for bad in (f"{raw}.{sig[:-2]}AA", f"{raw[:-1]}x.{sig}", raw, "", "a.b.c"):
        async with env.browser() as other:
            other.cookies.set("fdp_session", bad)
            r = await other.get("/dashboard/")
            assert r.status_code == 303 and r.headers["location"].startswith("/dashboard/login"), bad


@pytest.mark.anyio
async def test_sign_out_revokes_the_session(env: Env) -> None:
    await sign_in(env.client)
    cookie = env.client.cookies["fdp_session"]
    token = await page_csrf(env.client)
    assert (await env.client.get("/dashboard/logout")).status_code == 404  # never a GET
    assert (await env.client.get("/dashboard/")).status_code == 200
    refused = await env.client.post("/dashboard/logout", data={})
    assert refused.status_code == 403  # CSRF: a page elsewhere cannot sign you out either
    r = await env.client.post("/dashboard/logout", data={"csrf_token": token})
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/login?logged_out=1"
    assert any(h.startswith('fdp_session=""') for h in r.headers.get_list("set-cookie"))
    async with env.browser() as stolen:
        stolen.cookies.set("fdp_session", cookie)
        assert (await stolen.get("/dashboard/")).status_code == 303
    with env.platform.db.session() as s:
        row = s.exec(select(ApiToken).where(ApiToken.name == sessions.SESSION_NAME)).one()
    assert row.revoked_at is not None


@pytest.mark.anyio
async def test_a_password_reset_or_a_disabled_account_ends_sessions(env: Env) -> None:
    user = env.user("dev@example.com")
    changes: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", f"/admin/users/{user.id}/reset", {}),
        ("PATCH", f"/admin/users/{user.id}", {"disabled": True}),
    ]
    for method, path, body in changes:
        client = await env.signed_in(user)
        assert (await client.get("/dashboard/")).status_code == 200
        r = await env.api(method, path, json=body)
        assert r.status_code == 200, r.text
        assert (await client.get("/dashboard/")).status_code == 303
        await client.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_sessions_on_each_database(tmp_path: Path, kind: str) -> None:
    """The key setting, session rows and revocation on SQLite and on a real PostgreSQL."""
    with database(kind, tmp_path) as url:
        settings = Settings(
            data_dir=tmp_path / "data",
            router_port=0,
            database_url=url,
            admin_token=ADMIN,
            admin_password=PASSWORD,
        )
        async with running(settings) as env:
            assert (await sign_in(env.client)).status_code == 303
            token = await page_csrf(env.client)
            keys = sessions.load_keys(env.platform.db)
            assert keys == sessions.load_keys(env.platform.db)  # one secret, read back the same
            assert (await env.client.post("/dashboard/logout", data={"csrf_token": token})).status_code == 303
            assert (await env.client.get("/dashboard/")).status_code == 303


# -- CSRF on every form --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_every_post_needs_the_sessions_csrf_token(env: Env) -> None:
    app = await env.create_app("web")
    await sign_in(env.client)
    token = await page_csrf(env.client)
    form = {"min_instances": "0", "max_instances": "3"}
    missing = await env.client.post("/dashboard/apps/web/scaling", data=form)
    assert missing.status_code == 403 and "Form expired" in missing.text
    other = env.user("other@example.com", role="owner")
    other_token = await page_csrf(await env.signed_in(other))
    foreign = await env.client.post("/dashboard/apps/web/scaling", data={**form, "csrf_token": other_token})
    assert foreign.status_code == 403
    cross = await env.client.post(
        "/dashboard/apps/web/scaling",
        data={**form, "csrf_token": token},
        headers={"Origin": "https://evil.example"},
    )
    assert cross.status_code == 403
    assert (await env.api("GET", f"/apps/{app['id']}/scaling")).json()["max_instances"] == 10
    # The form field or the header (what the pages' scripts would send) both work.
    ok = await env.client.post("/dashboard/apps/web/scaling", data={**form, "csrf_token": token})
    assert ok.status_code == 303 and ok.headers["location"].endswith("?saved=scaling#scaling")
    ok = await env.client.post(
        "/dashboard/apps/web/scaling",
        data={"max_instances": "4"},
        headers={"X-CSRF-Token": token, "Origin": BASE},
    )
    assert ok.status_code == 303
    got = (await env.api("GET", f"/apps/{app['id']}/scaling")).json()
    assert (got["min_instances"], got["max_instances"]) == (0, 4)


# -- permissions: exactly the API's --------------------------------------------------------------------------

PAGES = {
    "/dashboard/apps/web": Action.APP_READ,
    "/dashboard/apps/web/live.json": Action.APP_READ,
    "/dashboard/apps/web/deployments": Action.APP_MONITOR,
    "/dashboard/apps/web/metrics": Action.APP_MONITOR,
    "/dashboard/apps/web/metrics.json?range=24h": Action.APP_MONITOR,
    "/dashboard/apps/web/insights": Action.APP_MONITOR,
    "/dashboard/apps/web/alerts": Action.APP_MONITOR,
    "/dashboard/apps/web/settings": Action.APP_MONITOR,
    "/dashboard/apps/web/traces": Action.LOGS_READ,
    "/dashboard/apps/web/logs": Action.LOGS_READ,
    "/dashboard/teams/default": Action.TEAM_READ,
}
FORMS: dict[str, tuple[Action, dict[str, str]]] = {
    "/dashboard/apps/web/scaling": (Action.SCALE, {"max_instances": "5"}),
    "/dashboard/apps/web/env": (Action.ENV_WRITE, {"name": "X", "value": "1"}),
    "/dashboard/apps/web/env/delete": (Action.ENV_WRITE, {"name": "X"}),
    "/dashboard/apps/web/health-path": (Action.APP_UPDATE, {"health_path": "/healthz"}),
    "/dashboard/apps/web/insights": (Action.APP_UPDATE, {"fail_on_blocking": "on"}),
    "/dashboard/apps/web/tokens": (Action.TOKENS_MANAGE, {"name": "ci"}),
    "/dashboard/apps/web/slos": (Action.APP_UPDATE, {"kind": "availability", "target": "99.9"}),
    "/dashboard/apps/web/slos/nope/delete": (Action.APP_UPDATE, {}),
    "/dashboard/apps/web/webhooks": (Action.APP_UPDATE, {"url": "http://127.0.0.1:9/hook"}),
    "/dashboard/apps/web/webhooks/nope/delete": (Action.APP_UPDATE, {}),
    "/dashboard/apps/web/webhooks/nope/test": (Action.APP_UPDATE, {}),
    "/dashboard/apps/web/rollback": (Action.RELEASE, {}),
    "/dashboard/apps/web/redeploy": (Action.RELEASE, {}),
    "/dashboard/apps/web/delete": (Action.APP_DELETE, {"confirm": "not-the-name"}),
    "/dashboard/teams/default/members": (Action.MEMBERS_MANAGE, {"email": "nobody@example.com"}),
}


@pytest.mark.anyio
@pytest.mark.parametrize("role", [r.name for r in Role])
async def test_each_role_sees_and_changes_what_the_api_allows(env: Env, role: str) -> None:
    await env.create_app("web")
    user = env.user(f"{role}@example.com", role=role)
    client = await env.signed_in(user)
    for path, action in PAGES.items():
        r = await client.get(path)
        expected = 200 if allows(Role[role], action) else 403
        assert r.status_code == expected, (role, path, r.status_code, r.text[:300])
        if expected == 403:
            assert "needs" in r.text and PERMISSIONS_WHAT[action] in r.text
    token = await page_csrf(client)
    for path, (action, form) in FORMS.items():
        r = await client.post(path, data={**form, "csrf_token": token})
        if allows(Role[role], action):
            # Past the permission check: done, or the API's own answer about the request itself.
            assert r.status_code in (201, 303, 400, 404, 409), (role, path, r.status_code, r.text[:300])
        else:
            assert r.status_code == 403, (role, path, r.status_code)
    settings = await client.get("/dashboard/apps/web/settings")
    disabled = "fieldset disabled" in settings.text.split('id="scaling"')[1].split("</form>")[0]
    assert disabled == (not allows(Role[role], Action.SCALE))
    await client.aclose()


PERMISSIONS_WHAT = {
    Action.LOGS_READ: "read this app&#39;s logs",
    Action.APP_MONITOR: "see this app&#39;s deployments and scaling",
    Action.TEAM_READ: "see this team",
    Action.APP_READ: "see this app",
}


@pytest.mark.anyio
async def test_other_teams_apps_do_not_exist(env: Env) -> None:
    await env.create_app("web")
    outsider = env.user("out@example.com", role="owner", team="elsewhere")
    client = await env.signed_in(outsider)
    for path in [*PAGES, "/dashboard/apps/nope"]:
        r = await client.get(path.replace("/teams/default", "/teams/default"))
        assert r.status_code == 404, path
    token = await page_csrf(client)
    r = await client.post("/dashboard/apps/web/scaling", data={"max_instances": "2", "csrf_token": token})
    assert r.status_code == 404
    apps = await client.get("/dashboard/")
    assert 'data-app="web"' not in apps.text
    await client.aclose()


@pytest.mark.anyio
async def test_admin_pages_are_for_platform_admins(env: Env) -> None:
    owner = env.user("owner@example.com", role="owner")
    client = await env.signed_in(owner)
    admin_pages = ["", "/users", "/teams", "/apps", "/tokens", "/audit"]
    for path in admin_pages:
        r = await client.get(f"/dashboard/admin{path}")
        assert r.status_code == 403 and "Platform admins only" in r.text, path
    await sign_in(env.client)
    for path in admin_pages:
        assert (await env.client.get(f"/dashboard/admin{path}")).status_code == 200, path
    await client.aclose()


# -- forms ---------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_scaling_form_validation_keeps_what_was_typed(env: Env) -> None:
    await env.create_app("web")
    await sign_in(env.client)
    token = await page_csrf(env.client)
    form = {"csrf_token": token, "min_instances": "5", "max_instances": "2", "target_concurrency": "10"}
    combo = await env.client.post("/dashboard/apps/web/scaling", data=form)
    assert combo.status_code == 400 and "Invalid scaling settings" in combo.text
    assert 'id="min_instances" name="min_instances"' in combo.text and 'value="5"' in combo.text
    field = await env.client.post(
        "/dashboard/apps/web/scaling", data={**form, "min_instances": "1", "max_instances": "0"}
    )
    assert field.status_code == 422
    assert 'id="max_instances-error"' in field.text and 'aria-invalid="true"' in field.text
    nonsense = await env.client.post(
        "/dashboard/apps/web/scaling", data={**form, "target_concurrency": "lots"}
    )
    assert nonsense.status_code == 422 and 'id="target_concurrency-error"' in nonsense.text


@pytest.mark.anyio
async def test_secret_values_never_reach_the_page(env: Env) -> None:
    app = await env.create_app("web")
    await env.api(
        "PUT",
        f"/apps/{app['id']}/environment-variables/",
        json={"upsert": {"TOKEN": {"value": "s3cr3t-value", "is_secret": True}, "MODE": {"value": "fast"}}},
    )
    await sign_in(env.client)
    page = await env.client.get("/dashboard/apps/web/settings")
    assert "s3cr3t-value" not in page.text and "TOKEN" in page.text and "fast" in page.text
    token = csrf_of(page.text)
    r = await env.client.post(
        "/dashboard/apps/web/env",
        data={"csrf_token": token, "name": "API_KEY", "value": "another-secret", "is_secret": "on"},
    )
    assert r.status_code == 303
    page = await env.client.get("/dashboard/apps/web/settings")
    assert "another-secret" not in page.text and 'data-env="API_KEY"' in page.text
    bad = await env.client.post(
        "/dashboard/apps/web/env", data={"csrf_token": token, "name": "PATH", "value": "/x"}
    )
    assert bad.status_code == 422 and "reserved by the platform" in bad.text


@pytest.mark.anyio
async def test_tokens_are_shown_once(env: Env) -> None:
    await env.create_app("web")
    await sign_in(env.client)
    token = await page_csrf(env.client)
    r = await env.client.post("/dashboard/apps/web/tokens", data={"csrf_token": token, "name": "ci"})
    value = re.search(r'id="once-value" class="mono" readonly value="([^"]+)"', r.text)
    assert r.status_code == 201 and value
    assert value.group(1) not in (await env.client.get("/dashboard/apps/web/settings")).text
    assert (await env.client.get("/dashboard/apps/web/live.json", headers={})).status_code == 200
    personal = await env.client.post(
        "/dashboard/account/tokens", data={"csrf_token": token, "name": "script"}
    )
    shown = re.search(r'readonly value="(fdp_[^"]+)"', personal.text)
    assert personal.status_code == 201 and shown
    assert (await env.api("GET", "/users/me", token=shown.group(1))).status_code == 200


@pytest.mark.anyio
async def test_team_members_are_managed_from_the_team_page(env: Env) -> None:
    env.user("new@example.com", role=None)
    await sign_in(env.client)
    token = await page_csrf(env.client, "/dashboard/teams/default")
    r = await env.client.post(
        "/dashboard/teams/default/members",
        data={"csrf_token": token, "email": "new@example.com", "role": "viewer"},
    )
    assert r.status_code == 303
    unknown = await env.client.post(
        "/dashboard/teams/default/members", data={"csrf_token": token, "email": "ghost@example.com"}
    )
    assert unknown.status_code == 404 and "No user with the email" in unknown.text
    with env.platform.db.session() as s:
        user = s.exec(select(User).where(User.email == "new@example.com")).one()
        assert s.get(Membership, (env.team().id, user.id)).role == "viewer"  # type: ignore[union-attr]
    r = await env.client.post(
        f"/dashboard/teams/default/members/{user.id}",
        data={"csrf_token": token, "action": "role", "role": "admin"},
    )
    assert r.status_code == 303
    with env.platform.db.session() as s:
        assert s.get(Membership, (env.team().id, user.id)).role == "admin"  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_admin_creates_a_user_and_sees_the_password_once(env: Env) -> None:
    await sign_in(env.client)
    token = await page_csrf(env.client)
    r = await env.client.post(
        "/dashboard/admin/users",
        data={"csrf_token": token, "email": "made@example.com", "team_id": env.team().id, "role": "member"},
    )
    assert r.status_code == 201
    password = re.search(r'readonly value="([^"]+)"', r.text)
    assert password
    async with env.browser() as client:
        assert (await sign_in(client, "made@example.com", password.group(1))).status_code == 303
    again = await env.client.post(
        "/dashboard/admin/users", data={"csrf_token": token, "email": "made@example.com"}
    )
    assert again.status_code == 409 and "Email taken" in again.text


# -- SLOs, alerts and webhooks ---------------------------------------------------------------------------


@dataclass
class _Head:
    path: bytes = b"/"


@dataclass
class FakeRequest:
    """A request as the router reports it when done (``RequestInfo``): what SLOs are counted from."""

    status: int = 200
    head: _Head = field(default_factory=_Head)
    method: bytes = b"GET"
    started: float = 0.0
    upstream_id: str | None = None
    waited: float = -1.0
    cold: bool = False
    broken: bool = False
    received: int = 0
    sent: int = 0


def served(env: Env, app_id: str, good: int, bad: int) -> None:
    """``good`` answers and ``bad`` 503s, as if through the router just now (the open metrics window)."""
    now = time.time()
    for status in [200] * good + [503] * bad:
        env.platform.metrics.request_done(app_id, FakeRequest(status, started=now - 0.02), now)  # type: ignore[arg-type]


def alert_row(app_id: str, kind: str, status: str, minutes_ago: float, **extra: Any) -> Alert:
    started = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    return Alert(
        app_id=app_id,
        kind=kind,
        key=extra.pop("key", kind),
        severity=extra.pop("severity", "page"),
        status=status,
        message=extra.pop("message", f"{kind} on purpose"),
        started_at=started,
        resolved_at=started + timedelta(minutes=2) if status == "resolved" else None,
        **extra,
    )


@pytest.mark.anyio
async def test_the_alerts_tab_shows_slos_budgets_burn_rates_alerts_and_webhooks(env: Env) -> None:
    app = await env.create_app("web")
    await env.create_app("quiet")
    availability = await env.api(
        "POST",
        f"/apps/{app['id']}/slos",
        json={"name": "available", "kind": "availability", "target": 0.999, "window_days": 0.25},
    )
    latency = await env.api(
        "POST",
        f"/apps/{app['id']}/slos",
        json={"name": "fast", "kind": "latency", "target": 0.99, "threshold_ms": 300},
    )
    assert availability.status_code == latency.status_code == 201, availability.text
    hook = (
        await env.api("POST", f"/apps/{app['id']}/webhooks", json={"url": "https://hooks.example/x"})
    ).json()
    served(env, app["id"], good=90, bad=10)
    delivered = json.dumps([{"webhook": hook["id"], "status": 204, "at": datetime.now(UTC).isoformat()}])
    with env.platform.db.session() as s:
        s.add(
            alert_row(
                app["id"], "slo", "firing", 30, key=availability.json()["id"], message="SLO available burns"
            )
        )
        s.add(alert_row(app["id"], "crash_loop", "resolved", 5, deliveries=delivered))
        s.add(alert_row(app["id"], "deploy_failed", "resolved", 1, severity="ticket"))
        s.commit()
    await sign_in(env.client)
    page = await env.client.get("/dashboard/apps/web/alerts")
    assert page.status_code == 200
    html = page.text
    assert 'aria-current="page">Alerts</a>' in html
    # Each SLO: objective, window, SLI, budget (a bar drawn here), burn rates, state.
    available = html.split(f'data-slo="{availability.json()["id"]}"')[1].split("</article>")[0]
    assert (
        "99.9 %" in available
        and "6 h" in available
        and "90 %" in available
        and "of 100 requests" in available
    )
    assert '<svg class="budget bad"' in available and "none left" in available
    assert available.count("<tr") == 5 and 'class="burning"' in available  # four rules, 10 % errors burn
    assert "14.4x" in available and "none left: 100" in available  # the page rule's rate; 10 % / 0.1 %
    fast = html.split(f'data-slo="{latency.json()["id"]}"')[1].split("</article>")[0]
    assert "answered within 300 ms" in fast and "30 d" in fast and "100 %" in fast
    assert '<svg class="budget ok"' in fast and "100 % left" in fast
    # The alerts: the firing one first, though the oldest; kind, severity, how long, what was sent.
    rows = re.findall(r'<tr data-alert="[^"]+" data-status="(\w+)" data-kind="(\w+)"', html)
    assert rows == [("firing", "slo"), ("resolved", "deploy_failed"), ("resolved", "crash_loop")]
    assert (
        "SLO available burns" in html and "crash loop" in html and "2 min" in html and "1 delivered" in html
    )
    # Webhooks (app:update): the URL and the last delivery's answer, never the secret.
    assert "https://hooks.example/x" in html and hook["secret"] not in html
    last = html.split(f'data-webhook="{hook["id"]}"')[1].split("</tr>")[0]
    assert '<span class="badge ok">204</span>' in last
    # The firing alert is on the app's header on every tab, and on the apps lists.
    for path in (
        "/dashboard/apps/web",
        "/dashboard/apps/web/metrics",
        "/dashboard/",
        "/dashboard/teams/default",
    ):
        found = await env.client.get(path)
        assert re.search(
            r'href="/dashboard/apps/web/alerts#alerts" data-firing="1">1 alert firing<', found.text
        ), path
        assert "/dashboard/apps/quiet/alerts#alerts" not in found.text, path
    # Nothing fires for the other app: no badge, an empty history.
    quiet = (await env.client.get("/dashboard/apps/quiet/alerts")).text
    assert "data-firing" not in quiet and "Nothing has fired." in quiet and "No SLOs yet" in quiet


@pytest.mark.anyio
async def test_slo_forms_are_the_apis_with_its_permissions_csrf_validation_and_audit(env: Env) -> None:
    app = await env.create_app("web")
    viewer = await env.signed_in(env.user("viewer@example.com", role="viewer"))
    page = await viewer.get("/dashboard/apps/web/alerts")
    assert page.status_code == 200  # a viewer reads SLOs and alerts (app:monitor) ...
    form = page.text.split('action="/dashboard/apps/web/slos"')[1].split("</form>")[0]
    assert "<fieldset disabled>" in form and "that needs <strong>member</strong>" in form
    assert "cannot change this app: that needs <strong>member</strong>" in page.text.split('id="webhooks"')[1]
    token = csrf_of(page.text)
    refused = await viewer.post("/dashboard/apps/web/slos", data={"csrf_token": token, "target": "99"})
    assert refused.status_code == 403 and "needs member" in refused.text  # ... and cannot add one
    await viewer.aclose()

    await sign_in(env.client)
    token = await page_csrf(env.client, "/dashboard/apps/web/alerts")
    good = {"kind": "availability", "target": "99.5", "window_days": "7"}
    assert (await env.client.post("/dashboard/apps/web/slos", data=good)).status_code == 403
    cross = await env.client.post(
        "/dashboard/apps/web/slos",
        data={**good, "csrf_token": token},
        headers={"Origin": "https://evil.example"},
    )
    assert cross.status_code == 403 and "Form expired" in cross.text
    assert (await env.api("GET", f"/apps/{app['id']}/slos")).json()["data"] == []
    # Validation: the API's model says what is wrong, next to the form, with what was typed.
    bad = await env.client.post(
        "/dashboard/apps/web/slos", data={**good, "target": "150", "window_days": "365", "csrf_token": token}
    )
    assert bad.status_code == 422
    assert (
        "<strong>Invalid SLO</strong> Some fields are not valid" in bad.text and "share answered" in bad.text
    )
    assert 'id="target-error">A percentage between 0 and 100' in bad.text
    assert 'id="window_days-error">Input should be less than or equal to 90' in bad.text
    assert 'value="150"' in bad.text and 'value="365"' in bad.text
    latency = await env.client.post(
        "/dashboard/apps/web/slos", data={"kind": "latency", "target": "99", "csrf_token": token}
    )
    assert latency.status_code == 400  # the API's own check, its title, message and hint
    assert "<strong>Invalid SLO</strong> A latency SLO needs threshold_ms." in latency.text
    assert "p99 ≤ 300 ms: target 0.99, threshold_ms 300." in latency.text
    # Added: the name made up as the CLI does, the objective as a fraction.
    r = await env.client.post("/dashboard/apps/web/slos", data={**good, "csrf_token": token})
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/apps/web/alerts?saved=slo#slos"
    r = await env.client.post(
        "/dashboard/apps/web/slos",
        data={"kind": "latency", "target": "95", "threshold_ms": "250", "csrf_token": token},
    )
    assert r.status_code == 303
    listed = (await env.api("GET", f"/apps/{app['id']}/slos")).json()["data"]
    assert [(s["name"], s["kind"], s["target"], s["threshold_ms"], s["window_days"]) for s in listed] == [
        ("availability 99.5%", "availability", 0.995, None, 7),
        ("p95 ≤ 250 ms", "latency", 0.95, 250, 30),
    ]
    shown = await env.client.get("/dashboard/apps/web/alerts?saved=slo")
    assert "SLO added" in shown.text and "availability 99.5%" in shown.text
    # Deleted, from its own form.
    r = await env.client.post(
        f"/dashboard/apps/web/slos/{listed[0]['id']}/delete", data={"csrf_token": token}
    )
    assert r.status_code == 303 and r.headers["location"].endswith("?saved=slo-deleted#slos")
    assert [s["name"] for s in (await env.api("GET", f"/apps/{app['id']}/slos")).json()["data"]] == [
        "p95 ≤ 250 ms"
    ]
    gone = await env.client.post(
        f"/dashboard/apps/web/slos/{listed[0]['id']}/delete", data={"csrf_token": token}
    )
    assert gone.status_code == 404 and "SLO not found" in gone.text
    with env.platform.db.session() as s:
        audited = s.exec(
            select(AuditEntry)
            .where(col(AuditEntry.route).startswith("/dashboard/apps/{app_slug}/slos"))
            .order_by(col(AuditEntry.id))
        ).all()
    assert [(a.route, a.status_code) for a in audited] == [
        ("/dashboard/apps/{app_slug}/slos", 403),
        ("/dashboard/apps/{app_slug}/slos", 403),
        ("/dashboard/apps/{app_slug}/slos", 403),
        ("/dashboard/apps/{app_slug}/slos", 422),
        ("/dashboard/apps/{app_slug}/slos", 400),
        ("/dashboard/apps/{app_slug}/slos", 303),
        ("/dashboard/apps/{app_slug}/slos", 303),
        ("/dashboard/apps/{app_slug}/slos/{slo_id}/delete", 303),
        ("/dashboard/apps/{app_slug}/slos/{slo_id}/delete", 404),
    ]
    assert {(a.actor_email, a.app_id) for a in audited[3:]} == {("admin@localhost", app["id"])}
    assert audited[0].actor_email == "viewer@example.com"


class Receiver(ThreadingHTTPServer):
    """A webhook receiver on a real socket: it keeps what it was sent and answers 204."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                signature = self.headers.get("X-FastAPI-Deploy-Signature")
                receiver.got.append({"body": json.loads(body), "raw": body, "signature": signature})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/hook"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.anyio
async def test_webhooks_are_added_tested_and_deleted_from_the_alerts_tab(
    env: Env, receiver: Receiver
) -> None:
    app = await env.create_app("web")
    await sign_in(env.client)
    token = await page_csrf(env.client, "/dashboard/apps/web/alerts")
    bad = await env.client.post(
        "/dashboard/apps/web/webhooks", data={"url": "not a url", "csrf_token": token}
    )
    assert bad.status_code == 422 and "<strong>Invalid webhook</strong>" in bad.text
    assert 'id="url-error">Input should be a valid URL' in bad.text and 'value="not a url"' in bad.text
    assert "hooks.slack.com/services/" in bad.text  # the hint
    created = await env.client.post(
        "/dashboard/apps/web/webhooks", data={"url": receiver.url, "csrf_token": token}
    )
    secret = re.search(r'id="once-value" class="mono" readonly value="([0-9a-f]{32})"', created.text)
    assert created.status_code == 201 and secret
    (hook,) = (await env.api("GET", f"/apps/{app['id']}/webhooks")).json()["data"]
    assert (hook["url"], hook["kind"]) == (receiver.url, "json")
    page = await env.client.get("/dashboard/apps/web/alerts")
    assert secret.group(1) not in page.text and f'data-webhook="{hook["id"]}"' in page.text
    # A test delivery: sent now, signed with the secret shown once, and what it answered is on the page.
    tested = await env.client.post(
        f"/dashboard/apps/web/webhooks/{hook['id']}/test", data={"csrf_token": token}
    )
    assert tested.status_code == 200 and "Test sent: the webhook answered 204." in tested.text
    (got,) = receiver.got
    assert got["body"]["type"] == "test" and got["body"]["app"] == "web"
    signed = hmac.new(secret.group(1).encode(), got["raw"], hashlib.sha256).hexdigest()
    assert got["signature"] == f"sha256={signed}"
    r = await env.client.post(f"/dashboard/apps/web/webhooks/{hook['id']}/delete", data={"csrf_token": token})
    assert r.status_code == 303 and r.headers["location"].endswith("?saved=webhook-deleted#webhooks")
    assert (await env.api("GET", f"/apps/{app['id']}/webhooks")).json()["data"] == []
    with env.platform.db.session() as s:
        routes = [
            (a.route, a.status_code)
            for a in s.exec(
                select(AuditEntry)
                .where(col(AuditEntry.route).startswith("/dashboard/apps/{app_slug}/webhooks"))
                .order_by(col(AuditEntry.id))
            ).all()
        ]
    assert routes == [
        ("/dashboard/apps/{app_slug}/webhooks", 422),
        ("/dashboard/apps/{app_slug}/webhooks", 201),
        ("/dashboard/apps/{app_slug}/webhooks/{webhook_id}/test", 200),
        ("/dashboard/apps/{app_slug}/webhooks/{webhook_id}/delete", 303),
    ]


# -- insights and traces ---------------------------------------------------------------------------------


# BLOCKING: an async route calling time.sleep through a helper (tests/test_insights_e2e.py).
def _contract(required_q: bool) -> dict[str, Any]:
    api = FastAPI()
    if required_q:

        @api.get("/items/{item_id}")
        def read_item_q(item_id: int, q: str) -> dict[str, int]:  # a new required parameter
            return {"item_id": item_id}

    else:

        @api.get("/items/{item_id}")
        def read_item(item_id: int) -> dict[str, int]:
            return {"item_id": item_id}

        @api.get("/users")
        def list_users() -> list[str]:
            return []

    return api.openapi()


@pytest.mark.anyio
async def test_the_insights_page_shows_the_builds_findings_and_contract_diff(
    env: Env, tmp_path: Path
) -> None:
    """What the pipeline keeps beside a build (its own functions, on a real project and two real
    OpenAPI documents), as the page shows it."""
    app = await env.create_app("web")
    with env.platform.db.session() as s:
        row = s.get(AppRow, app["id"])
        assert row is not None
        dep = Deployment(app_id=row.id, status="success")
        s.add(dep)
        s.flush()
        row.current_deployment_id, row.min_instances = dep.id, 0
        s.add(row)
        s.commit()
        dep_id = dep.id
    project = tmp_path / "blocky"
    project.mkdir()
    (project / "main.py").write_text(BLOCKING)
    kept = env.platform.paths.deployments / dep_id
    logged: list[str] = []
    report = insights.analyze_build(
        project, "main:app", kept / insights.INSIGHTS_FILE, fail_on_blocking=False, log=logged.append
    )
    diff = insights.compare_contract(
        _contract(False),
        _contract(True),
        "before",
        kept / insights.CONTRACT_FILE,
        fail_on_breaking=False,
        log=logged.append,
    )
    assert diff is not None and diff["summary"]["breaking"] >= 2, diff  # a removed path, a required q
    await sign_in(env.client)
    html = (await env.client.get("/dashboard/apps/web/insights")).text
    (finding,) = report["findings"]
    assert "1 blocking call(s)" in html
    assert '<strong class="mono">time.sleep</strong> in <span class="mono">main.py:10</span>' in html
    assert escape(finding["message"]) in html and escape(finding["fix"]) in html
    assert "GET /report" in finding["message"] and escape(" → ".join(finding["chain"])) in html
    assert f"{diff['summary']['breaking']} breaking, {diff['summary']['non_breaking']} compatible" in html
    for change in diff["changes"]:
        assert f'<span class="badge bad">breaking</span> {escape(change["message"])}' in html, change
    assert any("/users" in c["message"] for c in diff["changes"])


@pytest.mark.anyio
async def test_the_traces_route_filter_narrows_the_list(env: Env) -> None:
    app = await env.create_app("web")
    now = datetime.now(UTC)
    traces = {
        f"{i:032x}": ("/items/{item_id}" if i % 2 else "/users", 500 if i == 3 else 200) for i in range(1, 7)
    }
    with env.platform.db.session() as s:
        for n, (trace_id, (route, status)) in enumerate(traces.items()):
            s.add(
                TraceSummary(
                    trace_id=trace_id,
                    app_id=app["id"],
                    started_at=now - timedelta(seconds=n),
                    duration_ms=12.5,
                    name=f"GET {route}",
                    route=route,
                    method="GET",
                    http_status=status,
                    error=status >= 500,
                    span_count=2,
                )
            )
        s.commit()
    await sign_in(env.client)

    async def listed(query: str) -> set[str]:
        r = await env.client.get(f"/dashboard/apps/web/traces{query}")
        assert r.status_code == 200
        return set(re.findall(r'<tr data-trace="([0-9a-f]{32})"', r.text))

    items = {t for t, (route, _) in traces.items() if route == "/items/{item_id}"}
    assert await listed("") == set(traces)
    assert await listed("?route=/items/{item_id}") == items
    assert await listed("?route=%2Fusers") == set(traces) - items
    assert await listed("?route=/items/{item_id}&status=error") == {f"{3:032x}"}
    assert await listed("?route=/nowhere") == set()
    page = await env.client.get("/dashboard/apps/web/traces?route=/users")
    assert 'id="f-route" name="route" class="mono" list="route-list" value="/users"' in page.text


@pytest.mark.anyio
async def test_dashboard_changes_are_in_the_audit_log(env: Env) -> None:
    app = await env.create_app("web")
    await sign_in(env.client, password="wrong")
    await sign_in(env.client)
    token = await page_csrf(env.client)
    await env.client.post("/dashboard/apps/web/scaling", data={"csrf_token": token, "max_instances": "3"})
    with env.platform.db.session() as s:
        rows = s.exec(
            select(AuditEntry)
            .where(col(AuditEntry.path).startswith("/dashboard/"))
            .order_by(col(AuditEntry.id))
        ).all()
    login_failed, login_ok, scaling = rows[0], rows[1], rows[-1]
    assert (login_failed.route, login_failed.status_code, login_failed.actor_email) == (
        "/dashboard/login",
        401,
        None,
    )
    assert (login_ok.status_code, login_ok.actor_email) == (303, "admin@localhost")
    assert scaling.route == "/dashboard/apps/{app_slug}/scaling" and scaling.status_code == 303
    assert (scaling.actor_email, scaling.app_id, scaling.actor_kind) == ("admin@localhost", app["id"], "user")


# -- what every answer carries -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_pages_carry_security_headers_and_no_inline_script(env: Env) -> None:
    await env.create_app("web")
    await sign_in(env.client)
    for path in (
        "/dashboard/login",
        "/dashboard/",
        "/dashboard/apps/web/metrics",
        "/dashboard/apps/web/settings",
        "/dashboard/apps/web/alerts",
    ):
        r = await env.client.get(path)
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == "no-store"
        # Every script is a file of ours; the only inline <script> is a JSON data block (never run).
        for tag in re.findall(r"<script[^>]*>", r.text):
            assert 'src="/dashboard/static/' in tag or 'type="application/json"' in tag, (path, tag)
        assert not re.search(r"\son[a-z]+=", r.text), path  # no inline event handlers
        assert ' style="' not in r.text, path


@pytest.mark.anyio
async def test_static_assets_are_versioned_cached_and_contained(env: Env) -> None:
    assets = Assets()
    url = assets.url("dashboard.js")
    r = await env.client.get(url, headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert r.headers["content-encoding"] == "gzip" and r.content == (STATIC / "dashboard.js").read_bytes()
    assert (await env.client.get("/dashboard/static/dashboard.js")).headers["cache-control"] == "no-cache"
    again = await env.client.get(url, headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304
    for bad in ("../web.py", "%2e%2e/web.py", "nope.js", "vendor/../../pages/auth.py", "..%2Fweb.py"):
        assert (await env.client.get(f"/dashboard/static/{bad}")).status_code == 404, bad
    assert (
        gzip.decompress(assets.files["vendor/uplot/uPlot.iife.min.js"].gzipped or b"")[:20]
        == b"/*! https://github.c"
    )


@pytest.mark.anyio
async def test_each_page_loads_under_150_kb_of_javascript(env: Env) -> None:
    await env.create_app("web")
    assets = Assets()
    login = (await env.client.get("/dashboard/login")).text
    assert sum(assets.size(n) for n in re.findall(r'<script src="/dashboard/static/([^"?]+)\?v=', login)) > 0
    await sign_in(env.client)
    for path in (
        "/dashboard/",
        "/dashboard/apps/web",
        "/dashboard/apps/web/metrics",
        "/dashboard/admin",
    ):
        html = (await env.client.get(path)).text
        names = re.findall(r'<script src="/dashboard/static/([^"?]+)\?v=', html)
        assert names, path
        assert sum(assets.size(n) for n in names) < 150 * 1024, (path, names)


@pytest.mark.anyio
async def test_the_official_cli_links_lead_to_the_dashboard(env: Env) -> None:
    cases = {
        "/default/apps": "/dashboard/teams/default",
        "/default/apps/web": "/dashboard/apps/web",
        "/default/apps/web/deployments/abc": "/dashboard/apps/web/deployments/abc",
        "/dashboard": "/dashboard/",
    }
    for path, target in cases.items():
        r = await env.client.get(path)
        assert r.status_code == 303 and r.headers["location"] == target, path
    await sign_in(env.client)
    page = await env.client.get("/default/apps/web/integrations/connect")
    assert page.status_code == 200 and "deploy token" in page.text
    missing = await env.client.get("/dashboard/no/such/page")
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html")
    assert "Page not found" in missing.text


@pytest.mark.anyio
async def test_the_apps_list_is_rendered_on_the_server(env: Env) -> None:
    await env.create_app("web")
    await env.create_app("api")
    await sign_in(env.client)
    html = (await env.client.get("/dashboard/")).text
    assert 'data-app="web"' in html and 'data-app="api"' in html
    assert "http://web.localhost" in html and html.count('<svg class="spark') == 4
    team = (await env.client.get("/dashboard/teams/default")).text
    assert "admin@localhost" in team and "owner" in team and 'data-app="web"' in team


# -- pure parts ---------------------------------------------------------------------------------------


def test_session_cookies_are_signed() -> None:
    keys = sessions.Keys.derive(b"k" * 32)
    other = sessions.Keys.derive(b"j" * 32)
    raw = "abc"
    cookie = f"{raw}.{sessions._mac(keys.cookie, raw)}"
    assert sessions.unsign(keys, cookie) == raw
    assert sessions.unsign(other, cookie) is None
    assert sessions.unsign(keys, cookie + "x") is None and sessions.unsign(keys, None) is None
    token = sessions.csrf_token(keys, "t1")
    assert sessions.check_csrf(keys, "t1", token) and not sessions.check_csrf(keys, "t2", token)
    assert not sessions.check_csrf(keys, "t1", "") and not sessions.check_csrf(keys, "t1", None)
    nonce = sessions.login_nonce()
    assert sessions.check_login_csrf(keys, nonce, sessions.login_csrf(keys, nonce))
    assert not sessions.check_login_csrf(keys, sessions.login_nonce(), sessions.login_csrf(keys, nonce))
    assert len({keys.cookie, keys.bearer, keys.csrf, keys.login}) == 4
    assert hash_token(sessions._bearer(keys, raw)) != hash_token(cookie)


def test_sparkline_draws_gaps_and_single_points() -> None:
    svg = str(fmt.sparkline([1, 2, None, 4, None, None, 3, 5], "Requests"))
    assert svg.count("<polyline") == 2 and svg.count("<circle") == 1
    assert 'aria-label="Requests"' in svg and "<title>Requests</title>" in svg
    flat = str(fmt.sparkline([0, 0, 0], "Flat"))
    assert "<polyline" in flat and "nan" not in flat
    assert "<polyline" not in str(fmt.sparkline([None, None], "Nothing"))
    assert "&lt;script&gt;" in str(fmt.sparkline([1, 2], "<script>"))


def test_numbers_and_states_are_written_for_people() -> None:
    assert [fmt.seconds(v) for v in (0.25, 12.34, 125, 7300, None)] == [
        "250 ms",
        "12.3 s",
        "2 min 5 s",
        "2 h 1 min",
        "\u2013",
    ]
    assert [fmt.pct(v) for v in (0.0123, 0.5, 0, None)] == ["1.23 %", "50 %", "0 %", "\u2013"]
    assert [fmt.ms(v) for v in (1.234, 250, 1500)] == ["1.2 ms", "250 ms", "1.50 s"]
    assert [fmt.num(v) for v in (3, 2.5, 12_345, 2_500_000)] == ["3", "2.50", "12.3 k", "2.5 M"]
    assert fmt.size(1536) == "1.5 KiB"
    assert [
        fmt.tone(s) for s in ("success", "verifying", "verifying_failed", "warm", "stopped", "serving")
    ] == ["ok", "busy", "bad", "warn", "muted", "ok"]
    rows = fmt.waterfall(
        [{"offset_ms": 0, "duration_ms": 10, "depth": 0}, {"offset_ms": 9.99, "duration_ms": 0, "depth": 30}],
        10,
    )
    assert (rows[0]["x"], rows[0]["w"]) == (0, 1000) and rows[1]["w"] >= 2 and rows[1]["indent"] == 12


def _luminance(hex_color: str) -> float:
    channels = [int(hex_color[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_the_palette_keeps_wcag_aa_contrast() -> None:
    css = (STATIC / "dashboard.css").read_text()
    light = dict(
        re.findall(r"--([a-z0-9-]+): (#[0-9a-f]{6});", css.split("@media (prefers-color-scheme: dark)")[0])
    )
    dark_block = css.split("@media (prefers-color-scheme: dark)")[1].split("\n}\n")[0]
    dark = {**light, **dict(re.findall(r"--([a-z0-9-]+): (#[0-9a-f]{6});", dark_block))}
    pairs = [
        ("text", "bg"),
        ("text", "surface"),
        ("muted", "bg"),
        ("muted", "surface"),
        ("accent", "bg"),
        ("accent", "surface"),
        ("accent-text", "accent"),
        ("ok-fg", "ok-bg"),
        ("bad-fg", "bad-bg"),
        ("busy-fg", "busy-bg"),
        ("warn-fg", "warn-bg"),
        ("muted-fg", "muted-bg"),
        ("bad-fg", "bg"),
        ("log-text", "log-bg"),
        ("text", "muted-bg"),
        ("text", "bad-bg"),
        ("text", "ok-bg"),
        ("text", "warn-bg"),
    ]
    for name, palette in (("light", light), ("dark", dark)):
        for fg, bg in pairs:
            ratio = contrast(palette[fg], palette[bg])
            assert ratio >= 4.5, f"{name}: --{fg} on --{bg} is {ratio:.2f}:1"
