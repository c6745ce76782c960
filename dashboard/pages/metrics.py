"""An app's metrics: requests/s, error rate, p50/p95/p99 latency, instances and concurrency, over
1 h / 6 h / 24 h / 7 d, for the whole app or one route.

The numbers are ``Rollups.series`` (what ``GET /apps/{id}/metrics`` answers, readable with
``app:monitor``). The page carries the series it charts as a JSON block and the summary and per-route
table as HTML; ``static/charts.js`` draws them with the vendored uPlot and refreshes them from
``metrics.json``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from control_plane.errors import BadRequest
from control_plane.permissions import Action
from control_plane.platform import Platform
from control_plane.rollups import RANGES
from dashboard import format as fmt
from dashboard.pages._common import app_header
from dashboard.web import DashboardRoute, DashDep, Visitor, VisitorDep, app_by_slug, render

router = APIRouter(route_class=DashboardRoute, include_in_schema=False)

CHART_RANGES = ("1h", "6h", "24h", "7d")
REFRESH_SECONDS = {"1h": 10, "6h": 60, "24h": 300, "7d": 900}
_ROUTE_KEYS = ("requests", "rps", "error_rate", "p50_ms", "p95_ms", "p99_ms")
_APP_KEYS = ("instances", "warm", "concurrency_avg", "concurrency_max", "queued")


def _range(value: str) -> str:
    if value not in CHART_RANGES:
        raise BadRequest(
            f"Unknown range {value!r}.", title="Invalid range", hint="Use one of: " + ", ".join(CHART_RANGES)
        )
    return value


def chart_data(series: dict[str, Any], route: str | None) -> dict[str, Any]:
    """What the charts draw: the request series of the app or of ``route``, the app's instances and
    concurrency, on one time axis (epoch seconds)."""
    overall = series["overall"]
    source = overall
    if route:
        match = next((r for r in series["routes"] if r["route"] == route), None)
        empty: list[Any] = [None] * len(series["timestamps"])
        zeros: list[Any] = [0] * len(series["timestamps"])
        source = (
            match["series"]
            if match
            else {k: zeros if k in ("requests", "rps") else empty for k in _ROUTE_KEYS}
        )
    return {
        "timestamps": series["timestamps"],
        "step": series["step"],
        "route": route,
        **{k: source[k] for k in _ROUTE_KEYS},
        **{k: overall[k] for k in _APP_KEYS},
    }


def _last(values: list[Any]) -> Any:
    return next((v for v in reversed(values) if v is not None), None)


def summary(data: dict[str, Any]) -> dict[str, Any]:
    """The figures above the charts, over the whole range."""
    requests = sum(data["requests"])
    errors = sum((r or 0.0) * n for r, n in zip(data["error_rate"], data["requests"], strict=True))
    seconds = data["step"] * len(data["timestamps"]) or 1
    return {
        "requests": requests,
        "rps": requests / seconds,
        "error_rate": errors / requests if requests else None,
        "p50": _last(data["p50_ms"]),
        "p95": _last(data["p95_ms"]),
        "p99": _last(data["p99_ms"]),
        "instances": max((v for v in data["instances"] if v is not None), default=None),
        "concurrency": max((v for v in data["concurrency_max"] if v is not None), default=None),
    }


def _load(platform: Platform, who: Visitor, slug: str, range_: str) -> tuple[Any, dict[str, Any]]:
    with platform.db.session() as s:
        app = app_by_slug(s, who, slug, Action.APP_MONITOR)
    return app, platform.rollups.series(app.id, RANGES[range_], None, None)


@router.get("/dashboard/apps/{app_slug}/metrics")
def metrics_page(
    request: Request, app_slug: str, who: VisitorDep, dash: DashDep, range: str = "1h", route: str = ""
) -> Response:
    platform = dash.platform
    range_ = _range(range)
    app, series = _load(platform, who, app_slug, range_)
    with platform.db.session() as s:
        ctx = app_header(platform, s, who, app, "metrics")
    data = chart_data(series, route or None)
    return render(
        request,
        "app/metrics.html",
        data=data,
        figures=figure_texts(summary(data)),
        routes=series["routes"],
        range=range_,
        ranges=CHART_RANGES,
        route=route,
        refresh=REFRESH_SECONDS[range_],
        **ctx,
    )


@router.get("/dashboard/apps/{app_slug}/metrics.json")
def metrics_json(
    app_slug: str, who: VisitorDep, dash: DashDep, range: str = "1h", route: str = ""
) -> JSONResponse:
    """The charts' data again (the page refreshes every ``REFRESH_SECONDS[range]``)."""
    range_ = _range(range)
    _app, series = _load(dash.platform, who, app_slug, range_)
    data = chart_data(series, route or None)
    return JSONResponse({"data": data, "figures": figure_texts(summary(data))})


def figure_texts(figures: dict[str, Any]) -> dict[str, str]:
    """The figures as the page writes them (the script swaps the text in place)."""
    return {
        "requests": fmt.num(figures["requests"]),
        "rps": fmt.num(figures["rps"]),
        "error_rate": fmt.pct(figures["error_rate"]),
        "p50": fmt.ms(figures["p50"]),
        "p95": fmt.ms(figures["p95"]),
        "p99": fmt.ms(figures["p99"]),
        "instances": fmt.num(figures["instances"]),
        "concurrency": fmt.num(figures["concurrency"]),
    }
