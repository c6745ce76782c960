"""The role matrix: every action of ``control_plane/permissions.py``, tried by every kind of caller.

Callers: a viewer, member, admin and owner of the team; an outsider (owner of another team); a platform
admin who is not a member; the app's deploy token. Each action is exercised through real endpoints (in
process, SQLite and PostgreSQL) and the answer must be what the table says: allowed (not 401/403/404),
403 for a member whose role is too low (or a deploy token), 404 for the outsider. The docs' table
(``docs/ROLES.md``) is checked against the code's.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane.app import create_app
from control_plane.config import Settings
from control_plane.permissions import PERMISSIONS, Action, Role, allows, deploy_token_allows
from control_plane.platform import Platform
from tests.dbs import database
from tests.test_api import ADMIN, Env

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery staple"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sqlite", "postgres"])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    """The API in process, with rate limits out of the way (tests/test_admin.py tests them)."""
    with database(request.param, tmp_path) as url:
        settings = Settings(
            data_dir=tmp_path / "data",
            router_port=0,
            database_url=url,
            admin_token=ADMIN,
            rate_limit_tokens=(10_000, 0.001),
            rate_limit_login=(10_000, 0.001),
        )
        platform = Platform(settings)
        app = create_app(settings, platform)
        await platform.start()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                yield Env(platform, client)
        finally:
            await platform.stop()


async def make_user(
    env: Env, email: str, team_id: str | None = None, role: str = "member"
) -> tuple[str, str]:
    """A user made through the admin API (in ``team_id`` with ``role``); (user id, a user token)."""
    r = await env.post(
        "/admin/users", json={"email": email, "password": PASSWORD, "team_id": team_id, "role": role}
    )
    assert r.status_code == 201, r.text
    user_id = str(r.json()["id"])
    r = await env.post(f"/admin/users/{user_id}/tokens", json={"name": "test"})
    assert r.status_code == 201, r.text
    return user_id, str(r.json()["value"])


async def make_team(env: Env, slug: str) -> str:
    r = await env.post("/admin/teams", json={"name": slug, "slug": slug})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@dataclass
class Fixture:
    """What one caller acts on: a fresh app of the team, and things in it."""

    team_id: str
    app_id: str
    waiting_deployment: str
    cancelled_deployment: str
    deploy_token_id: str
    deploy_token: str
    spare_user: str
    spare_email: str
    n: int
    created: list[str] = field(default_factory=list)


Call = Callable[[Env, str, Fixture], Awaitable[httpx.Response]]


def _op(method: str, path: str, **kw: Any) -> Call:
    async def call(env: Env, token: str, f: Fixture) -> httpx.Response:
        concrete = path.format(**vars(f))
        body = kw.get("json")
        if callable(body):
            body = body(f)
        extra = {"json": body} if body is not None else {}
        return await getattr(env, method)(concrete, token, **extra)

    return call


# Every action, through its endpoints. Order matters: destructive calls come last.
APP_OPS: list[tuple[Action, Call]] = [
    (Action.APP_READ, _op("get", "/apps/{app_id}")),
    (Action.APP_MONITOR, _op("get", "/apps/{app_id}/deployments/")),
    (Action.APP_MONITOR, _op("get", "/apps/{app_id}/scaling")),
    (Action.APP_MONITOR, _op("get", "/apps/{app_id}/events")),
    (Action.DEPLOYMENT_READ, _op("get", "/deployments/{cancelled_deployment}")),
    (Action.DEPLOYMENT_READ, _op("get", "/deployments/{cancelled_deployment}/build-logs")),
    (Action.DEPLOY, _op("post", "/apps/{app_id}/deployments/", json={"archive_size_bytes": 10})),
    (Action.DEPLOY, _op("post", "/deployments/{waiting_deployment}/upload")),
    (Action.DEPLOY, _op("post", "/deployments/{waiting_deployment}/upload-cancelled")),
    (Action.RELEASE, _op("post", "/apps/{app_id}/redeploy")),  # allowed: 409, nothing to redeploy
    (Action.RELEASE, _op("post", "/apps/{app_id}/rollback", json={})),  # allowed: 409
    (Action.APP_UPDATE, _op("patch", "/apps/{app_id}", json={"directory": None})),
    (Action.LOGS_READ, _op("get", "/apps/{app_id}/logs/stream")),
    (Action.ENV_READ, _op("get", "/apps/{app_id}/environment-variables/")),
    (
        Action.ENV_WRITE,
        _op("put", "/apps/{app_id}/environment-variables/", json={"upsert": {"A": {"value": "1"}}}),
    ),
    (Action.TOKENS_MANAGE, _op("get", "/apps/{app_id}/tokens")),
    (Action.TOKENS_MANAGE, _op("post", "/apps/{app_id}/tokens", json={"name": "ci"})),
    (Action.TOKENS_MANAGE, _op("delete", "/apps/{app_id}/tokens/{deploy_token_id}")),
    (Action.SCALE, _op("patch", "/apps/{app_id}/scaling", json={"max_instances": 3})),
    (Action.APP_DELETE, _op("delete", "/apps/{app_id}")),
]
TEAM_OPS: list[tuple[Action, Call]] = [
    (Action.TEAM_READ, _op("get", "/teams/{team_id}")),
    (Action.TEAM_READ, _op("get", "/teams/{team_id}/members")),
    (Action.TEAM_READ, _op("get", "/teams/{team_id}/quota")),
    (Action.TEAM_READ, _op("get", "/apps/?team_id={team_id}")),
    (
        Action.APP_CREATE,
        _op("post", "/apps/", json=lambda f: {"team_id": f.team_id, "name": f"made-by-{f.n}"}),
    ),
    (
        Action.MEMBERS_MANAGE,
        _op("post", "/teams/{team_id}/members", json=lambda f: {"email": f.spare_email, "role": "viewer"}),
    ),
    (Action.MEMBERS_MANAGE, _op("patch", "/teams/{team_id}/members/{spare_user}", json={"role": "member"})),
    (Action.MEMBERS_MANAGE, _op("delete", "/teams/{team_id}/members/{spare_user}")),
    (Action.TEAM_UPDATE, _op("patch", "/teams/{team_id}", json={"name": "Renamed"})),
    (Action.TEAM_DELETE, _op("delete", "/teams/{team_id}")),  # allowed: 409, the team has apps
]


def test_every_action_is_exercised() -> None:
    assert {a for a, _ in APP_OPS + TEAM_OPS} == set(PERMISSIONS)


def test_roles_doc_matches_the_code() -> None:
    """docs/ROLES.md's table: one row per action, its minimum role and whether deploy tokens may."""
    text = (ROOT / "docs" / "ROLES.md").read_text()
    rows = re.findall(r"^\| `([a-z:]+)` \|[^|]*\| (\w+) \| (yes|no) \|", text, re.MULTILINE)
    documented = {action: (role, token == "yes") for action, role, token in rows}
    expected = {a.value: (r.minimum.name, r.deploy_token) for a, r in PERMISSIONS.items()}
    assert documented == expected


