"""Traces: the router's edge spans and the instances' spans, sampled at the tail, stored, queried.

    router ──edge(info)──> recent edge spans (every request, ~2 min, bounded)
                              │ kept at once when the edge itself says so (5xx, slow, in the ratio)
                              ▼
    instance ──OTLP──> ingest(app, spans) ──> pending ──writer (0.5 s)──> Span, TraceSummary rows
                              │ pulls the edge spans of those traces out of ``recent``
                              └──> Forwarder (another collector, optional)

An instance exports a trace when one of its spans failed, its request was slow, or the trace id falls in
the sampling ratio (``runtime/instrument.py``); the router applies the same three tests to its edge span.
Because the ratio test is a function of the trace id, both sides agree on the sampled share, and because
any spans that arrive pull their trace's edge spans in, every stored trace has its edge: errors and slow
requests are never sampled away, whichever side saw them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric
from sqlmodel import col, delete, func, select

from control_plane.db import Database
from control_plane.models import Span, TraceSummary
from control_plane.otlp import Forwarder, SpanData
from runtime.router import RequestInfo

log = logging.getLogger("fastapi_deploy.traces")

ROUTER_SERVICE = "fastapi-deploy-router"
FLUSH_SECONDS = 0.5
_RECENT_SECONDS = 120.0
_MAX_RECENT = 50_000
_MAX_PENDING = 100_000
_KIND_SERVER = 2
_KIND_CLIENT = 3


def ratio_bound(ratio: float) -> int:
    return max(0, min(2**64, round(ratio * 2**64)))


def _entry_rank(span: Span) -> int:
    """Which span speaks for a trace in an app's list: the router's edge span, else a server span."""
    if span.service == ROUTER_SERVICE:
        return 0
    if span.kind == _KIND_SERVER:
        return 1
    return 2


class Traces:
    """One per control plane. ``edge`` runs on the event loop per request; the rest off it."""

    def __init__(
        self,
        db: Database,
        *,
        sample_ratio: float = 0.1,
        slow_ms: float = 500.0,
        retention_seconds: float = 3 * 86400.0,
        max_spans_per_app: int = 200_000,
        forwarder: Forwarder | None = None,
    ) -> None:
        self.db = db
        self.sample_ratio = sample_ratio
        self.bound = ratio_bound(sample_ratio)
        self.slow = slow_ms / 1000.0
        self.retention_seconds = retention_seconds
        self.max_spans_per_app = max_spans_per_app
        self.forwarder = forwarder
        # trace id (bytes, hex) -> edge records of that trace not stored yet; insertion-ordered (oldest first)
        self._recent: dict[bytes, list[tuple[Any, ...]]] = {}
        self._pending: list[tuple[str, SpanData]] = []
        self._lock = threading.Lock()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_retention = 0.0
        self.counts = {"edge_seen": 0, "edge_kept": 0, "received": 0, "stored": 0, "dropped": 0}

    # -- the router's edge spans (event loop, every request) ---------------------------------------

    def edge(self, app_id: str, info: RequestInfo, now: float, route: str) -> None:
        head = info.head
        if head is None:
            return
        offset = time.time() - now  # the loop's clock -> wall clock
        record = (
            app_id,
            head.trace_id,
            head.span_id,
            head.parent_span_id,
            info.method,
            head.path,
            route,
            info.status,
            info.started + offset,
            now + offset,
            info.waited,
            (info.attached_at + offset) if info.attached_at else 0.0,
            info.upstream_id,
            info.retried,
            info.broken,
            info.cold,
            info.received,
            info.sent,
            head.request_id,
        )
        self.counts["edge_seen"] += 1
        trace_id = head.trace_id
        keep = (
            info.status >= 500
            or info.broken
            or now - info.started >= self.slow
            or int(trace_id[16:], 16) < self.bound
        )
        if keep:
            self.counts["edge_kept"] += 1
            self._queue([(app_id, _edge_span(record))])
            return
        recent = self._recent
        entry = recent.get(trace_id)
        if entry is None:
            recent[trace_id] = [record]
            if len(recent) > _MAX_RECENT:
                del recent[next(iter(recent))]
        else:
            entry.append(record)
        # Age out from the front, a few at a time (each call pays for at most two).
        for _ in range(2):
            if not recent:
                break
            oldest = next(iter(recent))
            if now + offset - recent[oldest][0][9] < _RECENT_SECONDS:
                break
            del recent[oldest]

    # -- spans from instances (the OTLP receiver) -----------------------------------------------

    def ingest(self, app_id: str, spans: list[SpanData]) -> int:
        """Spans an instance of ``app_id`` sent (already sampled by it). Runs on the event loop."""
        self.counts["received"] += len(spans)
        batch = [(app_id, span) for span in spans]
        for trace_id in {span.trace_id for span in spans}:
            edges = self._recent.pop(trace_id.encode(), None)
            if edges:
                self.counts["edge_kept"] += len(edges)
                batch += [(record[0], _edge_span(record)) for record in edges]
        self._queue(batch)
        return len(spans)

    def _queue(self, batch: list[tuple[str, SpanData]]) -> None:
        with self._lock:
            room = _MAX_PENDING - len(self._pending)
            if room < len(batch):
                self.counts["dropped"] += len(batch) - max(0, room)
                batch = batch[: max(0, room)]
            self._pending += batch
        if self.forwarder is not None and batch:
            self.forwarder.submit([span for _, span in batch])
        if self._wake is not None:
            self._wake.set()

    # -- the writer ------------------------------------------------------------------------------

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._writer(), name="trace-writer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.to_thread(self.flush)

    async def _writer(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), 60)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await asyncio.to_thread(self.flush)
            except Exception:
                log.exception("writing spans failed")
            await asyncio.sleep(FLUSH_SECONDS)

    def flush(self) -> None:
        """Write pending spans and their traces' summaries; apply retention now and then."""
        with self._lock:
            batch, self._pending = self._pending, []
        if batch:
            rows = [_row(app_id, span) for app_id, span in batch]
            traces: dict[tuple[str, str], list[Span]] = {}
            for row in rows:
                traces.setdefault((row.trace_id, row.app_id), []).append(row)
            with self.db.session() as s:
                s.add_all(rows)
                s.flush()
                # A trace's spans mostly arrive in one batch (an instance's, with the edge spans kept
                # for it): its summary is made from the batch. Only a trace summarized before is read
                # back whole (a query per trace was ~2 ms of this thread's CPU, with the GIL: under a
                # surge of sampled traces the event loop, and with it the API, starved for seconds).
                known = self._summarized(s, traces)
                for (trace_id, app_id), spans in traces.items():
                    if (trace_id, app_id) in known:
                        self._summarize(s, trace_id, app_id)
                    else:
                        s.add(_summary(trace_id, app_id, spans, None))
                s.commit()
            self.counts["stored"] += len(rows)
        now = time.time()
        if now - self._last_retention >= 300:
            self._last_retention = now
            self._retain(now)

    @staticmethod
    def _summarized(s: Any, traces: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of ``traces`` (trace id, app id) have a summary already: one query per 500 ids."""
        wanted = set(traces)
        ids = sorted({trace_id for trace_id, _ in wanted})
        known: set[tuple[str, str]] = set()
        for start in range(0, len(ids), 500):
            query = select(TraceSummary.trace_id, TraceSummary.app_id).where(
                col(TraceSummary.trace_id).in_(ids[start : start + 500])
            )
            known.update(key for key in s.exec(query).all() if key in wanted)
        return known

    @staticmethod
    def _summarize(s: Any, trace_id: str, app_id: str) -> None:
        """The summary of a trace made again from all its stored spans."""
        spans = s.exec(select(Span).where(Span.trace_id == trace_id, Span.app_id == app_id)).all()
        if spans:
            s.add(_summary(trace_id, app_id, spans, s.get(TraceSummary, (trace_id, app_id))))

    def _retain(self, now: float) -> None:
        cutoff_ns = int((now - self.retention_seconds) * 1e9)
        cutoff = datetime.fromtimestamp(now - self.retention_seconds, UTC)
        with self.db.session() as s:
            s.exec(delete(Span).where(col(Span.start_ns) < cutoff_ns))
            s.exec(delete(TraceSummary).where(col(TraceSummary.started_at) < cutoff))
            counts = s.exec(select(Span.app_id, func.count()).group_by(Span.app_id)).all()
            for app_id, n in counts:
                if n <= self.max_spans_per_app:
                    continue
                edge = s.exec(
                    select(Span.start_ns)
                    .where(Span.app_id == app_id)
                    .order_by(col(Span.start_ns).desc())
                    .offset(self.max_spans_per_app)
                    .limit(1)
                ).first()
                if edge is not None:
                    s.exec(delete(Span).where(col(Span.app_id) == app_id, col(Span.start_ns) <= edge))
                    edge_at = datetime.fromtimestamp(edge / 1e9, UTC)
                    s.exec(
                        delete(TraceSummary).where(
                            col(TraceSummary.app_id) == app_id, col(TraceSummary.started_at) <= edge_at
                        )
                    )
            s.commit()

    def delete_app(self, app_id: str) -> None:
        with self.db.session() as s:
            s.exec(delete(Span).where(col(Span.app_id) == app_id))
            s.exec(delete(TraceSummary).where(col(TraceSummary.app_id) == app_id))
            s.commit()

    # -- queries (worker threads) ------------------------------------------------------------------

    def list(
        self,
        app_id: str,
        *,
        min_duration_ms: float | None = None,
        status: str | None = None,
        route: str | None = None,
        limit: int = 50,
        before: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """The app's newest traces first; ``status`` is ``error`` or ``ok``."""
        self.flush()
        with self.db.session() as s:
            query = select(TraceSummary).where(TraceSummary.app_id == app_id)
            if min_duration_ms is not None:
                query = query.where(col(TraceSummary.duration_ms) >= min_duration_ms)
            if status == "error":
                query = query.where(col(TraceSummary.error).is_(True))
            elif status == "ok":
                query = query.where(col(TraceSummary.error).is_(False))
            if route:
                query = query.where(TraceSummary.route == route)
            if before is not None:
                query = query.where(col(TraceSummary.started_at) < before)
            rows = s.exec(query.order_by(col(TraceSummary.started_at).desc()).limit(limit)).all()
            return [_summary_out(r) for r in rows]

    def get(self, trace_id: str, app_ids: Iterable[str] | None) -> dict[str, Any] | None:
        """The trace as a flat depth-first list (a waterfall), only spans of ``app_ids`` (None: all)."""
        self.flush()
        with self.db.session() as s:
            query = select(Span).where(Span.trace_id == trace_id.lower())
            if app_ids is not None:
                query = query.where(col(Span.app_id).in_(list(app_ids)))
            spans = list(s.exec(query.order_by(col(Span.start_ns))).all())
        if not spans:
            return None
        ids = {sp.span_id for sp in spans}
        children: dict[str, list[Span]] = {}
        roots = []
        for sp in spans:
            if sp.parent_span_id and sp.parent_span_id in ids:
                children.setdefault(sp.parent_span_id, []).append(sp)
            else:
                roots.append(sp)
        start = min(sp.start_ns for sp in spans)
        end = max(sp.end_ns for sp in spans)
        out: list[dict[str, Any]] = []

        def walk(span: Span, depth: int) -> None:
            out.append(_span_out(span, depth, start))
            for child in children.get(span.span_id, []):
                walk(child, depth + 1)

        for root in roots:
            walk(root, 0)
        return {
            "trace_id": trace_id.lower(),
            "start_time": _iso(start),
            "duration_ms": round((end - start) / 1e6, 3),
            "span_count": len(spans),
            "apps": sorted({sp.app_id for sp in spans}),
            "error": any(sp.status_code == 2 for sp in spans),
            "spans": out,
        }

    def prometheus(self) -> Iterator[Metric]:
        spans = CounterMetricFamily(
            "fastapi_deploy_trace_spans",
            "Spans seen by the trace pipeline, by what happened.",
            labels=["outcome"],
        )
        for outcome, n in self.counts.items():
            spans.add_metric([outcome], n)
        yield spans
        if self.forwarder is not None:
            forwarded = CounterMetricFamily(
                "fastapi_deploy_trace_forward_batches",
                "Batches forwarded to the OTLP collector.",
                labels=["outcome"],
            )
            forwarded.add_metric(["sent"], self.forwarder.sent)
            forwarded.add_metric(["failed"], self.forwarder.failed)
            yield forwarded


def _edge_span(record: tuple[Any, ...]) -> SpanData:
    (
        app_id,
        trace_id,
        span_id,
        parent,
        method,
        path,
        route,
        status,
        started,
        ended,
        waited,
        attached,
        upstream_id,
        retried,
        broken,
        cold,
        received,
        sent,
        request_id,
    ) = record
    template = route.partition(" ")[2] or route
    attributes: dict[str, Any] = {
        "http.request.method": method.decode("latin-1"),
        "url.path": path.decode("latin-1"),
        "http.route": template,
        "http.response.status_code": status,
        "http.request.body.size": received,
        "http.response.size": sent,
        "fastapi_deploy.request_id": request_id.decode("latin-1"),
        "fastapi_deploy.retried": bool(retried),
    }
    if upstream_id:
        attributes["fastapi_deploy.instance_id"] = upstream_id
    if waited >= 0:
        attributes["fastapi_deploy.queue_wait_ms"] = round(waited * 1000, 3)
        attributes["fastapi_deploy.cold_start"] = bool(cold)
    if attached:
        attributes["fastapi_deploy.upstream_ms"] = round((ended - attached) * 1000, 3)
    error = status >= 500 or broken
    return SpanData(
        trace_id=trace_id.decode(),
        span_id=span_id.decode(),
        parent_span_id=parent.decode(),
        name=f"{attributes['http.request.method']} {template}",
        kind=_KIND_SERVER,
        start_ns=int(started * 1e9),
        end_ns=int(ended * 1e9),
        status_code=2 if error else 0,
        status_message="response cut off" if broken else "",
        attributes=attributes,
        resource={"service.name": ROUTER_SERVICE, "fastapi_deploy.app_id": app_id},
        scope="fastapi-deploy.router",
    )


def _summary(trace_id: str, app_id: str, spans: list[Span], summary: TraceSummary | None) -> TraceSummary:
    """``summary`` (or a new one) set from all of a trace's spans in one app."""
    entry = min(spans, key=lambda sp: (_entry_rank(sp), sp.start_ns))
    attrs = json.loads(entry.attributes or "{}")
    status = attrs.get("http.response.status_code", attrs.get("http.status_code", 0))
    if summary is None:
        summary = TraceSummary(trace_id=trace_id, app_id=app_id, started_at=datetime.now(UTC))
    summary.started_at = datetime.fromtimestamp(min(sp.start_ns for sp in spans) / 1e9, UTC)
    summary.duration_ms = round(max(0, entry.end_ns - entry.start_ns) / 1e6, 3)
    summary.name = entry.name
    summary.route = str(attrs.get("http.route", ""))
    summary.method = str(attrs.get("http.request.method", attrs.get("http.method", "")))
    summary.http_status = int(status) if isinstance(status, int) else 0
    summary.error = any(sp.status_code == 2 for sp in spans) or summary.http_status >= 500
    summary.span_count = len(spans)
    return summary


def _row(app_id: str, span: SpanData) -> Span:
    resource = span.resource
    return Span(
        trace_id=span.trace_id,
        span_id=span.span_id,
        parent_span_id=span.parent_span_id,
        app_id=app_id,
        deployment_id=str(resource.get("fastapi_deploy.deployment_id", "")),
        instance_id=str(
            resource.get("fastapi_deploy.instance_id")
            or span.attributes.get("fastapi_deploy.instance_id", "")
        ),
        service=span.service,
        name=span.name[:500],
        kind=span.kind,
        start_ns=span.start_ns,
        end_ns=span.end_ns,
        status_code=span.status_code,
        status_message=span.status_message[:1000],
        attributes=json.dumps(span.attributes, default=str)[:100_000],
        events=json.dumps(span.events, default=str)[:100_000],
    )


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="microseconds")


