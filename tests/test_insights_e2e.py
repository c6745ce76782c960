"""FastAPI-aware insights end to end, on a real server through the real CLI.

A blocking call in an async endpoint is reported at build time (push output, API, CLI) and can be made
to refuse the build; under load the same endpoint stalls the event loop, and the instance reports where
(the stack names the offending line) as an app event, a span in the request's trace and the instance's
lag readings. A push that removes a route is reported as breaking and, with ``--fail-on-breaking``,
refused while the serving revision keeps serving.
"""

from __future__ import annotations

import json
import textwrap
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, wait_until
from tests.test_e2e import push

pytestmark = pytest.mark.e2e

BLOCKING = """
import time

from fastapi import FastAPI

app = FastAPI()


def load_report():
    time.sleep(0.3)  # the blocking line
    return {"report": "ready"}


@app.get("/report")
async def report():
    return load_report()


@app.get("/fine")
async def fine():
    return {"fine": True}
"""

V1 = """
from fastapi import FastAPI

app = FastAPI()


@app.get("/items/{item_id}")
def read_item(item_id: int) -> dict[str, int]:
    return {"item_id": item_id}


@app.get("/users")
def list_users() -> list[str]:
    return ["ada", "grace"]
"""

V2 = """
from fastapi import FastAPI

app = FastAPI()


@app.get("/items/{item_id}")
def read_item(item_id: int, q: str) -> dict[str, int]:  # a new required parameter
    return {"item_id": item_id}
"""


def project(tmp: Path, name: str, source: str) -> Path:
    folder = tmp / name
    folder.mkdir(exist_ok=True)
    (folder / "main.py").write_text(textwrap.dedent(source))
    return folder


def test_blocking_calls_found_at_build_time_and_refused_on_request(server: Server, tmp_path: Path) -> None:
    folder = project(tmp_path, "blocky", BLOCKING)
    text = server.cli("push", str(folder), "--app", "blocky").stdout
    assert "main.py:10:5: high: `time.sleep` blocks the event loop in async endpoint" in text, text
    assert "GET /report" in text and "asyncio.sleep" in text
    found = server.cli_json("insights", "blocky")
    (finding,) = found["blocking"]["findings"]
    assert (finding["file"], finding["line"], finding["call"]) == ("main.py", 10, "time.sleep")
    assert finding["routes"] == ["GET /report"] and finding["chain"][-1] == "time.sleep"
    assert found["fail_on_blocking"] is False
    assert "load_report" in server.cli("insights", "blocky").stdout

    # Refusing blocking calls: the next push fails the build, the serving revision stays.
    assert server.cli_json("insights", "blocky", "--fail-on-blocking")["fail_on_blocking"] is True
    (folder / "main.py").write_text(textwrap.dedent(BLOCKING).replace('"ready"', '"v2"'))
    refused = server.cli("push", str(folder), "--app", "blocky", "--json", check=False)
    assert refused.returncode == 1
    out = json.loads(refused.stdout)
    assert out["status"] == "building_image_failed", out
    assert "Blocking calls in async code" in refused.stdout + refused.stderr
    assert server.get("blocky", "/fine").json() == {"fine": True}
    server.cli("insights", "blocky", "--no-fail-on-blocking")
    assert server.cli_json("insights", "blocky")["fail_on_blocking"] is False


def test_the_blocked_loop_is_caught_with_its_stack(server: Server, tmp_path: Path) -> None:
    push(server, project(tmp_path, "stalls", BLOCKING), "stalls")
    errors: list[str] = []

    def hit() -> None:
        r = server.get("stalls", "/report", timeout=30)
        if r.status_code != 200:
            errors.append(r.text)

    threads = [threading.Thread(target=hit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors

    def blocked() -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = server.cli_json("events", "stalls", "--kind", "insight")
        return events

    events = wait_until(blocked, 30, interval=0.5, what="an event-loop block event")
    event = events[0]
    assert event["message"].startswith("Event loop blocked for ")
    assert event["data"]["user_frame"] == "main.py:10:load_report", event
    assert any("main.py:10:load_report" in frame for frame in event["data"]["stack"])
    assert event["data"]["duration_ms"] >= 100
    # The block is a span of the request it stalled: that trace is kept, whatever the sampling.
    trace_id = event["data"]["trace_id"]

    def whole() -> dict[str, Any] | None:
        with server.api() as api:
            got = api.get(f"/traces/{trace_id}")
        if got.status_code != 200:
            return None
        spans = got.json()["spans"]
        names = {(s["name"], s["service"]) for s in spans}
        return got.json() if {("event loop blocked", "stalls"), ("GET /report", "stalls")} <= names else None

    trace = wait_until(whole, 30, interval=0.5, what="the stalled request's trace")
    block = next(s for s in trace["spans"] if s["name"] == "event loop blocked")
    request = next(s for s in trace["spans"] if s["name"] == "GET /report" and s["service"] == "stalls")
    assert block["parent_span_id"] == request["span_id"] and block["status"] == "error"
    assert block["attributes"]["code.lineno"] == 10
    # The instance's lag readings arrive every 10 s.
    runtime = wait_until(
        lambda: [i for i in server.cli_json("insights", "stalls")["runtime"] if i["blocks"] >= 1],
        30,
        interval=1.0,
        what="the instance's loop readings",
    )
    assert runtime[0]["lag_max_ms"] >= 100
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'fastapi_deploy_event_loop_blocks_total{app="stalls"' in metrics
    assert "fastapi_deploy_event_loop_lag_seconds_bucket" in metrics


def test_breaking_changes_are_reported_and_refused_on_request(server: Server, tmp_path: Path) -> None:
    folder = project(tmp_path, "contract", V1)
    first = push(server, folder, "contract")
    (folder / "main.py").write_text(textwrap.dedent(V2))
    refused = server.cli(
        "push", str(folder), "--app", "contract", "--fail-on-breaking", "--json", check=False
    )
    assert refused.returncode == 1
    out = json.loads(refused.stdout)
    assert out["status"] == "verifying_failed", out
    assert "Breaking API changes" in refused.stdout + refused.stderr
    assert server.get("contract", "/users").json() == ["ada", "grace"]  # the old revision serves on
    with server.api() as api:
        dep = api.get(f"/deployments/{out['deployment_id']}").json()
        assert dep["failure"]["error_code"] == "verifying_failed_breaking_changes", dep
        diff = api.get(f"/deployments/{out['deployment_id']}/insights").json()["contract"]
    kinds = {(c["kind"], c["path"]) for c in diff["changes"] if c["severity"] == "breaking"}
    assert any(path == "/users" for _, path in kinds), kinds
    assert any(path == "/items/{item_id}" for _, path in kinds), kinds
    assert diff["against"] == first["deployment_id"]
    # Without the flag the push goes through, and says what it broke.
    second = server.cli("push", str(folder), "--app", "contract", "--json", check=False)
    assert json.loads(second.stdout)["status"] == "success"
    assert "breaking" in server.cli("insights", "contract").stdout
    # Every deployment's OpenAPI document is kept and downloadable.
    with server.api() as api:
        old = api.get(f"/deployments/{first['deployment_id']}/openapi.json")
        new = api.get(f"/deployments/{json.loads(second.stdout)['deployment_id']}/openapi.json")
    assert old.status_code == 200 and "/users" in old.json()["paths"]
    assert new.status_code == 200 and "/users" not in new.json()["paths"]
