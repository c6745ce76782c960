"""The API in process (httpx.ASGITransport), against SQLite and against a real PostgreSQL.

Covers the FastAPI Cloud contract's sharp edges (exact slashes, string ids, error shapes, the device
flow's 400s), tenant isolation, deploy-token scope, validation, and the migrations.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import zstandard
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from control_plane.app import create_app
from control_plane.config import Settings
from control_plane.db import alembic_config
from control_plane.models import ApiToken, Membership, Team, User, utcnow
from control_plane.platform import Platform
from control_plane.security import hash_token
from tests.dbs import database

ADMIN = "fdp_test_admin_token"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Env:
    def __init__(self, platform: Platform, client: httpx.AsyncClient) -> None:
        self.platform = platform
        self.client = client

    def auth(self, token: str = ADMIN) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    async def get(self, path: str, token: str = ADMIN, **kw: Any) -> httpx.Response:
        return await self.client.get(f"/api/v1{path}", headers=self.auth(token), **kw)

    async def post(self, path: str, token: str = ADMIN, **kw: Any) -> httpx.Response:
        return await self.client.post(f"/api/v1{path}", headers=self.auth(token), **kw)

    async def put(self, path: str, token: str = ADMIN, **kw: Any) -> httpx.Response:
        return await self.client.put(f"/api/v1{path}", headers=self.auth(token), **kw)

    async def patch(self, path: str, token: str = ADMIN, **kw: Any) -> httpx.Response:
        return await self.client.patch(f"/api/v1{path}", headers=self.auth(token), **kw)

    async def delete(self, path: str, token: str = ADMIN, **kw: Any) -> httpx.Response:
        return await self.client.delete(f"/api/v1{path}", headers=self.auth(token), **kw)

    async def team_id(self, token: str = ADMIN) -> str:
        r = await self.get("/teams/", token)
        return str(r.json()["data"][0]["id"])

    async def create_app(self, name: str, token: str = ADMIN) -> dict[str, Any]:
        r = await self.post("/apps/", token, json={"team_id": await self.team_id(token), "name": name})
        assert r.status_code == 201, r.text
        out: dict[str, Any] = r.json()
        return out

    def add_user(self, email: str, team_slug: str) -> str:
        """Another user in another team (the admin API comes later); returns their token."""
        raw = f"fdp_user_{team_slug}"
        with self.platform.db.session() as s:
            user = User(email=email, name=email)
            team = Team(slug=team_slug, name=team_slug)
            s.add(user)
            s.add(team)
            s.flush()
            s.add(Membership(team_id=team.id, user_id=user.id, role="owner"))
            s.add(ApiToken(token_hash=hash_token(raw), kind="user", user_id=user.id, name="test"))
            s.commit()
        return raw


@pytest.fixture(params=["sqlite", "postgres"])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    with database(request.param, tmp_path) as url:
        settings = Settings(data_dir=tmp_path / "data", router_port=0, database_url=url, admin_token=ADMIN)
        platform = Platform(settings)
        app = create_app(settings, platform)
        await platform.start()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                yield Env(platform, client)
        finally:
            await platform.stop()


def tar_zst(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return zstandard.ZstdCompressor().compress(raw.getvalue())


# -- migrations ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_migrations_reach_head_and_are_idempotent(env: Env) -> None:
    engine = env.platform.db.engine
    tables = set(inspect(engine).get_table_names())
    assert {"user", "team", "membership", "apitoken", "app", "deployment", "buildlogline", "envvar"} <= tables
    env.platform.db.migrate()  # a second start migrates nothing and breaks nothing
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    with engine.connect() as conn:
        current = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    assert current == head
    # Downgrade and upgrade round-trip (the migration is reversible).
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
        command.upgrade(cfg, "head")


# -- contract edges ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_auth_errors_have_title_message_hint(env: Env) -> None:
    r = await env.client.get("/api/v1/users/me")
    assert r.status_code == 401
    body = r.json()
    assert isinstance(body["detail"], str)
    assert set(body["error"]) == {"code", "title", "message", "hint"}
    r = await env.get("/users/me", token="fdp_nope")
    assert r.status_code == 401
    r = await env.get("/users/me")
    assert r.status_code == 200 and r.json()["email"] == "admin@localhost"


@pytest.mark.anyio
async def test_paths_match_exactly_and_never_redirect(env: Env) -> None:
    assert (await env.get("/apps/")).status_code == 200
    assert (await env.get("/teams/")).status_code == 200
    for wrong in ("/apps", "/teams"):
        r = await env.get(wrong)
        assert r.status_code == 404, (wrong, r.status_code)  # not a 307
    app = await env.create_app("exact")
    assert (await env.get(f"/apps/{app['id']}/")).status_code == 404
    assert (await env.get(f"/apps/{app['id']}/deployments/")).status_code == 200
    assert (await env.get(f"/apps/{app['id']}/environment-variables/")).status_code == 200
    assert (await env.get(f"/apps/{app['id']}/tokens")).status_code == 200


@pytest.mark.anyio
async def test_app_shape_and_validation(env: Env) -> None:
    app = await env.create_app("My Shop")
    assert app["slug"] == "my-shop"
    assert all(isinstance(app[k], str) for k in ("id", "slug", "name", "team_id"))
    assert app["directory"] is None
    assert app["url"].startswith("http://my-shop.localhost:")
    r = await env.post("/apps/", json={"team_id": await env.team_id(), "name": "my shop"})
    assert r.status_code == 409 and "already exists" in r.json()["detail"]
    for bad in ("../up", "/abs", "~home", "a$b"):
        r = await env.post("/apps/", json={"team_id": await env.team_id(), "name": "x1", "directory": bad})
        assert r.status_code == 422, bad
        assert isinstance(r.json()["detail"][0]["msg"], str)
    r = await env.patch(f"/apps/{app['id']}", json={"directory": "src"})
    assert r.json()["directory"] == "src"
    r = await env.patch(f"/apps/{app['id']}", json={"directory": None})
    assert r.json()["directory"] is None


@pytest.mark.anyio
async def test_device_flow(env: Env) -> None:
    stale = {"Authorization": "Bearer fdp_stale_token"}  # the official CLI sends whatever it has
    r = await env.client.post(
        "/api/v1/login/device/authorization", data={"client_id": "fastapi-cli"}, headers=stale
    )
    assert r.status_code == 200
    auth = r.json()
    assert auth["verification_uri_complete"].endswith(f"?user_code={auth['user_code']}")
    assert isinstance(auth["interval"], int)
    form = {"device_code": auth["device_code"], "client_id": "fastapi-cli", "grant_type": "device"}
    r = await env.client.post("/api/v1/login/device/token", data=form, headers=stale)
    assert r.status_code == 400 and r.json()["error"] == "authorization_pending"

    page = await env.client.get("/login/device", params={"user_code": auth["user_code"]})
    assert page.status_code == 200 and auth["user_code"] in page.text
    bad = await env.client.post("/login/device", data={"user_code": auth["user_code"], "token": "fdp_wrong"})
    assert bad.status_code == 403
    ok = await env.client.post("/login/device", data={"user_code": auth["user_code"], "token": ADMIN})
    assert ok.status_code == 200 and "Approved" in ok.text

    r = await env.client.post("/api/v1/login/device/token", data=form)
    assert r.status_code == 200
    token = r.json()["access_token"]
    assert (await env.get("/users/me", token=token)).json()["email"] == "admin@localhost"
    r = await env.client.post("/api/v1/login/device/token", data=form)
    assert r.status_code == 400 and r.json()["error"] not in ("authorization_pending", "slow_down")
    # logout revokes the token
    assert (await env.post("/logout", token=token)).status_code == 204
    assert (await env.get("/users/me", token=token)).status_code == 401


@pytest.mark.anyio
async def test_device_flow_denied(env: Env) -> None:
    auth = (await env.client.post("/api/v1/login/device/authorization", data={"client_id": "x"})).json()
    await env.client.post(
        "/login/device", data={"user_code": auth["user_code"], "token": ADMIN, "action": "deny"}
    )
    form = {"device_code": auth["device_code"], "client_id": "x", "grant_type": "device"}
    r = await env.client.post("/api/v1/login/device/token", data=form)
    assert r.status_code == 400 and r.json()["error"] == "access_denied"


# -- tenancy and tokens ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_other_team_sees_404_everywhere(env: Env) -> None:
    app = await env.create_app("private")
    app_id = app["id"]
    dep = (await env.post(f"/apps/{app_id}/deployments/", json={"archive_size_bytes": 10})).json()
    other = env.add_user("eve@example.com", "eve-team")

    assert [a["id"] for a in (await env.get("/apps/", other)).json()["data"]] == []
    assert (await env.get(f"/apps/?team_id={app['team_id']}", other)).status_code == 404
    assert (await env.get(f"/teams/{app['team_id']}", other)).status_code == 404
    for method, path, kw in [
        ("get", f"/apps/{app_id}", {}),
        ("patch", f"/apps/{app_id}", {"json": {"directory": None}}),
        ("delete", f"/apps/{app_id}", {}),
        ("post", f"/apps/{app_id}/deployments/", {"json": {"archive_size_bytes": 1}}),
        ("get", f"/apps/{app_id}/deployments/", {}),
        ("get", f"/deployments/{dep['id']}", {}),
        ("post", f"/deployments/{dep['id']}/upload", {}),
        ("post", f"/deployments/{dep['id']}/upload-complete", {}),
        ("post", f"/deployments/{dep['id']}/upload-cancelled", {}),
        ("get", f"/deployments/{dep['id']}/build-logs", {}),
        ("get", f"/apps/{app_id}/logs/stream", {}),
        ("get", f"/apps/{app_id}/environment-variables/", {}),
        ("put", f"/apps/{app_id}/environment-variables/", {"json": {"upsert": {"A": {"value": "1"}}}}),
        ("get", f"/apps/{app_id}/tokens", {}),
        ("post", f"/apps/{app_id}/tokens", {"json": {"name": "t"}}),
        ("post", f"/apps/{app_id}/rollback", {}),
        ("post", f"/apps/{app_id}/redeploy", {}),
    ]:
        r = await getattr(env, method)(path, other, **kw)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
    # And nothing changed.
    assert (await env.get(f"/apps/{app_id}")).status_code == 200
    assert (await env.get(f"/apps/{app_id}/environment-variables/")).json()["data"] == []


@pytest.mark.anyio
async def test_deploy_token_scope(env: Env) -> None:
    mine = await env.create_app("scoped")
    theirs = await env.create_app("unrelated")
    created = (await env.post(f"/apps/{mine['id']}/tokens", json={"name": "ci", "expires_in_days": 1})).json()
    assert set(created) >= {"id", "name", "expired_at", "value"}
    token = created["value"]
    listed = (await env.get(f"/apps/{mine['id']}/tokens")).json()["data"]
    assert [t["id"] for t in listed] == [created["id"]] and "value" not in listed[0]

    assert (await env.get(f"/apps/{mine['id']}", token)).status_code == 200
    r = await env.post(f"/apps/{mine['id']}/deployments/", token, json={"archive_size_bytes": 5})
    assert r.status_code == 201
    dep = r.json()
    assert (await env.get(f"/deployments/{dep['id']}", token)).status_code == 200
    assert (await env.post(f"/deployments/{dep['id']}/upload", token)).status_code == 200
    assert (await env.get(f"/apps/{theirs['id']}", token)).status_code == 404
    assert (await env.get("/apps/", token)).status_code == 403
    assert (await env.get(f"/apps/{mine['id']}/environment-variables/", token)).status_code == 403
    assert (await env.get("/users/me", token)).status_code == 403

    assert (await env.delete(f"/apps/{mine['id']}/tokens/{created['id']}")).status_code == 204
    assert (await env.get(f"/apps/{mine['id']}", token)).status_code == 401
    assert (await env.delete(f"/apps/{mine['id']}/tokens/{created['id']}")).status_code == 404


@pytest.mark.anyio
async def test_expired_token_is_refused(env: Env) -> None:
    with env.platform.db.session() as s:
        s.add(
            ApiToken(
                token_hash=hash_token("fdp_old"),
                kind="user",
                user_id=(await env.get("/users/me")).json()["id"],
                expires_at=utcnow() - timedelta(seconds=1),
            )
        )
        s.commit()
    r = await env.get("/users/me", token="fdp_old")
    assert r.status_code == 401 and "expired" in r.json()["detail"]


# -- env vars --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_env_vars_batch(env: Env) -> None:
    app = await env.create_app("envs")
    path = f"/apps/{app['id']}/environment-variables/"
    r = await env.put(path, json={"upsert": {"A": {"value": "1"}, "S": {"value": "x", "is_secret": True}}})
    assert r.status_code == 200
    data = {v["name"]: v for v in r.json()["data"]}
    assert data["A"]["value"] == "1" and data["A"]["is_secret"] is False
    assert data["S"]["value"] is None and data["S"]["is_secret"] is True
    datetime.fromisoformat(data["A"]["updated_at"])
    # An existing variable keeps its secret status.
    r = await env.put(path, json={"upsert": {"S": {"value": "y", "is_secret": False}}})
    assert {v["name"]: v for v in r.json()["data"]}["S"]["is_secret"] is True
    # Deleting a missing name succeeds.
    r = await env.put(path, json={"upsert": {}, "delete": ["A", "NOPE"]})
    assert r.status_code == 200 and [v["name"] for v in r.json()["data"]] == ["S"]
    for bad in ("1X", "A-B", "PATH", "FASTAPI_DEPLOY_X", ""):
        r = await env.put(path, json={"upsert": {bad: {"value": "v"}}})
        assert r.status_code == 422, bad
        assert isinstance(r.json()["detail"][0]["msg"], str)


# -- deployments ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_create_deployment_shape_and_size_limit(env: Env) -> None:
    app = await env.create_app("sizes")
    r = await env.post(f"/apps/{app['id']}/deployments/", json={"archive_size_bytes": 1234})
    dep = r.json()
    for key in ("id", "app_id", "slug", "status", "dashboard_url", "url"):
        assert isinstance(dep[key], str) and dep[key], key
    assert dep["status"] == "waiting_upload"
    assert dep["dashboard_url"].startswith("http")
    r = await env.post(f"/apps/{app['id']}/deployments/", json={"archive_size_bytes": 10**12})
    assert r.status_code == 413 and ".fastapicloudignore" in r.json()["error"]["hint"]


@pytest.mark.anyio
async def test_upload_guards(env: Env) -> None:
    app = await env.create_app("guards")
    dep = (await env.post(f"/apps/{app['id']}/deployments/", json={"archive_size_bytes": 10})).json()
    r = await env.post(f"/deployments/{dep['id']}/upload-complete")
    assert r.status_code == 400 and r.json()["error"]["title"] == "Nothing uploaded"
    target = (await env.post(f"/deployments/{dep['id']}/upload")).json()
    assert target["url"].startswith("http") and all(isinstance(v, str) for v in target["fields"].values())
    path = httpx.URL(target["url"]).path
    # Wrong token: refused, nothing stored. The storage endpoint takes no Bearer token.
    r = await env.client.post(path, data={"upload_token": "nope"}, files={"file": ("archive.tar", b"x")})
    assert r.status_code == 403
    archive = tar_zst({"main.py": b"from fastapi import FastAPI\napp = FastAPI()\n"})
    r = await env.client.post(path, data=target["fields"], files={"file": ("archive.tar", archive)})
    assert r.status_code == 204
    # Single use.
    r = await env.client.post(path, data=target["fields"], files={"file": ("archive.tar", archive)})
    assert r.status_code == 403
    assert (
        await env.post(f"/deployments/{dep['id']}/upload")
    ).status_code == 200  # still waiting: new URL ok


@pytest.mark.anyio
async def test_cancelled_upload_build_log_ends_failed(env: Env) -> None:
    app = await env.create_app("cancelled")
    dep = (await env.post(f"/apps/{app['id']}/deployments/", json={"archive_size_bytes": 10})).json()
    await env.post(f"/deployments/{dep['id']}/upload-cancelled")
    r = await env.get(f"/deployments/{dep['id']}/build-logs")
    lines = [json.loads(line) for line in r.text.splitlines() if line]
    assert lines[-1]["type"] == "failed"
    assert (await env.post(f"/deployments/{dep['id']}/upload")).status_code == 409
    listed = (await env.get(f"/apps/{app['id']}/deployments/")).json()
    assert listed["count"] == 1 and listed["data"][0]["status"] == "upload_cancelled"


@pytest.mark.anyio
async def test_log_stream_validation(env: Env) -> None:
    app = await env.create_app("logs")
    r = await env.get(f"/apps/{app['id']}/logs/stream", params={"tail": 10, "since": "5m", "follow": "false"})
    assert r.status_code == 200 and r.text == ""
    r = await env.get(f"/apps/{app['id']}/logs/stream", params={"since": "5 minutes"})
    assert r.status_code == 400 and r.json()["error"]["hint"]
    r = await env.get(f"/apps/{app['id']}/logs/stream", params={"since": "400d"})
    assert r.status_code == 400
    r = await env.get(f"/apps/{app['id']}/logs/stream", params={"level": "loud"})
    assert r.status_code == 400


@pytest.mark.anyio
async def test_rollback_with_nothing_to_roll_back_to(env: Env) -> None:
    app = await env.create_app("fresh")
    r = await env.post(f"/apps/{app['id']}/rollback", json={})
    assert r.status_code == 409 and r.json()["error"]["title"] == "Nothing to roll back to"
    r = await env.post(f"/apps/{app['id']}/rollback", json={"deployment_id": "nope"})
    assert r.status_code == 404


@pytest.mark.anyio
async def test_health_endpoints(env: Env) -> None:
    assert (await env.client.get("/healthz")).json() == {"status": "ok"}
    r = await env.client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