CALLERS = ["viewer", "member", "admin", "owner", "outsider", "platform-admin", "deploy-token"]


def expectation(caller: str, action: Action, app_level: bool) -> str:
    """ "ok", "403" or "404"."""
    if caller == "platform-admin":
        return "ok"
    if caller == "outsider":
        return "404"
    if caller == "deploy-token":
        return "ok" if app_level and deploy_token_allows(action) else "403"
    return "ok" if allows(Role[caller], action) else "403"


def check(status: int, expected: str, what: str) -> None:
    assert status < 500, what
    if expected == "ok":
        assert status not in (401, 403, 404), what
    else:
        assert status == int(expected), what


@pytest.mark.anyio
async def test_role_matrix(env: Env) -> None:
    team_id = await make_team(env, "acme")
    tokens: dict[str, str] = {"platform-admin": ""}
    for role in ("viewer", "member", "admin", "owner"):
        tokens[role] = (await make_user(env, f"{role}@acme.test", team_id, role))[1]
    other_team = await make_team(env, "other")
    tokens["outsider"] = (await make_user(env, "outsider@other.test", other_team, "owner"))[1]
    _, tokens["platform-admin"] = await make_user(env, "root@platform.test")
    r = await env.patch(
        f"/admin/users/{(await env.get('/admin/users?email=root@platform.test')).json()['data'][0]['id']}",
        json={"is_admin": True},
    )
    assert r.status_code == 200

    for n, caller in enumerate(CALLERS):
        f = await _fixture(env, team_id, n)
        token = f.deploy_token if caller == "deploy-token" else tokens[caller]
        for action, call in APP_OPS:
            r = await call(env, token, f)
            check(
                r.status_code,
                expectation(caller, action, True),
                f"{caller} {action}: {r.status_code} {r.text}",
            )
            if r.status_code == 403:
                body = r.json()
                assert body["error"]["hint"] and body["error"]["title"], body
        for action, call in TEAM_OPS:
            r = await call(env, token, f)
            check(
                r.status_code,
                expectation(caller, action, False),
                f"{caller} {action}: {r.status_code} {r.text}",
            )
        # Whatever was allowed, the spare user left the team again (or never joined) for the next caller.
        await env.delete(f"/teams/{team_id}/members/{f.spare_user}")


