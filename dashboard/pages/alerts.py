"""An app's SLOs with their error budgets and burn rates, its alert history and its alert webhooks.

Every form calls the API's own handler (``POST|DELETE /apps/{id}/slos``, ``POST|DELETE
/apps/{id}/webhooks``, ``POST .../webhooks/{id}/test``) with a body built by the API's own request
model (``SloCreate``, ``WebhookCreate``): the same validation, limits and permissions (``app:update``).
Reading needs what the API's reads need: SLOs and alerts ``app:monitor``, webhooks ``app:update``
(their URLs can carry credentials).

The form asks for the objective in percent, as the CLI does (``99.9``); the page sends the API its
fraction (``0.999``).
"""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError
from sqlmodel import select
from starlette.datastructures import FormData

from control_plane import audit
from control_plane import slo as slo_math
from control_plane.alerting import rules_for, slo_of
from control_plane.api import alerts as alerts_api
from control_plane.errors import BadRequest
from control_plane.models import App, Slo
from control_plane.permissions import Action
from control_plane.platform import Platform
from dashboard import format as fmt
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

HISTORY = 50
"""Alerts the history shows besides the firing ones (all of those are shown, first)."""
SLO_FIELDS = ("name", "kind", "target", "threshold_ms", "window_days")
SLO_DEFAULTS = {"kind": "availability", "target": "99.9", "window_days": "30"}
KINDS = {"slo": "SLO", "crash_loop": "crash loop", "oom": "OOM kill", "deploy_failed": "deploy failed"}
NOTICES = {
    "slo": "SLO added; it is evaluated every few seconds from now on.",
    "slo-deleted": "SLO deleted.",
    "webhook-deleted": "Webhook deleted.",
}


# -- what the page shows ----------------------------------------------------------------------------------


def burn_rates(platform: Platform, row: Slo) -> list[dict[str, Any]]:
    """Each burn-rate rule of the SLO with its windows' burn rates now: what ``Alerts.evaluate`` reads
    (the same rules, counts and math), for the page; the API's ``GET .../slos`` lists only the rules."""
    objective = slo_of(row)
    counts: dict[float, slo_math.Counts] = {}

    def of(window: float) -> slo_math.Counts:
        if window not in counts:
            counts[window] = platform.alerts.counts(row.app_id, objective, window)
        return counts[window]

    out = []
    for rule in rules_for(objective):
        long, short = of(rule.long_window_s), of(rule.short_window_s)
        long_rate, short_rate = slo_math.burn_rate(objective, long), slo_math.burn_rate(objective, short)
        out.append(
            {
                "severity": rule.severity,
                "long_window": rule.long_window_s,
                "short_window": rule.short_window_s,
                "threshold": rule.burn_rate,
                "long": long_rate,
                "short": short_rate,
                "requests": short.total,
                # As slo.evaluate: both windows over the rate, the short one with at least an event.
                "burning": short.total >= 1 and min(long_rate, short_rate) > rule.burn_rate,
            }
        )
    return out


def _slo_view(platform: Platform, out: dict[str, Any], row: Slo | None) -> dict[str, Any]:
    remaining = float(out["budget_remaining"])
    if remaining >= 0:
        budget_text = f"{fmt.pct(remaining)} left"
    else:
        budget_text = f"none left: {fmt.rate(1 - remaining)} the budget spent"
    return {
        **out,
        "window_s": out["window_days"] * 86400,
        "budget_text": budget_text,
        "windows": burn_rates(platform, row) if row is not None else [],
    }


def _alert_view(alert: dict[str, Any], now: datetime) -> dict[str, Any]:
    started = datetime.fromisoformat(alert["started_at"])
    ended = datetime.fromisoformat(alert["resolved_at"]) if alert["resolved_at"] else None
    lasted = ((ended or now) - started).total_seconds()
    sent = alert["deliveries"]
    return {
        **alert,
        "kind_text": KINDS.get(alert["kind"], alert["kind"].replace("_", " ")),
        "duration": lasted,
        "delivered": sum(1 for d in sent if 200 <= (d.get("status") or 0) < 300),
        "undelivered": sum(1 for d in sent if not 200 <= (d.get("status") or 0) < 300),
    }


