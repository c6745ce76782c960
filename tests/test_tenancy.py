"""Tenant isolation, enumerated from the OpenAPI schema: every route, every method.

Team B has real resources (an app with a secret, deployments, a deploy token, members, tokens). A user of
team A (and team A's deploy token) calls every operation of ``/api/v1/openapi.json`` with team B's ids
substituted into the path and a valid body. Each must answer 404 (team B's things do not exist for them),
or 403 where the route is known to exist whatever the ids (the admin API; user-only routes for a deploy
token). Routes that name no resource must not leak any of team B's ids. Afterwards team B's resources
are exactly as before, and every mutating call is in the audit log with its actor and target team.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from control_plane.otlp import SpanData
from tests import test_roles
from tests.test_api import ADMIN, Env
from tests.test_roles import make_team, make_user

# The in-process platform (SQLite and PostgreSQL) of tests/test_roles.py.
env = test_roles.env
anyio_backend = test_roles.anyio_backend

MUTATING = {"post", "put", "patch", "delete"}
ANONYMOUS = {
    "/api/v1/auth/login",
    "/api/v1/login/device/authorization",
    "/api/v1/login/device/token",
    "/api/v1/deployments/{deployment_id}/archive",
}


def example(schema: dict[str, Any], components: dict[str, Any], name: str, ids: dict[str, str]) -> Any:
    """A small valid value for ``schema`` (required fields only), ids of team B where a field names one."""
    if "$ref" in schema:
        return example(components[schema["$ref"].rsplit("/", 1)[1]], components, name, ids)
    if name in ids:
        return ids[name]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            options = [s for s in schema[key] if s.get("type") != "null"]
            return example(options[0], components, name, ids) if options else None
    if "default" in schema:
        return schema["default"]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: example(props[k], components, k, ids) for k in schema.get("required", [])}
    if kind == "array":
        return []
    if kind == "integer":
        return max(1, schema.get("minimum", 1))
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0.0))
        high = schema.get("maximum", schema.get("exclusiveMaximum", low + 2.0))
        return (low + high) / 2
    if kind == "boolean":
        return False
    if name == "email":
        return "someone@b.test"
    if schema.get("format") == "uri":
        return "https://hooks.b.test/alerts"
    return "x" * max(3, schema.get("minLength", 3))


async def snapshot(env: Env, b: dict[str, str], b_token: str) -> list[Any]:
    """Everything of team B that the API shows, as its admin sees it (a platform admin, for tokens)."""
    out = []
    for path in (
        f"/teams/{b['team_id']}",
        f"/teams/{b['team_id']}/members",
        f"/apps/{b['app_id']}",
        f"/apps/{b['app_id']}/deployments/",
        f"/apps/{b['app_id']}/environment-variables/",
        f"/apps/{b['app_id']}/tokens",
        f"/apps/{b['app_id']}/scaling",
        f"/deployments/{b['deployment_id']}",
        f"/admin/users/{b['user_id']}",
        f"/admin/teams/{b['team_id']}/quota",
        f"/traces/{b['trace_id']}",
        f"/apps/{b['app_id']}/slos",
        f"/apps/{b['app_id']}/webhooks",
        f"/apps/{b['app_id']}/alerts",
    ):
        r = await env.get(path)
        assert r.status_code == 200, (path, r.text)
        out.append(r.json())
    mine = (await env.get("/tokens/", b_token)).json()
    out.append([{k: v for k, v in t.items() if k != "last_used_at"} for t in mine["data"]])
    return out


@pytest.mark.anyio
async def test_team_a_gets_404_on_every_team_b_resource(env: Env) -> None:
    # Team B, with one of everything.
    b_team = await make_team(env, "team-b")
    b_user, b_token = await make_user(env, "owner@b.test", b_team, "owner")
    b_app = (await env.post("/apps/", b_token, json={"team_id": b_team, "name": "b-app"})).json()
    r = await env.put(
        f"/apps/{b_app['id']}/environment-variables/",
        b_token,
        json={"upsert": {"B_SECRET": {"value": "b-secret-value", "is_secret": True}}, "redeploy": False},
    )
    assert r.status_code == 200
    b_dep = (
        await env.post(f"/apps/{b_app['id']}/deployments/", b_token, json={"archive_size_bytes": 9})
    ).json()
    b_deploy = (await env.post(f"/apps/{b_app['id']}/tokens", b_token, json={"name": "ci"})).json()
    b_user_token_id = next(
        t["id"] for t in (await env.get("/tokens/", b_token)).json()["data"] if t["current"]
    )
    b_trace = "b0" * 16  # a trace of B's app, as its instances would send it
    now = time.time_ns()
    env.platform.traces.ingest(
        b_app["id"],
        [
            SpanData(
                trace_id=b_trace,
                span_id="b1" * 8,
                parent_span_id="",
                name="GET /",
                kind=2,
                start_ns=now,
                end_ns=now + 1000,
            )
        ],
    )
    b_slo = (
        await env.post(
            f"/apps/{b_app['id']}/slos", b_token, json={"name": "b", "kind": "availability", "target": 0.99}
        )
    ).json()
    b_hook = (
        await env.post(f"/apps/{b_app['id']}/webhooks", b_token, json={"url": "https://hooks.b.test/x"})
    ).json()
    ids = {
        "team_id": b_team,
        "slo_id": b_slo["id"],
        "webhook_id": b_hook["id"],
        "app_id": b_app["id"],
        "deployment_id": b_dep["id"],
        "user_id": b_user,
        "token_id": b_deploy["id"],
        "trace_id": b_trace,
    }
    b_secrets = {*ids.values(), b_user_token_id, b_app["slug"], "owner@b.test", "b-secret-value"}

    # Team A: a user and a deploy token of A's own app.
    a_team = await make_team(env, "team-a")
    a_user, a_token = await make_user(env, "owner@a.test", a_team, "owner")
    a_app = (await env.post("/apps/", a_token, json={"team_id": a_team, "name": "a-app"})).json()
    a_deploy = (await env.post(f"/apps/{a_app['id']}/tokens", a_token, json={"name": "ci"})).json()

    before = await snapshot(env, ids, b_token)
    schema = (await env.client.get("/api/v1/openapi.json")).json()
    components = schema.get("components", {}).get("schemas", {})
    sent: list[tuple[str, str, str, int, str]] = []  # (caller, method, path, status, actor id)
    routes = 0

    for template, operations in schema["paths"].items():
        assert template.startswith("/api/v1/"), template
        for method, op in operations.items():
            routes += 1
            params = [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]
            path = template
            for name in params:
                value = (
                    b_user_token_id
                    if (name == "token_id" and template.startswith("/api/v1/tokens/"))
                    else ids[name]
                )
                path = path.replace("{" + name + "}", value)
            kw: dict[str, Any] = {}
            body = op.get("requestBody", {}).get("content", {})
            if "application/json" in body:
                kw["json"] = example(body["application/json"]["schema"], components, "", ids)
            elif "application/x-www-form-urlencoded" in body or "multipart/form-data" in body:
                kw["data"] = {"device_code": "nope", "client_id": "x", "upload_token": "nope"}
            if template == "/api/v1/logout":
                continue  # revokes the caller's own token; nothing of team B's (tests/test_api.py covers it)
            if template == "/api/v1/auth/login":
                kw["json"] = {"email": "owner@b.test", "password": "not the password"}

            for caller, token, actor in (
                ("user", a_token, a_user),
                ("deploy", a_deploy["value"], a_deploy["id"]),
            ):
                headers = {"Authorization": f"Bearer {token}"}
                r = await env.client.request(method.upper(), path, headers=headers, **kw)
                what = f"{caller} {method.upper()} {path}: {r.status_code} {r.text[:300]}"
                assert r.status_code < 500, what
                if params:
                    if template.startswith("/api/v1/admin/"):
                        assert r.status_code == 403, what
                    elif template == "/api/v1/deployments/{deployment_id}/archive":
                        assert r.status_code in (403, 404), what  # storage: refuses without the upload token
                    elif caller == "user":
                        assert r.status_code == 404, what
                    else:
                        assert r.status_code in (403, 404), what
                        if r.status_code == 403:
                            assert "Deploy tokens" in r.json()["detail"], what
                else:
                    echoed = str(kw.get("json"))  # an error may repeat the id the caller sent
                    leaked = [s for s in b_secrets if s in r.text and s not in echoed]
                    assert not leaked, (what, leaked)
                    if template == "/api/v1/apps/" and method == "post":
                        assert r.status_code in (403, 404), what  # team B's id in the body
                if method in MUTATING:
                    # Login and the storage endpoint do not read the Bearer token: no actor there.
                    anonymous = template in ANONYMOUS
                    sent.append((caller, method.upper(), path, r.status_code, "" if anonymous else actor))

    assert routes >= 40  # the whole API was enumerated
    assert await snapshot(env, ids, b_token) == before  # nothing of team B changed

    # Every mutating call is in the audit log: method, path, status, actor, and team B where it was targeted.
    entries = []
    page = (await env.get("/admin/audit", params={"limit": 1000})).json()
    entries = page["data"]
    for caller, method, path, status, actor in sent:
        match = [
            e
            for e in entries
            if e["method"] == method
            and e["path"] == path
            and e["status_code"] == status
            and (e["actor_user_id"] if caller == "user" else e["actor_token_id"]) == (actor or None)
        ]
        assert match, (caller, method, path, status)
        if any(v in path for v in ids.values()) and "/tokens/" not in path and "/users/" not in path:
            assert match[0]["team_id"] == b_team, (method, path, match[0])
        assert match[0]["client_ip"], match[0]


@pytest.mark.anyio
async def test_lists_show_only_your_teams_things(env: Env) -> None:
    b_team = await make_team(env, "b-only")
    _, b_token = await make_user(env, "b@b-only.test", b_team, "owner")
    await env.post("/apps/", b_token, json={"team_id": b_team, "name": "hidden"})
    a_team = await make_team(env, "a-only")
    _, a_token = await make_user(env, "a@a-only.test", a_team, "viewer")
    assert [t["slug"] for t in (await env.get("/teams/", a_token)).json()["data"]] == ["a-only"]
    assert (await env.get("/apps/", a_token)).json() == {"data": [], "count": 0}
    # The platform admin sees both.
    slugs = {t["slug"] for t in (await env.get("/teams/", ADMIN)).json()["data"]}
    assert {"a-only", "b-only"} <= slugs
