"""Schemathesis against the live API: a real server process, its own ``/api/v1/openapi.json``. Every
operation gets generated requests, valid (positive) and invalid (negative); no answer may be a 5xx, and
every answer must match the schema the API publishes (body shapes, content types).

Twice: as a *member* of a team (a second user, no platform rights: the admin API, owner-only and
admin-only actions answer 403), every operation; and as the platform admin, the operations a member is
refused (the admin API, the teams'). Random ids only ever reach 404s, so half of
the generated requests get the ids of real things instead, made for the run in a team of its own: an
app with an env var, a deployment (cancelled: its build log ends at once), a deploy token, a spare
member and a spare user token (so a generated reset, role change or revocation never locks the run's
own caller out). That way the typed 200 answers are checked too, not only the error shapes.

Bounded: ``MAX_EXAMPLES`` per operation and mode (fewer invalid ones: they mostly meet the same 422
validation). Left out, and why: ``POST /logout`` revokes the token
the run uses (every later call would be a 401); tests/test_api.py covers it. Real ids are not put into
``GET /apps/{app_id}/logs/stream``: with ``follow=true`` it streams until the client leaves.

Schemathesis' pytest plugin (``from_fixture``) does not run on pytest 9 (it reads a node attribute pytest
removed), so the operations are driven here with Hypothesis directly: one ``@given`` per operation, every
failure collected and reported together.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

from tests.conftest import Server

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = {GenerationMode.POSITIVE: 10, GenerationMode.NEGATIVE: 5}
EXCLUDED = {("POST", "/api/v1/logout")}
# The admin's run: what a member is refused (the platform admin's API, a team's members and settings);
# the member's run covers every other operation with the same typed answers.
ADMIN_RUN = ("/api/v1/admin", "/api/v1/teams")
NO_REAL_IDS = {("GET", "/api/v1/apps/{app_id}/logs/stream")}


def _ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code < 300, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    out: dict[str, Any] = r.json()
    return out


def seed(server: Server, caller: str) -> tuple[str, dict[str, list[str]]]:
    """A team of its own with one of everything; (the caller's token, real ids by path parameter)."""
    with server.api() as admin:
        team = _ok(admin.post("/admin/teams", json={"name": f"st-{caller}", "slug": f"st-{caller}"}))["id"]
        token = server.admin_token
        if caller == "member":
            member = _ok(
                admin.post(
                    "/admin/users",
                    json={"email": f"member@st-{caller}.test", "team_id": team, "role": "member"},
                )
            )
            token = _ok(admin.post(f"/admin/users/{member['id']}/tokens", json={"name": "schemathesis"}))[
                "value"
            ]
        spare = _ok(
            admin.post(
                "/admin/users", json={"email": f"spare@st-{caller}.test", "team_id": team, "role": "viewer"}
            )
        )
        app = _ok(admin.post("/apps/", json={"team_id": team, "name": f"st-{caller}-app"}))
        _ok(
            admin.put(
                f"/apps/{app['id']}/environment-variables/",
                json={"upsert": {"GREETING": {"value": "hi"}}, "redeploy": False},
            )
        )
        dep = _ok(admin.post(f"/apps/{app['id']}/deployments/", json={"archive_size_bytes": 100}))
        _ok(admin.post(f"/deployments/{dep['id']}/upload-cancelled"))
        deploy_token = _ok(admin.post(f"/apps/{app['id']}/tokens", json={"name": "ci"}))
    with server.api(token) as own:
        spare_token = _ok(own.post("/tokens/", json={"name": "spare"}))
        assert _ok(own.get("/users/me"))["email"] == (
            f"member@st-{caller}.test" if caller == "member" else "admin@localhost"
        )
    ids = {
        "team_id": [team],
        "app_id": [app["id"]],
        "deployment_id": [dep["id"]],
        "user_id": [spare["id"]],
        "token_id": [deploy_token["id"], spare_token["id"]],
    }
    return token, ids


def with_real_ids(strategy: Any, ids: dict[str, list[str]]) -> Any:
    """Cases of ``strategy``, half of them with ``ids`` in place of their generated path parameters."""

    def swap(drawn: tuple[Any, bool, int]) -> Any:
        case, real, pick = drawn
        if real and case.path_parameters:
            params = dict(case.path_parameters)
            for name in params:
                if name in ids:
                    params[name] = ids[name][pick % len(ids[name])]
            case.path_parameters = params
        return case

    return st.tuples(strategy, st.booleans(), st.integers(0, 7)).map(swap)


@pytest.mark.parametrize("caller", ["member", "admin"])  # the member first: the admin run changes more
def test_api_conforms_to_its_schema(server: Server, caller: str) -> None:
    token, ids = seed(server, caller)
    schema = schemathesis.openapi.from_url(f"{server.url}/api/v1/openapi.json")
    headers = {"Authorization": f"Bearer {token}"}
    failures: list[str] = []
    operations = 0
    statuses: dict[int, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        key = (operation.method.upper(), operation.path)
        if key in EXCLUDED or (caller == "admin" and not operation.path.startswith(ADMIN_RUN)):
            continue
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode)
            if key not in NO_REAL_IDS:
                strategy = with_real_ids(strategy, ids)

            @given(case=strategy)
            @settings(
                max_examples=MAX_EXAMPLES[mode],
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def run(case: Any) -> None:
                response = case.call_and_validate(
                    base_url=server.url,
                    headers=headers,
                    checks=[not_a_server_error, response_schema_conformance, content_type_conformance],
                    timeout=30,
                )
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

            try:
                run()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # nothing of this operation can be made invalid
            except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {exc}"[:3000])
    assert operations >= (40 if caller == "member" else 15), operations
    assert not failures, "\n\n".join(failures)
    # The run reached real resources (typed 2xx answers were checked), and the member was refused some.
    assert sum(n for status, n in statuses.items() if 200 <= status < 300) >= 50, statuses
    if caller == "member":
        assert statuses.get(403, 0) >= 20, statuses
