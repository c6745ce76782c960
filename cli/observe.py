"""``metrics APP``, ``traces APP`` and ``trace ID``: an app's numbers, its kept traces, one waterfall.

All three read the observability API (``/apps/{id}/metrics``, ``/apps/{id}/traces``, ``/traces/{id}``);
``--json`` prints the API's answer unchanged.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.text import Text

from cli.errors import CLIError
from cli.output import JsonOption, Output
from cli.resolve import AppArgument, resolve_app
from cli.session import use

app = typer.Typer()

RANGES = ("5m", "15m", "1h", "6h", "24h", "7d")
_BARS = " ▁▂▃▄▅▆▇█"
_WATERFALL_WIDTH = 40


def sparkline(values: list[float | None]) -> str:
    """One character per point, scaled to the largest value; blanks where there is no value."""
    present = [v for v in values if v is not None]
    top = max(present, default=0.0)
    if top <= 0:
        return "".join(" " if v is None else _BARS[1] for v in values)
    return "".join(" " if v is None else _BARS[max(1, round(v / top * (len(_BARS) - 1)))] for v in values)


def _last(values: list[Any]) -> Any:
    for value in reversed(values):
        if value is not None:
            return value
    return None


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}{unit}" if abs(value) < 1000 else f"{value:,.0f}{unit}"
    return f"{value}{unit}"


@app.command()
def metrics(
    ctx: typer.Context,
    app_ref: AppArgument,
    range_: Annotated[str, typer.Option("--range", help="How far back: " + ", ".join(RANGES))] = "1h",
    step: Annotated[str | None, typer.Option("--step", help="Seconds per point, e.g. 10s, 1m")] = None,
    route: Annotated[
        str | None, typer.Option("--route", help='One route, e.g. "GET /items/{item_id}"')
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Requests/s, errors, latency percentiles and instances over time, overall and per route."""
    if range_ not in RANGES:
        raise typer.BadParameter(f"use one of: {', '.join(RANGES)}", param_hint="--range")
    session = use(ctx, json_output)
    client, out = session.client, session.output
    found = resolve_app(client, app_ref)
    params: dict[str, Any] = {"range": range_}
    if step:
        params["step"] = step
    if route:
        params["route"] = route
    result: dict[str, Any] = client.get(f"/apps/{found['id']}/metrics", params=params)
    if out.json_mode:
        out.emit(result)
        return
    render_metrics(out, str(found.get("slug", app_ref)), range_, result)


def render_metrics(out: Output, name: str, range_: str, m: dict[str, Any]) -> None:
    overall = m["overall"]
    total = sum(overall["requests"])
    errors = sum(
        round((rate or 0) * n) for rate, n in zip(overall["error_rate"], overall["requests"], strict=True)
    )
    out.say(Text.assemble((f"{name}", "bold"), f" over the last {range_}, {m['step']}s a point"))
    out.say(f"{total} requests, {errors} server errors" + (f" ({errors / total:.2%})" if total else ""))
    rows = [
        ("requests/s", overall["rps"], ""),
        ("error rate", [None if v is None else v * 100 for v in overall["error_rate"]], "%"),
        ("p50", overall["p50_ms"], " ms"),
        ("p95", overall["p95_ms"], " ms"),
        ("p99", overall["p99_ms"], " ms"),
        ("instances", overall["instances"], ""),
        ("concurrency", overall["concurrency_max"], ""),
    ]
    out.table(
        ["SERIES", "NOW", "MAX", "OVER TIME"],
        [
            [
                label,
                _fmt(_last(values), unit),
                _fmt(max((v for v in values if v is not None), default=None), unit),
                sparkline(values),
            ]
            for label, values, unit in rows
        ],
    )
    if m["routes"]:
        out.say()
        out.table(
            ["ROUTE", "REQUESTS", "ERRORS", "P50", "P99"],
            [
                [
                    r["route"],
                    str(r["requests"]),
                    str(r["errors"]),
                    _fmt(_last(r["series"]["p50_ms"]), " ms"),
                    _fmt(max((v for v in r["series"]["p99_ms"] if v is not None), default=None), " ms"),
                ]
                for r in m["routes"]
            ],
        )


