"""Observability end to end: a real server, real instances traced with no code changes, a real second
OTLP receiver.

``examples/gateway`` calls ``examples/orders`` through the router with httpx; orders queries SQLite
through SQLAlchemy. One request to the gateway must give one trace: the router's edge span, the gateway's
server span, its httpx client span, the router's edge span of the hop to orders, the orders server span
and its database span, each the child of the one before. The same spans reach a second receiver (a test
process, as a platform team's collector would be). Metrics, the Prometheus exposition, request-correlated
logs and the CLI read it all back. A second server samples nothing but errors and slow requests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import CLI, ROOT, Server, free_port, make_server, wait_until
from tests.test_e2e import copy_example, push

pytestmark = pytest.mark.e2e

RECEIVER = """
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

spans = []

class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for rs in request.resource_spans:
            names = [a.value.string_value for a in rs.resource.attributes if a.key == "service.name"]
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append({"trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                                  "service": names[0] if names else "",
                                  "auth": self.headers.get("X-Collector-Key", "")})
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        data = json.dumps(spans).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second OTLP/HTTP receiver in its own process; yields its base URL."""
    script = tmp_path_factory.mktemp("collector") / "receiver.py"
    script.write_text(RECEIVER)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(script), str(port)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url, timeout=1).status_code == 200, 20, what="the test collector")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, collector: str) -> Iterator[Server]:
    """A server that keeps every trace and forwards its spans to the test collector."""
    tmp = tmp_path_factory.mktemp("traced")
    srv = make_server(
        tmp,
        FASTAPI_DEPLOY_TRACE_SAMPLE="1.0",
        FASTAPI_DEPLOY_OTLP_FORWARD_URL=f"{collector}/v1/traces",
        FASTAPI_DEPLOY_OTLP_FORWARD_HEADERS="X-Collector-Key=s3cret",
    )
    srv.start()
    srv.cli("login", "--url", srv.url, "--token", srv.admin_token)
    try:
        yield srv
    finally:
        srv.stop()
        (ROOT / "test-artifacts").mkdir(exist_ok=True)
        (ROOT / "test-artifacts" / f"server-{tmp.name}.log").write_text(
            srv.log_path.read_text(errors="replace")
        )


@pytest.fixture(scope="module")
def shop(traced: Server, tmp_path_factory: pytest.TempPathFactory) -> None:
    """orders and gateway deployed, the gateway pointed at orders through the router."""
    work = tmp_path_factory.mktemp("shop")
    push(traced, copy_example("orders", work), "orders")
    push(traced, copy_example("gateway", work), "gateway")
    traced.cli(
        "env",
        "set",
        "gateway",
        f"ORDERS_URL=http://127.0.0.1:{traced.router_port}",
        "ORDERS_HOST=orders.localhost",
    )
    wait_until(
        lambda: traced.get("gateway", "/checkout/1").status_code == 200, 60, what="the gateway redeploy"
    )


def trace_of(server: Server, trace_id: str, services: int) -> dict[str, Any]:
    """The stored trace once spans of ``services`` services (the router counts as one) arrived."""

    def ready() -> dict[str, Any] | None:
        with server.api() as api:
            r = api.get(f"/traces/{trace_id}")
        if r.status_code != 200:
            return None
        trace: dict[str, Any] = r.json()
        return trace if len({s["service"] for s in trace["spans"]}) >= services else None

    result: dict[str, Any] = wait_until(
        ready, 30, interval=0.3, what=f"trace {trace_id} from {services} services"
    )
    return result


def test_one_request_one_trace_across_two_apps_and_the_database(
    traced: Server, shop: None, collector: str
) -> None:
    r = traced.get("gateway", "/checkout/1")
    assert r.status_code == 200 and r.json() == {"order": {"id": 1, "item": "book"}, "orders_status": 200}
    trace_id = r.headers["x-trace-id"]
    assert r.headers["x-request-id"] == trace_id  # one id for both when the client sent neither
    trace = trace_of(traced, trace_id, services=3)
    spans = trace["spans"]
    by_id = {s["span_id"]: s for s in spans}

    def parent(span: dict[str, Any]) -> dict[str, Any] | None:
        return by_id.get(span["parent_span_id"] or "")

    edge_gateway = next(s for s in spans if s["service"] == "fastapi-deploy-router" and s["depth"] == 0)
    assert edge_gateway["attributes"]["http.route"] == "/checkout/{order_id}"
    server_gateway = next(s for s in spans if s["service"] == "gateway" and s["kind"] == "server")
    assert parent(server_gateway) is edge_gateway
    assert server_gateway["name"] == "GET /checkout/{order_id}"
    client = next(s for s in spans if s["service"] == "gateway" and s["kind"] == "client")
    assert parent(client) is server_gateway
    edge_orders = next(
        s
        for s in spans
        if s["service"] == "fastapi-deploy-router" and s["attributes"]["url.path"] == "/orders/1"
    )
    assert parent(edge_orders) is client
    server_orders = next(s for s in spans if s["service"] == "orders" and s["kind"] == "server")
    assert parent(server_orders) is edge_orders
    assert server_orders["attributes"]["http.route"] == "/orders/{order_id}"
    database = [s for s in spans if s["service"] == "orders" and s["kind"] == "client"]
    assert database, [(s["service"], s["kind"], s["name"]) for s in spans]
    assert all(parent(s) is server_orders for s in database)
    assert any("SELECT" in str(s["attributes"].get("db.statement", s["name"])) for s in database)
    # Depth-first order: each span right after (or below) its parent.
    assert [s["depth"] for s in spans[:5]] == [0, 1, 2, 3, 4]
    # The test collector received the same spans, with the platform team's header.
    ids = {s["span_id"] for s in spans}

    def forwarded() -> bool:
        got = httpx.get(collector, timeout=5).json()
        mine = [s for s in got if s["trace_id"] == trace_id]
        return ids <= {s["span_id"] for s in mine} and all(s["auth"] == "s3cret" for s in mine)

    wait_until(forwarded, 30, interval=0.3, what="the spans at the second receiver")


def test_metrics_move_with_load_and_prometheus_agrees(traced: Server, shop: None) -> None:
    for i in range(30):
        assert traced.get("gateway", f"/checkout/{1 + i % 2}").status_code == 200
    assert traced.get("gateway", "/boom").status_code == 500
    gateway = traced.app_id("gateway")

    def moved() -> dict[str, Any] | None:
        with traced.api() as api:
            m: dict[str, Any] = api.get(f"/apps/{gateway}/metrics", params={"range": "5m"}).json()
        return m if sum(m["overall"]["requests"]) >= 31 else None

    m = wait_until(moved, 30, interval=0.5, what="the metric series to move")
    routes = {r["route"]: r for r in m["routes"]}
    assert routes["GET /checkout/{order_id}"]["requests"] >= 30
    assert routes["GET /boom"]["errors"] == 1
    assert any(v is not None and v > 0 for v in m["overall"]["p99_ms"])
    assert max(v or 0 for v in m["overall"]["instances"]) >= 1
    assert not any(r.startswith("GET /checkout/1") for r in routes)  # templates, never raw paths
    text = httpx.get(f"{traced.url}/metrics", timeout=10).text
    samples = [
        s
        for f in text_string_to_metric_families(text)
        if f.name == "fastapi_deploy_requests"
        for s in f.samples
        if s.labels.get("app") == "gateway" and s.name.endswith("_total")
    ]
    checkout = sum(s.value for s in samples if s.labels["route"] == "GET /checkout/{order_id}")
    assert checkout >= 30
    assert any(s.labels["status_class"] == "5xx" for s in samples)
    assert 'fastapi_deploy_instances{app="orders",state="serving"}' in text


def test_cli_reads_metrics_traces_and_a_waterfall(traced: Server, shop: None) -> None:
    r = traced.get("gateway", "/checkout/2")
    trace_id = r.headers["x-trace-id"]
    trace_of(traced, trace_id, services=3)
    listed = traced.cli_json("traces", "gateway")
    assert trace_id in {t["trace_id"] for t in listed}
    errors = traced.cli_json("traces", "gateway", "--errors")
    assert errors and all(t["error"] for t in errors)
    waterfall = traced.cli("trace", trace_id).stdout
    for name in ("GET /checkout/{order_id}", "GET /orders/{order_id}", "gateway", "orders"):
        assert name in waterfall, waterfall
    metrics = traced.cli_json("metrics", "gateway", "--range", "5m")
    assert sum(metrics["overall"]["requests"]) > 0
    assert "GET /checkout/{order_id}" in traced.cli("metrics", "gateway", "--range", "15m").stdout
    bad = traced.cli("trace", "nothex", check=False)
    assert bad.returncode == 1 and "32 hex digits" in bad.stderr


def test_logs_are_correlated_by_request_and_trace(traced: Server, shop: None) -> None:
    r = traced.get("gateway", "/checkout/1")
    request_id = r.headers["x-request-id"]

    def lines() -> list[dict[str, Any]]:
        return traced.cli_ndjson("logs", "gateway", "--request-id", request_id)

    found = wait_until(lines, 20, interval=0.3, what="the request's access log line")
    assert len(found) == 1 and "/checkout/1" in found[0]["message"] and found[0]["trace_id"] == request_id
    # The orders app saw the same trace: its access line has the trace id too.
    orders = wait_until(
        lambda: traced.cli_ndjson("logs", "orders", "--trace-id", request_id), 20, what="orders' line"
    )
    assert "/orders/1" in orders[0]["message"]
    # Builds are in the app's logs too.
    built = traced.cli_ndjson("logs", "gateway", "--since", "1h", "--tail", "1000", "--grep", "Entrypoint")
    assert built and built[0]["stream"] == "build"


# -- sampling: errors and slow requests always, the rest never (ratio 0) ----------------------------------

SLOW_APP = """
import asyncio
from fastapi import FastAPI

