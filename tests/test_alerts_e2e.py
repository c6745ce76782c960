"""Alerts end to end: a real server, a real app, a webhook receiver in its own process.

A synthetic burst of 5xx answers burns an availability SLO's budget: the receiver gets exactly one
``firing`` and, once the errors stop, exactly one ``resolved`` (signed with the webhook's secret). A
deploy that fails and an app that crash-loops are alerts too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, Server, free_port, make_server, wait_until
from tests.test_e2e import push

pytestmark = pytest.mark.e2e

RECEIVER = """
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

received = []

class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        received.append({"body": json.loads(body), "raw": body.decode(),
                         "signature": self.headers.get("X-FastAPI-Deploy-Signature")})
        self.send_response(204)
        self.end_headers()

    def do_GET(self):
        data = json.dumps(received).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

FLAKY = """
import os
from fastapi import FastAPI, HTTPException

app = FastAPI()


@app.get("/")
def root() -> dict[str, bool]:
    return {"ok": True}


@app.get("/fail")
def fail() -> None:
    raise HTTPException(status_code=503, detail="synthetic failure")


@app.get("/die")
def die() -> None:
    os._exit(3)
"""


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    script = tmp_path_factory.mktemp("receiver") / "receiver.py"
    script.write_text(RECEIVER)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(script), str(port)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url, timeout=1).status_code == 200, 20, what="the webhook receiver")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def alerting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = make_server(
        tmp_path_factory.mktemp("alerting"),
        FASTAPI_DEPLOY_ALERT_INTERVAL="1",
        FASTAPI_DEPLOY_CRASH_WINDOW=str(CRASH_WINDOW),
    )
    srv.start()
    srv.cli("login", "--url", srv.url, "--token", srv.admin_token)
    try:
        yield srv
    finally:
        srv.stop()
        (ROOT / "test-artifacts").mkdir(exist_ok=True)
        (ROOT / "test-artifacts" / "server-alerting.log").write_text(srv.log_path.read_text(errors="replace"))


CRASH_WINDOW = 20
"""Seconds: a second crash within it is a crash loop; healthy again after it passes without one."""


def received(receiver: str, **match: Any) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = httpx.get(receiver, timeout=5).json()
    return [r for r in got if all(r["body"].get(k) == v for k, v in match.items())]


def test_an_error_burst_fires_once_and_resolves_once(alerting: Server, receiver: str, tmp_path: Path) -> None:
    project = tmp_path / "flaky"
    project.mkdir()
    (project / "main.py").write_text(textwrap.dedent(FLAKY))
    push(alerting, project, "flaky")
    # A 6-hour SLO: its page rules read 30 s / 10 s and 3 min / 15 s windows (the 30-day rules' windows,
    # scaled; none shorter than the rollups' 10 s resolution).
    slo = alerting.cli_json("slo", "flaky", "--availability", "99.9", "--window-days", "0.25")[0]
    assert slo["alert"]["status"] == "ok" and slo["budget_remaining"] == 1
    hook = alerting.cli_json("webhooks", "flaky", "--add", f"{receiver}/hooks/flaky")
    assert hook["secret"]
    test = alerting.cli_json("webhooks", "flaky", "--test", hook["id"])
    assert test["status"] == 204 and received(receiver, type="test")

    for _ in range(40):  # the burst: every answer a 503
        assert alerting.get("flaky", "/fail").status_code == 503
    firing = wait_until(
        lambda: received(receiver, type="slo_alert", status="firing"), 30, interval=0.5, what="firing"
    )
    assert firing[0]["body"]["severity"] == "page" and firing[0]["body"]["app"] == "flaky"
    assert firing[0]["body"]["burn_rate"]["short"] > 14.4
    expected = (
        "sha256=" + hmac.new(hook["secret"].encode(), firing[0]["raw"].encode(), hashlib.sha256).hexdigest()
    )
    assert firing[0]["signature"] == expected
    assert alerting.cli_json("alerts", "flaky", "--firing")[0]["kind"] == "slo"

    # The errors stop; good traffic goes on: the short window recovers and the alert resolves, once.
    def healthy_until_resolved() -> list[dict[str, Any]]:
        assert alerting.get("flaky", "/").status_code == 200
        return received(receiver, type="slo_alert", status="resolved")

    wait_until(healthy_until_resolved, 90, interval=0.5, what="resolved")
    deadline = time.monotonic() + 5  # more evaluations: nothing fires again, nothing resolves twice
    while time.monotonic() < deadline:
        assert alerting.get("flaky", "/").status_code == 200
        time.sleep(0.25)
    assert len(received(receiver, type="slo_alert", status="firing")) == 1
    assert len(received(receiver, type="slo_alert", status="resolved")) == 1
    history = alerting.cli_json("alerts", "flaky")
    slo_alerts = [a for a in history if a["kind"] == "slo"]
    assert len(slo_alerts) == 1 and slo_alerts[0]["status"] == "resolved"
    assert {d["status"] for d in slo_alerts[0]["deliveries"]} == {204}
    budget = alerting.cli_json("slo", "flaky")[0]["budget_remaining"]
    assert budget < 1