def _summary_out(row: TraceSummary) -> dict[str, Any]:
    return {
        "trace_id": row.trace_id,
        "app_id": row.app_id,
        "started_at": row.started_at.astimezone(UTC).isoformat(timespec="microseconds"),
        "duration_ms": row.duration_ms,
        "name": row.name,
        "route": row.route,
        "method": row.method,
        "http_status": row.http_status,
        "error": row.error,
        "span_count": row.span_count,
    }


_KIND_NAMES = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


def _span_out(span: Span, depth: int, trace_start: int) -> dict[str, Any]:
    return {
        "span_id": span.span_id,
        "parent_span_id": span.parent_span_id or None,
        "depth": depth,
        "name": span.name,
        "service": span.service,
        "app_id": span.app_id,
        "instance_id": span.instance_id or None,
        "kind": _KIND_NAMES.get(span.kind, str(span.kind)),
        "start_time": _iso(span.start_ns),
        "offset_ms": round((span.start_ns - trace_start) / 1e6, 3),
        "duration_ms": round(max(0, span.end_ns - span.start_ns) / 1e6, 3),
        "status": {0: "unset", 1: "ok", 2: "error"}.get(span.status_code, "unset"),
        "status_message": span.status_message or None,
        "attributes": json.loads(span.attributes or "{}"),
        "events": json.loads(span.events or "[]"),
    }