@app.command()
def traces(
    ctx: typer.Context,
    app_ref: AppArgument,
    slow: Annotated[
        bool, typer.Option("--slow", help="Only slow traces (at least the platform's slow threshold).")
    ] = False,
    min_ms: Annotated[
        float | None, typer.Option("--min-ms", help="Only traces at least this slow (ms).")
    ] = None,
    errors: Annotated[bool, typer.Option("--errors", help="Only traces with an error.")] = False,
    route: Annotated[
        str | None, typer.Option("--route", help="A route template, e.g. /items/{item_id}")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=500)] = 20,
    json_output: JsonOption = False,
) -> None:
    """The app's kept traces, newest first (every error and slow request, a sample of the rest)."""
    session = use(ctx, json_output)
    client, out = session.client, session.output
    app_id = str(resolve_app(client, app_ref)["id"])
    params: dict[str, Any] = {"limit": limit}
    if slow:
        params["slow"] = "true"
    if min_ms is not None:
        params["min_duration_ms"] = min_ms
    if errors:
        params["status"] = "error"
    if route:
        params["route"] = route
    result: dict[str, Any] = client.get(f"/apps/{app_id}/traces", params=params)
    if out.json_mode:
        out.emit(result)
        return
    if not result["data"]:
        out.say("No traces kept yet. Every error and slow request is kept, and a sample of the rest.")
        return
    out.table(
        ["STARTED", "DURATION", "STATUS", "REQUEST", "SPANS", "TRACE"],
        [
            [
                str(t["started_at"])[:23].replace("T", " "),
                f"{t['duration_ms']:.1f} ms",
                Text(str(t["http_status"] or "-"), style="red" if t["error"] else ""),
                f"{t['method']} {t['route'] or t['name']}".strip(),
                str(t["span_count"]),
                str(t["trace_id"]),
            ]
            for t in result["data"]
        ],
    )


@app.command()
def trace(
    ctx: typer.Context,
    trace_id: Annotated[str, typer.Argument(metavar="TRACE_ID", help="32 hex digits (X-Trace-Id).")],
    json_output: JsonOption = False,
) -> None:
    """One trace as a text waterfall: every span, indented by parent, with its timing."""
    if len(trace_id) != 32 or any(c not in "0123456789abcdefABCDEF" for c in trace_id):
        raise CLIError(
            "Invalid trace id", f"{trace_id!r} is not 32 hex digits.", hint="Copy it from X-Trace-Id."
        )
    session = use(ctx, json_output)
    client, out = session.client, session.output
    result: dict[str, Any] = client.get(f"/traces/{trace_id.lower()}")
    if out.json_mode:
        out.emit(result)
        return
    render_waterfall(out, result)


def render_waterfall(out: Output, t: dict[str, Any]) -> None:
    total = max(float(t["duration_ms"]), 0.001)
    out.say(
        Text.assemble(
            ("trace ", "dim"),
            (str(t["trace_id"]), "bold"),
            f"  {t['duration_ms']:.2f} ms, {t['span_count']} spans",
            (" (error)", "red") if t.get("error") else "",
        )
    )
    rows: list[list[str | Text]] = []
    for span in t["spans"]:
        start = round(float(span["offset_ms"]) / total * _WATERFALL_WIDTH)
        width = max(1, round(float(span["duration_ms"]) / total * _WATERFALL_WIDTH))
        start = min(start, _WATERFALL_WIDTH - 1)
        bar = " " * start + "█" * min(width, _WATERFALL_WIDTH - start)
        rows.append(
            [
                Text("  " * int(span["depth"]) + str(span["name"])),
                str(span["service"]),
                f"{span['offset_ms']:.1f}",
                f"{span['duration_ms']:.2f}",
                Text(bar.ljust(_WATERFALL_WIDTH), style="red" if span["status"] == "error" else "cyan"),
            ]
        )
    out.table(["SPAN", "SERVICE", "AT MS", "MS", "WATERFALL"], rows)