def test_failed_deploys_and_crash_loops_alert(alerting: Server, receiver: str, tmp_path: Path) -> None:
    project = tmp_path / "crashy"
    project.mkdir()
    (project / "main.py").write_text(textwrap.dedent(FLAKY))
    push(alerting, project, "crashy")
    alerting.cli("webhooks", "crashy", "--add", f"{receiver}/hooks/crashy")
    (project / "main.py").write_text("from fastapi import FastAPI\napp = FastAPI(\n")  # a syntax error
    result = alerting.cli("push", str(project), "--app", "crashy", "--json", check=False)
    assert json.loads(result.stdout)["status"] != "success"
    failed = wait_until(
        lambda: received(receiver, type="app_alert", kind="deploy_failed", app="crashy"),
        30,
        what="deploy alert",
    )
    assert "failed" in failed[0]["body"]["message"]
    # An instance that keeps dying: a crash loop, announced once.
    for _ in range(3):
        with pytest.raises(httpx.HTTPError):
            raise_unless_failed(alerting.get("crashy", "/die", timeout=10))
        wait_until(lambda: alerting.get("crashy", "/").status_code == 200, 60, what="a replacement instance")
    loops = wait_until(
        lambda: received(receiver, type="app_alert", kind="crash_loop", app="crashy"),
        30,
        what="crash loop alert",
    )
    assert len(loops) == 1 and loops[0]["body"]["status"] == "firing"

    # The live deployment is degraded while it crash-loops, with the reason, then healthy again.
    live = alerting.cli_json("status", "crashy")["app"]["current_deployment_id"]

    def deployment() -> dict[str, Any]:
        with alerting.api() as api:
            got: dict[str, Any] = api.get(f"/deployments/{live}").json()
        return got

    degraded = wait_until(lambda: (d := deployment())["status"] == "degraded" and d, 30, what="degraded")
    failure = degraded["failure"]
    assert failure["error_title"] == "Degraded" and "crash-looping" in failure["error_message"], degraded
    assert alerting.cli_json("status", "crashy")["app"]["status"] == "degraded"
    events = alerting.cli_json("events", "crashy", "--kind", "health")
    assert any("is degraded" in e["message"] for e in events), events
    assert "is degraded: crash-looping" in alerting.cli("logs", "crashy", "--tail", "300").stdout
    healthy = wait_until(
        lambda: (d := deployment())["status"] == "success" and d, CRASH_WINDOW + 30, what="healthy again"
    )
    assert healthy["failure"] is None
    assert alerting.cli_json("status", "crashy")["app"]["status"] == "serving"
    # A degraded live deployment's build is kept: the crash loop did not make it unrecoverable.
    assert alerting.get("crashy", "/").status_code == 200


def raise_unless_failed(response: httpx.Response) -> None:
    """The request that killed its instance gets the router's 502 (a failed answer, as expected)."""
    if response.status_code >= 500:
        raise httpx.HTTPError(f"{response.status_code}")
