"""The admin API, passwords, quotas, the audit log, secrets at rest and rate limits.

In process against SQLite and PostgreSQL (the platform of tests/test_roles.py), then through a real server
process and the real CLI: ``fastapi-deploy admin ...`` and ``teams ...``, a deployed app with a secret,
and a grep of the whole data directory and the server log for that secret.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlmodel import select

from control_plane.app import create_app
from control_plane.config import Settings
from control_plane.models import BuildLogLine, EnvVar, utcnow
from control_plane.platform import Platform
from control_plane.ratelimit import RateLimits, TokenBucket
from control_plane.secrets import SecretBox
from tests import test_roles
from tests.conftest import CLI, EXAMPLES, Server, wait_until
from tests.test_api import ADMIN, Env
from tests.test_roles import PASSWORD, make_team, make_user

env = test_roles.env
anyio_backend = test_roles.anyio_backend


@asynccontextmanager
async def platform_env(
    tmp_path: Path, clock: Callable[[], float] | None = None, **overrides: Any
) -> AsyncIterator[Env]:
    """An in-process platform on SQLite with the given settings (rate limits, secret keys...); its rate
    limits on ``clock`` when given (a fake one: tests move time instead of waiting)."""
    settings = Settings(data_dir=tmp_path / "data", router_port=0, admin_token=ADMIN, **overrides)
    platform = Platform(settings)
    app = create_app(settings, platform)
    if clock is not None:
        app.state.rate_limits = RateLimits(settings, clock=clock)
    await platform.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield Env(platform, client)
    finally:
        await platform.stop()


async def login(env: Env, email: str, password: str) -> httpx.Response:
    return await env.client.post("/api/v1/auth/login", json={"email": email, "password": password})


# -- users ----------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_user_lifecycle_create_login_disable_reset(env: Env) -> None:
    r = await env.post("/admin/users", json={"email": "New@Example.test", "name": "New"})
    assert r.status_code == 201
    created = r.json()
    generated = created["password"]
    assert created["email"] == "new@example.test" and len(generated) >= 16 and created["has_password"]
    assert "password" not in (await env.get(f"/admin/users/{created['id']}")).json()  # shown once
    assert (await env.post("/admin/users", json={"email": "new@example.test"})).status_code == 409

    r = await login(env, "new@example.test", generated)
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    assert r.json()["expires_in"] > 0 and r.json()["user"]["email"] == "new@example.test"
    me = await env.get("/users/me", token)
    assert me.json()["email"] == "new@example.test" and me.json()["is_admin"] is False
    assert (await env.get("/admin/users", token)).status_code == 403  # not a platform admin
    bad = await login(env, "new@example.test", "wrong password")
    assert bad.status_code == 401 and bad.json()["error"]["hint"]
    unknown = await login(env, "nobody@example.test", "wrong password")
    assert unknown.json()["detail"] == bad.json()["detail"]  # no account enumeration

    # Disabled: every token and the password are refused; enabled again: they work.
    assert (await env.patch(f"/admin/users/{created['id']}", json={"disabled": True})).json()["disabled"]
    assert (await env.get("/users/me", token)).status_code == 401
    assert (await login(env, "new@example.test", generated)).status_code == 401
    assert (await env.patch(f"/admin/users/{created['id']}", json={"disabled": False})).status_code == 200
    assert (await env.get("/users/me", token)).status_code == 200

    # Reset: a new password, every user token revoked.
    r = await env.post(f"/admin/users/{created['id']}/reset", json={"password": "a brand new secret"})
    assert r.json() == {"password": None, "revoked_tokens": 1}
    assert (await env.get("/users/me", token)).status_code == 401
    assert (await login(env, "new@example.test", generated)).status_code == 401
    assert (await login(env, "new@example.test", "a brand new secret")).status_code == 200
    r = await env.post(f"/admin/users/{created['id']}/reset", json={"password": "short"})
    assert r.status_code == 409 and r.json()["error"]["title"] == "Password too weak"

    # An admin cannot lock themselves out.
    me_id = (await env.get("/users/me")).json()["id"]
    r = await env.patch(f"/admin/users/{me_id}", json={"disabled": True})
    assert r.status_code == 409
    listed = (await env.get("/admin/users", params={"email": "example.test"})).json()
    assert [u["email"] for u in listed["data"]] == ["new@example.test"] and listed["count"] == 1


@pytest.mark.anyio
async def test_user_tokens_are_listed_created_and_revoked(env: Env) -> None:
    _, token = await make_user(env, "tokens@example.test")
    r = await env.post("/tokens/", token, json={"name": "script", "expires_in_days": 7})
    assert r.status_code == 201
    created = r.json()
    listed = (await env.get("/tokens/", token)).json()["data"]
    assert {t["name"] for t in listed} == {"test", "script"}
    assert all("value" not in t for t in listed)
    assert [t["current"] for t in listed if t["name"] == "test"] == [True]
    assert (await env.get("/users/me", created["value"])).status_code == 200
    used = next(t for t in (await env.get("/tokens/", token)).json()["data"] if t["id"] == created["id"])
    assert used["last_used_at"] is not None
    assert (await env.delete(f"/tokens/{created['id']}", token)).status_code == 204
    assert (await env.get("/users/me", created["value"])).status_code == 401
    assert (await env.delete(f"/tokens/{created['id']}", token)).status_code == 404


@pytest.mark.anyio
async def test_admins_list_and_revoke_any_token(env: Env) -> None:
    team = await make_team(env, "tok-team")
    user_id, token = await make_user(env, "revoked@example.test", team, "admin")
    app = await env.create_app("tok-app", token)
    deploy = (await env.post(f"/apps/{app['id']}/tokens", token, json={"name": "ci"})).json()
    assert (await env.get("/admin/tokens", token)).status_code == 403  # a team admin is not a platform admin

    mine = (await env.get("/admin/tokens", params={"user_id": user_id, "kind": "user"})).json()
    assert [(t["name"], t["kind"], t["user_email"]) for t in mine["data"]] == [
        ("test", "user", "revoked@example.test")
    ]
    deploys = (await env.get("/admin/tokens", params={"kind": "deploy", "app_id": app["id"]})).json()["data"]
    assert [(t["id"], t["app_slug"], t["current"]) for t in deploys] == [(deploy["id"], "tok-app", False)]
    assert "value" not in deploys[0] and "token_hash" not in deploys[0]

    user_token_id = mine["data"][0]["id"]
    assert (await env.delete(f"/admin/tokens/{user_token_id}")).status_code == 204
    assert (await env.get("/users/me", token)).status_code == 401
    assert (await env.delete(f"/admin/tokens/{user_token_id}")).status_code == 404  # already revoked
    assert (await env.delete(f"/admin/tokens/{deploy['id']}")).status_code == 204
    assert (await env.get("/admin/tokens", params={"app_id": app["id"]})).json()["count"] == 0
    audit = (await env.get("/admin/audit", params={"app_id": app["id"]})).json()["data"]
    assert any(e["method"] == "DELETE" and deploy["id"] in e["path"] for e in audit), audit


@pytest.mark.anyio
async def test_device_login_approved_with_email_and_password(env: Env) -> None:
    await make_user(env, "device@example.test")
    auth = (await env.client.post("/api/v1/login/device/authorization", data={"client_id": "x"})).json()
    page = await env.client.get("/login/device", params={"user_code": auth["user_code"]})
    assert 'name="password"' in page.text and 'name="token"' in page.text
    form = {"user_code": auth["user_code"], "email": "device@example.test", "password": "wrong one"}
    assert (await env.client.post("/login/device", data=form)).status_code == 403
    form["password"] = PASSWORD
    ok = await env.client.post("/login/device", data=form)
    assert ok.status_code == 200 and "device@example.test" in ok.text
    r = await env.client.post(
        "/api/v1/login/device/token",
        data={"device_code": auth["device_code"], "client_id": "x", "grant_type": "device"},
    )
    assert r.status_code == 200
    assert (await env.get("/users/me", r.json()["access_token"])).json()["email"] == "device@example.test"


# -- teams and quotas -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_admin_teams_and_apps_across_teams(env: Env) -> None:
    await make_user(env, "lead@example.test")
    r = await env.post("/admin/teams", json={"name": "Blue", "owner_email": "lead@example.test"})
    assert r.status_code == 201
    blue = r.json()
    _, lead = await make_user(env, "lead2@example.test", blue["id"], "owner")
    await env.post("/apps/", lead, json={"team_id": blue["id"], "name": "blue-app"})
    teams = {t["slug"]: t for t in (await env.get("/admin/teams")).json()["data"]}
    assert teams["blue"]["members"] == 2 and teams["blue"]["apps"] == 1
    apps = (await env.get("/admin/apps", params={"team_id": blue["id"]})).json()
    assert [(a["slug"], a["team_slug"]) for a in apps["data"]] == [("blue-app", "blue")]
    r = await env.delete(f"/admin/teams/{blue['id']}")
    assert r.status_code == 409 and r.json()["error"]["title"] == "Team not empty"
    empty = (await env.post("/admin/teams", json={"name": "Empty"})).json()
    assert (await env.delete(f"/admin/teams/{empty['id']}")).status_code == 204
    status = (await env.get("/admin/status")).json()
    assert status["backend"]["name"] == "process" and status["backend"]["nodes"][0]["cpus"] >= 1
    assert status["apps"] >= 1 and status["secret_keys"] == 1


@pytest.mark.anyio
async def test_quotas_are_enforced_with_title_message_hint(env: Env) -> None:
    team = await make_team(env, "capped")
    _, owner = await make_user(env, "owner@capped.test", team, "owner")
    r = await env.put(
        f"/admin/teams/{team}/quota",
        json={"max_apps": 2, "max_instances": 3, "max_archive_bytes": 1000, "max_storage_bytes": 1500},
    )
    assert r.status_code == 200 and r.json()["limits"]["max_apps"] == 2

    first = (await env.post("/apps/", owner, json={"team_id": team, "name": "q1"})).json()
    assert first["id"]
    await env.post("/apps/", owner, json={"team_id": team, "name": "q2"})
    r = await env.post("/apps/", owner, json={"team_id": team, "name": "q3"})
    body = r.json()
    assert r.status_code == 403 and body["error"]["code"] == "quota_exceeded"
    assert body["error"]["title"] == "Quota exceeded" and "2 of its 2 apps" in body["detail"]
    assert "quota" in body["error"]["hint"]

    # Instances: each app's ceiling and the team's floor (min + pre-warm) fit the cap of 3.
    scaling = f"/apps/{first['id']}/scaling"
    assert (await env.patch(scaling, owner, json={"max_instances": 4})).status_code == 403
    assert (await env.patch(scaling, owner, json={"max_instances": 3, "min_instances": 2})).status_code == 200
    r = await env.patch(scaling, owner, json={"prewarm": 1})  # 2 + 1 + the other app's 1 = 4 > 3
    assert r.status_code == 403 and "reserve 4 instances" in r.json()["detail"]
    # CPU quota with the platform's instance size: 1 core / 0.5 per instance = a cap of 2.
    await env.put(f"/admin/teams/{team}/quota", json={"max_apps": 2, "max_cpu": 1.0})
    assert (await env.get(f"/teams/{team}/quota", owner)).json()["instance_cap"] == 2
    assert (await env.patch(scaling, owner, json={"max_instances": 3})).status_code == 403

    # Sizes: one upload over the team's limit, then the team's storage.
    await env.put(f"/admin/teams/{team}/quota", json={"max_archive_bytes": 1000, "max_storage_bytes": 1500})
    deployments = f"/apps/{first['id']}/deployments/"
    r = await env.post(deployments, owner, json={"archive_size_bytes": 1001})
    assert r.status_code == 413 and ".fastapicloudignore" in r.json()["error"]["hint"]
    assert (await env.post(deployments, owner, json={"archive_size_bytes": 1000})).status_code == 201
    r = await env.post(deployments, owner, json={"archive_size_bytes": 600})
    assert r.status_code == 413 and r.json()["error"]["title"] == "Storage quota exceeded"

    # Build minutes: this month's build-log spans.
    await env.put(f"/admin/teams/{team}/quota", json={"max_build_minutes": 1})
    dep = (await env.post(deployments, owner, json={"archive_size_bytes": 10})).json()
    with env.platform.db.session() as s:  # a build of two minutes, this month
        now = utcnow()
        s.add(BuildLogLine(deployment_id=dep["id"], message="start", created_at=now))
        s.add(BuildLogLine(deployment_id=dep["id"], message="end", created_at=now + timedelta(minutes=2)))
        s.commit()
    assert (await env.get(f"/teams/{team}/quota", owner)).json()["usage"]["build_minutes"] == 2
    r = await env.post(deployments, owner, json={"archive_size_bytes": 10})
    assert r.status_code == 403 and r.json()["error"]["title"] == "Build minutes used up"

    # Back to the defaults: the overrides are gone, the platform default applies.
    r = await env.put(f"/admin/teams/{team}/quota", json={})
    assert r.json()["overrides"]["max_apps"] is None and r.json()["limits"]["max_apps"] == 50
    assert (await env.post("/apps/", owner, json={"team_id": team, "name": "q3"})).status_code == 201


@pytest.mark.anyio
async def test_the_memory_quota_caps_instances_by_the_instance_size(env: Env) -> None:
    team = await make_team(env, "lean")
    _, owner = await make_user(env, "owner@lean.test", team, "owner")
    # 1 GiB at the platform's 512 MiB per instance: two instances, though CPU alone would allow 20.
    r = await env.put(f"/admin/teams/{team}/quota", json={"max_memory_mb": 1024, "max_cpu": 10.0})
    assert r.status_code == 200 and r.json()["limits"]["max_memory_mb"] == 1024
    assert r.json()["instance_cap"] == 2

    first = (await env.post("/apps/", owner, json={"team_id": team, "name": "m1"})).json()
    scaling = f"/apps/{first['id']}/scaling"
    r = await env.patch(scaling, owner, json={"max_instances": 3})
    body = r.json()
    assert r.status_code == 403 and body["error"]["code"] == "quota_exceeded"
    assert body["error"]["title"] == "Quota exceeded"
    assert (
        body["error"]["message"]
        == body["detail"]
        == "max_instances 3 is over team lean's cap of 2 instances."
    )
    assert (
        body["error"]["hint"].startswith("Use --max 2 or less")
        and "admin quotas set" in body["error"]["hint"]
    )
    assert (await env.patch(scaling, owner, json={"max_instances": 2, "min_instances": 2})).status_code == 200
    quota = (await env.get(f"/teams/{team}/quota", owner)).json()
    assert quota["usage"]["memory_mb"] == 1024 and quota["usage"]["instances_floor"] == 2

    # The two instances are reserved: a new app (one more) does not fit in the memory.
    r = await env.post("/apps/", owner, json={"team_id": team, "name": "m2"})
    body = r.json()
    assert r.status_code == 403 and body["error"]["title"] == "Quota exceeded"
    assert body["detail"] == "A new app needs one instance and team lean already reserves 2 of its 2."
    assert body["error"]["hint"].startswith("Lower another app's minimum")
    r = await env.patch(scaling, owner, json={"prewarm": 1})  # a warm spare takes memory too
    assert r.status_code == 403 and "reserve 3 instances (min + pre-warm) of its 2" in r.json()["detail"]

    # Smaller instances: the same memory holds four of them.
    assert (await env.patch("/admin/settings", json={"instance_memory_mb": 256})).status_code == 200
    assert (await env.get(f"/teams/{team}/quota", owner)).json()["instance_cap"] == 4
    assert (await env.post("/apps/", owner, json={"team_id": team, "name": "m2"})).status_code == 201
    # Less memory than one instance: not even one.
    await env.put(f"/admin/teams/{team}/quota", json={"max_memory_mb": 200})
    assert (await env.get(f"/teams/{team}/quota", owner)).json()["instance_cap"] == 0
    r = await env.post("/apps/", owner, json={"team_id": team, "name": "m3"})
    assert r.status_code == 403 and "of its 0" in r.json()["detail"]


# -- the audit log ----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_audit_log_records_and_filters_and_is_append_only(env: Env) -> None:
    team = await make_team(env, "audited")
    user_id, token = await make_user(env, "auditor@example.test", team, "owner")
    app = (await env.post("/apps/", token, json={"team_id": team, "name": "audited-app"})).json()
    await env.put(
        f"/apps/{app['id']}/environment-variables/",
        token,
        json={"upsert": {"TOP": {"value": "do-not-log-me", "is_secret": True}}, "redeploy": False},
    )
    await env.delete(f"/apps/{app['id']}", token)
    await env.client.post("/api/v1/apps/", json={"team_id": team, "name": "x"})  # no token: 401
    await env.get(f"/apps/{app['id']}", token)  # reads are not audited

    mine = (await env.get("/admin/audit", params={"actor": "auditor@example.test"})).json()
    calls = [(e["method"], e["route"], e["status_code"]) for e in reversed(mine["data"])]
    assert calls == [
        ("POST", "/api/v1/apps/", 201),
        ("PUT", "/api/v1/apps/{app_id}/environment-variables/", 200),
        ("DELETE", "/api/v1/apps/{app_id}", 204),
    ]
    for e in mine["data"]:
        assert e["actor_user_id"] == user_id and e["actor_kind"] == "user" and e["actor_token_id"]
        assert e["team_id"] == team and e["app_id"] == app["id"] and e["client_ip"]
    # The delete still knows its app, though the app is gone.
    by_app = (await env.get("/admin/audit", params={"app_id": app["id"], "method": "delete"})).json()
    assert by_app["count"] == 1
    anonymous = (await env.get("/admin/audit", params={"status": 401, "path": "/api/v1/apps/"})).json()
    assert anonymous["data"][0]["actor_user_id"] is None
    assert "do-not-log-me" not in json.dumps((await env.get("/admin/audit", params={"limit": 1000})).json())
    paged = (await env.get("/admin/audit", params={"limit": 2})).json()
    older = (await env.get("/admin/audit", params={"limit": 2, "before_id": paged["next_before_id"]})).json()
    assert int(older["data"][0]["id"]) < int(paged["data"][-1]["id"])

    # Append-only in the database itself, and no API route changes it.
    with env.platform.db.engine.connect() as conn:
        for statement in ("UPDATE auditentry SET path = 'x'", "DELETE FROM auditentry"):
            with pytest.raises(DBAPIError, match="append-only"):
                conn.execute(text(statement))
            conn.rollback()
    schema = (await env.client.get("/api/v1/openapi.json")).json()
    assert set(schema["paths"]["/api/v1/admin/audit"]) == {"get"}


# -- secrets at rest --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_secret_key_rotation(tmp_path: Path) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    path = ""
    async with platform_env(tmp_path, secret_keys=old) as e:
        app = await e.create_app("rotating")
        path = f"/apps/{app['id']}/environment-variables/"
        r = await e.put(
            path, json={"upsert": {"S": {"value": "rotate-me", "is_secret": True}}, "redeploy": False}
        )
        assert r.json()["data"][0]["value"] is None
    # Step 1: the new key first, the old one still there to decrypt; rotate.
    async with platform_env(tmp_path, secret_keys=f"{new},{old}") as e:
        r = await e.post("/admin/secrets/rotate")
        assert r.json() == {"rotated": 1, "keys": 2}
        with e.platform.db.session() as s:
            stored = s.exec(select(EnvVar)).one().value
        assert "rotate-me" not in stored
        assert SecretBox([new.encode()]).decrypt(stored) == "rotate-me"
        with pytest.raises(ValueError):
            SecretBox([old.encode()]).decrypt(stored)
    # Step 2: the old key is gone; everything still decrypts (the deployer reads values this way).
    async with platform_env(tmp_path, secret_keys=new) as e:
        assert e.platform.deployer._env_for(app["id"]) == {"S": "rotate-me"}
        assert (await e.post("/admin/secrets/rotate")).json() == {"rotated": 1, "keys": 1}
        with e.platform.db.session() as s:
            stored = s.exec(select(EnvVar)).one().value
    # A value under a key that is not configured: rotation refuses and changes nothing.
    async with platform_env(tmp_path, secret_keys=Fernet.generate_key().decode()) as e:
        r = await e.post("/admin/secrets/rotate")
        assert r.status_code == 409 and r.json()["error"]["title"] == "Unknown key"
        with e.platform.db.session() as s:
            assert s.exec(select(EnvVar)).one().value == stored


def test_settings_read_the_secret_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("FASTAPI_DEPLOY_SECRET_KEY", key)
    settings = Settings.from_env()
    assert settings.secret_keys == key and settings.extra["secret_keys"] == key


# -- rate limits --------------------------------------------------------------------------------------------


def test_token_bucket_with_a_fake_clock() -> None:
    now = [0.0]
    bucket = TokenBucket(3, 10.0, clock=lambda: now[0])
    assert [bucket.take("ip") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take("ip") == pytest.approx(10.0)
    assert bucket.take("other") == 0.0  # per key
    now[0] = 10.0
    assert bucket.take("ip") == 0.0
    assert bucket.take("ip") > 0


def test_official_cli_polling_is_never_limited() -> None:
    """The device-token limit against the official CLI's polling: every 2 s (our interval), 5 minutes."""
    now = [0.0]
    settings = Settings()
    bucket = TokenBucket(*settings.rate_limit_device, clock=lambda: now[0])
    for _ in range(150):
        assert bucket.take("127.0.0.1") == 0.0
        now[0] += 2.0