def _history(firing: list[dict[str, Any]], recent: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Firing alerts first (newest first, however old), then the rest of the newest ones."""
    now = datetime.now(UTC)
    ids = {a["id"] for a in firing}
    return [_alert_view(a, now) for a in [*firing, *(a for a in recent if a["id"] not in ids)]]


def _last_deliveries(alerts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each webhook's newest delivery among the alerts shown (deliveries are kept on the alerts)."""
    last: dict[str, dict[str, Any]] = {}
    for alert in alerts:
        for d in alert["deliveries"]:
            hook = d.get("webhook")
            if hook and (hook not in last or str(d.get("at")) > str(last[hook].get("at"))):
                last[hook] = {**d, "ok": 200 <= (d.get("status") or 0) < 300}
    return last


async def _page(
    request: Request, who: Visitor, platform: Platform, slug: str, status: int = 200, **extra: Any
) -> Response:
    def load() -> tuple[App, dict[str, Any]]:
        with platform.db.session() as s:
            app = app_by_slug(s, who, slug, Action.APP_MONITOR)
            return app, app_header(platform, s, who, app, "alerts")

    app, ctx = await asyncio.to_thread(load)
    principal = who.principal
    slos = (await alerts_api.list_slos(app.id, platform, principal))["data"]
    firing = (await alerts_api.list_alerts(app.id, platform, principal, "firing", 500))["data"]
    recent = (await alerts_api.list_alerts(app.id, platform, principal, None, HISTORY))["data"]
    can_update = who.can(Action.APP_UPDATE, app.team_id)
    hooks = (await alerts_api.list_webhooks(app.id, platform, principal))["data"] if can_update else []

    def views() -> list[dict[str, Any]]:
        with platform.db.session() as s:
            rows = {r.id: r for r in s.exec(select(Slo).where(Slo.app_id == app.id)).all()}
        return [_slo_view(platform, out, rows.get(out["id"])) for out in slos]

    alerts = _history(firing, recent)
    last = _last_deliveries(alerts)
    return render(
        request,
        "app/alerts.html",
        status,
        slos=await asyncio.to_thread(views),
        alerts=alerts,
        firing_alerts=len(firing),
        webhooks=[{**h, "last": last.get(h["id"])} for h in hooks],
        can_update=can_update,
        slo_values=extra.pop("slo_values", None) or SLO_DEFAULTS,
        max_slos=alerts_api.MAX_SLOS,
        max_webhooks=alerts_api.MAX_WEBHOOKS,
        notice=NOTICES.get(request.query_params.get("saved", ""), ""),
        **ctx,
        **extra,
    )


@router.get("/dashboard/apps/{app_slug}/alerts")
async def alerts_page(request: Request, app_slug: str, who: VisitorDep, dash: DashDep) -> Response:
    """SLOs (objective, window, SLI, budget, burn rates, state), alerts (firing first) and webhooks."""
    return await _page(request, who, dash.platform, app_slug)


# -- SLOs ---------------------------------------------------------------------------------------------------


def _slo_body(form: FormData) -> dict[str, Any]:
    """The form as ``SloCreate`` takes it: the objective as a fraction, the name made up if left empty
    (as the CLI makes it: ``availability 99.9%``, ``p99 ≤ 300 ms``)."""
    values = {k: field_str(form, k) for k in SLO_FIELDS}
    body: dict[str, Any] = {k: v for k, v in values.items() if v != ""}
    percent = _number(values["target"])
    if percent is not None:
        body["target"] = round(percent / 100, 12)
    if not values["name"] and percent is not None:
        threshold = _number(values["threshold_ms"])
        if values["kind"] != "latency":
            body["name"] = f"availability {percent:g}%"
        else:
            body["name"] = f"p{percent:g}" + (f" ≤ {threshold:g} ms" if threshold is not None else "")
    if values["kind"] != "latency":
        body.pop("threshold_ms", None)  # the API ignores it for availability: so does the form
    return body


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@router.post("/dashboard/apps/{app_slug}/slos")
async def create_slo(
    request: Request, app_slug: str, who: VisitorDep, form: FormDep, dash: DashDep
) -> Response:
    """``POST /apps/{id}/slos`` (``app:update``); a mistake comes back next to the form, as typed."""
    platform = dash.platform
    app = await load_app(platform, who, app_slug, Action.APP_UPDATE)
    audit.note(request, team_id=app.team_id, app_id=app.id)
    typed = {k: field_str(form, k) for k in SLO_FIELDS}
    try:
        body = alerts_api.SloCreate.model_validate(_slo_body(form))
        await alerts_api.create_slo(app.id, body, platform, who.principal)
    except ValidationError as exc:
        errors = messages(exc)
        if "target" in errors:
            errors["target"] = "A percentage between 0 and 100 (not either), e.g. 99.9."
        error = BadRequest(
            "Some fields are not valid: each says why below.",
            title="Invalid SLO",
            hint="Availability: the share of requests that must not fail (99.9). Latency: the share "
            "answered within the threshold (99 with 300 ms is p99 ≤ 300 ms).",
        )
        return await _page(
            request, who, platform, app_slug, 422, slo_values=typed, slo_errors=errors, slo_error=error
        )
    except BadRequest as exc:  # the API's own checks: a latency SLO's threshold, at most 20 SLOs
        return await _page(request, who, platform, app_slug, 400, slo_values=typed, slo_error=exc)
    return see_other(f"/dashboard/apps/{app_slug}/alerts?saved=slo#slos")


@router.post("/dashboard/apps/{app_slug}/slos/{slo_id}/delete")
async def delete_slo(
    request: Request, app_slug: str, slo_id: str, who: VisitorDep, _form: FormDep, dash: DashDep
) -> Response:
    """``DELETE /apps/{id}/slos/{slo_id}``: the SLO and its alert state (its alerts stay in the history)."""
    platform = dash.platform
    app = await load_app(platform, who, app_slug, Action.APP_UPDATE)
    audit.note(request, team_id=app.team_id, app_id=app.id)
    await alerts_api.delete_slo(app.id, slo_id, platform, who.principal)
    return see_other(f"/dashboard/apps/{app_slug}/alerts?saved=slo-deleted#slos")


# -- webhooks -----------------------------------------------------------------------------------------------


@router.post("/dashboard/apps/{app_slug}/webhooks")
async def create_webhook(
    request: Request, app_slug: str, who: VisitorDep, form: FormDep, dash: DashDep
) -> Response:
    """``POST /apps/{id}/webhooks``: a JSON webhook's signing secret is on the page this answers with,
    and nowhere else."""
    platform = dash.platform
    app = await load_app(platform, who, app_slug, Action.APP_UPDATE)
    audit.note(request, team_id=app.team_id, app_id=app.id)
    url, kind = field_str(form, "url"), field_str(form, "kind", "json")
    try:
        body = alerts_api.WebhookCreate.model_validate({"url": url, "kind": kind or "json"})
        created = await alerts_api.create_webhook(app.id, body, platform, who.principal)
    except ValidationError as exc:
        errors = messages(exc)
        error = BadRequest(
            "The webhook was not added: " + "; ".join(errors.values()),
            title="Invalid webhook",
            hint="An http:// or https:// URL that accepts POST; Slack's incoming webhooks start "
            "https://hooks.slack.com/services/.",
        )
        return await _page(
            request, who, platform, app_slug, 422, hook_url=url, hook_errors=errors, hook_error=error
        )
    except BadRequest as exc:  # at most 10 webhooks
        return await _page(request, who, platform, app_slug, 400, hook_url=url, hook_error=exc)
    return await _page(request, who, platform, app_slug, 201, created_hook=created)


@router.post("/dashboard/apps/{app_slug}/webhooks/{webhook_id}/delete")
async def delete_webhook(
    request: Request, app_slug: str, webhook_id: str, who: VisitorDep, _form: FormDep, dash: DashDep
) -> Response:
    """``DELETE /apps/{id}/webhooks/{webhook_id}``."""
    platform = dash.platform
    app = await load_app(platform, who, app_slug, Action.APP_UPDATE)
    audit.note(request, team_id=app.team_id, app_id=app.id)
    await alerts_api.delete_webhook(app.id, webhook_id, platform, who.principal)
    return see_other(f"/dashboard/apps/{app_slug}/alerts?saved=webhook-deleted#webhooks")


@router.post("/dashboard/apps/{app_slug}/webhooks/{webhook_id}/test")
async def test_webhook(
    request: Request, app_slug: str, webhook_id: str, who: VisitorDep, _form: FormDep, dash: DashDep
) -> Response:
    """``POST .../webhooks/{id}/test``: a test message now (up to three attempts), and what it answered."""
    platform = dash.platform
    app = await load_app(platform, who, app_slug, Action.APP_UPDATE)
    audit.note(request, team_id=app.team_id, app_id=app.id)
    answer = await alerts_api.test_webhook(app.id, webhook_id, platform, who.principal)
    ok = 200 <= (answer.get("status") or 0) < 300
    return await _page(request, who, platform, app_slug, tested={**answer, "ok": ok})
