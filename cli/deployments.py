"""``deployments APP`` (history) and ``rollback APP [DEPLOYMENT_ID]``."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.text import Text

from cli import statuses, watch
from cli.output import JsonOption
from cli.resolve import AppArgument, resolve_app
from cli.session import use

app = typer.Typer()


@app.command()
def deployments(
    ctx: typer.Context,
    app_ref: AppArgument,
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, max=1000, help="How many, newest first.")
    ] = 20,
    json_output: JsonOption = False,
) -> None:
    """List an app's deployments: id, status, kind, created, duration."""
    session = use(ctx, json_output)
    client, out = session.client, session.output
    target = resolve_app(client, app_ref)
    page = client.get(f"/apps/{target['id']}/deployments/", params={"limit": limit, "skip": 0})
    rows: list[dict[str, Any]] = page.get("data", [])
    if out.json_mode:
        out.emit({"data": rows, "count": page.get("count", len(rows))})
        return
    if not rows:
        out.say(f"No deployments yet. Deploy with `fastapi-deploy push --app {target['slug']}`.")
        return
    current = target.get("current_deployment_id")
    out.table(
        ["ID", "STATUS", "KIND", "CREATED", "DURATION"],
        [
            [
                Text(f"{d.get('id')} *", style="bold") if d.get("id") == current else str(d.get("id")),
                status_text(str(d.get("status"))),
                str(d.get("kind") or "upload"),
                str(d.get("created_at") or "-"),
                format_duration(d.get("duration_seconds")),
            ]
            for d in rows
        ],
    )
    if current:
        out.say("* serving now", style="dim")


@app.command()
def rollback(
    ctx: typer.Context,
    app_ref: AppArgument,
    deployment_id: Annotated[
        str | None,
        typer.Argument(
            metavar="DEPLOYMENT_ID",
            help="Deployment to go back to (default: the successful one before the current).",
            show_default=False,
        ),
    ] = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Return without waiting for it to serve.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Serve an earlier deployment's build again (no rebuild)."""
    session = use(ctx, json_output)
    client, out = session.client, session.output
    target = resolve_app(client, app_ref)
    slug = str(target["slug"])
    created: dict[str, Any] = client.post(
        f"/apps/{target['id']}/rollback", json={"deployment_id": deployment_id}
    )
    source = created.get("source_deployment_id") or deployment_id or "the previous deployment"
    out.say(f"Rolling back {slug} to {source} (new deployment {created['id']})")
    if no_wait:
        out.emit(watch.result(created, app_slug=slug))
        return
    final = watch.follow(client, out, created, build_log=False)
    watch.report(out, final, app_slug=slug, fallback_url=created.get("url") or target.get("url"))


def status_text(status: str) -> Text:
    style = {statuses.Outcome.SUCCEEDED: "green", statuses.Outcome.PENDING: "yellow"}.get(
        statuses.outcome(status), "red"
    )
    return Text(status, style=style)


def format_duration(seconds: object) -> str:
    """``75.2`` -> ``"1m15s"``; ``None`` -> ``"-"``."""
    if not isinstance(seconds, int | float):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s"
