"""Request metrics, live: what the router saw, per app and route template, in 10-second buckets.

    router ──on_request_done──> Metrics.request_done ──> the app's open Bucket (a Cell per route)
    fleet tick ──────────────> Metrics.observe_fleet ──> concurrency and instances of the open Bucket
    every 10 s ─────────────> Metrics.roll ──> closed buckets ──> rollups.py (database) and the totals
    /metrics ───────────────> prometheus.py reads the totals and the open buckets

Per request the cost is a cached route lookup, a bisect and a few integer additions on the event loop:
no lock, no allocation beyond the first request of a route in a bucket. Latency is kept as a histogram
over fixed bounds (:data:`BOUNDS`, about 1.25x apart from 0.5 ms to 60 s) so buckets merge exactly and
quantiles are interpolated the way Prometheus' ``histogram_quantile`` does it.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from control_plane.otlp import LoopReading
from runtime.router import RequestInfo
from runtime.routes import RouteMatcher

RESOLUTION = 10
"""Seconds per live bucket (and per row of the fine rollup)."""


def _bounds() -> tuple[float, ...]:
    # 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 7.5 per decade: the 1-2.5-5 steps Prometheus users expect are
    # among them, so /metrics exposes a subset without re-bucketing.
    steps = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.5)
    out = [round(s * 10.0**e, 6) for e in range(-4, 2) for s in steps]
    return tuple(b for b in out if 0.0005 <= b <= 60.0)


BOUNDS: tuple[float, ...] = _bounds()
"""Upper bounds (seconds, inclusive) of the latency histogram; one more slot counts what is above."""
PROMETHEUS_BOUNDS: tuple[float, ...] = tuple(
    b for b in BOUNDS if round(b / 10.0 ** math.floor(math.log10(b)), 6) in (1.0, 2.5, 5.0)
)
"""The subset of :data:`BOUNDS` exposed at ``/metrics`` (1, 2.5, 5 steps)."""


def bucket_of(seconds: float) -> int:
    return bisect.bisect_left(BOUNDS, seconds)


def quantile(hist: Sequence[int], q: float) -> float | None:
    """The ``q``-quantile (0..1) of a histogram over :data:`BOUNDS`, linearly interpolated inside the
    bucket it falls in; None for an empty histogram. Above the last bound: the last bound."""
    total = sum(hist)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(hist):
        if count and seen + count >= rank:
            if i >= len(BOUNDS):
                return BOUNDS[-1]
            lower = BOUNDS[i - 1] if i else 0.0
            return lower + (BOUNDS[i] - lower) * ((rank - seen) / count)
        seen += count
    return BOUNDS[-1]


class Cell:
    """Counts of one route (or one app) over one bucket; merges exactly."""

    __slots__ = ("bytes_in", "bytes_out", "duration_sum", "hist", "requests", "statuses")

    def __init__(self) -> None:
        self.requests = 0
        self.statuses = [0, 0, 0, 0, 0, 0]  # by status // 100; index 5 counts 5xx and broken responses
        self.duration_sum = 0.0
        self.hist = [0] * (len(BOUNDS) + 1)
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def errors(self) -> int:
        """Server errors: 5xx answers and responses cut off mid-way."""
        return self.statuses[5]

    @property
    def client_errors(self) -> int:
        return self.statuses[4]

    def merge(self, other: Cell) -> None:
        self.requests += other.requests
        self.duration_sum += other.duration_sum
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        for i, n in enumerate(other.statuses):
            self.statuses[i] += n
        hist = self.hist
        for i, n in enumerate(other.hist):
            if n:
                hist[i] += n

    @staticmethod
    def merged(cells: Iterable[Cell]) -> Cell:
        out = Cell()
        for cell in cells:
            out.merge(cell)
        return out


@dataclass
class Bucket:
    """One app over one :data:`RESOLUTION` window: a cell per route, plus what the fleet reported."""

    start: int
    """Epoch seconds, a multiple of :data:`RESOLUTION`."""
    routes: dict[str, Cell] = field(default_factory=dict)
    queue_hist: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS) + 1))
    queue_wait_sum: float = 0.0
    queued: int = 0
    cold_starts: int = 0
    concurrency_max: float = 0.0
    concurrency_sum: float = 0.0
    concurrency_samples: int = 0
    serving: int = 0
    warm: int = 0

    @property
    def concurrency_avg(self) -> float:
        return self.concurrency_sum / self.concurrency_samples if self.concurrency_samples else 0.0

    def overall(self) -> Cell:
        return Cell.merged(self.routes.values())


@dataclass
class AppInfo:
    """What labels an app's metrics: its name and the route templates of its serving revision."""

    name: str
    matcher: RouteMatcher = field(default_factory=RouteMatcher)
    revision_of: dict[str, str] = field(default_factory=dict)
    """instance id -> deployment id, for the ``revision`` label."""


