"""The dashboard in process (httpx.ASGITransport against ``create_app``): sign-in, sessions, CSRF,
permissions exactly as the API's, secrets, audit, headers, assets, and the small pure parts.

The browser tier (``test_dashboard_browser.py``) drives the same pages in Chromium against a real
server; this tier checks the rules one by one, fast.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import col, select

from control_plane.app import create_app
from control_plane.config import Settings
from control_plane.models import ApiToken, AuditEntry, Membership, Team, User
from control_plane.passwords import hash_password
from control_plane.permissions import Action, Role, allows
from control_plane.platform import Platform
from control_plane.security import hash_token
from dashboard import format as fmt
from dashboard import sessions
from dashboard.assets import STATIC, Assets
from tests.dbs import database

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
