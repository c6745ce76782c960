"""The apps list (every team, or one), the team page with its members, an app's overview page and the
small JSON document its instances table polls."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sqlmodel import Session, col, select

from control_plane import audit, quotas
from control_plane.api import teams as teams_api
from control_plane.api.apps import render_app
from control_plane.api.scaling import scaling_out
from control_plane.errors import BadRequest, Conflict, NotFound
from control_plane.models import App, Deployment, Team
from control_plane.permissions import Action
from control_plane.platform import Platform
from control_plane.security import get_team, team_ids
from control_plane.serializers import deployment_out
from dashboard import format as fmt
from dashboard.pages._common import app_header, firing_counts, instance_rows
from dashboard.web import (
    DashboardRoute,
    DashDep,
    FormDep,
    Visitor,
    VisitorDep,
    app_by_slug,
    field_str,
    render,
    see_other,
)

router = APIRouter(route_class=DashboardRoute, include_in_schema=False)

SPARK_RANGE = 3600
SPARK_STEP = 60


def app_row(
    platform: Platform, session: Session, app: App, team_slug: str, firing: int = 0
) -> dict[str, Any]:
    """One line of the apps table: the API's view of the app plus an hour of requests and errors, and
    how many of its alerts fire."""
    out = render_app(platform, session, app)
    current = session.get(Deployment, app.current_deployment_id) if app.current_deployment_id else None
    overall = platform.rollups.series(app.id, SPARK_RANGE, SPARK_STEP, "")["overall"]
    requests: list[int] = overall["requests"]
    error_rate: list[float | None] = overall["error_rate"]
    total = sum(requests)
    errors = sum((rate or 0.0) * n for rate, n in zip(error_rate, requests, strict=True))
    return {
        "app": app,
        "out": out,
        "team_slug": team_slug,
        "current": current,
        "serving": sum(1 for i in out["instances"] if i["state"] == "serving"),
        "instances": len(out["instances"]),
        "rpm": requests,
        "rpm_recent": sum(requests[-5:]) / 5,
        "error_rate": error_rate,
        "error_rate_hour": errors / total if total else None,
        "firing": firing,
    }


def _rows(platform: Platform, session: Session, who: Visitor, ids: list[str]) -> list[dict[str, Any]]:
    slugs = dict(session.exec(select(Team.id, Team.slug)).all())
    apps = session.exec(select(App).where(col(App.team_id).in_(ids)).order_by(col(App.slug))).all()
    firing = firing_counts(session, who, apps)
    return [app_row(platform, session, a, slugs.get(a.team_id, ""), firing.get(a.id, 0)) for a in apps]


@router.get("/dashboard")
@router.get("/dashboard/apps")
def bare() -> Response:
    return see_other("/dashboard/")


@router.get("/dashboard/")
def apps_list(request: Request, who: VisitorDep, dash: DashDep) -> Response:
    """Every app the visitor can see (``GET /apps/``), with status, URL, revision and an hour of traffic."""
    with dash.platform.db.session() as s:
        rows = _rows(dash.platform, s, who, team_ids(s, who.user))
    return render(request, "apps.html", section="apps", rows=rows, team=None)


@router.get("/dashboard/switch-team")
def switch_team(team: str = "") -> Response:
    """The header's team switcher (a GET form: it works without JavaScript)."""
    return see_other(f"/dashboard/teams/{team}" if team else "/dashboard/")


def _team(session: Session, who: Visitor, slug: str, action: Action) -> Team:
    row = session.exec(select(Team).where(Team.slug == slug)).first()
    if row is None:
        raise NotFound(f"Team {slug} not found.", title="Team not found")
    return get_team(session, who.principal, row.id, action=action)


def _team_page(
    request: Request, who: Visitor, platform: Platform, slug: str, status: int = 200, **extra: Any
) -> Response:
    with platform.db.session() as s:
        team = _team(s, who, slug, Action.TEAM_READ)
        rows = _rows(platform, s, who, [team.id])
        members = teams_api.list_members(team.id, s, who.principal).data
        quota = quotas.report(s, team, platform.settings)
    return render(
        request,
        "team.html",
        status,
        section="apps",
        team=team,
        rows=rows,
        members=members,
        quota=quota,
        manage=who.can(Action.MEMBERS_MANAGE, team.id),
        **extra,
    )