@pytest.mark.anyio
async def test_login_is_rate_limited_with_retry_after(tmp_path: Path) -> None:
    async with platform_env(tmp_path, rate_limit_login=(4, 60.0)) as e:
        await make_user(e, "limited@example.test")
        statuses = [(await login(e, "limited@example.test", "wrong")).status_code for _ in range(3)]
        assert statuses == [401, 401, 429]  # per email: half the burst
        r = await login(e, "limited@example.test", PASSWORD)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "rate_limited" and r.json()["error"]["hint"]
        r = await login(e, "other@example.test", "wrong")  # the IP's own burst of 4 is used up now
        assert r.status_code == 429


def assert_rate_limited(r: httpx.Response, wait: int) -> None:
    """429 with ``Retry-After`` (whole seconds, rounded up) and our error's title, message and hint."""
    assert r.status_code == 429, r.text
    assert r.headers["Retry-After"] == str(wait)
    error = r.json()["error"]
    assert error["code"] == "rate_limited" and error["title"] and error["hint"], error
    assert r.json()["detail"] == error["message"]


@pytest.mark.anyio
async def test_token_creation_is_rate_limited_per_user(tmp_path: Path) -> None:
    now = [1000.0]
    async with platform_env(tmp_path, clock=lambda: now[0], rate_limit_tokens=(3, 30.0)) as e:
        app = await e.create_app("limited")
        # One bucket per user for every kind of token it creates: personal tokens and deploy tokens.
        assert (await e.post("/tokens/", json={"name": "a"})).status_code == 201
        assert (await e.post(f"/apps/{app['id']}/tokens", json={"name": "b"})).status_code == 201
        assert (await e.post("/tokens/", json={"name": "c"})).status_code == 201
        assert_rate_limited(await e.post(f"/apps/{app['id']}/tokens", json={"name": "d"}), 30)
        assert_rate_limited(await e.post("/tokens/", json={"name": "e"}), 30)
        # Refused requests made nothing.
        names = {t["name"] for t in (await e.get(f"/apps/{app['id']}/tokens")).json()["data"]}
        assert names == {"b"}
        # Another user has a bucket of its own.
        team = await make_team(e, "other-team")
        _user, other = await make_user(e, "other@example.test", team, "owner")
        assert (await e.post("/tokens/", other, json={"name": "theirs"})).status_code == 201
        now[0] += 10.0  # a third of the way to the next token
        assert_rate_limited(await e.post("/tokens/", json={"name": "f"}), 20)
        now[0] += 20.0
        assert (await e.post("/tokens/", json={"name": "g"})).status_code == 201