_EMPTY = AppInfo(name="")


class Metrics:
    """The live request metrics of every app. Everything runs on the control plane's event loop."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.apps: dict[str, AppInfo] = {}
        self.open: dict[str, Bucket] = {}
        self._start = self._window(clock())
        # Since the start of this process, for /metrics: requests by (app, revision, route) and status
        # class, counted per request; latency, bytes by (app, route), folded in as buckets close.
        self.requests: dict[tuple[str, str, str], list[int]] = {}
        self.totals: dict[tuple[str, str], Cell] = {}
        self.queue_totals: dict[str, list[int]] = {}
        self.queue_wait_totals: dict[str, float] = {}
        self.deploys: dict[tuple[str, str], int] = {}
        self.deploy_durations: dict[str, list[int]] = {}
        self.deploy_duration_sums: dict[str, float] = {}
        self.scale_events: dict[tuple[str, str], int] = {}
        self.pool_hits: dict[str, int] = {}
        # (app, instance) -> the instance's latest event-loop reading and when it came (clock seconds).
        self.loops: dict[tuple[str, str], tuple[float, LoopReading]] = {}

    @staticmethod
    def _window(now: float) -> int:
        return int(now // RESOLUTION) * RESOLUTION

    # -- what labels an app ----------------------------------------------------------------------

    def set_app(self, app_id: str, name: str, matcher: RouteMatcher | None = None) -> None:
        info = self.apps.get(app_id)
        if info is None:
            self.apps[app_id] = AppInfo(name=name, matcher=matcher or RouteMatcher())
            return
        info.name = name
        if matcher is not None:
            info.matcher = matcher

    def set_instances(self, app_id: str, deployment_id: str, instance_ids: Iterable[str]) -> None:
        """The instances now routed for the app's revision ``deployment_id`` (the ``revision`` label)."""
        info = self.apps.get(app_id)
        if info is None:
            info = self.apps[app_id] = AppInfo(name="")
        if len(info.revision_of) > 10_000:  # instances of long-gone revisions
            info.revision_of = {k: v for k, v in info.revision_of.items() if v == deployment_id}
        for instance_id in instance_ids:
            info.revision_of[instance_id] = deployment_id

    def forget_app(self, app_id: str) -> None:
        self.apps.pop(app_id, None)
        self.open.pop(app_id, None)
        for key in [k for k in self.requests if k[0] == app_id]:
            del self.requests[key]
        for route_key in [k for k in self.totals if k[0] == app_id]:
            del self.totals[route_key]

    # -- the hot path ----------------------------------------------------------------------------

    def request_done(self, app_id: str, info: RequestInfo, now: float) -> str:
        """The router's ``on_request_done``; returns the route label (the edge span uses it)."""
        head = info.head
        app = self.apps.get(app_id, _EMPTY)
        route = app.matcher.label(info.method, head.path if head is not None else b"")
        bucket = self.open.get(app_id)
        if bucket is None:
            bucket = self.open[app_id] = Bucket(start=self._start)
        cell = bucket.routes.get(route)
        if cell is None:
            cell = bucket.routes[route] = Cell()
        duration = now - info.started
        status = info.status
        cell.requests += 1
        cell.statuses[5 if info.broken or status >= 500 else status // 100] += 1  # 499 is a 4xx
        cell.duration_sum += duration
        cell.hist[bisect.bisect_left(BOUNDS, duration)] += 1
        cell.bytes_in += info.received
        cell.bytes_out += info.sent
        waited = info.waited
        if waited >= 0:
            bucket.queued += 1
            bucket.queue_wait_sum += waited
            bucket.queue_hist[bisect.bisect_left(BOUNDS, waited)] += 1
            if info.cold:
                bucket.cold_starts += 1
        key = (app_id, app.revision_of.get(info.upstream_id or "", ""), route)
        counts = self.requests.get(key)
        if counts is None:
            counts = self.requests[key] = [0, 0, 0, 0, 0, 0]
        counts[5 if info.broken or status >= 500 else status // 100] += 1
        return route

    def observe_fleet(self, app_id: str, concurrency: float, serving: int, warm: int) -> None:
        """One autoscaler tick's view of an app (in flight + queued, instances)."""
        bucket = self.open.get(app_id)
        if bucket is None:
            bucket = self.open[app_id] = Bucket(start=self._start)
        if concurrency > bucket.concurrency_max:
            bucket.concurrency_max = concurrency
        bucket.concurrency_sum += concurrency
        bucket.concurrency_samples += 1
        bucket.serving, bucket.warm = serving, warm

    def deploy_finished(self, app_id: str, status: str, seconds: float | None) -> None:
        self.deploys[(app_id, status)] = self.deploys.get((app_id, status), 0) + 1
        if seconds is not None:
            hist = self.deploy_durations.setdefault(status, [0] * (len(BOUNDS) + 1))
            hist[bucket_of(seconds)] += 1
            self.deploy_duration_sums[status] = self.deploy_duration_sums.get(status, 0.0) + seconds

    # -- the instances' event loops ------------------------------------------------------------------

    LOOP_STALE = 60.0
    """A reading older than this is of an instance that went away: dropped."""

    def observe_loop(self, app_id: str, reading: LoopReading) -> None:
        now = self.clock()
        self.loops[(app_id, reading.instance_id)] = (now, reading)
        for key in [k for k, (at, _) in self.loops.items() if now - at > self.LOOP_STALE]:
            del self.loops[key]

    def loop_lag_of(self, app_id: str) -> list[dict[str, object]]:
        """Per live instance: lag percentiles since it started, the worst lag, blocks, the thread pool."""
        now = self.clock()
        out: list[dict[str, object]] = []
        for (app, instance_id), (at, r) in sorted(self.loops.items()):
            if app != app_id or now - at > self.LOOP_STALE:
                continue
            out.append(
                {
                    "instance_id": instance_id,
                    "samples": r.count,
                    "lag_p50_ms": _bounded_quantile(r.bounds_ms, r.counts, 0.50),
                    "lag_p99_ms": _bounded_quantile(r.bounds_ms, r.counts, 0.99),
                    "lag_max_ms": round(r.max_ms, 1),
                    "blocks": r.gauges.get("event_loop.blocks", 0),
                    "threadpool_busy": r.gauges.get("threadpool.busy"),
                    "threadpool_size": r.gauges.get("threadpool.size"),
                    "threadpool_saturated_beats": r.gauges.get("threadpool.saturated_beats"),
                    "reported_seconds_ago": round(now - at, 1),
                }
            )
        return out

    def pool_hit(self, app_id: str) -> None:
        self.pool_hits[app_id] = self.pool_hits.get(app_id, 0) + 1

    def scaled(self, app_id: str, direction: str) -> None:
        key = (app_id, direction)
        self.scale_events[key] = self.scale_events.get(key, 0) + 1

    # -- the roll -------------------------------------------------------------------------------

    def roll(self, now: float | None = None) -> list[tuple[str, Bucket]]:
        """Close the open buckets if their window has passed: the closed ones, for the rollups.

        Every app that has an open bucket gets a new one, so the instance counts of an idle app keep
        a row per window; the caller passes apps that serve through :meth:`observe_fleet`."""
        start = self._window(self.clock() if now is None else now)
        if start <= self._start:
            return []
        closed = list(self.open.items())
        self._start = start
        self.open = {}
        for app_id, bucket in closed:
            hist = self.queue_totals.setdefault(app_id, [0] * (len(BOUNDS) + 1))
            for i, n in enumerate(bucket.queue_hist):
                if n:
                    hist[i] += n
            self.queue_wait_totals[app_id] = self.queue_wait_totals.get(app_id, 0.0) + bucket.queue_wait_sum
            for route, cell in bucket.routes.items():
                total = self.totals.get((app_id, route))
                if total is None:
                    total = self.totals[(app_id, route)] = Cell()
                total.merge(cell)
        return closed

    def route_totals(self) -> dict[tuple[str, str], Cell]:
        """Latency and bytes since the start by (app, route), the open buckets included."""
        out: dict[tuple[str, str], Cell] = {}
        for key, cell in self.totals.items():
            out[key] = Cell.merged((cell,))
        for app_id, bucket in self.open.items():
            for route, cell in bucket.routes.items():
                total = out.get((app_id, route))
                if total is None:
                    total = out[(app_id, route)] = Cell()
                total.merge(cell)
        return out


def _bounded_quantile(bounds: list[float], counts: list[int], q: float) -> float | None:
    """A quantile of an explicit-bounds histogram (the instance's own bounds), interpolated."""
    total = sum(counts)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(bounds):
                return round(bounds[-1], 3) if bounds else None
            lower = bounds[i - 1] if i else 0.0
            return round(lower + (bounds[i] - lower) * ((rank - seen) / n), 3)
        seen += n
    return round(bounds[-1], 3) if bounds else None
