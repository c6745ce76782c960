"""The dashboard's routes, as one router the control plane mounts (``control_plane/app.py``).

    /dashboard/login, /logout, /account                 pages/auth.py
    /dashboard/, /teams/{team}, /apps/{app}             pages/apps.py
    /dashboard/apps/{app}/deployments[/{id}], rollback  pages/deployments.py
    /dashboard/apps/{app}/settings (+ forms)            pages/configure.py
    /dashboard/apps/{app}/metrics, traces, logs         pages/metrics.py, traces.py, logs.py
    /dashboard/apps/{app}/insights                      pages/insights.py
    /dashboard/apps/{app}/alerts (+ SLO, webhook forms) pages/alerts.py
    /dashboard/traces/{trace_id}                        pages/traces.py
    /dashboard/admin/...                                pages/admin.py
    /dashboard/static/{file}                            assets.py

And the links the official CLI prints or opens (fastapi-cloud-api.md §12): ``/{team}/apps``,
``/{team}/apps/{app}`` and its ``integrations/connect`` page, redirected to the dashboard's own pages;
``/`` goes to the dashboard.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from control_plane.errors import NotFound
from dashboard.pages import (
    admin,
    alerts,
    apps,
    auth,
    configure,
    deployments,
    insights,
    logs,
    metrics,
    traces,
)
from dashboard.web import Dashboard, DashboardRoute, DashDep, VisitorDep, render, see_other

router = APIRouter(include_in_schema=False)
_static = APIRouter(route_class=DashboardRoute, include_in_schema=False)
_links = APIRouter(route_class=DashboardRoute, include_in_schema=False)


@_static.get("/dashboard/static/{name:path}")
def static(request: Request, name: str, dash: DashDep, v: str = "") -> Response:
    """A static asset from memory: a year of caching when the URL names its current digest."""
    asset = dash.assets.files.get(name)
    if asset is None:
        return Response("Not found\n", status_code=404, media_type="text/plain")
    etag = f'"{asset.digest}"'
    cache = "public, max-age=31536000, immutable" if v == asset.digest else "no-cache"
    headers = {"ETag": etag, "Cache-Control": cache, "Vary": "Accept-Encoding"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    if asset.gzipped is not None and "gzip" in request.headers.get("accept-encoding", ""):
        headers["Content-Encoding"] = "gzip"
        return Response(asset.gzipped, media_type=asset.media_type, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@_links.get("/")
def home() -> Response:
    return see_other("/dashboard/")


@_links.get("/{team_slug}/apps")
def cli_team_link(team_slug: str) -> Response:
    """``{dashboard}/{team}/apps``: what ``fastapi cloud teams list`` links to."""
    return see_other(f"/dashboard/teams/{team_slug}")


@_links.get("/{team_slug}/apps/{app_slug}")
def cli_app_link(team_slug: str, app_slug: str) -> Response:
    """``{dashboard}/{team}/apps/{app}``: what ``fastapi cloud apps`` links to."""
    return see_other(f"/dashboard/apps/{app_slug}")


@_links.get("/{team_slug}/apps/{app_slug}/deployments/{deployment_id}")
def cli_deployment_link(team_slug: str, app_slug: str, deployment_id: str) -> Response:
    return see_other(f"/dashboard/apps/{app_slug}/deployments/{deployment_id}")


@_links.get("/{team_slug}/apps/{app_slug}/integrations/connect")
def cli_integrations(request: Request, team_slug: str, app_slug: str, who: VisitorDep) -> Response:
    """``fastapi cloud integrations connect`` opens this; a self-hosted platform has no GitHub app."""
    return render(request, "integrations.html", section="apps", app_slug=app_slug)


@_links.get("/dashboard/{rest:path}")
def unknown(rest: str) -> Response:
    """Any other dashboard path: a page saying so (the API's 404 would be JSON)."""
    raise NotFound(f"There is no page at /dashboard/{rest}.", title="Page not found")


for _module in (auth, apps, deployments, configure, metrics, traces, logs, insights, alerts, admin):
    router.include_router(_module.router)
router.include_router(_static)
router.include_router(_links)  # last: ``/{team}/apps/...`` would otherwise shadow ``/dashboard/apps/...``


def mount(app: FastAPI) -> None:
    """Add the dashboard to the control plane's app: its state (templates, assets, the session keys,
    read from the database on first use) on ``app.state.dashboard``, then its routes."""
    app.state.dashboard = Dashboard(app.state.platform)
    app.include_router(router)
