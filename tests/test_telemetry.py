"""The observability pieces in process: route templates, live metrics and their rollups in a real SQLite,
the Prometheus exposition, OTLP decoding and encoding, the trace pipeline's sampling and storage, and the
instance-side tail sampler. Time is an input everywhere (fake clocks); nothing sleeps.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import socketserver
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from control_plane.db import Database
from control_plane.metrics import BOUNDS, PROMETHEUS_BOUNDS, Cell, Metrics, bucket_of, quantile
from control_plane.otlp import OTLPError, SpanData, decode, decode_json, decompress, encode_protobuf
from control_plane.rollups import Rollups, decode_hist, encode_hist
from control_plane.traces import ROUTER_SERVICE, Traces
from runtime import instrument
from runtime.routes import UNMATCHED, RouteMatcher

# -- route templates ---------------------------------------------------------------------------------


def test_route_templates_from_openapi() -> None:
    schema = {
        "paths": {
            "/": {},
            "/items/{item_id}": {},
            "/items/special": {},  # declared after the template: the template wins, as in Starlette
            "/files/{path:path}": {},
            "/users/{user_id}/orders/{order_id}": {},
        }
    }
    m = RouteMatcher.from_openapi(schema)
    assert m.template(b"/") == "/"
    assert m.template(b"/items/42") == "/items/{item_id}"
    assert m.template(b"/items/special") == "/items/special"  # an exact static path is exact
    assert m.template(b"/files/a/b/c.txt") == "/files/{path:path}"
    assert m.template(b"/users/1/orders/2") == "/users/{user_id}/orders/{order_id}"
    assert m.template(b"/users/1/orders") == UNMATCHED
    assert m.template(b"/items/1/extra") == UNMATCHED
    assert m.label(b"GET", b"/items/7") == "GET /items/{item_id}"
    assert m.label(b"BREW", b"/") == "OTHER /"
    assert RouteMatcher.from_openapi(None).label(b"GET", b"/x") == f"GET {UNMATCHED}"
    assert RouteMatcher.from_openapi({"paths": "nonsense"}).templates == []


def test_route_cache_stays_bounded() -> None:
    m = RouteMatcher(["/items/{item_id}"])
    for i in range(10_000):
        assert m.template(b"/items/%d" % i) == "/items/{item_id}"
    assert len(m._cache) <= 4096


# -- histograms and live metrics ------------------------------------------------------------------


def test_bounds_and_prometheus_subset() -> None:
    assert list(BOUNDS) == sorted(BOUNDS) and BOUNDS[0] == 0.0005 and BOUNDS[-1] == 60.0
    assert set(PROMETHEUS_BOUNDS) <= set(BOUNDS)
    assert (0.001, 0.0025, 0.005, 0.01, 0.1, 1.0, 10.0) == tuple(
        b for b in PROMETHEUS_BOUNDS if b in (0.001, 0.0025, 0.005, 0.01, 0.1, 1.0, 10.0)
    )
    assert bucket_of(0.001) == BOUNDS.index(0.001)  # upper bounds are inclusive, like Prometheus' le
    assert bucket_of(1000.0) == len(BOUNDS)


def test_quantiles_are_close_to_the_truth() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(-4.5, 0.8) for _ in range(20_000)]  # around 11 ms, a long tail
    hist = [0] * (len(BOUNDS) + 1)
    for v in values:
        hist[bucket_of(v)] += 1
    values.sort()
    for q in (0.5, 0.95, 0.99):
        true = values[int(q * len(values))]
        estimate = quantile(hist, q)
        assert estimate is not None and abs(estimate - true) / true < 0.15, (q, true, estimate)
    assert quantile([0] * (len(BOUNDS) + 1), 0.5) is None


@dataclass
class Head:
    path: bytes = b"/"
    request_id: bytes = b"r" * 32
    trace_id: bytes = b"0" * 31 + b"1"
    span_id: bytes = b"a" * 16
    parent_span_id: bytes = b""


@dataclass
class Info:
    """A finished request as the router hands it to the hook (the ``RequestInfo`` protocol)."""

    head: Head | None = field(default_factory=Head)
    method: bytes = b"GET"
    status: int = 200
    upstream_id: str | None = "i1"
    started: float = 100.0
    attached_at: float = 100.001
    waited: float = -1.0
    cold: bool = False
    retried: bool = False
    broken: bool = False
    received: int = 0
    sent: int = 100


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _metrics(clock: Clock) -> Metrics:
    m = Metrics(clock=clock)
    m.set_app("app1", "hello", RouteMatcher(["/", "/items/{item_id}"]))
    m.set_instances("app1", "dep1", ["i1"])
    return m


def test_request_done_counts_by_route_status_and_revision() -> None:
    clock = Clock()
    m = _metrics(clock)
    for i in range(10):
        m.request_done("app1", Info(head=Head(path=b"/items/%d" % i)), 100.010)  # type: ignore[arg-type]
    m.request_done("app1", Info(status=503), 100.5)  # type: ignore[arg-type]
    m.request_done("app1", Info(broken=True), 100.002)  # type: ignore[arg-type]
    m.request_done("app1", Info(status=404, head=Head(path=b"/nope"), waited=0.2, cold=True), 100.3)  # type: ignore[arg-type]
    bucket = m.open["app1"]
    items = bucket.routes["GET /items/{item_id}"]
    assert items.requests == 10 and items.statuses[2] == 10 and items.errors == 0
    root = bucket.routes["GET /"]
    assert root.requests == 2 and root.errors == 2  # a 503 and a cut-off response
    assert bucket.routes["GET unmatched"].client_errors == 1
    assert (bucket.queued, bucket.cold_starts) == (1, 1)
    assert m.requests[("app1", "dep1", "GET /items/{item_id}")][2] == 10
    assert quantile(items.hist, 0.5) == pytest.approx(0.01, rel=0.25)


def test_roll_closes_windows_and_folds_totals() -> None:
    clock = Clock(1_000_005.0)
    m = _metrics(clock)
    m.request_done("app1", Info(), 100.01)  # type: ignore[arg-type]
    m.observe_fleet("app1", 3.0, 2, 1)
    assert m.roll() == []  # the window has not passed
    clock.now += 10
    closed = m.roll()
    assert [(a, b.start) for a, b in closed] == [("app1", 1_000_000)]
    assert closed[0][1].concurrency_max == 3.0 and closed[0][1].serving == 2
    m.request_done("app1", Info(), 100.02)  # type: ignore[arg-type]
    totals = m.route_totals()[("app1", "GET /")]
    assert totals.requests == 2  # one folded in, one still open
    m.forget_app("app1")
    assert not m.requests and not m.totals and "app1" not in m.open


def test_cell_merge_is_exact() -> None:
    a, b = Cell(), Cell()
    a.requests, a.hist[3], a.statuses[2] = 2, 2, 2
    b.requests, b.hist[3], b.hist[5], b.statuses[5] = 3, 1, 2, 3
    merged = Cell.merged([a, b])
    assert merged.requests == 5 and merged.hist[3] == 3 and merged.hist[5] == 2 and merged.errors == 3
    assert decode_hist(encode_hist(merged.hist)) == merged.hist


# -- rollups in a real database ---------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    database.migrate()
    return database


def test_rollups_write_query_roll_up_and_expire(db: Database) -> None:
    clock = Clock(1_000_020.0)  # a minute's start
    m = _metrics(clock)
    rollups = Rollups(db, m, fine_retention=600, coarse_retention=3600, clock=clock)
    # Two minutes of traffic: 5 requests per 10 s window, the second minute slower.
    for window in range(12):
        for _ in range(5):
            latency = 0.01 if window < 6 else 0.1
            m.request_done("app1", Info(), 100.0 + latency)  # type: ignore[arg-type]
        m.observe_fleet("app1", 1.0 + window, 1, 0)
        clock.now += 10
        rollups._unwritten += m.roll()
        rollups.flush()
    clock.now += 15  # past the second minute: it is rolled up too
    rollups.flush()
    fine = rollups.series("app1", 300, 10)
    assert fine["resolution"] == 10
    requests = [n for n in fine["overall"]["requests"] if n]
    assert sum(requests) == 60 and set(requests) == {5}
    assert max(v for v in fine["overall"]["p50_ms"] if v) == pytest.approx(100, rel=0.25)
    assert fine["routes"][0]["route"] == "GET /" and fine["routes"][0]["requests"] == 60
    coarse = rollups.series("app1", 3600, 60)
    assert coarse["resolution"] == 60
    per_minute = [n for n in coarse["overall"]["requests"] if n]
    assert per_minute == [30, 30]
    p99 = [v for v in coarse["overall"]["p99_ms"] if v is not None]
    assert p99[0] < 20 < 80 < p99[1]
    assert max(v for v in coarse["overall"]["concurrency_max"] if v is not None) == 12.0
    # Only one route asked for: the app's own series plus that route.
    only = rollups.series("app1", 300, 10, route="GET /items/{item_id}")
    assert only["routes"] == [] and sum(only["overall"]["requests"]) == 60
    # A restart within a window merges into the row that is there.
    m.request_done("app1", Info(), 100.01)  # type: ignore[arg-type]
    rollups._unwritten += list(m.open.items())
    rollups.flush()
    m2 = _metrics(clock)
    m2.request_done("app1", Info(), 100.01)  # type: ignore[arg-type]
    again = Rollups(db, m2, clock=clock)
    again._unwritten += list(m2.open.items())
    again.flush()
    assert sum(rollups.series("app1", 300, 10)["overall"]["requests"]) == 62
    # Retention: fine rows go after 10 minutes, coarse after an hour.
    clock.now += 2 * 3600
    rollups._last_retention = 0
    rollups.flush()
    assert sum(rollups.series("app1", 3600, 60)["overall"]["requests"]) == 0
    with pytest.raises(ValueError):
        rollups.series("app1", 7 * 86400, 10)  # too many points


def test_live_window_is_in_the_series(db: Database) -> None:
    clock = Clock(1_000_003.0)
    m = _metrics(clock)
    rollups = Rollups(db, m, clock=clock)
    m.request_done("app1", Info(), 100.01)  # type: ignore[arg-type]
    series = rollups.series("app1", 300, 10)
    assert series["overall"]["requests"][-1] == 1  # the open window, not yet written


# -- Prometheus -------------------------------------------------------------------------------------


def test_prometheus_exposition_parses(tmp_path: Path) -> None:
    from control_plane.config import Settings
    from control_plane.platform import Platform
    from control_plane.prometheus import exposition

    platform = Platform(Settings(data_dir=tmp_path / "data", router_port=0))
    platform.metrics.set_app("app1", "hello", RouteMatcher(["/items/{item_id}"]))
    platform.metrics.set_instances("app1", "deployment1", ["i1"])
    for status in (200, 200, 500):
        platform.metrics.request_done("app1", Info(status=status, head=Head(path=b"/items/1")), 100.02)  # type: ignore[arg-type]
    platform.metrics.deploy_finished("app1", "success", 2.5)
    families = {f.name: f for f in text_string_to_metric_families(exposition(platform).decode())}
    requests = {
        (s.labels["route"], s.labels["status_class"]): s.value
        for s in families["fastapi_deploy_requests"].samples
        if s.name.endswith("_total")
    }
    assert requests == {("GET /items/{item_id}", "2xx"): 2, ("GET /items/{item_id}", "5xx"): 1}
    revision = {s.labels["revision"] for s in families["fastapi_deploy_requests"].samples}
    assert revision == {"deployment1"[:12]}
    buckets = [
        s for s in families["fastapi_deploy_request_duration_seconds"].samples if s.name.endswith("_bucket")
    ]
    assert {s.labels["app"] for s in buckets} == {"hello"}
    assert [s.value for s in buckets if s.labels["le"] == "+Inf"] == [3.0]
    assert [s.value for s in buckets if s.labels["le"] == "0.01"] == [0.0]
    assert [s.value for s in buckets if s.labels["le"] == "0.025"] == [3.0]
    deploys = families["fastapi_deploy_deployments"].samples
    assert [(s.labels["status"], s.value) for s in deploys if s.name.endswith("_total")] == [("success", 1)]
    assert "fastapi_deploy_trace_spans" in families


# -- OTLP ----------------------------------------------------------------------------------------------


_NOW = time.time_ns()


def _span(**kw: Any) -> SpanData:
    base: dict[str, Any] = {
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "span_id": "00f067aa0ba902b7",
        "parent_span_id": "",
        "name": "GET /",
        "kind": 2,
        "start_ns": _NOW,
        "end_ns": _NOW + 5_000_000,
        "attributes": {"http.route": "/", "http.response.status_code": 200, "ok": True, "ratio": 0.5},
        "resource": {"service.name": "hello", "fastapi_deploy.deployment_id": "d1"},
    }
    base.update(kw)
    return SpanData(**base)


def test_otlp_protobuf_round_trip_and_gzip() -> None:
    spans = [_span(), _span(span_id="1111111111111111", parent_span_id="00f067aa0ba902b7", kind=3)]
    spans[1].events = [{"name": "exception", "time_ns": 5, "attributes": {"exception.type": "ValueError"}}]
    body = encode_protobuf(spans)
    ExportTraceServiceRequest().ParseFromString(body)  # it is what collectors expect
    back = decode(decompress(gzip.compress(body), "gzip"), "application/x-protobuf")
    assert [(s.span_id, s.parent_span_id, s.kind) for s in back] == [
        ("00f067aa0ba902b7", "", 2),
        ("1111111111111111", "00f067aa0ba902b7", 3),
    ]
    assert back[0].attributes == spans[0].attributes and back[0].service == "hello"
    assert back[1].events[0]["attributes"] == {"exception.type": "ValueError"}
    with pytest.raises(OTLPError):
        decode(b"\xff\xff", "application/x-protobuf")
    with pytest.raises(OTLPError):
        decompress(b"not gzip", "gzip")
    with pytest.raises(OTLPError):
        decode(b"{}", "text/plain")


def test_otlp_json_hex_ids_and_enums() -> None:
    doc = {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "svc"}}]},
                "scopeSpans": [
                    {
                        "scope": {"name": "manual"},
                        "spans": [
                            {
                                "traceId": "5B8EFFF798038103D269B633813FC60C",
                                "spanId": "EEE19B7EC3C1B174",
                                "name": "work",
                                "kind": "SPAN_KIND_INTERNAL",
                                "startTimeUnixNano": "1544712660000000000",
                                "endTimeUnixNano": "1544712661000000000",
                                "status": {"code": 2, "message": "boom"},
                                "attributes": [
                                    {"key": "n", "value": {"intValue": "3"}},
                                    {
                                        "key": "tags",
                                        "value": {"arrayValue": {"values": [{"stringValue": "a"}]}},
                                    },
                                ],
                            }
                        ],
                    }
                ],
            }
        ]
    }
    (span,) = decode_json(json.dumps(doc).encode())
    assert span.trace_id == "5b8efff798038103d269b633813fc60c" and span.span_id == "eee19b7ec3c1b174"
    assert (span.kind, span.status_code, span.status_message) == (1, 2, "boom")
    assert span.attributes == {"n": 3, "tags": ["a"]} and span.service == "svc"
    assert span.duration_ms == 1000.0
    bad = {"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "xyz", "spanId": "1"}]}]}]}
    with pytest.raises(OTLPError):
        decode_json(json.dumps(bad).encode())


# -- the trace pipeline ---------------------------------------------------------------------------


def _trace(n: int) -> bytes:
    return b"%032x" % n


def test_edge_spans_are_kept_for_errors_slow_and_the_ratio(db: Database) -> None:
    traces = Traces(db, sample_ratio=0.0, slow_ms=500)
    traces.edge("app1", Info(head=Head(trace_id=_trace(1))), 100.01, "GET /")  # type: ignore[arg-type]
    traces.edge("app1", Info(head=Head(trace_id=_trace(2)), status=502), 100.01, "GET /")  # type: ignore[arg-type]
    traces.edge("app1", Info(head=Head(trace_id=_trace(3))), 101.0, "GET /")  # type: ignore[arg-type]
    assert [s.trace_id for _, s in traces._pending] == [_trace(2).decode(), _trace(3).decode()]
    assert list(traces._recent) == [_trace(1)]
    everyone = Traces(db, sample_ratio=1.0)
    everyone.edge("app1", Info(head=Head(trace_id=_trace(4))), 100.01, "GET /")  # type: ignore[arg-type]
    assert len(everyone._pending) == 1
    # The instance's spans of trace 1 pull its edge span in: the stored trace has both.
    child = _span(trace_id=_trace(1).decode(), span_id="b" * 16, parent_span_id="a" * 16)
    traces.ingest("app1", [child])
    tree = traces.get(_trace(1).decode(), None)
    assert tree is not None
    assert [(s["depth"], s["service"]) for s in tree["spans"]] == [(0, ROUTER_SERVICE), (1, "hello")]
    listed = traces.list("app1")
    assert {t["trace_id"] for t in listed} == {_trace(n).decode() for n in (1, 2, 3)}
    assert [t["http_status"] for t in traces.list("app1", status="error")] == [502]
    assert [t["trace_id"] for t in traces.list("app1", min_duration_ms=900)] == [_trace(3).decode()]
    assert traces.get(_trace(1).decode(), ["another-app"]) is None  # not the caller's
    edge = tree["spans"][0]["attributes"]
    assert edge["http.route"] == "/" and edge["fastapi_deploy.instance_id"] == "i1"
    assert edge["fastapi_deploy.upstream_ms"] == pytest.approx(9.0, abs=0.5)


def test_a_trace_in_two_batches_is_summarized_from_all_its_spans(db: Database) -> None:
    """A batch's new traces are summarized from the batch; a trace that has a summary already (its
    spans came in two exports) is summarized again from everything stored."""
    traces = Traces(db, sample_ratio=1.0)
    trace_id = "c" * 32
    server = _span(trace_id=trace_id, span_id="1" * 16, end_ns=_NOW + 20_000_000)
    traces.ingest("app1", [server, _span(trace_id="d" * 32, attributes={"http.response.status_code": 503})])
    traces.flush()
    first = {t["trace_id"]: t for t in traces.list("app1")}
    assert first[trace_id]["span_count"] == 1 and first[trace_id]["duration_ms"] == 20.0
    assert first["d" * 32]["error"] and first["d" * 32]["http_status"] == 503
    late = _span(trace_id=trace_id, span_id="2" * 16, parent_span_id="1" * 16, kind=3, status_code=2)
    traces.ingest("app1", [late])
    traces.ingest("app2", [_span(trace_id=trace_id, span_id="3" * 16)])  # the same trace in another app
    traces.flush()
    again = {t["trace_id"]: t for t in traces.list("app1")}[trace_id]
    assert again["span_count"] == 2 and again["error"] and again["duration_ms"] == 20.0
    assert again["name"] == "GET /"  # the server span still speaks for it, not the late client span
    assert [t["span_count"] for t in traces.list("app2")] == [1]


def test_trace_retention_by_age_and_count(db: Database) -> None:
    traces = Traces(db, retention_seconds=3600, max_spans_per_app=3)
    now = time.time_ns()
    old = _span(trace_id="1" * 32, start_ns=now - 2 * 3600 * 10**9, end_ns=now - 2 * 3600 * 10**9 + 1)
    fresh = [
        _span(trace_id=f"{i:032x}", span_id=f"{i:016x}", start_ns=now + i * 10**9, end_ns=now + i * 10**9 + 1)
        for i in range(2, 8)
    ]
    traces.ingest("app1", [old, *fresh])
    traces.flush()  # the first flush applies retention
    kept = {t["trace_id"] for t in traces.list("app1", limit=100)}
    assert kept == {f"{i:032x}" for i in (5, 6, 7)}


# -- the instance's tail sampler (its logic; the e2e tier runs it in real instances) --------------------


@dataclass
class FakeContext:
    trace_id: int


@dataclass
class FakeParent:
    is_remote: bool


@dataclass
class FakeEnum:
    value: int


@dataclass
class FakeStatus:
    status_code: FakeEnum


@dataclass
class FakeSpan:
    trace_id: int
    parent: FakeParent | None
    kind: int = 0
    duration_ns: int = 1_000_000
    error: bool = False
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def context(self) -> FakeContext:
        return FakeContext(self.trace_id)

    @property
    def start_time(self) -> int:
        return 0

    @property
    def end_time(self) -> int:
        return self.duration_ns

    @property
    def status(self) -> FakeStatus:
        return FakeStatus(FakeEnum(2 if self.error else 0))

    def __post_init__(self) -> None:
        self.kind = FakeEnum(self.kind)  # type: ignore[assignment]


class Sink:
    def __init__(self) -> None:
        self.got: list[FakeSpan] = []

    def on_end(self, span: FakeSpan) -> None:
        self.got.append(span)


@dataclass
class FakeServerContext:
    trace_id: int
    span_id: int


def test_server_spans_are_written_as_the_receiver_reads_them() -> None:
    """The exporter writes the platform's server spans itself (not through the SDK's encoder): the
    control plane's decoder reads what the SDK would have written, and the bytes join another request's."""
    resource = FakeResource({"service.name": "hello", "fastapi_deploy.instance_id": "i1"})
    failed = instrument._ServerSpan(
        FakeServerContext(int("4bf92f3577b34da6a3ce929d0e0e4736", 16), 0x1111111111111111),
        0x00F067AA0BA902B7,
        "GET /items/{item_id}",
        _NOW,
        _NOW + 5_000_000,
        {"http.route": "/items/{item_id}", "http.response.status_code": 500, "ok": True, "r": 0.5, "n": -3},
        [("exception", _NOW + 4_000_000, {"exception.type": "KeyError", "exception.message": "ünï"})],
        2,
        "KeyError",
    )
    local = instrument._ServerSpan(FakeServerContext(7, 8), 0, "GET", _NOW, _NOW + 1, {}, [], 0, "")
    fields = instrument._resource_and_scope(resource, "fastapi-deploy.instance")
    other = encode_protobuf([_span()])
    spans = decode(other + instrument.encode_server_spans(*fields, [failed, local]), "application/x-protobuf")
    assert len(spans) == 3 and spans[0] == _span()
    assert spans[1] == SpanData(
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        span_id="1111111111111111",
        parent_span_id="00f067aa0ba902b7",
        name="GET /items/{item_id}",
        kind=2,
        start_ns=_NOW,
        end_ns=_NOW + 5_000_000,
        status_code=2,
        status_message="KeyError",
        attributes={
            "http.route": "/items/{item_id}",
            "http.response.status_code": 500,
            "ok": True,
            "r": 0.5,
            "n": -3,
        },
        events=[
            {
                "name": "exception",
                "time_ns": _NOW + 4_000_000,
                "attributes": {"exception.type": "KeyError", "exception.message": "ünï"},
            }
        ],
        resource={"service.name": "hello", "fastapi_deploy.instance_id": "i1"},
        scope="fastapi-deploy.instance",
    )
    assert (spans[2].trace_id, spans[2].parent_span_id, spans[2].status_code) == (f"{7:032x}", "", 0)
    # The span flags say whether the parent is remote, as the SDK's encoder does (0x100 | 0x200).
    request = ExportTraceServiceRequest()
    request.ParseFromString(instrument.encode_server_spans(*fields, [failed, local]))
    assert [span.flags for span in request.resource_spans[0].scope_spans[0].spans] == [0x300, 0x100]


class _Receiver:
    """A raw HTTP/1.1 receiver on a real socket: records each connection's bodies; answers ``status``;
    after answering a body in ``close_after`` it closes the connection (without saying so in a header,
    like a server's idle timeout firing between two requests)."""

    def __init__(self) -> None:
        self.connections: list[list[bytes]] = []
        self.status = 200
        self.close_after: set[bytes] = set()
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handler(self) -> type[socketserver.StreamRequestHandler]:
        receiver = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                bodies: list[bytes] = []
                receiver.connections.append(bodies)
                while True:
                    head = b""
                    while not head.endswith(b"\r\n\r\n"):
                        line = self.rfile.readline()
                        if not line:
                            return
                        head += line
                    length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
                    bodies.append(self.rfile.read(length))
                    self.wfile.write(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % receiver.status)
                    if bodies[-1] in receiver.close_after:
                        return

        return Handler


def test_the_exporter_keeps_its_connection_and_reconnects() -> None:
    """Spans go out on one kept-alive connection; one the receiver closed while idle is replaced and the
    batch is sent once on the new one; a refusal (non-2xx, nothing listening) is an error, not a retry."""
    receiver = _Receiver()
    receiver.close_after = {b"four"}
    poster = instrument._Poster(receiver.url, "tok")
    try:
        for body in (b"one", b"two", b"three", b"four"):
            poster.post(body)
        assert receiver.connections == [[b"one", b"two", b"three", b"four"]]
        time.sleep(0.05)  # the receiver has closed the connection; the client cannot know yet
        poster.post(b"five")  # on the closed connection first, then once on a new one
        poster.post(b"six")
        assert receiver.connections == [[b"one", b"two", b"three", b"four"], [b"five", b"six"]]
        receiver.status = 500
        with pytest.raises(OSError, match="HTTP 500"):
            poster.post(b"seven")
        assert sum(len(bodies) for bodies in receiver.connections) == 7  # sent once, not retried
    finally:
        poster.close()
        receiver.server.shutdown()
        receiver.server.server_close()
    with pytest.raises(OSError):
        instrument._Poster(receiver.url, "").post(b"eight")  # nothing listening any more
    with pytest.raises(ValueError):
        instrument._Poster("unix:///tmp/x", "")


@dataclass
class FakeResource:
    attributes: dict[str, Any]


def test_tail_sampler_keeps_whole_traces() -> None:
    sink = Sink()
    sampler = instrument.TailSampler(sink, ratio=0.0, slow_ns=500_000_000)
    local = FakeParent(is_remote=False)
    roots: list[str] = []

    def root(name: str) -> Any:
        def make() -> str:
            roots.append(name)
            return name

        return make

    # A fast, fine request: its spans are dropped, and its own span is never even built.
    sampler.on_end(FakeSpan(1, local))
    assert sampler.finish(1, 1_000_000, False, root("fine")) is False
    assert sink.got == [] and roots == []
    # A child failed: the whole trace goes, the request's span built last.
    failing = FakeSpan(2, local, error=True)
    sampler.on_end(failing)
    assert sampler.finish(2, 1_000_000, False, root("child failed"))
    assert sink.got == [failing, "child failed"]
    # A late span of a kept trace follows it; of a dropped one, not.
    late = FakeSpan(2, local)
    sampler.on_end(late)
    sampler.on_end(FakeSpan(1, local))
    assert sink.got[-1] is late and len(sink.got) == 3
    # A 5xx (error) and a slow request: kept.
    assert sampler.finish(3, 1_000, True, root("5xx"))
    assert sampler.finish(4, 600_000_000, False, root("slow"))
    assert roots == ["child failed", "5xx", "slow"]
    # Work outside a request: an SDK span that is its own root decides for its trace.
    background = FakeSpan(5, None, duration_ns=700_000_000)
    sampler.on_end(background)
    assert sink.got[-1] is background
    # The ratio test is the router's: the trace id's low 64 bits against the bound.
    everyone = Sink()
    assert instrument.TailSampler(everyone, ratio=1.0, slow_ns=10**12).finish(6, 1, False, root("ratio"))
    bound = Traces(None, sample_ratio=0.25).bound  # type: ignore[arg-type]
    assert bound == instrument._ratio_bound(0.25)
    assert instrument.sampled_by_ratio(int("0" * 16 + "3fffffffffffffff", 16), bound)
    assert not instrument.sampled_by_ratio(int("f" * 16 + "4000000000000000", 16), bound)
    quarter = instrument.TailSampler(Sink(), ratio=0.25, slow_ns=10**12)  # the sampler's own (inline) test
    assert quarter.finish(int("f" * 16 + "3fffffffffffffff", 16), 1, False, root("in"))
    assert not quarter.finish(int("0" * 16 + "4000000000000000", 16), 1, False, root("out"))
    # The quick way out (no span pending, nothing forced) still remembers the trace as dropped.
    quick = 0x5000_0000_0000_0011  # low 64 bits beyond the quarter's bound
    assert not quarter._pending and not quarter.finish(quick, 1, False, root("quick"))
    quarter.on_end(FakeSpan(quick, local))  # a late span of it: dropped, not held as pending
    assert not quarter._pending and roots[-1] == "in"


def test_recent_decisions_are_bounded() -> None:
    """The sampler's memory of decided traces keeps the last ``size`` to ``2 * size`` keys, False too."""
    recent = instrument._Recent(3)
    for key in range(1, 8):
        recent[key] = key % 2 == 0
    assert [recent.get(key) for key in range(1, 8)] == [None, None, None, True, False, True, False]
    assert recent.pop(4) is True and recent.pop(4) is None and recent.get(4) is None
    assert recent.pop(7) is False


def test_a_block_report_brings_back_the_request_it_stalled() -> None:
    """The loop monitor reports a block after the blocking callback returned, often after the request
    was answered and dropped: forcing its trace exports the request's spans after all."""
    sink = Sink()
    sampler = instrument.TailSampler(sink, ratio=0.0, slow_ns=10**12, block_ns=100_000_000)
    child = FakeSpan(7, FakeParent(False))
    sampler.on_end(child)
    built: list[str] = []

    def root(name: str) -> str:
        built.append(name)
        return name

    # As long as the block at least: held, its span built at once (plain data, not the request's scope).
    assert sampler.finish(7, 150_000_000, False, root, "request span") is False
    assert sink.got == [] and built == ["request span"]
    # Shorter than any block: no block can have stalled it, and nothing of it is built or held.
    assert sampler.finish(9, 99_000_000, False, root, "fast") is False
    assert built == ["request span"]
    sampler.force(9, "block of 9")  # type: ignore[arg-type]
    assert sink.got == ["block of 9"]
    sink.got.clear()
    sampler.force(7, "block span")  # type: ignore[arg-type]
    assert sink.got == [child, "request span", "block span"]
    late = FakeSpan(7, FakeParent(False))
    sampler.on_end(late)  # the trace is kept from now on
    assert sink.got[-1] is late
    # A block during a request still running: the request is kept when it ends.
    sampler.force(8, "block of 8")  # type: ignore[arg-type]
    assert sampler.finish(8, 1_000, False, lambda: "request of 8")
    assert sink.got[-2:] == ["block of 8", "request of 8"]


def test_the_request_span_is_the_current_context_inside_the_request_only() -> None:
    """ServerSpans attaches no context per request: OpenTelemetry's current context derives from the
    request's ids when asked (by the app, an instrumented library, a worker thread of a sync endpoint),
    what the app attaches inside stays its own, and nothing is left over after the request."""
    import asyncio

    from opentelemetry import context, trace

    sink = Sink()
    telemetry = instrument.Telemetry("http://127.0.0.1:9/v1/traces", "")
    telemetry.sampler = instrument.TailSampler(sink, ratio=1.0, slow_ns=10**12)
    seen: dict[str, Any] = {}

    def ids() -> tuple[int, int]:
        span_context = trace.get_current_span().get_span_context()
        return span_context.trace_id, span_context.span_id

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["first"] = ids()
        seen["once"] = context.get_current() is context.get_current()
        # The app's own span (as a library's would be: made from the current one, attached, detached).
        parent = trace.get_current_span().get_span_context()
        own = trace.NonRecordingSpan(trace.SpanContext(parent.trace_id, 0xABC, False))
        token = context.attach(trace.set_span_in_context(own))
        seen["inside"] = ids()
        context.detach(token)
        seen["after"] = ids()
        seen["thread"] = await asyncio.to_thread(ids)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def request(traceparent: bytes) -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            pass

        scope = {
            "type": "http",
            "method": "GET",
            "path": "/q",
            "headers": [(b"host", b"a.localhost:8000"), (b"traceparent", traceparent)],
            "client": ("127.0.0.1", 1),
        }
        await instrument.ServerSpans(app, telemetry)(scope, receive, send)

    trace_id, parent_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    asyncio.run(request(b"00-%032x-%016x-01" % (trace_id, parent_id)))
    [root] = sink.got
    assert (root.context.trace_id, root.parent_id) == (trace_id, parent_id)
    span_id = root.context.span_id
    assert seen["first"] == seen["after"] == seen["thread"] == (trace_id, span_id) and seen["once"]
    assert seen["inside"] == (trace_id, 0xABC)
    assert root.attributes["server.address"] == "a.localhost" and root.name == "GET"
    # Outside a request: no current span; a malformed traceparent starts a new trace.
    assert not trace.get_current_span().get_span_context().is_valid
    assert getattr(context._RUNTIME_CONTEXT, "request_variable", None) is instrument.CURRENT_SPAN
    hex_id, hex_parent = b"%032x" % trace_id, b"%016x" % parent_id
    for bad in (b"+", b"_", b"g", b" "):  # int(..., 16) takes the first two (and spaces around)
        malformed = b"00-" + bad + hex_id[1:] + b"-" + hex_parent + b"-01"
        assert len(malformed) == 55
        asyncio.run(request(malformed))
        assert sink.got[-1].context.trace_id != trace_id and sink.got[-1].parent_id == 0, malformed


def test_alert_rules_scale_their_windows_with_the_slo() -> None:
    from control_plane import slo as slo_math
    from control_plane.alerting import rules_for

    thirty = slo_math.SLO.availability("a", 0.999)
    assert rules_for(thirty) == slo_math.DEFAULT_RULES
    day = rules_for(slo_math.SLO.availability("a", 0.999, window_s=86400))
    assert [(r.long_window_s, r.short_window_s, r.burn_rate) for r in day[:2]] == [
        (120.0, 10.0, 14.4),
        (720.0, 60.0, 6.0),
    ]
    tiny = rules_for(slo_math.SLO.availability("a", 0.999, window_s=600))
    assert min(r.short_window_s for r in tiny) == 10.0  # never below the rollups' resolution


def test_rollup_totals_cover_the_window_and_the_live_bucket(db: Database) -> None:
    clock = Clock(1_000_020.0)
    m = _metrics(clock)
    rollups = Rollups(db, m, clock=clock)
    for status in (200, 200, 503):
        m.request_done("app1", Info(status=status), 100.01)  # type: ignore[arg-type]
    clock.now += 10
    rollups._unwritten += m.roll()
    rollups.flush()
    m.request_done("app1", Info(status=500), 100.5)  # type: ignore[arg-type]  # still open
    total, errors, hist = rollups.totals("app1", 60)
    assert (total, errors, sum(hist)) == (4, 2, 4)
    clock.now += 120
    assert rollups.totals("app1", 60)[0] == 0  # all of it older than the window
