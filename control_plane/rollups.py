"""Metric rollups in the database: what the dashboard charts without a Prometheus.

Every :data:`~control_plane.metrics.RESOLUTION` seconds the live buckets close (``Metrics.roll``) and are
written as ``resolution=10`` rows, one per app (``route=""``) and one per route; once a minute has passed,
its fine rows are merged into ``resolution=60`` rows. Fine rows are kept ``fine_retention`` (1 h), coarse
rows ``coarse_retention`` (7 d). Writes merge into a row that is already there (a restart within a
window adds to it instead of failing), so a crash loses at most the window that was open.

:meth:`Rollups.series` answers ``GET /apps/{id}/metrics``: per step, requests/s, error rate, p50/p95/p99,
instances, concurrency, queueing, overall and per route, from the database plus the windows still in
memory (the open one included: the newest point is live).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import col, delete, select

from control_plane.db import Database
from control_plane.metrics import BOUNDS, RESOLUTION, Bucket, Metrics, quantile
from control_plane.models import MetricPoint

log = logging.getLogger("fastapi_deploy.rollups")

COARSE = 60
MAX_POINTS = 2000
RANGES = {"5m": 300, "15m": 900, "1h": 3600, "6h": 6 * 3600, "24h": 86400, "7d": 7 * 86400}
DEFAULT_STEPS = {300: 10, 900: 10, 3600: 10, 6 * 3600: 60, 86400: 300, 7 * 86400: 1800}
TOP_ROUTES = 20


def encode_hist(hist: Sequence[int]) -> str:
    return ",".join(f"{i}:{n}" for i, n in enumerate(hist) if n)


def decode_hist(text: str) -> list[int]:
    hist = [0] * (len(BOUNDS) + 1)
    for part in text.split(",") if text else ():
        i, _, n = part.partition(":")
        if i.isdigit() and n.isdigit() and int(i) < len(hist):
            hist[int(i)] += int(n)
    return hist


def _rows(app_id: str, bucket: Bucket, resolution: int) -> list[MetricPoint]:
    overall = bucket.overall()
    rows = [
        MetricPoint(
            app_id=app_id,
            resolution=resolution,
            ts=bucket.start,
            route="",
            requests=overall.requests,
            errors=overall.errors,
            client_errors=overall.client_errors,
            duration_sum=overall.duration_sum,
            hist=encode_hist(overall.hist),
            bytes_in=overall.bytes_in,
            bytes_out=overall.bytes_out,
            queued=bucket.queued,
            queue_wait_sum=bucket.queue_wait_sum,
            cold_starts=bucket.cold_starts,
            concurrency_max=bucket.concurrency_max,
            concurrency_avg=bucket.concurrency_avg,
            serving=bucket.serving,
            warm=bucket.warm,
        )
    ]
    for route, cell in bucket.routes.items():
        rows.append(
            MetricPoint(
                app_id=app_id,
                resolution=resolution,
                ts=bucket.start,
                route=route,
                requests=cell.requests,
                errors=cell.errors,
                client_errors=cell.client_errors,
                duration_sum=cell.duration_sum,
                hist=encode_hist(cell.hist),
                bytes_in=cell.bytes_in,
                bytes_out=cell.bytes_out,
            )
        )
    return rows


_ADDED = ("requests", "errors", "client_errors", "duration_sum", "bytes_in", "bytes_out", "queued")
_ADDED_TOO = ("queue_wait_sum", "cold_starts")


def _merge_into(target: MetricPoint, row: MetricPoint, *, same_window: bool) -> None:
    """Add ``row`` to ``target``. Instances and concurrency are gauges: within the same window the later
    reading wins (the average is weighted as two halves), across windows the maximum is kept."""
    for name in (*_ADDED, *_ADDED_TOO):
        setattr(target, name, getattr(target, name) + getattr(row, name))
    merged = zip(decode_hist(target.hist), decode_hist(row.hist), strict=True)
    target.hist = encode_hist([a + b for a, b in merged])
    target.concurrency_max = max(target.concurrency_max, row.concurrency_max)
    if same_window:
        target.concurrency_avg = (target.concurrency_avg + row.concurrency_avg) / 2
        target.serving, target.warm = row.serving, row.warm
    else:
        target.serving = max(target.serving, row.serving)
        target.warm = max(target.warm, row.warm)


@dataclass
class _Acc:
    """One step of one series, accumulated from rows."""

    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    duration_sum: float = 0.0
    hist: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS) + 1))
    bytes_in: int = 0
    bytes_out: int = 0
    queued: int = 0
    queue_wait_sum: float = 0.0
    cold_starts: int = 0
    concurrency_max: float = 0.0
    concurrency_weighted: float = 0.0
    windows: int = 0
    serving: int | None = None
    warm: int | None = None

    def add(self, row: MetricPoint, hist: list[int]) -> None:
        self.requests += row.requests
        self.errors += row.errors
        self.client_errors += row.client_errors
        self.duration_sum += row.duration_sum
        for i, n in enumerate(hist):
            if n:
                self.hist[i] += n
        self.bytes_in += row.bytes_in
        self.bytes_out += row.bytes_out
        self.queued += row.queued
        self.queue_wait_sum += row.queue_wait_sum
        self.cold_starts += row.cold_starts
        self.concurrency_max = max(self.concurrency_max, row.concurrency_max)
        self.concurrency_weighted += row.concurrency_avg
        self.windows += 1
        self.serving = max(self.serving or 0, row.serving)
        self.warm = max(self.warm or 0, row.warm)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _series(accs: list[_Acc], step: int, *, app_level: bool) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {
        "requests": [a.requests for a in accs],
        "rps": [round(a.requests / step, 4) for a in accs],
        "error_rate": [round(a.errors / a.requests, 4) if a.requests else None for a in accs],
        "client_error_rate": [round(a.client_errors / a.requests, 4) if a.requests else None for a in accs],
        "latency_avg_ms": [_ms(a.duration_sum / a.requests) if a.requests else None for a in accs],
        "p50_ms": [_ms(quantile(a.hist, 0.50)) for a in accs],
        "p95_ms": [_ms(quantile(a.hist, 0.95)) for a in accs],
        "p99_ms": [_ms(quantile(a.hist, 0.99)) for a in accs],
        "bytes_in": [a.bytes_in for a in accs],
        "bytes_out": [a.bytes_out for a in accs],
    }
    if app_level:
        out["instances"] = [a.serving for a in accs]
        out["warm"] = [a.warm for a in accs]
        out["concurrency_avg"] = [
            round(a.concurrency_weighted / a.windows, 3) if a.windows else None for a in accs
        ]
        out["concurrency_max"] = [round(a.concurrency_max, 3) if a.windows else None for a in accs]
        out["queued"] = [a.queued for a in accs]
        out["queue_wait_avg_ms"] = [_ms(a.queue_wait_sum / a.queued) if a.queued else None for a in accs]
        out["cold_starts"] = [a.cold_starts for a in accs]
    return out


class Rollups:
    """Writes the closed windows and answers series queries. One per control plane."""

    def __init__(
        self,
        db: Database,
        metrics: Metrics,
        *,
        fine_retention: float = 3600.0,
        coarse_retention: float = 7 * 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.metrics = metrics
        self.fine_retention = fine_retention
        self.coarse_retention = coarse_retention
        self.clock = clock
        self._unwritten: list[tuple[str, Bucket]] = []  # closed, not yet in the database
        self._coarse_done = int(clock() // COARSE) * COARSE  # minutes before this are rolled up
        self._last_retention = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="metric-rollups")

    async def stop(self) -> None:
        """Write what is in memory, the open windows too (a restart merges into them)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._unwritten += list(self.metrics.open.items())
        self.metrics.open = {}
        await asyncio.to_thread(self._write_pending)

    async def _run(self) -> None:
        while True:
            now = self.clock()
            await asyncio.sleep(RESOLUTION - now % RESOLUTION + 0.01)
            try:
                self._unwritten += self.metrics.roll()
                await asyncio.to_thread(self.flush)
            except Exception:
                log.exception("writing metric rollups failed")

    def flush(self) -> None:
        """Write closed windows, roll finished minutes up, apply retention (in a worker thread)."""
        self._write_pending()
        now = self.clock()
        minute = int(now // COARSE) * COARSE
        while self._coarse_done < minute - COARSE or (
            self._coarse_done < minute and now - minute >= RESOLUTION
        ):
            self._roll_minute(self._coarse_done)
            self._coarse_done += COARSE
        if now - self._last_retention >= 60:
            self._last_retention = now
            with self.db.session() as s:
                for resolution, keep in ((RESOLUTION, self.fine_retention), (COARSE, self.coarse_retention)):
                    s.exec(
                        delete(MetricPoint).where(
                            col(MetricPoint.resolution) == resolution, col(MetricPoint.ts) < now - keep
                        )
                    )
                s.commit()

    def _write_pending(self) -> None:
        batch, self._unwritten = self._unwritten, []
        rows = [row for app_id, bucket in batch for row in _rows(app_id, bucket, RESOLUTION)]
        try:
            self._upsert(rows, same_window=True)
        except Exception:
            self._unwritten = batch + self._unwritten  # the next flush tries again
            raise

    def _upsert(self, rows: Iterable[MetricPoint], *, same_window: bool) -> None:
        rows = list(rows)
        if not rows:
            return
        with self.db.session() as s:
            for row in rows:
                existing = s.get(MetricPoint, (row.app_id, row.resolution, row.ts, row.route))
                if existing is None:
                    s.add(row)
                else:
                    _merge_into(existing, row, same_window=same_window)
                    s.add(existing)
            s.commit()

    def _roll_minute(self, start: int) -> None:
        with self.db.session() as s:
            fine = s.exec(
                select(MetricPoint).where(
                    MetricPoint.resolution == RESOLUTION,
                    col(MetricPoint.ts) >= start,
                    col(MetricPoint.ts) < start + COARSE,
                )
            ).all()
            merged: dict[tuple[str, str], MetricPoint] = {}
            for row in sorted(fine, key=lambda r: r.ts):
                key = (row.app_id, row.route)
                target = merged.get(key)
                if target is None:
                    merged[key] = MetricPoint(**{**row.model_dump(), "resolution": COARSE, "ts": start})
                else:
                    _merge_into(target, row, same_window=False)
                    target.concurrency_avg += row.concurrency_avg  # summed, divided below
            for key, target in merged.items():
                windows = sum(1 for r in fine if (r.app_id, r.route) == key)
                target.concurrency_avg = target.concurrency_avg / windows if windows else 0.0
        self._upsert(merged.values(), same_window=False)

    # -- queries ---------------------------------------------------------------------------------

    def series(
        self, app_id: str, range_s: int, step: int | None = None, route: str | None = None
    ) -> dict[str, Any]:
        """The app's series over the last ``range_s`` seconds, ``step`` seconds a point (rounded up to
        the resolution used: 10 s within the fine retention, else 60 s). Raises ``ValueError``."""
        step = step or DEFAULT_STEPS.get(range_s) or max(RESOLUTION, range_s // 300)
        resolution = RESOLUTION if step < COARSE and range_s <= self.fine_retention else COARSE
        step = max(resolution, -(-step // resolution) * resolution)
        points = -(-range_s // step)
        if points > MAX_POINTS:
            raise ValueError(f"{points} points: at most {MAX_POINTS} (use a larger step)")
        end = (int(self.clock() // step) + 1) * step
        start = end - points * step
        # Coarse queries take the minutes not rolled up yet from the fine rows; either takes the windows
        # still in memory (the open one too: the newest point is live).
        sources = [(resolution, start, end)]
        if resolution == COARSE:
            sources = [(COARSE, start, min(end, self._coarse_done)), (RESOLUTION, self._coarse_done, end)]
        rows: list[MetricPoint] = []
        with self.db.session() as s:
            for res, lo, hi in sources:
                if lo >= hi:
                    continue
                query = select(MetricPoint).where(
                    MetricPoint.app_id == app_id,
                    MetricPoint.resolution == res,
                    col(MetricPoint.ts) >= lo,
                    col(MetricPoint.ts) < hi,
                )
                if route is not None:
                    query = query.where(col(MetricPoint.route).in_(["", route]))
                rows += s.exec(query).all()
        written = {r.ts for r in rows if r.route == "" and r.resolution == RESOLUTION}
        live = [b for a, b in self._unwritten if a == app_id]
        bucket = self.metrics.open.get(app_id)
        if bucket is not None:
            live.append(bucket)
        for b in live:
            if b.start not in written:
                rows += [r for r in _rows(app_id, b, RESOLUTION) if route is None or r.route in ("", route)]
        overall = [_Acc() for _ in range(points)]
        by_route: dict[str, list[_Acc]] = {}
        for row in rows:
            k = (row.ts - start) // step
            if not 0 <= k < points:
                continue
            hist = decode_hist(row.hist)
            if row.route == "":
                overall[k].add(row, hist)
            else:
                by_route.setdefault(row.route, [_Acc() for _ in range(points)])[k].add(row, hist)
        ranked = sorted(by_route.items(), key=lambda item: -sum(a.requests for a in item[1]))[:TOP_ROUTES]
        return {
            "app_id": app_id,
            "range": range_s,
            "step": step,
            "resolution": resolution,
            "start": start,
            "end": end,
            "timestamps": [start + k * step for k in range(points)],
            "overall": _series(overall, step, app_level=True),
            "routes": [
                {
                    "route": name,
                    "requests": sum(a.requests for a in accs),
                    "errors": sum(a.errors for a in accs),
                    "series": _series(accs, step, app_level=False),
                }
                for name, accs in ranked
            ],
        }

    def totals(self, app_id: str, window_s: float) -> tuple[int, int, list[int]]:
        """Requests, server errors and the latency histogram of the app's last ``window_s`` seconds
        (to the resolution kept that far back; the windows still in memory included): the SLO counts."""
        now = self.clock()
        start = int((now - window_s) // RESOLUTION) * RESOLUTION
        sources = [(RESOLUTION, start)]
        if window_s > self.fine_retention:
            sources = [(COARSE, start), (RESOLUTION, self._coarse_done)]
        total = errors = 0
        hist = [0] * (len(BOUNDS) + 1)
        seen: set[int] = set()
        with self.db.session() as s:
            for res, lo in sources:
                query = select(MetricPoint).where(
                    MetricPoint.app_id == app_id,
                    MetricPoint.resolution == res,
                    MetricPoint.route == "",
                    col(MetricPoint.ts) >= lo,
                )
                if res == COARSE:
                    query = query.where(col(MetricPoint.ts) < self._coarse_done)
                for row in s.exec(query).all():
                    if res == RESOLUTION:
                        seen.add(row.ts)
                    total += row.requests
                    errors += row.errors
                    for i, n in enumerate(decode_hist(row.hist)):
                        hist[i] += n
        live = [b for a, b in self._unwritten if a == app_id]
        bucket = self.metrics.open.get(app_id)
        if bucket is not None:
            live.append(bucket)
        for b in live:
            if b.start in seen or b.start < start:
                continue
            cell = b.overall()
            total += cell.requests
            errors += cell.errors
            for i, n in enumerate(cell.hist):
                hist[i] += n
        return total, errors, hist

    def delete_app(self, app_id: str) -> None:
        with self.db.session() as s:
            s.exec(delete(MetricPoint).where(col(MetricPoint.app_id) == app_id))
            s.commit()
