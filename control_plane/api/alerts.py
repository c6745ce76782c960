"""SLOs, alert webhooks and alert history of an app (``control_plane/alerting.py``).

GET    /api/v1/apps/{id}/slos                      each SLO with its budget and alert state
POST   /api/v1/apps/{id}/slos                      {"name", "kind", "target", "threshold_ms"?, "window_days"?}
DELETE /api/v1/apps/{id}/slos/{slo_id}
GET    /api/v1/apps/{id}/webhooks                  (app:update: URLs can carry credentials)
POST   /api/v1/apps/{id}/webhooks                  {"url", "kind": "json" | "slack"}; the secret, once
DELETE /api/v1/apps/{id}/webhooks/{webhook_id}
POST   /api/v1/apps/{id}/webhooks/{webhook_id}/test
GET    /api/v1/apps/{id}/alerts?status=firing|resolved&limit=
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field, HttpUrl
from sqlmodel import col, select

from control_plane import slo as slo_math
from control_plane.alerting import rules_for, slo_of
from control_plane.api.deps import PlatformDep, PrincipalDep
from control_plane.errors import BadRequest, NotFound
from control_plane.models import Alert, Slo, Webhook
from control_plane.permissions import Action
from control_plane.platform import Platform
from control_plane.security import Principal, get_app
from control_plane.serializers import ts

router = APIRouter()

MAX_SLOS = 20
MAX_WEBHOOKS = 10


class SloCreate(BaseModel):
    name: str = Field(min_length=1, max_length=80)
    kind: Literal["availability", "latency"]
    target: float = Field(gt=0, lt=1, description="The share of good requests, e.g. 0.999")
    threshold_ms: float | None = Field(None, gt=0, le=600_000, description="latency SLOs: good is this fast")
    window_days: float = Field(30, gt=0, le=90)


class WebhookCreate(BaseModel):
    url: HttpUrl
    kind: Literal["json", "slack"] = "json"


def _slo_out(platform: Platform, row: Slo) -> dict[str, Any]:
    objective = slo_of(row)
    counts = platform.alerts.counts(row.app_id, objective, row.window_s)
    budget = slo_math.error_budget(objective, counts)
    state = json.loads(row.state or "{}")
    return {
        "id": row.id,
        "name": row.name,
        "kind": row.kind,
        "target": row.target,
        "threshold_ms": row.threshold_ms,
        "window_days": round(row.window_s / 86400, 4),
        "requests": counts.total,
        "bad": counts.bad,
        "good_ratio": None if not counts.total else round(1 - counts.error_ratio, 6),
        "budget_remaining": round(budget.remaining, 6),
        "alert": {"status": state.get("status", "ok"), "severity": state.get("severity")},
        "rules": [
            {"name": r.name, "severity": r.severity, "burn_rate": r.burn_rate} for r in rules_for(objective)
        ],
        "created_at": ts(row.created_at),
    }


def _hook_out(row: Webhook, *, secret: bool = False) -> dict[str, Any]:
    out = {"id": row.id, "url": row.url, "kind": row.kind, "created_at": ts(row.created_at)}
    if secret:
        out["secret"] = row.secret
    return out


def _app(platform: Platform, principal: Principal, app_id: str, action: Action) -> str:
    with platform.db.session() as s:
        return get_app(s, principal, app_id, action=action).id


@router.get("/apps/{app_id}/slos")
async def list_slos(app_id: str, platform: PlatformDep, principal: PrincipalDep) -> dict[str, Any]:
    def load() -> list[dict[str, Any]]:
        the_app = _app(platform, principal, app_id, Action.APP_MONITOR)
        with platform.db.session() as s:
            rows = s.exec(select(Slo).where(Slo.app_id == the_app).order_by(col(Slo.created_at))).all()
        return [_slo_out(platform, row) for row in rows]

    return {"data": await asyncio.to_thread(load)}


@router.post("/apps/{app_id}/slos", status_code=201)
async def create_slo(
    app_id: str, body: SloCreate, platform: PlatformDep, principal: PrincipalDep
) -> dict[str, Any]:
    def create() -> dict[str, Any]:
        the_app = _app(platform, principal, app_id, Action.APP_UPDATE)
        if body.kind == "latency" and body.threshold_ms is None:
            raise BadRequest(
                "A latency SLO needs threshold_ms.",
                title="Invalid SLO",
                hint="e.g. p99 ≤ 300 ms: target 0.99, threshold_ms 300.",
            )
        with platform.db.session() as s:
            if len(s.exec(select(Slo.id).where(Slo.app_id == the_app)).all()) >= MAX_SLOS:
                raise BadRequest(
                    f"An app has at most {MAX_SLOS} SLOs.", title="Too many SLOs", hint="Delete one first."
                )
            row = Slo(
                app_id=the_app,
                name=body.name,
                kind=body.kind,
                target=body.target,
                threshold_ms=body.threshold_ms if body.kind == "latency" else None,
                window_s=body.window_days * 86400,
            )
            slo_of(row)  # validates the combination
            s.add(row)
            s.commit()
            s.refresh(row)
        return _slo_out(platform, row)

    return await asyncio.to_thread(create)


@router.delete("/apps/{app_id}/slos/{slo_id}", status_code=204)
async def delete_slo(app_id: str, slo_id: str, platform: PlatformDep, principal: PrincipalDep) -> Response:
    def delete() -> None:
        the_app = _app(platform, principal, app_id, Action.APP_UPDATE)
        with platform.db.session() as s:
            row = s.get(Slo, slo_id)
            if row is None or row.app_id != the_app:
                raise NotFound(f"SLO {slo_id} not found.", title="SLO not found")
            s.delete(row)
            s.commit()

    await asyncio.to_thread(delete)
    return Response(status_code=204)


@router.get("/apps/{app_id}/webhooks")
async def list_webhooks(app_id: str, platform: PlatformDep, principal: PrincipalDep) -> dict[str, Any]:
    def load() -> list[dict[str, Any]]:
        the_app = _app(platform, principal, app_id, Action.APP_UPDATE)
        with platform.db.session() as s:
            return [_hook_out(h) for h in s.exec(select(Webhook).where(Webhook.app_id == the_app)).all()]

    return {"data": await asyncio.to_thread(load)}


@router.post("/apps/{app_id}/webhooks", status_code=201)
async def create_webhook(
    app_id: str, body: WebhookCreate, platform: PlatformDep, principal: PrincipalDep
) -> dict[str, Any]:
    """The webhook, with its signing secret (shown this once)."""

    def create() -> dict[str, Any]:
        the_app = _app(platform, principal, app_id, Action.APP_UPDATE)
        with platform.db.session() as s:
            if len(s.exec(select(Webhook.id).where(Webhook.app_id == the_app)).all()) >= MAX_WEBHOOKS:
                raise BadRequest(
                    f"An app has at most {MAX_WEBHOOKS} webhooks.",
                    title="Too many webhooks",
                    hint="Delete one first.",
                )
            row = Webhook(app_id=the_app, url=str(body.url), kind=body.kind)
            s.add(row)
            s.commit()
            s.refresh(row)
            return _hook_out(row, secret=True)

    return await asyncio.to_thread(create)


@router.delete("/apps/{app_id}/webhooks/{webhook_id}", status_code=204)
async def delete_webhook(
    app_id: str, webhook_id: str, platform: PlatformDep, principal: PrincipalDep
) -> Response:
    def delete() -> None:
        the_app = _app(platform, principal, app_id, Action.APP_UPDATE)
        with platform.db.session() as s:
            row = s.get(Webhook, webhook_id)
            if row is None or row.app_id != the_app:
                raise NotFound(f"Webhook {webhook_id} not found.", title="Webhook not found")
            s.delete(row)
            s.commit()

    await asyncio.to_thread(delete)
    return Response(status_code=204)


@router.post("/apps/{app_id}/webhooks/{webhook_id}/test")
async def test_webhook(
    app_id: str, webhook_id: str, platform: PlatformDep, principal: PrincipalDep
) -> dict[str, Any]:
    """Send a test message now; answers what the webhook answered."""

    def load() -> tuple[Webhook, str]:
        with platform.db.session() as s:
            the_app = get_app(s, principal, app_id, action=Action.APP_UPDATE)
            row = s.get(Webhook, webhook_id)
            if row is None or row.app_id != the_app.id:
                raise NotFound(f"Webhook {webhook_id} not found.", title="Webhook not found")
            return row, the_app.slug

    hook, slug = await asyncio.to_thread(load)
    return await platform.alerts.send_test(hook, slug)


@router.get("/apps/{app_id}/alerts")
async def list_alerts(
    app_id: str,
    platform: PlatformDep,
    principal: PrincipalDep,
    status: str | None = Query(None, pattern="^(firing|resolved)$"),
    limit: int = Query(50, ge=1, le=500),
) -> dict[str, Any]:
    """The app's alerts, newest first."""

    def load() -> list[dict[str, Any]]:
        the_app = _app(platform, principal, app_id, Action.APP_MONITOR)
        with platform.db.session() as s:
            query = select(Alert).where(Alert.app_id == the_app)
            if status:
                query = query.where(Alert.status == status)
            rows = s.exec(query.order_by(col(Alert.started_at).desc()).limit(limit)).all()
            return [
                {
                    "id": a.id,
                    "kind": a.kind,
                    "severity": a.severity,
                    "status": a.status,
                    "message": a.message,
                    "data": json.loads(a.data or "{}"),
                    "started_at": ts(a.started_at),
                    "resolved_at": ts(a.resolved_at) if a.resolved_at else None,
                    "deliveries": json.loads(a.deliveries or "[]"),
                }
                for a in rows
            ]

    return {"data": await asyncio.to_thread(load)}
