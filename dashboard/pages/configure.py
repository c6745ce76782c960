"""An app's settings page: autoscaling, environment variables, health path, deploy tokens, deletion.

Every form calls the API's own handler (``PATCH /apps/{id}/scaling``, ``PUT .../environment-variables/``,
``PATCH /apps/{id}``, ``POST|DELETE .../tokens``, ``DELETE /apps/{id}``) with a body built by the
API's own request model, so validation, quotas, permissions and side effects (a redeploy with the new
environment, the autoscaler picking up new knobs) are exactly the API's. Validation errors come back
next to the form, with what was typed.

Secret values never reach the browser: the page lists what ``GET .../environment-variables/`` returns,
where a secret's value is null, and a secret's form field starts empty.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import FormData

from control_plane import audit
from control_plane.api import apps as apps_api
from control_plane.api import env as env_api
from control_plane.api import scaling as scaling_api
from control_plane.api import tokens as tokens_api
from control_plane.api.deps import LimitsDep
from control_plane.errors import BadRequest, QuotaExceeded
from control_plane.permissions import Action
from control_plane.platform import Platform
from dashboard.pages._common import app_header
from dashboard.web import (
    DashboardRoute,
    DashDep,
    FormDep,
    Visitor,
    VisitorDep,
    app_by_slug,
    field_str,
    load_app,
    messages,
    render,
    see_other,
)

router = APIRouter(route_class=DashboardRoute, include_in_schema=False)

SCALING_FIELDS = ("min_instances", "max_instances", "target_concurrency", "prewarm", "scale_to_zero_after")
NOTICES = {
    "scaling": "Scaling settings saved; the autoscaler uses them from its next tick.",
    "env": "Environment variable saved.",
    "env-redeploy": "Environment variable saved; a redeploy with the new environment started.",
    "env-deleted": "Environment variable removed.",
    "health": "Health path saved; it applies from the next deployment.",
    "token-revoked": "Deploy token revoked.",
}


def _page(
    request: Request, who: Visitor, platform: Platform, slug: str, status: int = 200, **extra: Any
) -> Response:
    with platform.db.session() as s:
        app = app_by_slug(s, who, slug, Action.APP_MONITOR)
        ctx = app_header(platform, s, who, app, "settings")
        can_env = who.can(Action.ENV_READ, app.team_id)
        env = env_api.list_env(app.id, platform, s, who.principal)["data"] if can_env else []
        can_tokens = who.can(Action.TOKENS_MANAGE, app.team_id)
        tokens = tokens_api.list_tokens(app.id, s, who.principal)["data"] if can_tokens else []
    scaling = scaling_api.scaling_out(platform, app)
    values = extra.pop("scaling_values", None) or {k: scaling[k] for k in SCALING_FIELDS}
    return render(
        request,
        "app/settings.html",
        status,
        scaling=scaling,
        scaling_values=values,
        can_scale=who.can(Action.SCALE, app.team_id),
        can_env=can_env,
        can_env_write=who.can(Action.ENV_WRITE, app.team_id),
        can_update=who.can(Action.APP_UPDATE, app.team_id),
        can_tokens=can_tokens,
        can_delete=who.can(Action.APP_DELETE, app.team_id),
        env=env,
        deploy_tokens=tokens,
        notice=NOTICES.get(request.query_params.get("saved", ""), ""),
        **ctx,
        **extra,
    )


@router.get("/dashboard/apps/{app_slug}/settings")
def settings_page(request: Request, app_slug: str, who: VisitorDep, dash: DashDep) -> Response:
    """The forms, enabled as the visitor's role allows (a viewer sees them, disabled, with the role
    each needs)."""
    return _page(request, who, dash.platform, app_slug)


@router.post("/dashboard/apps/{app_slug}/scaling")
async def save_scaling(
    request: Request, app_slug: str, who: VisitorDep, form: FormDep, dash: DashDep
) -> Response:
    """``PATCH /apps/{id}/scaling`` with the form's five knobs."""
    platform = dash.platform
    app = await load_app(platform, who, app_slug, Action.SCALE)
    audit.note(request, team_id=app.team_id, app_id=app.id)
    values = {k: field_str(form, k) for k in SCALING_FIELDS}
    try:
        body = scaling_api.ScalingUpdate.model_validate({k: v for k, v in values.items() if v != ""})
        await scaling_api.update_scaling(app.id, body, platform, who.principal)
    except ValidationError as exc:
        return await _rerender(
            request, who, platform, app_slug, 422, scaling_values=values, scaling_errors=messages(exc)
        )
    except (BadRequest, QuotaExceeded) as exc:
        return await _rerender(
            request, who, platform, app_slug, exc.status_code, scaling_values=values, scaling_error=exc
        )
    return see_other(f"/dashboard/apps/{app_slug}/settings?saved=scaling#scaling")


def _bool(form: FormData, name: str) -> bool:
    return field_str(form, name) in ("on", "true", "1", "yes")


