"""``apps``, ``status APP`` and ``delete APP``: what is deployed, and removing it."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.text import Text

from cli import statuses
from cli.output import JsonOption, Output
from cli.resolve import AppArgument, iter_apps, resolve_app
from cli.session import use

app = typer.Typer()

_APP_STATUS_STYLES = {"serving": "green", "deploying": "yellow", "failed": "red", "stopped": "dim"}
_INSTANCE_STATE_STYLES = {"serving": "green", "warm": "green", "crashed": "red", "stopped": "dim"}


@app.command("apps")
def list_apps(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """List your apps: status, URL, current deployment and instances."""
    session = use(ctx, json_output)
    apps = list(iter_apps(session.client))
    out = session.output
    if out.json_mode:
        out.emit({"data": apps, "count": len(apps)})
        return
    if not apps:
        out.say("No apps yet. Deploy one with `fastapi-deploy push`.")
        return
    out.table(
        ["NAME", "STATUS", "URL", "CURRENT DEPLOYMENT", "INSTANCES"],
        [
            [
                str(a.get("slug") or a.get("name")),
                _styled(a.get("status"), _APP_STATUS_STYLES),
                str(a.get("url") or "-"),
                str(a.get("current_deployment_id") or "-"),
                str(len(a.get("instances") or [])),
            ]
            for a in apps
        ],
    )


@app.command()
def status(ctx: typer.Context, app_ref: AppArgument, json_output: JsonOption = False) -> None:
    """Show an app, its instances and its latest deployment."""
    session = use(ctx, json_output)
    client, out = session.client, session.output
    app_id = str(resolve_app(client, app_ref)["id"])
    details: dict[str, Any] = client.get(f"/apps/{app_id}")
    latest_page = client.get(f"/apps/{app_id}/deployments/", params={"limit": 1, "skip": 0})
    latest = (latest_page.get("data") or [None])[0]
    if out.json_mode:
        out.emit({"app": details, "latest_deployment": latest})
        return
    render_app(out, details, latest)


def render_app(out: Output, details: dict[str, Any], latest: dict[str, Any] | None) -> None:
    rows: list[tuple[str, str | Text]] = [
        ("App", f"{details.get('name')} ({details.get('slug')})"),
        ("Id", str(details.get("id"))),
        ("Status", _styled(details.get("status"), _APP_STATUS_STYLES)),
        ("URL", str(details.get("url") or "-")),
        ("Current deployment", str(details.get("current_deployment_id") or "-")),
    ]
    if latest is not None:
        rows.append(
            (
                "Latest deployment",
                f"{latest.get('id')}  {statuses.label(str(latest.get('status')))}"
                f"  {latest.get('created_at')}",
            )
        )
    for key, value in rows:
        out.say(Text.assemble((f"{key + ':':<20}", "bold"), value))
    instances = details.get("instances") or []
    out.say()
    if not instances:
        out.say("No instances running.")
        return
    out.table(
        ["INSTANCE", "STATE", "DEPLOYMENT", "PORT", "PID", "STARTED"],
        [
            [
                str(i.get("id")),
                _styled(i.get("state"), _INSTANCE_STATE_STYLES),
                str(i.get("deployment_id") or "-"),
                str(i.get("port") or "-"),
                str(i.get("pid") or "-"),
                str(i.get("started_at") or "-"),
            ]
            for i in instances
        ],
    )


@app.command()
def delete(
    ctx: typer.Context,
    app_ref: AppArgument,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Don't ask for confirmation.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Delete an app: stop its instances and remove its route."""
    session = use(ctx, json_output)
    client, out = session.client, session.output
    target = resolve_app(client, app_ref)
    slug = str(target.get("slug"))
    if not (yes or out.json_mode):
        typer.confirm(
            f"Delete app {slug} ({target['id']})? Its instances stop and its URL goes away.", abort=True
        )
    client.delete(f"/apps/{target['id']}")
    out.emit({"deleted": True, "app_id": target["id"], "app": slug})
    out.say(f"Deleted app {slug}.")


def _styled(value: object, styles: dict[str, str]) -> Text:
    text = str(value or "-")
    return Text(text, style=styles.get(text, ""))
