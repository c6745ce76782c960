"""``slo APP``, ``alerts APP`` and ``webhooks APP``: objectives, what fired, and where alerts go."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.text import Text

from cli.output import JsonOption
from cli.resolve import AppArgument, resolve_app
from cli.session import use

app = typer.Typer()


@app.command()
def slo(
    ctx: typer.Context,
    app_ref: AppArgument,
    availability: Annotated[
        float | None, typer.Option("--availability", help="Add: this % of requests must not fail (99.9).")
    ] = None,
    latency: Annotated[
        float | None, typer.Option("--latency", help="Add: requests must be answered within this many ms.")
    ] = None,
    quantile: Annotated[
        float, typer.Option("--quantile", help="With --latency: this % of them (99 means p99).")
    ] = 99.0,
    window_days: Annotated[float, typer.Option("--window-days", help="The SLO's window.")] = 30.0,
    name: Annotated[str | None, typer.Option("--name", help="Its name (default: from the target).")] = None,
    remove: Annotated[str | None, typer.Option("--remove", help="Delete the SLO with this id.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Show an app's SLOs and their error budgets, add one, or remove one."""
    session = use(ctx, json_output)
    client, out = session.client, session.output
    app_id = str(resolve_app(client, app_ref)["id"])
    if remove:
        client.delete(f"/apps/{app_id}/slos/{remove}")
    for kind, value in (("availability", availability), ("latency", latency)):
        if value is None:
            continue
        target = value / 100 if kind == "availability" else quantile / 100
        body: dict[str, Any] = {
            "kind": kind,
            "target": target,
            "window_days": window_days,
            "name": name
            or (f"availability {value:g}%" if kind == "availability" else f"p{quantile:g} ≤ {value:g} ms"),
        }
        if kind == "latency":
            body["threshold_ms"] = value
        client.post(f"/apps/{app_id}/slos", json=body)
    result: dict[str, Any] = client.get(f"/apps/{app_id}/slos")
    if out.json_mode:
        out.emit(result)
        return
    if not result["data"]:
        out.say("No SLOs yet: `fastapi-deploy slo APP --availability 99.9` adds one.")
        return
    out.table(
        ["ID", "SLO", "GOOD", "BUDGET LEFT", "ALERT"],
        [
            [
                str(s["id"])[:8],
                f"{s['name']} over {s['window_days']:g} d",
                "-" if s["good_ratio"] is None else f"{s['good_ratio']:.3%}",
                f"{max(s['budget_remaining'], 0):.1%}",
                Text(s["alert"]["status"], style="red" if s["alert"]["status"] == "firing" else "green"),
            ]
            for s in result["data"]
        ],
    )


@app.command()
def alerts(
    ctx: typer.Context,
    app_ref: AppArgument,
    firing: Annotated[bool, typer.Option("--firing", help="Only alerts still firing.")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, max=500)] = 20,
    json_output: JsonOption = False,
) -> None:
    """What fired for an app: SLO burn rates, crash loops, OOM kills, failed deploys."""
    session = use(ctx, json_output)
    client, out = session.client, session.output
    app_id = str(resolve_app(client, app_ref)["id"])
    params: dict[str, Any] = {"limit": limit}
    if firing:
        params["status"] = "firing"
    result: dict[str, Any] = client.get(f"/apps/{app_id}/alerts", params=params)
    if out.json_mode:
        out.emit(result)
        return
    if not result["data"]:
        out.say("No alerts.")
        return
    out.table(
        ["STARTED", "KIND", "STATUS", "MESSAGE"],
        [
            [
                str(a["started_at"])[:19].replace("T", " "),
                f"{a['kind']} ({a['severity']})",
                Text(a["status"], style="red" if a["status"] == "firing" else "green"),
                str(a["message"]),
            ]
            for a in result["data"]
        ],
    )


@app.command()
def webhooks(
    ctx: typer.Context,
    app_ref: AppArgument,
    add: Annotated[str | None, typer.Option("--add", help="Send the app's alerts to this URL.")] = None,
    slack: Annotated[bool, typer.Option("--slack", help="With --add: a Slack incoming webhook.")] = False,
    remove: Annotated[str | None, typer.Option("--remove", help="Delete the webhook with this id.")] = None,
    test: Annotated[str | None, typer.Option("--test", help="Send a test message to this webhook.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Where an app's alerts go: list, add (its signing secret is printed once), remove, test."""
    session = use(ctx, json_output)
    client, out = session.client, session.output
    app_id = str(resolve_app(client, app_ref)["id"])
    if add:
        created = client.post(
            f"/apps/{app_id}/webhooks", json={"url": add, "kind": "slack" if slack else "json"}
        )
        if out.json_mode:
            out.emit(created)
            return
        out.say(f"Added webhook {created['id']} ({created['kind']}).")
        if created["kind"] == "json":
            out.say(f"Signing secret (shown once): {created['secret']}")
        return
    if remove:
        client.delete(f"/apps/{app_id}/webhooks/{remove}")
    if test:
        answer = client.post(f"/apps/{app_id}/webhooks/{test}/test")
        if out.json_mode:
            out.emit(answer)
            return
        out.say(
            f"Sent: {answer['status'] or 'no answer'}"
            + (f" ({answer['error']})" if answer.get("error") else "")
        )
        return
    result: dict[str, Any] = client.get(f"/apps/{app_id}/webhooks")
    if out.json_mode:
        out.emit(result)
        return
    out.table(["ID", "KIND", "URL"], [[str(h["id"]), str(h["kind"]), str(h["url"])] for h in result["data"]])
