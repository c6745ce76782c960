"""``scale APP`` (autoscaling settings and what the autoscaler decided) and ``events APP``."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.text import Text

from cli.output import JsonOption, Output
from cli.resolve import AppArgument, resolve_app
from cli.session import use

app = typer.Typer()


@app.command()
def scale(
    ctx: typer.Context,
    app_ref: AppArgument,
    min_instances: Annotated[
        int | None, typer.Option("--min", help="Serving floor (0 allows scale to zero).")
    ] = None,
    max_instances: Annotated[int | None, typer.Option("--max", help="Serving ceiling.")] = None,
    concurrency: Annotated[
        float | None, typer.Option("--concurrency", help="Target in-flight requests per instance.")
    ] = None,
    prewarm: Annotated[
        int | None, typer.Option("--prewarm", help="Warm spares kept booted, not routed.")
    ] = None,
    scale_to_zero_after: Annotated[
        float | None,
        typer.Option(
            "--scale-to-zero-after", help="Seconds without traffic before scaling to zero (with --min 0)."
        ),
    ] = None,
    max_concurrency: Annotated[
        int | None,
        typer.Option(
            "--max-concurrency",
            help="Requests in flight per instance before the router queues the rest (0: no limit).",
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Show or change an app's autoscaling: min, max, target concurrency, pre-warm, scale to zero."""
    session = use(ctx, json_output)
    client, out = session.client, session.output
    app_id = str(resolve_app(client, app_ref)["id"])
    changes = {
        k: v
        for k, v in {
            "min_instances": min_instances,
            "max_instances": max_instances,
            "target_concurrency": concurrency,
            "prewarm": prewarm,
            "scale_to_zero_after": scale_to_zero_after,
            "max_concurrency": max_concurrency,
        }.items()
        if v is not None
    }
    result: dict[str, Any] = (
        client.patch(f"/apps/{app_id}/scaling", json=changes)
        if changes
        else client.get(f"/apps/{app_id}/scaling")
    )
    if out.json_mode:
        out.emit(result)
        return
    render(out, result)


def render(out: Output, s: dict[str, Any]) -> None:
    rows = [
        ("Instances", f"min {s['min_instances']}, max {s['max_instances']}"),
        ("Target concurrency", f"{s['target_concurrency']:g} in-flight requests per instance"),
        ("Pre-warm", f"{s['prewarm']} warm spare(s)"),
        (
            "Max concurrency",
            f"{s['max_concurrency']} per instance, then queued" if s.get("max_concurrency") else "no limit",
        ),
        (
            "Scale to zero",
            f"after {s['scale_to_zero_after']:g}s idle" if s["min_instances"] == 0 else "off (min ≥ 1)",
        ),
    ]
    current = s.get("current")
    if current:
        rows += [
            ("Now", f"{current['serving']} serving, {current['warm']} warm, {current['starting']} starting"),
            ("Decision", str(current.get("reason") or "-")),
            ("Predicted", _predicted(current)),
            ("Pool hits", f"{current['pool_hits']} (cold starts {current['cold_starts']})"),
        ]
    for key, value in rows:
        out.say(Text.assemble((f"{key + ':':<20}", "bold"), value))


def _predicted(current: dict[str, Any]) -> str:
    forecast = current.get("forecast_concurrency")
    if forecast is None:
        return "no history for this time of week yet"
    return f"{forecast:.1f} in flight → {current.get('predicted_instances')} instance(s)"


@app.command()
def events(
    ctx: typer.Context,
    app_ref: AppArgument,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
    kind: Annotated[str | None, typer.Option("--kind", help="instance, scale, deploy or health")] = None,
    json_output: JsonOption = False,
) -> None:
    """Instance state changes and scale decisions, newest first, with their reasons."""
    session = use(ctx, json_output)
    client, out = session.client, session.output
    app_id = str(resolve_app(client, app_ref)["id"])
    params: dict[str, Any] = {"limit": limit}
    if kind:
        params["kind"] = kind
    result: dict[str, Any] = client.get(f"/apps/{app_id}/events", params=params)
    if out.json_mode:
        out.emit(result)
        return
    out.table(
        ["TIME", "KIND", "EVENT"], [[str(e["at"]), str(e["kind"]), str(e["message"])] for e in result["data"]]
    )