@router.post("/dashboard/apps/{app_slug}/env")
async def set_env(request: Request, app_slug: str, who: VisitorDep, form: FormDep, dash: DashDep) -> Response:
    """Set one variable (``PUT .../environment-variables/`` with one upsert), redeploying if asked."""
    platform = dash.platform
    app = await load_app(platform, who, app_slug, Action.ENV_WRITE)
    audit.note(request, team_id=app.team_id, app_id=app.id)
    name, value = field_str(form, "name"), str(form.get("value") or "")
    redeploy = _bool(form, "redeploy")
    try:
        body = env_api.EnvBatch.model_validate(
            {"upsert": {name: {"value": value, "is_secret": _bool(form, "is_secret")}}, "redeploy": redeploy}
        )
        if not name:
            raise BadRequest("Name the variable.", title="Invalid variable")
        await env_api.update_env(app.id, body, platform, who.principal)
    except ValidationError as exc:
        return await _rerender(request, who, platform, app_slug, 422, env_errors=messages(exc), env_name=name)
    except BadRequest as exc:
        return await _rerender(request, who, platform, app_slug, 400, env_error=exc, env_name=name)
    saved = "env-redeploy" if redeploy and app.current_deployment_id else "env"
    return see_other(f"/dashboard/apps/{app_slug}/settings?saved={saved}#env")


@router.post("/dashboard/apps/{app_slug}/env/delete")
async def delete_env(
    request: Request, app_slug: str, who: VisitorDep, form: FormDep, dash: DashDep
) -> Response:
    """Remove one variable (``PUT .../environment-variables/`` with one delete)."""
    platform = dash.platform
    app = await load_app(platform, who, app_slug, Action.ENV_WRITE)
    audit.note(request, team_id=app.team_id, app_id=app.id)
    body = env_api.EnvBatch(delete=[field_str(form, "name")], redeploy=_bool(form, "redeploy"))
    await env_api.update_env(app.id, body, platform, who.principal)
    return see_other(f"/dashboard/apps/{app_slug}/settings?saved=env-deleted#env")


@router.post("/dashboard/apps/{app_slug}/health-path")
def save_health_path(
    request: Request, app_slug: str, who: VisitorDep, form: FormDep, dash: DashDep
) -> Response:
    """``PATCH /apps/{id}`` ``{"health_path"}`` (empty: back to ``/``)."""
    platform = dash.platform
    with platform.db.session() as s:
        app = app_by_slug(s, who, app_slug, Action.APP_UPDATE)
        audit.note(request, team_id=app.team_id, app_id=app.id)
        value = field_str(form, "health_path")
        try:
            body = apps_api.AppUpdate.model_validate({"health_path": value or None})
        except ValidationError as exc:
            errors = {"health_path": messages(exc).get("health_path", "Not a valid path.")}
            return _page(request, who, platform, app_slug, 422, app_errors=errors, health_value=value)
        apps_api.update_app(app.id, body, platform, s, who.principal)
    return see_other(f"/dashboard/apps/{app_slug}/settings?saved=health#general")


@router.post("/dashboard/apps/{app_slug}/tokens")
def create_deploy_token(
    request: Request, app_slug: str, who: VisitorDep, form: FormDep, dash: DashDep, limits: LimitsDep
) -> Response:
    """``POST /apps/{id}/tokens``: the value is on the page this answers with, and nowhere else."""
    platform = dash.platform
    with platform.db.session() as s:
        app = app_by_slug(s, who, app_slug, Action.TOKENS_MANAGE)
        audit.note(request, team_id=app.team_id, app_id=app.id)
        try:
            body = tokens_api.TokenCreate.model_validate(
                {
                    "name": field_str(form, "name"),
                    "expires_in_days": field_str(form, "expires_in_days") or 365,
                }
            )
        except ValidationError as exc:
            return _page(request, who, platform, app_slug, 422, token_errors=messages(exc))
        created = tokens_api.create_token(app.id, body, s, who.principal, limits)
    return _page(request, who, platform, app_slug, 201, created_token=created)


@router.post("/dashboard/apps/{app_slug}/tokens/{token_id}/revoke")
def revoke_deploy_token(
    request: Request, app_slug: str, token_id: str, who: VisitorDep, _form: FormDep, dash: DashDep
) -> Response:
    """``DELETE /apps/{id}/tokens/{token_id}``."""
    with dash.platform.db.session() as s:
        app = app_by_slug(s, who, app_slug, Action.APP_READ)
        audit.note(request, team_id=app.team_id, app_id=app.id)
        tokens_api.delete_token(app.id, token_id, s, who.principal)
    return see_other(f"/dashboard/apps/{app_slug}/settings?saved=token-revoked#tokens")


@router.post("/dashboard/apps/{app_slug}/delete")
async def delete_app(
    request: Request, app_slug: str, who: VisitorDep, form: FormDep, dash: DashDep
) -> Response:
    """``DELETE /apps/{id}`` (owners), once the app's name is typed to confirm."""
    platform = dash.platform
    app = await load_app(platform, who, app_slug, Action.APP_DELETE)
    audit.note(request, team_id=app.team_id, app_id=app.id)
    if field_str(form, "confirm") != app.slug:
        error = BadRequest(f"Type {app.slug} to confirm.", title="Not deleted")
        return await _rerender(request, who, platform, app_slug, 400, delete_error=error)
    await apps_api.delete_app(app.id, platform, who.principal)
    return see_other(f"/dashboard/?deleted={app.slug}")


# -- helpers for the async handlers (database work and rendering in worker threads) ---------------------


async def _rerender(
    request: Request, who: Visitor, platform: Platform, slug: str, status: int, **extra: Any
) -> Response:
    return await asyncio.to_thread(_page, request, who, platform, slug, status, **extra)