@pytest.mark.anyio
async def test_device_flow_is_rate_limited_per_ip(tmp_path: Path) -> None:
    now = [1000.0]
    async with platform_env(tmp_path, clock=lambda: now[0], rate_limit_device=(3, 2.0)) as e:
        authorize = "/api/v1/login/device/authorization"
        first = await e.client.post(authorize, data={"client_id": "fastapi-cli"})
        assert first.status_code == 200
        form = {"device_code": first.json()["device_code"], "client_id": "fastapi-cli", "grant_type": "x"}
        # Authorizations and token polls share the client's bucket.
        r = await e.client.post("/api/v1/login/device/token", data=form)
        assert r.status_code == 400 and r.json()["error"] == "authorization_pending"
        assert (await e.client.post(authorize, data={"client_id": "fastapi-cli"})).status_code == 200
        assert_rate_limited(await e.client.post("/api/v1/login/device/token", data=form), 2)
        assert_rate_limited(await e.client.post(authorize, data={"client_id": "fastapi-cli"}), 2)
        now[0] += 2.0  # Retry-After later, the poll goes through again
        r = await e.client.post("/api/v1/login/device/token", data=form)
        assert r.status_code == 400 and r.json()["error"] == "authorization_pending"


# -- the real server and the real CLI ----------------------------------------------------------------------


