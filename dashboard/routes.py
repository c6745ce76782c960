"""Dashboard pages mounted by the control plane. For now: the landing page and the links the official
CLI prints (``{dashboard}/{team}/apps/{app}``...), which show the app's state until the full dashboard
lands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


def _ctx(request: Request, **extra: Any) -> dict[str, Any]:
    platform = request.app.state.platform
    return {"settings": platform.settings, **extra}


@router.get("/", response_class=HTMLResponse)
def landing(request: Request) -> HTMLResponse:
    return templates.TemplateResponse(request, "landing.html", _ctx(request))


@router.get("/{team_slug}/apps", response_class=HTMLResponse)
def team_apps(request: Request, team_slug: str) -> HTMLResponse:
    """The official CLI links here from `teams list` / `teams get`."""
    return templates.TemplateResponse(request, "team.html", _ctx(request, team_slug=team_slug))


@router.get("/dashboard/apps/{app_slug}", response_class=HTMLResponse)
@router.get("/dashboard/apps/{app_slug}/deployments/{deployment_id}", response_class=HTMLResponse)
@router.get("/{team_slug}/apps/{app_slug}", response_class=HTMLResponse)
def app_page(request: Request, app_slug: str, deployment_id: str = "", team_slug: str = "") -> HTMLResponse:
    return templates.TemplateResponse(
        request, "app.html", _ctx(request, app_slug=app_slug, deployment_id=deployment_id)
    )
