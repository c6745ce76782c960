"""What several pages show about an app: its header (status, URL, team, tabs, alerts firing) and its
instances."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlmodel import Session, col, func, select

from control_plane.api.apps import render_app
from control_plane.models import Alert, App, Deployment, Team
from control_plane.permissions import Action
from control_plane.platform import Platform
from dashboard import format as fmt
from dashboard.web import Visitor

TABS = (
    ("overview", "Overview", ""),
    ("deployments", "Deployments", "/deployments"),
    ("metrics", "Metrics", "/metrics"),
    ("traces", "Traces", "/traces"),
    ("logs", "Logs", "/logs"),
    ("insights", "Insights", "/insights"),
    ("alerts", "Alerts", "/alerts"),
    ("settings", "Settings", "/settings"),
)


def instance_rows(session: Session, app_out: dict[str, Any]) -> list[dict[str, Any]]:
    """The app's live instances as the instances table shows them (also the live endpoint's JSON)."""
    instances = app_out["instances"]
    ids = {i["deployment_id"] for i in instances}
    slugs = dict(
        session.exec(select(Deployment.id, Deployment.slug).where(col(Deployment.id).in_(list(ids)))).all()
    )
    return [
        {
            "id": i["id"],
            "state": i["state"],
            "tone": fmt.tone(i["state"]),
            "deployment_id": i["deployment_id"],
            "deployment_slug": slugs.get(i["deployment_id"], fmt.short(i["deployment_id"])),
            "current": i["deployment_id"] == app_out["current_deployment_id"],
            "started_at": i["started_at"],
            "started_ago": fmt.ago(i["started_at"]),
            "in_flight": i["in_flight"],
            "pid": i["pid"],
            "port": i["port"],
            "oom": i["oom"],
            "exit_code": i["exit_code"],
        }
        for i in sorted(instances, key=lambda i: (i["state"] != "serving", i["started_at"]))
    ]


def firing_counts(session: Session, who: Visitor, apps: Iterable[App]) -> dict[str, int]:
    """How many alerts fire per app, for the apps whose alerts the visitor may see (``app:monitor``,
    as ``GET /apps/{id}/alerts``): one query for a whole apps table."""
    ids = [a.id for a in apps if who.can(Action.APP_MONITOR, a.team_id)]
    if not ids:
        return {}
    rows = session.exec(
        select(Alert.app_id, func.count())
        .where(col(Alert.app_id).in_(ids), Alert.status == "firing")
        .group_by(col(Alert.app_id))
    ).all()
    return {app_id: int(n) for app_id, n in rows}


def app_header(platform: Platform, session: Session, who: Visitor, app: App, tab: str) -> dict[str, Any]:
    """The context of ``app/_header.html``: the app as the API shows it, its team and current revision."""
    out = render_app(platform, session, app)
    team = session.get(Team, app.team_id)
    current = session.get(Deployment, app.current_deployment_id) if app.current_deployment_id else None
    return {
        "app": app,
        "app_out": out,
        "team": team,
        "current": current,
        "tab": tab,
        "tabs": TABS,
        "firing": firing_counts(session, who, [app]).get(app.id, 0),
        "role": who.role(app.team_id),
        "section": "apps",
        "base": f"/dashboard/apps/{app.slug}",
    }