@pytest.mark.e2e
def test_admin_and_teams_cli(server: Server, tmp_path: Path) -> None:
    created = server.cli_json("admin", "users", "create", "dev@cli.test", "--name", "Dev")
    assert created["email"] == "dev@cli.test" and created["password"]
    assert "dev@cli.test" in server.cli("admin", "users").stdout
    team = server.cli_json("admin", "teams", "create", "CLI Team", "--owner", "admin@localhost")
    assert team["slug"] == "cli-team"
    server.cli("teams", "add", "cli-team", "dev@cli.test", "--role", "viewer")
    members = server.cli_json("teams", "members", "cli-team")
    assert {m["email"]: m["role"] for m in members}["dev@cli.test"] == "viewer"
    server.cli("teams", "role", "cli-team", "dev@cli.test", "member")
    report = server.cli_json("admin", "quotas", "set", "cli-team", "--max-apps", "3", "--max-upload", "1MB")
    assert report["limits"]["max_apps"] == 3 and report["limits"]["max_archive_bytes"] == 1_000_000
    assert "Apps" in server.cli("admin", "quotas", "show", "cli-team").stdout
    status = server.cli_json("admin", "status")
    assert status["ready"] is True
    assert "Backend" in server.cli("admin", "status").stdout
    server.cli("admin", "users", "disable", "dev@cli.test")
    server.cli("admin", "users", "enable", "dev@cli.test")
    audit = server.cli_json("admin", "audit", "--actor", "admin@localhost", "--since", "1h")
    assert any(e["route"] == "/api/v1/teams/{team_id}/members" for e in audit)

    # The new user logs in with email and password, in a config folder of their own.
    dev_env = {**server.env, "FASTAPI_DEPLOY_CONFIG_DIR": str(tmp_path / "dev-config")}
    result = subprocess.run(
        [CLI, "login", "--url", server.url, "--email", "dev@cli.test", "--password-stdin"],
        input=created["password"] + "\n",
        env=dev_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "dev@cli.test" in result.stdout
    denied = subprocess.run([CLI, "admin", "users"], env=dev_env, capture_output=True, text=True, timeout=60)
    assert denied.returncode == 1 and "Platform admins only" in denied.stderr

    # The admin sees the new login's token and revokes it: the user is signed out.
    listed = server.cli_json("admin", "tokens", "list", "--user", "dev@cli.test", "--kind", "user")
    assert len(listed) == 1 and listed[0]["user_email"] == "dev@cli.test", listed
    assert "dev@cli.test" in server.cli("admin", "tokens").stdout
    server.cli("admin", "tokens", "revoke", listed[0]["id"])
    after = subprocess.run([CLI, "whoami"], env=dev_env, capture_output=True, text=True, timeout=60)
    assert after.returncode != 0, after.stdout
    bad = server.cli("admin", "tokens", "revoke", listed[0]["id"], check=False)
    assert bad.returncode == 1 and "Token not found" in bad.stderr


@pytest.mark.e2e
def test_secret_values_never_leave_the_encryption(server: Server, tmp_path: Path) -> None:
    """A deployed app with a secret: the app sees it; no API answer, log or file of the data directory
    (database and WAL, app logs, build logs, instance state), nor the server's log, holds it."""
    secret = "s3cret-" + Fernet.generate_key().decode()[:16]
    project = tmp_path / "secretive"
    shutil.copytree(EXAMPLES / "hello", project)
    # The app's source must not hold the secret (it is uploaded and kept): it answers a hash of it.
    (project / "main.py").write_text(
        "import hashlib, os\nfrom fastapi import FastAPI\n\napp = FastAPI()\n\n\n"
        "@app.get('/')\ndef root() -> dict[str, str]:\n"
        "    print('serving a request')\n"
        "    return {'key_sha256': hashlib.sha256(os.environ.get('API_KEY', '').encode()).hexdigest()}\n"
    )
    server.cli("push", str(project), "--app", "secretive", "--json")
    responses = [server.cli("env", "set", "secretive", f"API_KEY={secret}", "--secret", "--json").stdout]
    expected = hashlib.sha256(secret.encode()).hexdigest()
    wait_until(
        lambda: server.get("secretive").json().get("key_sha256") == expected, 90, what="secret redeploy"
    )
    with server.api() as api:
        app_id = next(a["id"] for a in api.get("/apps/").json()["data"] if a["slug"] == "secretive")
        for path in (
            f"/apps/{app_id}",
            f"/apps/{app_id}/environment-variables/",
            f"/apps/{app_id}/deployments/",
            "/admin/audit?limit=1000",
            "/admin/apps",
            "/admin/status",
        ):
            responses.append(api.get(path).text)
        for dep in api.get(f"/apps/{app_id}/deployments/").json()["data"]:
            with api.stream("GET", f"/deployments/{dep['id']}/build-logs") as r:
                responses.append("".join(r.iter_text()))
        responses.append(api.get(f"/apps/{app_id}/logs/stream", params={"since": "1h"}).text)
    assert "serving a request" in responses[-1]  # the app's logs were read
    for response in responses:
        assert secret not in response
    leaks = [str(p) for p in server.data_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaks == []
    assert secret not in server.log_path.read_text(errors="replace")


@pytest.mark.e2e
def test_rotation_through_the_cli(server: Server) -> None:
    out = server.cli_json("admin", "secrets", "rotate")
    assert out["keys"] == 1 and out["rotated"] >= 0
