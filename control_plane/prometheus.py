"""``/metrics``: the platform in Prometheus' exposition format, written by ``prometheus-client``.

A custom collector reads the live aggregates at scrape time (``control_plane/metrics.py``, the fleet,
the router's counters), so requests never pay for the client library. Label cardinality is bounded:
apps by name, routes by template (``runtime/routes.py``), revisions only on the request counter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from control_plane.metrics import BOUNDS, PROMETHEUS_BOUNDS

if TYPE_CHECKING:
    from control_plane.platform import Platform

__all__ = ["CONTENT_TYPE_LATEST", "exposition"]

_STATUS_CLASSES = ("unknown", "1xx", "2xx", "3xx", "4xx", "5xx")  # Cell.statuses: by status // 100
_PROM_INDEXES = [BOUNDS.index(b) for b in PROMETHEUS_BOUNDS]


def _buckets(hist: Sequence[int]) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs over :data:`PROMETHEUS_BOUNDS`, then ``+Inf``."""
    out, seen, at = [], 0, 0
    for bound, index in zip(PROMETHEUS_BOUNDS, _PROM_INDEXES, strict=True):
        while at <= index:
            seen += hist[at]
            at += 1
        out.append((f"{bound:g}", float(seen)))
    out.append(("+Inf", float(sum(hist))))
    return out


