"""The API in process (httpx.ASGITransport), against SQLite and against a real PostgreSQL.

Covers the FastAPI Cloud contract's sharp edges (exact slashes, string ids, error shapes, the device
flow's 400s), tenant isolation, deploy-token scope, validation, and the migrations.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import zstandard
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel

from control_plane.app import create_app
from control_plane.config import Settings
from control_plane.db import Database, alembic_config, migration_connection
from control_plane.models import ApiToken, Deployment, Membership, Team, User, utcnow
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


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Env]:
    """The platform of ``settings``, started, with an in-process client of its API."""
    platform = Platform(settings)
    app = create_app(settings, platform)
    await platform.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield Env(platform, client)
    finally:
        await platform.stop()


@pytest.fixture(params=["sqlite", "postgres"])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    with database(request.param, tmp_path) as url:
        settings = Settings(data_dir=tmp_path / "data", router_port=0, database_url=url, admin_token=ADMIN)
        async with running(settings) as env:
            yield env


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
    # Downgrade and upgrade round-trip (the migration is reversible), on a database with rows that
    # other tables refer to (the bootstrap's admin, team, membership and token).
    with migration_connection(engine) as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
        command.upgrade(cfg, "head")


def _drift(diff: list[Any]) -> list[tuple[str, ...]]:
    """Alembic's differences as (operation, table, column) or (operation, name), less the one kind that
    is on purpose: a server default in the database on a column whose model declares none. Migrations
    that add a NOT NULL column to a table that may have rows give it one (0002's autoscaling knobs,
    0003's ``user.disabled``); new rows get the model's default from the ORM either way."""
    out: list[tuple[str, ...]] = []
    for entry in diff:
        for change in entry if isinstance(entry, list) else [entry]:
            op = change[0]
            if op == "modify_default":  # (op, schema, table, column, info, database's, model's)
                if change[5] is not None and change[6] is None:
                    continue
                out.append((op, change[2], change[3]))
            elif op.startswith("modify_"):
                out.append((op, change[2], change[3]))
            else:  # (op, Table | Index | Column | Constraint ...)
                obj = change[-1]
                out.append((op, str(getattr(obj, "name", obj))))
    return out


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_migrations_match_the_models(kind: str, tmp_path: Path) -> None:
    """An empty database migrated to head has exactly the models' tables, columns, types, nullability,
    indexes, unique and foreign keys, and server defaults (but for the kind ``_drift`` explains)."""
    with database(kind, tmp_path) as url:
        db = Database(Settings(data_dir=tmp_path, database_url=url).sqlalchemy_url)
        try:
            db.migrate()
            with db.engine.connect() as conn:
                context = MigrationContext.configure(
                    conn, opts={"compare_type": True, "compare_server_default": True}
                )
                diff = compare_metadata(context, SQLModel.metadata)
        finally:
            db.dispose()
    # The exception is exercised: 0003's user.disabled is one of them.
    assert any(isinstance(e, list) and e[0][:4] == ("modify_default", None, "user", "disabled") for e in diff)
    assert _drift(diff) == [], diff


@pytest.mark.anyio
async def test_foreign_keys_are_enforced(env: Env) -> None:
    with env.platform.db.session() as s:
        if env.platform.db.engine.dialect.name == "sqlite":
            assert s.connection().exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        s.add(Deployment(app_id="no-such-app"))
        with pytest.raises(IntegrityError):
            s.commit()
    # Deleting an app (with deployments, env vars, build logs) and a team deletes in a valid order.
    app = await env.create_app("doomed")
    await env.post(f"/apps/{app['id']}/deployments/", json={"archive_size_bytes": 10})
    r = await env.put(f"/apps/{app['id']}/environment-variables/", json={"upsert": {"A": {"value": "1"}}})
    assert r.status_code == 200
    assert (await env.delete(f"/apps/{app['id']}")).status_code == 204
    assert (await env.get(f"/apps/{app['id']}")).status_code == 404
    team = await env.post("/teams/", json={"name": "Short lived"})
    assert team.status_code == 201, team.text
    assert (await env.delete(f"/teams/{team.json()['id']}")).status_code == 204


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


LIMIT = 200_000  # the server's max_archive_bytes in the upload-limit tests
BOUNDARY = "fdp-test-boundary"


class ChunkedForm:
    """A storage form sent without Content-Length (chunked), the file in 64 KiB chunks; counts what
    the server pulled from it."""

    def __init__(self, fields: dict[str, str], file_size: int) -> None:
        self.fields, self.file_size = fields, file_size
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for name, value in self.fields.items():
            yield (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
            ).encode()
        yield (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="archive.tar"\r\n'
            "Content-Type: application/x-tar\r\n\r\n"
        ).encode()
        left = self.file_size
        while left > 0:
            chunk = b"z" * min(65536, left)
            left -= len(chunk)
            self.sent += len(chunk)
            yield chunk
        yield f"\r\n--{BOUNDARY}--\r\n".encode()


@pytest.fixture(params=["sqlite", "postgres"])
async def small_env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    """A platform that accepts uploads of at most ``LIMIT`` bytes."""
    with database(request.param, tmp_path) as url:
        settings = Settings(
            data_dir=tmp_path / "data",
            router_port=0,
            database_url=url,
            admin_token=ADMIN,
            max_archive_bytes=LIMIT,
        )
        async with running(settings) as env:
            yield env


async def waiting_upload(env: Env, name: str, declared: int = 1000) -> tuple[dict[str, Any], dict[str, Any]]:
    """A new app's deployment waiting for its upload (``declared`` bytes), and its storage target."""
    app = await env.create_app(name)
    r = await env.post(f"/apps/{app['id']}/deployments/", json={"archive_size_bytes": declared})
    assert r.status_code == 201, r.text
    dep = r.json()
    target = (await env.post(f"/deployments/{dep['id']}/upload")).json()
    return dep, target


async def assert_refused_as_too_large(env: Env, dep: dict[str, Any], r: httpx.Response, words: str) -> None:
    """413 with title, message and hint; the deployment failed the way extraction would; nothing kept."""
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["title"] and error["hint"] and words in error["message"], error
    assert r.json()["detail"] == error["message"]
    got = (await env.get(f"/deployments/{dep['id']}")).json()
    assert got["status"] == "extracting_failed_archive_too_large"
    assert got["failure"] == {
        "error_code": "extracting_failed_archive_too_large",
        "error_title": error["title"],
        "error_message": error["message"],
        "error_hint": error["hint"],
    }
    assert not (env.platform.paths.deployments / dep["id"]).exists()  # the partial file is gone
    logs = await env.get(f"/deployments/{dep['id']}/build-logs")
    lines = [json.loads(line) for line in logs.text.splitlines() if line]
    assert lines[-1]["type"] == "failed"
    assert any(error["message"] in line.get("message", "") for line in lines)
    r = await env.post(f"/deployments/{dep['id']}/upload-complete")
    assert r.status_code == 409


@pytest.mark.anyio
async def test_chunked_oversize_upload_is_cut_off(small_env: Env) -> None:
    env = small_env
    dep, target = await waiting_upload(env, "chunky")
    form = ChunkedForm(target["fields"], file_size=20 * LIMIT)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    r = await env.client.post(httpx.URL(target["url"]).path, content=form, headers=headers)
    assert "content-length" not in r.request.headers
    await assert_refused_as_too_large(env, dep, r, "exceeds the maximum allowed size (0.2 MB)")
    assert "the upload was stopped after" in r.json()["detail"]
    # Reading stopped at the limit: the rest of the body was never pulled.
    assert form.sent < LIMIT + 3 * 65536, form.sent


@pytest.mark.anyio
async def test_chunked_upload_within_the_limit_is_stored(small_env: Env) -> None:
    env = small_env
    dep, target = await waiting_upload(env, "fits")
    form = ChunkedForm(target["fields"], file_size=LIMIT)  # exactly the limit: allowed
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    r = await env.client.post(httpx.URL(target["url"]).path, content=form, headers=headers)
    assert r.status_code == 204, r.text
    assert env.platform.paths.archive(dep["id"]).read_bytes() == b"z" * LIMIT
    assert (await env.get(f"/deployments/{dep['id']}")).json()["status"] == "waiting_upload"
    assert not list(env.platform.paths.archive(dep["id"]).parent.glob("*.part"))


@pytest.mark.anyio
async def test_oversize_upload_over_the_team_quota(small_env: Env) -> None:
    env = small_env
    dep, target = await waiting_upload(env, "quota-cut")
    team_id = (await env.get(f"/apps/{dep['app_id']}")).json()["team_id"]
    quota = {k: None for k in (await env.get(f"/admin/teams/{team_id}/quota")).json()["overrides"]}
    r = await env.put(f"/admin/teams/{team_id}/quota", json={**quota, "max_archive_bytes": 50_000})
    assert r.status_code == 200, r.text
    form = ChunkedForm(target["fields"], file_size=LIMIT // 2)  # under the server's limit, over the team's
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    r = await env.client.post(httpx.URL(target["url"]).path, content=form, headers=headers)
    await assert_refused_as_too_large(
        env, dep, r, "exceeds the maximum allowed size (50 kB) for team default"
    )


@pytest.mark.anyio
async def test_oversize_upload_over_the_team_storage_quota(small_env: Env) -> None:
    env = small_env
    dep, target = await waiting_upload(env, "storage-cut")  # declares 1000 bytes: fits at create time
    team_id = (await env.get(f"/apps/{dep['app_id']}")).json()["team_id"]
    quota = {k: None for k in (await env.get(f"/admin/teams/{team_id}/quota")).json()["limits"]}
    r = await env.put(f"/admin/teams/{team_id}/quota", json={**quota, "max_storage_bytes": 60_000})
    assert r.status_code == 200, r.text
    form = ChunkedForm(target["fields"], file_size=LIMIT // 2)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    r = await env.client.post(httpx.URL(target["url"]).path, content=form, headers=headers)
    await assert_refused_as_too_large(
        env, dep, r, "does not fit in team default's storage quota (60 kB left)"
    )
    assert r.json()["error"]["title"] == "Storage quota exceeded"


@pytest.mark.anyio
async def test_declared_oversize_upload_fails_the_deployment_too(small_env: Env) -> None:
    env = small_env
    dep, target = await waiting_upload(env, "declared")
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="upload_token"\r\n\r\n'
        f"{target['fields']['upload_token']}\r\n"
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="archive.tar"\r\n\r\n'
    ).encode()
    headers = {
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(10 * LIMIT),  # says it is too large before a byte of the file arrives
    }
    r = await env.client.post(httpx.URL(target["url"]).path, content=body, headers=headers)
    await assert_refused_as_too_large(env, dep, r, "exceeds the maximum allowed size")


@pytest.mark.anyio
async def test_oversize_upload_without_the_token_changes_nothing(small_env: Env) -> None:
    env = small_env
    dep, target = await waiting_upload(env, "no-token")
    form = ChunkedForm({"upload_token": "not-the-token"}, file_size=20 * LIMIT)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    r = await env.client.post(httpx.URL(target["url"]).path, content=form, headers=headers)
    assert r.status_code == 403, r.text
    assert form.sent <= 65536  # refused before the file's bytes were read
    assert (await env.get(f"/deployments/{dep['id']}")).json()["status"] == "waiting_upload"
    assert not (env.platform.paths.deployments / dep["id"]).exists()
    # The real token still works.
    r = await env.client.post(
        httpx.URL(target["url"]).path, data=target["fields"], files={"file": ("archive.tar", b"ok")}
    )
    assert r.status_code == 204


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


@pytest.mark.anyio
async def test_health_path_is_configurable(env: Env) -> None:
    app = await env.create_app("checked")
    assert app["health_path"] == "/"
    r = await env.patch(f"/apps/{app['id']}", json={"health_path": "/healthz?deep=1"})
    assert r.status_code == 200, r.text
    assert r.json()["health_path"] == "/healthz?deep=1"
    assert r.json()["directory"] is None  # only what was sent changes
    assert (await env.get(f"/apps/{app['id']}")).json()["health_path"] == "/healthz?deep=1"
    for bad, words in [
        ("healthz", "must start with '/'"),
        ("/health check", "without spaces"),
        ("/a\r\nHost: evil", "without spaces"),
        ("/" + "a" * 200, "at most 200 characters"),
        ("", "must start with '/'"),
    ]:
        r = await env.patch(f"/apps/{app['id']}", json={"health_path": bad})
        assert r.status_code == 422, bad
        assert words in r.json()["detail"][0]["msg"], (bad, r.json())
    assert (await env.get(f"/apps/{app['id']}")).json()["health_path"] == "/healthz?deep=1"
    # The directory alone (what the official CLI sends) leaves it alone; null resets it.
    r = await env.patch(f"/apps/{app['id']}", json={"directory": "src"})
    assert r.json()["health_path"] == "/healthz?deep=1"
    r = await env.patch(f"/apps/{app['id']}", json={"health_path": None})
    assert r.json()["health_path"] == "/" and r.json()["directory"] == "src"