app = FastAPI()


@app.get("/fast")
async def fast() -> dict[str, str]:
    return {"speed": "fast"}


@app.get("/slow")
async def slow() -> dict[str, str]:
    await asyncio.sleep(0.4)
    return {"speed": "slow"}


@app.get("/fail")
def fail() -> None:
    raise ValueError("it failed")
"""


def test_errors_and_slow_requests_are_kept_the_rest_sampled_away(tmp_path: Path) -> None:
    srv = make_server(tmp_path, FASTAPI_DEPLOY_TRACE_SAMPLE="0", FASTAPI_DEPLOY_TRACE_SLOW_MS="300")
    srv.start()
    try:
        srv.cli("login", "--url", srv.url, "--token", srv.admin_token)
        project = tmp_path / "sampled"
        project.mkdir()
        (project / "main.py").write_text(textwrap.dedent(SLOW_APP))
        push(srv, project, "sampled")
        ids = {
            name: srv.get("sampled", f"/{name}").headers["x-trace-id"] for name in ("fast", "slow", "fail")
        }
        failed = trace_of(srv, ids["fail"], services=2)
        exception = next(s for s in failed["spans"] if s["service"] == "sampled")
        assert exception["status"] == "error"
        assert exception["events"][0]["attributes"]["exception.type"] == "ValueError"
        assert "it failed" in exception["events"][0]["attributes"]["exception.stacktrace"]
        trace_of(srv, ids["slow"], services=2)
        with srv.api() as api:
            assert api.get(f"/traces/{ids['fast']}").status_code == 404
            kept = api.get(f"/apps/{srv.app_id('sampled')}/traces", params={"slow": "true"}).json()["data"]
        assert [t["trace_id"] for t in kept] == [ids["slow"]]
    finally:
        srv.stop()


def test_tracing_can_be_turned_off(tmp_path: Path) -> None:
    srv = make_server(tmp_path, FASTAPI_DEPLOY_TRACING="0", FASTAPI_DEPLOY_TRACE_SAMPLE="1")
    srv.start()
    try:
        srv.cli("login", "--url", srv.url, "--token", srv.admin_token)
        project = tmp_path / "untraced"
        project.mkdir()
        (project / "main.py").write_text(textwrap.dedent(SLOW_APP))
        push(srv, project, "untraced")
        response = srv.get("untraced", "/fast")
        trace_id, request_id = response.headers["x-trace-id"], response.headers["x-request-id"]
        trace = trace_of(srv, trace_id, services=1)  # the edge span only: nothing in the instance
        assert {s["service"] for s in trace["spans"]} == {"fastapi-deploy-router"}
        # Untraced, the launcher notes the request's ids for the access log itself.
        found = wait_until(
            lambda: srv.cli_ndjson("logs", "untraced", "--request-id", request_id), 20, what="the access line"
        )
        assert "/fast" in found[0]["message"] and found[0]["trace_id"] == trace_id
        assert not (srv.data_dir / "otel").exists() or not any((srv.data_dir / "otel").iterdir())
        status = subprocess.run(
            [CLI, "status", "untraced", "--json"], env=srv.env, capture_output=True, text=True, check=True
        )
        (instance,) = [i for i in json.loads(status.stdout)["app"]["instances"] if i["state"] == "serving"]
        environ = Path(f"/proc/{instance['pid']}/environ").read_bytes().split(b"\0")
        assert b"FASTAPI_DEPLOY_APP_ID" in b" ".join(environ)  # the platform's own variables are there
        assert not any(v.startswith(b"FASTAPI_DEPLOY_OTLP_ENDPOINT=") for v in environ)
    finally:
        srv.stop()


# -- latency per route -----------------------------------------------------------------------------------


def test_route_percentiles_are_ordered_and_a_slow_route_is_slower(traced: Server, tmp_path: Path) -> None:
    project = tmp_path / "paced"
    project.mkdir()
    (project / "main.py").write_text(textwrap.dedent(SLOW_APP))  # /fast answers at once, /slow in 0.4 s
    push(traced, project, "paced")
    for _ in range(20):
        assert traced.get("paced", "/fast").status_code == 200
    for _ in range(5):
        assert traced.get("paced", "/slow").status_code == 200
    paced = traced.app_id("paced")

    def counted() -> dict[str, dict[str, Any]] | None:
        with traced.api() as api:
            m = api.get(f"/apps/{paced}/metrics", params={"range": "5m"}).json()
        routes = {r["route"]: r for r in m["routes"]}
        done = routes.get("GET /fast", {}).get("requests", 0) >= 20
        return routes if done and routes.get("GET /slow", {}).get("requests", 0) >= 5 else None

    routes = wait_until(counted, 30, interval=0.5, what="both routes' requests in the series")
    p95: dict[str, list[float]] = {}
    for name in ("GET /fast", "GET /slow"):
        series = routes[name]["series"]
        points = [
            (n, p50, p95_, p99)
            for n, p50, p95_, p99 in zip(
                series["requests"], series["p50_ms"], series["p95_ms"], series["p99_ms"], strict=True
            )
        ]
        for n, p50, p95_, p99 in points:
            if n == 0:
                assert (p50, p95_, p99) == (None, None, None), (name, points)
            else:
                assert p50 is not None and p95_ is not None and p99 is not None, (name, points)
                assert 0 < p50 <= p95_ <= p99, (name, points)
        p95[name] = [v for n, _, v, _ in points if n]
    assert min(p95["GET /slow"]) >= 400  # the route sleeps 0.4 s
    assert max(p95["GET /fast"]) < min(p95["GET /slow"])
    # The exposition's histogram per route says the same: no slow request under 0.25 s.
    text = httpx.get(f"{traced.url}/metrics", timeout=10).text
    buckets = {
        (s.labels["route"], s.labels["le"]): s.value
        for f in text_string_to_metric_families(text)
        if f.name == "fastapi_deploy_request_duration_seconds"
        for s in f.samples
        if s.labels.get("app") == "paced" and s.name.endswith("_bucket")
    }
    assert buckets[("GET /slow", "0.25")] == 0 and buckets[("GET /slow", "+Inf")] == 5
    assert buckets[("GET /fast", "+Inf")] == 20