class PlatformCollector(Collector):
    def __init__(self, platform: Platform) -> None:
        self.platform = platform

    def collect(self) -> Iterator[Metric]:
        p = self.platform
        metrics = p.metrics
        names = {app_id: info.name or app_id for app_id, info in metrics.apps.items()}

        def name(app_id: str) -> str:
            return names.get(app_id, app_id)

        requests = CounterMetricFamily(
            "fastapi_deploy_requests",
            "Requests through the router, by app, revision, route template and status class.",
            labels=["app", "revision", "route", "status_class"],
        )
        for (app_id, revision, route), counts in metrics.requests.items():
            by_class: dict[str, int] = {}
            for i, n in enumerate(counts):
                if n:
                    by_class[_STATUS_CLASSES[i]] = by_class.get(_STATUS_CLASSES[i], 0) + n
            for status_class, n in by_class.items():
                requests.add_metric([name(app_id), revision[:12], route, status_class], n)
        yield requests

        duration = HistogramMetricFamily(
            "fastapi_deploy_request_duration_seconds",
            "Request latency at the router (queueing included), by app and route template.",
            labels=["app", "route"],
        )
        bytes_in = CounterMetricFamily(
            "fastapi_deploy_request_body_bytes", "Request body bytes from clients.", labels=["app"]
        )
        bytes_out = CounterMetricFamily(
            "fastapi_deploy_response_bytes", "Response bytes from instances.", labels=["app"]
        )
        per_app_in: dict[str, int] = {}
        per_app_out: dict[str, int] = {}
        for (app_id, route), cell in metrics.route_totals().items():
            duration.add_metric([name(app_id), route], _buckets(cell.hist), cell.duration_sum)
            per_app_in[app_id] = per_app_in.get(app_id, 0) + cell.bytes_in
            per_app_out[app_id] = per_app_out.get(app_id, 0) + cell.bytes_out
        for app_id, n in per_app_in.items():
            bytes_in.add_metric([name(app_id)], n)
        for app_id, n in per_app_out.items():
            bytes_out.add_metric([name(app_id)], n)
        yield duration
        yield bytes_in
        yield bytes_out

        queue = HistogramMetricFamily(
            "fastapi_deploy_queue_wait_seconds",
            "Time requests waited in the router's per-app queue for an instance.",
            labels=["app"],
        )
        open_buckets = metrics.open
        for app_id in set(metrics.queue_totals) | set(open_buckets):
            hist = list(metrics.queue_totals.get(app_id, [0] * (len(BOUNDS) + 1)))
            total = metrics.queue_wait_totals.get(app_id, 0.0)
            bucket = open_buckets.get(app_id)
            if bucket is not None:
                hist = [a + b for a, b in zip(hist, bucket.queue_hist, strict=True)]
                total += bucket.queue_wait_sum
            queue.add_metric([name(app_id)], _buckets(hist), total)
        yield queue

        in_flight = GaugeMetricFamily(
            "fastapi_deploy_requests_in_flight", "Requests being served right now.", labels=["app"]
        )
        queued = GaugeMetricFamily(
            "fastapi_deploy_requests_queued", "Requests waiting for an instance right now.", labels=["app"]
        )
        instances = GaugeMetricFamily(
            "fastapi_deploy_instances", "Instances by state.", labels=["app", "state"]
        )
        pool_hits = CounterMetricFamily(
            "fastapi_deploy_pool_hits", "Warm instances promoted into the routing set.", labels=["app"]
        )
        busy = p.router.in_flight()
        waiting = p.router.queued()
        for app_id, live in p.fleet.serving.items():
            in_flight.add_metric([name(app_id)], sum(busy.get(i.id, 0) for i in live.serving))
            queued.add_metric([name(app_id)], waiting.get(app_id, 0))
            for state, n in (
                ("starting", live.starting_serving + live.starting_warm),
                ("warm", len(live.warm)),
                ("serving", len(live.serving)),
            ):
                instances.add_metric([name(app_id), state], n)
        draining: dict[str, int] = {}
        for instance in p.backend.instances():
            if instance.state.value == "draining":
                draining[instance.spec.app_id] = draining.get(instance.spec.app_id, 0) + 1
        for app_id, n in draining.items():
            instances.add_metric([name(app_id), "draining"], n)
        for app_id, n in metrics.pool_hits.items():
            pool_hits.add_metric([name(app_id)], n)
        yield in_flight
        yield queued
        yield instances
        yield pool_hits

        cold = CounterMetricFamily(
            "fastapi_deploy_cold_starts",
            "Requests that arrived while their app had no instance (they waited for one to start).",
            labels=["app"],
        )
        for app_id, stats in p.router.stats.items():
            cold.add_metric([name(app_id)], stats.cold_starts)
        yield cold

        scale = CounterMetricFamily(
            "fastapi_deploy_scale_events",
            "Autoscaler decisions that changed the target.",
            labels=["app", "direction"],
        )
        for (app_id, direction), n in metrics.scale_events.items():
            scale.add_metric([name(app_id), direction], n)
        yield scale

        deploys = CounterMetricFamily(
            "fastapi_deploy_deployments", "Deployments that ended, by outcome.", labels=["app", "status"]
        )
        for (app_id, status), n in metrics.deploys.items():
            deploys.add_metric([name(app_id), status], n)
        yield deploys
        deploy_time = HistogramMetricFamily(
            "fastapi_deploy_deployment_duration_seconds",
            "From the start of the pipeline to the end of the deployment, by outcome.",
            labels=["status"],
        )
        for status, hist in metrics.deploy_durations.items():
            deploy_time.add_metric([status], _buckets(hist), metrics.deploy_duration_sums.get(status, 0.0))
        yield deploy_time

        lag = HistogramMetricFamily(
            "fastapi_deploy_event_loop_lag_seconds",
            "How late each instance's event loop ran its 50 ms heartbeat (blocking code makes it late).",
            labels=["app", "instance"],
        )
        pool_busy = GaugeMetricFamily(
            "fastapi_deploy_threadpool_busy",
            "Threads running sync endpoints right now.",
            labels=["app", "instance"],
        )
        pool_size = GaugeMetricFamily(
            "fastapi_deploy_threadpool_size", "Threads in the pool.", labels=["app", "instance"]
        )
        blocks = CounterMetricFamily(
            "fastapi_deploy_event_loop_blocks",
            "Callbacks that blocked the loop past the threshold.",
            labels=["app", "instance"],
        )
        for (app_id, instance_id), (_, reading) in metrics.loops.items():
            labels = [name(app_id), instance_id]
            cumulative, running = [], 0
            for bound, count in zip([*reading.bounds_ms, None], reading.counts, strict=True):
                running += count
                cumulative.append(("+Inf" if bound is None else f"{bound / 1000:g}", float(running)))
            lag.add_metric(labels, cumulative, reading.sum_ms / 1000)
            if "threadpool.busy" in reading.gauges:
                pool_busy.add_metric(labels, reading.gauges["threadpool.busy"])
            if "threadpool.size" in reading.gauges:
                pool_size.add_metric(labels, reading.gauges["threadpool.size"])
            blocks.add_metric(labels, reading.gauges.get("event_loop.blocks", 0))
        yield lag
        yield pool_busy
        yield pool_size
        yield blocks

        yield from p.traces.prometheus()


def exposition(platform: Platform) -> bytes:
    """The whole exposition, from a registry of our own (the process-global one stays untouched)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PlatformCollector(platform))
    return generate_latest(registry)
