"""Remote routers (``fastapi-deploy router``, runtime/edge.py) fed by a real control plane.

A real ``fastapi-deploy server`` (process backend) and real router processes on loopback: the table
arrives over the WebSocket, requests through the remote router reach the app and come back to the
control plane as metrics and edge spans, its in-flight counts drive the autoscaler and hold a drain
open, a request waiting at it scales the app from zero, it keeps serving while the control plane is
frozen, and a wrong token is refused clearly. The EndpointSlice half runs on the fake cluster
(tests/test_kubernetes_e2e.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import CLI, Server, free_port, make_server, wait_until
from tests.test_e2e import push

pytestmark = pytest.mark.e2e

TOKEN = "fdp_router_" + os.urandom(8).hex()

SLOW_APP = """
import asyncio, os
from fastapi import FastAPI

app = FastAPI()


@app.get("/")
def root() -> dict[str, object]:
    return {"pid": os.getpid(), "version": os.environ.get("VERSION", "1")}


@app.get("/slow")
async def slow(seconds: float = 2.0) -> dict[str, object]:
    await asyncio.sleep(seconds)
    return {"pid": os.getpid(), "slept": seconds}


@app.get("/boom")
def boom() -> None:
    raise RuntimeError("boom")
"""


@dataclass
class Edge:
    """A ``fastapi-deploy router`` subprocess."""

    control_plane: str
    log_path: Path
    token: str = TOKEN
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTAPI_DEPLOY_")}
        env.update(FASTAPI_DEPLOY_ROUTER_TOKEN=self.token, PYTHONUNBUFFERED="1", **self.extra_env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    CLI,
                    "router",
                    "--control-plane",
                    self.control_plane,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--health-port",
                    str(self.health_port),
                    *args,
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def health(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.health_port}{path}", timeout=5)

    def routes(self) -> dict[str, Any]:
        out: dict[str, Any] = self.health("/routes").json()
        return out

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the router exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                return self.health("/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout, what="the remote router to sync")

    def get(self, app: str, path: str = "/", **kw: Any) -> httpx.Response:
        headers = {"Host": f"{app}.localhost", **kw.pop("headers", {})}
        return httpx.get(
            f"http://127.0.0.1:{self.port}{path}", headers=headers, timeout=kw.pop("timeout", 30), **kw
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("edge-control")
    srv = make_server(tmp, FASTAPI_DEPLOY_ROUTER_TOKEN=TOKEN, FASTAPI_DEPLOY_TRACE_SAMPLE="1")
    srv.start()
    srv.cli("login", "--url", srv.url, "--token", srv.admin_token)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def edge(control: Server, tmp_path: Path) -> Iterator[Edge]:
    e = Edge(control.url, tmp_path / "router.log")
    e.start()
    try:
        e.wait_ready()
        yield e
    finally:
        e.stop()


def slow_project(tmp_path: Path, name: str) -> Path:
    project = tmp_path / name
    project.mkdir()
    (project / "main.py").write_text(textwrap.dedent(SLOW_APP))
    return project


def routed(edge: Edge, host: str) -> list[str]:
    return next((a["routed"] for a in edge.routes()["apps"] if a["host"] == host), [])


def test_requests_through_a_remote_router_are_metrics_and_traces(
    control: Server, edge: Edge, tmp_path: Path
) -> None:
    push(control, slow_project(tmp_path, "edged"), "edged")
    wait_until(lambda: routed(edge, "edged.localhost"), 15, what="the app in the remote router's table")
    for _ in range(5):
        assert edge.get("edged", "/").status_code == 200
    failed = edge.get("edged", "/boom")
    assert failed.status_code == 500
    trace_id = failed.headers["x-trace-id"]

    def edge_span() -> dict[str, Any] | None:
        with control.api() as api:
            r = api.get(f"/traces/{trace_id}")
        if r.status_code != 200:
            return None
        spans = r.json()["spans"]
        return next((s for s in spans if s["kind"] == "edge" or s["name"].startswith("GET")), None)

    span = wait_until(edge_span, 30, what="the remote router's edge span at the control plane")
    assert span["attributes"].get("http.response.status_code") == 500 or "500" in json.dumps(span)

    def counted() -> bool:
        text = httpx.get(f"{control.url}/metrics", timeout=10).text
        return any(
            line.startswith("fastapi_deploy_requests_total{")
            and 'app="edged"' in line
            and 'route="GET /"' in line
            and float(line.rsplit(" ", 1)[1]) >= 5
            for line in text.splitlines()
        )

    wait_until(counted, 30, what="the remote router's requests in /metrics")
    status = httpx.get(f"{control.url}/api/v1/admin/status", headers=auth(control), timeout=10).json()
    assert [r["name"] for r in status["router"]["remote"]] == [edge.routes()["name"]]


def test_a_request_waiting_at_a_remote_router_scales_from_zero(
    control: Server, edge: Edge, tmp_path: Path
) -> None:
    push(control, slow_project(tmp_path, "sleepy"), "sleepy")
    control.cli("scale", "sleepy", "--min", "0", "--scale-to-zero-after", "2")
    wait_until(lambda: not control_serving(control, "sleepy"), 60, what="scaled to zero")
    wait_until(lambda: not routed(edge, "sleepy.localhost"), 10, what="the remote router told")
    r = edge.get("sleepy", "/")
    assert r.status_code == 200, r.text
    assert r.headers.get("x-cold-start") == "1" and int(r.headers["x-queue-time"]) > 0


def test_in_flight_at_a_remote_router_scales_up_and_holds_a_drain(
    control: Server, edge: Edge, tmp_path: Path
) -> None:
    project = slow_project(tmp_path, "busy")
    push(control, project, "busy")
    control.cli("scale", "busy", "--min", "1", "--max", "3", "--concurrency", "1", "--prewarm", "0")
    results: list[int] = []

    def hold(seconds: float) -> None:
        results.append(edge.get("busy", f"/slow?seconds={seconds}", timeout=60).status_code)

    threads = [threading.Thread(target=hold, args=(8.0,)) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        # Only the remote router sees these requests: the autoscaler must get them from its reports.
        wait_until(lambda: len(control_serving(control, "busy")) >= 2, 30, what="a scale-up from remote load")
    finally:
        for t in threads:
            t.join(60)
    assert results == [200, 200, 200]

    # A redeploy while a request is in flight at the remote router: the old instance is drained, not
    # cut off (its request finishes), though the control plane's own router saw nothing.
    control.cli("scale", "busy", "--min", "1", "--max", "1")
    wait_until(lambda: len(control_serving(control, "busy")) == 1, 60, what="back to one")
    slow = threading.Thread(target=hold, args=(4.5,))  # the drain timeout is 5 s (tests/conftest.py)
    results.clear()
    wait_until(lambda: edge.get("busy", "/").json()["version"] == "1", 10, what="version 1 serving")
    slow.start()
    wait_until(lambda: in_flight(control, "busy") >= 1, 10, what="the request in flight")
    control.cli("env", "set", "busy", "VERSION=2")  # a redeploy: the env changes, the build is reused
    wait_until(lambda: edge.get("busy", "/").json()["version"] == "2", 30, interval=0.2, what="version 2")
    assert slow.is_alive(), "the switch came after the slow request: nothing was drained"
    slow.join(60)
    assert results == [200]


def test_a_remote_router_keeps_serving_while_the_control_plane_is_frozen(
    control: Server, edge: Edge, tmp_path: Path
) -> None:
    push(control, slow_project(tmp_path, "steady"), "steady")
    wait_until(lambda: routed(edge, "steady.localhost"), 15, what="the app in the remote router's table")
    assert control.proc is not None
    os.kill(control.proc.pid, signal.SIGSTOP)
    try:
        codes = [edge.get("steady", "/", timeout=10).status_code for _ in range(5)]
    finally:
        os.kill(control.proc.pid, signal.SIGCONT)
    assert codes == [200] * 5
    wait_until(lambda: edge.routes()["connected"], 30, what="the link back")


def test_a_wrong_token_is_refused_and_said(control: Server, tmp_path: Path) -> None:
    wrong = Edge(control.url, tmp_path / "wrong.log", token="not-the-token")
    wrong.start()
    try:
        wait_until(lambda: wrong.routes()["refusal"], 30, what="the refusal")
        assert wrong.health("/readyz").status_code == 503
        assert "refused this router" in wrong.log() or "answered 403" in wrong.log()
        assert wrong.get("edged", "/").status_code == 404  # no table: nothing is routed
    finally:
        wrong.stop()


def auth(server: Server) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.admin_token}"}


def control_serving(server: Server, app: str) -> list[dict[str, Any]]:
    instances = server.cli_json("status", app)["app"]["instances"]
    return [i for i in instances if i["state"] == "serving"]


def in_flight(server: Server, app: str) -> int:
    return sum(int(i.get("in_flight", 0)) for i in server.cli_json("status", app)["app"]["instances"])