@router.get("/dashboard/teams/{team_slug}")
def team_page(request: Request, team_slug: str, who: VisitorDep, dash: DashDep) -> Response:
    """One team: its apps, members and roles, quota and usage (``team:read``)."""
    return _team_page(request, who, dash.platform, team_slug)


@router.post("/dashboard/teams/{team_slug}/members")
def add_member(request: Request, team_slug: str, who: VisitorDep, form: FormDep, dash: DashDep) -> Response:
    """``POST /teams/{id}/members`` (``team:members``)."""
    with dash.platform.db.session() as s:
        team = _team(s, who, team_slug, Action.TEAM_READ)
        audit.note(request, team_id=team.id)
        try:
            body = teams_api.MemberAdd.model_validate(
                {"email": field_str(form, "email"), "role": field_str(form, "role", "member")}
            )
            teams_api.add_member(team.id, body, s, who.principal)
        except ValidationError:
            error = BadRequest("Enter the member's email and one of the roles.", title="Invalid member")
            return _team_page(request, who, dash.platform, team_slug, 400, member_error=error)
        except (NotFound, Conflict) as exc:  # an unknown email, already a member: said next to the form
            return _team_page(request, who, dash.platform, team_slug, exc.status_code, member_error=exc)
    return see_other(f"/dashboard/teams/{team_slug}?added=1")


@router.post("/dashboard/teams/{team_slug}/members/{user_id}")
def change_member(
    request: Request, team_slug: str, user_id: str, who: VisitorDep, form: FormDep, dash: DashDep
) -> Response:
    """Change a member's role (``PATCH``) or remove them (``DELETE``), as ``action`` says."""
    with dash.platform.db.session() as s:
        team = _team(s, who, team_slug, Action.TEAM_READ)
        audit.note(request, team_id=team.id)
        if field_str(form, "action") == "remove":
            teams_api.remove_member(team.id, user_id, s, who.principal)
        else:
            try:
                body = teams_api.MemberUpdate.model_validate({"role": field_str(form, "role")})
            except ValidationError:
                raise BadRequest("Choose one of the roles.", title="Invalid role") from None
            teams_api.update_member(team.id, user_id, body, s, who.principal)
    if user_id == who.user.id and field_str(form, "action") == "remove":
        return see_other("/dashboard/")
    return see_other(f"/dashboard/teams/{team_slug}")


# -- an app --------------------------------------------------------------------------------------------


@router.get("/dashboard/apps/{app_slug}")
def app_overview(request: Request, app_slug: str, who: VisitorDep, dash: DashDep) -> Response:
    """Status, instances (live), the autoscaler's decision, recent deployments and events."""
    platform = dash.platform
    with platform.db.session() as s:
        app = app_by_slug(s, who, app_slug, Action.APP_READ)
        ctx = app_header(platform, s, who, app, "overview")
        instances = instance_rows(s, ctx["app_out"])
        monitor = who.can(Action.APP_MONITOR, app.team_id)
        recent = []
        if monitor:
            deps = s.exec(
                select(Deployment)
                .where(Deployment.app_id == app.id)
                .order_by(col(Deployment.created_at).desc())
                .limit(5)
            ).all()
            recent = [deployment_out(d, app, platform.settings) for d in deps]
    scaling = scaling_out(platform, app) if monitor else None
    events = platform.events.list(app.id, 15) if monitor else []
    overall = platform.rollups.series(app.id, SPARK_RANGE, SPARK_STEP, "")["overall"] if monitor else None
    return render(
        request,
        "app/overview.html",
        instances=instances,
        deployments=recent,
        scaling=scaling,
        events=events,
        overall=overall,
        monitor=monitor,
        **ctx,
    )


@router.get("/dashboard/apps/{app_slug}/live.json")
def app_live(app_slug: str, who: VisitorDep, dash: DashDep) -> JSONResponse:
    """What the overview refreshes every few seconds: the app's status, instances and autoscaler."""
    platform = dash.platform
    with platform.db.session() as s:
        app = app_by_slug(s, who, app_slug, Action.APP_READ)
        out = render_app(platform, s, app)
        instances = instance_rows(s, out)
    current = None
    if who.can(Action.APP_MONITOR, app.team_id):
        current = scaling_out(platform, app)["current"]
    return JSONResponse(
        {
            "status": out["status"],
            "status_tone": fmt.tone(out["status"]),
            "instances": instances,
            "scaling": current,
        }
    )