async def _fixture(env: Env, team_id: str, n: int) -> Fixture:
    app = (await env.post("/apps/", json={"team_id": team_id, "name": f"app-{n}"})).json()
    waiting = (await env.post(f"/apps/{app['id']}/deployments/", json={"archive_size_bytes": 10})).json()
    cancelled = (await env.post(f"/apps/{app['id']}/deployments/", json={"archive_size_bytes": 10})).json()
    await env.post(f"/deployments/{cancelled['id']}/upload-cancelled")
    victim = (await env.post(f"/apps/{app['id']}/tokens", json={"name": "to delete"})).json()
    mine = (await env.post(f"/apps/{app['id']}/tokens", json={"name": "caller"})).json()
    spare_id, _ = await make_user(env, f"spare-{n}@acme.test")
    return Fixture(
        team_id=team_id,
        app_id=app["id"],
        waiting_deployment=waiting["id"],
        cancelled_deployment=cancelled["id"],
        deploy_token_id=victim["id"],
        deploy_token=mine["value"],
        spare_user=spare_id,
        spare_email=f"spare-{n}@acme.test",
        n=n,
    )


@pytest.mark.anyio
async def test_owner_rules(env: Env) -> None:
    """Admins manage members but not owners; a team keeps at least one owner; anyone may leave."""
    team_id = await make_team(env, "rules")
    owner_id, owner = await make_user(env, "owner@rules.test", team_id, "owner")
    admin_id, admin = await make_user(env, "admin@rules.test", team_id, "admin")
    viewer_id, _ = await make_user(env, "viewer@rules.test", team_id, "viewer")

    r = await env.patch(f"/teams/{team_id}/members/{viewer_id}", admin, json={"role": "owner"})
    assert r.status_code == 403 and "owner" in r.json()["detail"]
    r = await env.delete(f"/teams/{team_id}/members/{owner_id}", admin)
    assert r.status_code == 403
    assert (
        await env.patch(f"/teams/{team_id}/members/{viewer_id}", admin, json={"role": "admin"})
    ).is_success
    # The last owner can neither step down nor leave.
    r = await env.patch(f"/teams/{team_id}/members/{owner_id}", owner, json={"role": "member"})
    assert r.status_code == 409 and r.json()["error"]["title"] == "Last owner"
    assert (await env.delete(f"/teams/{team_id}/members/{owner_id}", owner)).status_code == 409
    assert (await env.patch(f"/teams/{team_id}/members/{admin_id}", owner, json={"role": "owner"})).is_success
    assert (await env.delete(f"/teams/{team_id}/members/{owner_id}", owner)).status_code == 204
    assert (await env.get(f"/teams/{team_id}", owner)).status_code == 404  # left: not a member any more
    r = await env.patch(f"/teams/{team_id}/members/{viewer_id}", json={"role": "superuser"})
    assert r.status_code == 422


@pytest.mark.anyio
async def test_team_creation_and_the_official_teams_shape(env: Env) -> None:
    _, token = await make_user(env, "solo@example.test")
    assert (await env.get("/teams/", token)).json() == {"data": [], "count": 0}
    r = await env.post("/teams/", token, json={"name": "Solo Works"})
    assert r.status_code == 201 and r.json()["slug"] == "solo-works" and r.json()["role"] == "owner"
    listed = (await env.get("/teams/", token)).json()
    assert listed["count"] == 1 and {"id", "slug", "name"} <= set(listed["data"][0])
    assert (await env.post("/teams/", token, json={"name": "x", "slug": "api"})).status_code == 409
    # A platform setting closes team creation to non-admins.
    assert (await env.patch("/admin/settings", json={"users_can_create_teams": False})).is_success
    r = await env.post("/teams/", token, json={"name": "Another"})
    assert r.status_code == 403 and r.json()["error"]["title"] == "Team creation disabled"
    assert (await env.post("/teams/", json={"name": "By Admin"})).status_code == 201
