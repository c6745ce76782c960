"""Alerts: SLOs burning their error budget, crash loops, instances killed at their memory limit, failed
deploys; kept as history and sent to the app's webhooks (a generic JSON body or a Slack message).

    every ``alert_interval`` (30 s) ──> each SLO: counts of its windows from the rollups ──> slo.evaluate
                                        ──> firing / escalated / resolved ──> Alert row ──> webhooks
    fleet, deployer ──raise_alert()──> crash_loop / oom / deploy_failed ──> Alert row ──> webhooks
                                        (a crash loop resolves after 5 quiet minutes)

An incident is announced once and resolved once: the SLO state machine (``control_plane/slo.py``) has no
flapping, and the other kinds are deduplicated by their key while they fire. Sends run in background
tasks with three attempts (1 s, 4 s apart); each attempt's answer is recorded on the alert. JSON
webhooks are signed: ``X-FastAPI-Deploy-Signature: sha256=<HMAC-SHA256 of the body under the webhook's
secret>``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlmodel import col, select

from control_plane import slo as slo_math
from control_plane.db import Database
from control_plane.models import Alert, App, Slo, Webhook, utcnow
from control_plane.rollups import Rollups

log = logging.getLogger("fastapi_deploy.alerts")

CRASH_LOOP_QUIET = 300.0
"""Seconds without a crash after which a crash-loop alert resolves."""
_ATTEMPTS = (0.0, 1.0, 4.0)


def slo_of(row: Slo) -> slo_math.SLO:
    if row.kind == "latency":
        return slo_math.SLO(row.name, "latency", row.target, row.window_s, row.threshold_ms)
    return slo_math.SLO(row.name, "availability", row.target, row.window_s)


def rules_for(objective: slo_math.SLO) -> tuple[slo_math.BurnRateRule, ...]:
    """The workbook's rules for a 30-day SLO (page at 14.4x over 1 h and 5 min, at 6x over 6 h and 30 min;
    ticket at 3x over 1 d and 2 h, at 1x over 3 d and 6 h), their windows scaled to the SLO's own: each
    rule still means "this share of the budget went in this share of the window" (a 1-day SLO pages on 2
    minutes and 10 seconds at 14.4x). No window is shorter than the rollups' 10-second resolution."""
    from control_plane.metrics import RESOLUTION

    scale = objective.window_s / (30 * slo_math.DAY)
    return tuple(
        slo_math.BurnRateRule(
            rule.severity,
            max(float(RESOLUTION), rule.long_window_s * scale),
            max(float(RESOLUTION), rule.short_window_s * scale),
            rule.burn_rate,
        )
        for rule in slo_math.DEFAULT_RULES
    )


class Alerts:
    """One per control plane; its loop runs on the leader (``start``)."""

    def __init__(
        self,
        db: Database,
        rollups: Rollups,
        *,
        app_url: Callable[[str], str],
        interval: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.rollups = rollups
        self.app_url = app_url
        self.interval = interval
        self.clock = clock
        self._task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self._crashed: dict[str, float] = {}  # app id -> last crash (clock seconds)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="alerts")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._sends:
            await asyncio.wait(list(self._sends), timeout=10)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.evaluate()
            except Exception:
                log.exception("evaluating alerts failed")

    # -- SLOs ----------------------------------------------------------------------------------------

    async def evaluate(self) -> None:
        """One round over every SLO, then the crash loops that went quiet."""
        now = self.clock()
        fired = await asyncio.to_thread(self._evaluate_slos, now)
        for alert, payloads in fired:
            self._send(alert, payloads)
        for app_id, at in list(self._crashed.items()):
            if now - at >= CRASH_LOOP_QUIET:
                del self._crashed[app_id]
                resolved = await asyncio.to_thread(
                    self._resolve, app_id, "crash_loop", "The app is stable again"
                )
                if resolved is not None:
                    self._send(*resolved)

    def _evaluate_slos(self, now: float) -> list[tuple[Alert, dict[str, dict[str, Any]]]]:
        out = []
        with self.db.session() as s:
            rows = list(s.exec(select(Slo)).all())
            slugs = {
                a.id: a.slug for a in s.exec(select(App).where(col(App.id).in_({r.app_id for r in rows})))
            }
        for row in rows:
            objective = slo_of(row)
            state = slo_math.AlertState(objective, rules=rules_for(objective)).restore(
                json.loads(row.state or "{}")
            )
            windows = {
                w: self.counts(row.app_id, objective, w)
                for w in slo_math.required_windows(objective, state.rules)
            }
            state, notifications = slo_math.evaluate(state, windows, now)
            with self.db.session() as s:
                fresh = s.get(Slo, row.id)
                if fresh is None:
                    continue
                fresh.state = json.dumps(state.as_dict())
                s.add(fresh)
                s.commit()
            for n in notifications:
                slug = slugs.get(row.app_id, row.app_id)
                alert = self._record_slo(row, n)
                payloads = {
                    "json": slo_math.webhook_payload(n, app=slug, url=self.app_url(slug)),
                    "slack": slo_math.slack_payload(n, app=slug, url=self.app_url(slug)),
                }
                out.append((alert, payloads))
        return out

    def counts(self, app_id: str, objective: slo_math.SLO, window_s: float) -> slo_math.Counts:
        """Requests and bad requests (5xx, or slower than the threshold) of the last ``window_s``."""
        total, errors, hist = self.rollups.totals(app_id, window_s)
        if objective.kind == "availability":
            return slo_math.Counts(float(total), float(errors))
        from control_plane.metrics import BOUNDS

        cumulative, running = [], 0
        for n in hist:
            running += n
            cumulative.append(float(running))
        assert objective.threshold_ms is not None
        return slo_math.counts_from_histogram([b * 1000 for b in BOUNDS], cumulative, objective.threshold_ms)

    def _record_slo(self, row: Slo, n: slo_math.Notification) -> Alert:
        with self.db.session() as s:
            if n.status == "resolved":
                alert = s.exec(
                    select(Alert)
                    .where(Alert.key == row.id, Alert.status == "firing")
                    .order_by(col(Alert.started_at).desc())
                ).first()
                if alert is not None:
                    alert.status, alert.resolved_at = "resolved", utcnow()
                    s.add(alert)
                    s.commit()
                    s.refresh(alert)
                    return alert
            elif n.status == "escalated":
                alert = s.exec(select(Alert).where(Alert.key == row.id, Alert.status == "firing")).first()
                if alert is not None:
                    alert.severity, alert.message = n.severity, n.message
                    alert.data = json.dumps(n.as_dict(), default=str)
                    s.add(alert)
                    s.commit()
                    s.refresh(alert)
                    return alert
            alert = Alert(
                app_id=row.app_id,
                kind="slo",
                key=row.id,
                severity=n.severity,
                status="resolved" if n.status == "resolved" else "firing",
                message=n.message,
                data=json.dumps(n.as_dict(), default=str),
                resolved_at=utcnow() if n.status == "resolved" else None,
            )
            s.add(alert)
            s.commit()
            s.refresh(alert)
            return alert

    # -- operational alerts ----------------------------------------------------------------------------

    def raise_alert(
        self, app_id: str, kind: str, message: str, *, key: str | None = None, **data: Any
    ) -> None:
        """A crash loop, an OOM kill, a failed deploy (called on the event loop by the fleet and the
        deployer). A crash loop fires once while it lasts; OOM kills and failed deploys are one-shot."""
        if kind == "crash_loop":
            ongoing = app_id in self._crashed
            self._crashed[app_id] = self.clock()
            if ongoing:
                return
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._raise(app_id, kind, message, key or kind, data), name=f"alert-{kind}")
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _raise(self, app_id: str, kind: str, message: str, key: str, data: dict[str, Any]) -> None:
        recorded = await asyncio.to_thread(self._record, app_id, kind, message, key, data)
        if recorded is not None:
            self._send(*recorded)

    def _record(
        self, app_id: str, kind: str, message: str, key: str, data: dict[str, Any]
    ) -> tuple[Alert, dict[str, dict[str, Any]]] | None:
        one_shot = kind != "crash_loop"
        with self.db.session() as s:
            app = s.get(App, app_id)
            if app is None:
                return None
            if (
                not one_shot
                and s.exec(
                    select(Alert).where(Alert.app_id == app_id, Alert.key == key, Alert.status == "firing")
                ).first()
            ):
                return None
            alert = Alert(
                app_id=app_id,
                kind=kind,
                key=key,
                severity="page" if kind == "crash_loop" else "ticket",
                status="resolved" if one_shot else "firing",
                message=message,
                data=json.dumps(data, default=str),
                resolved_at=utcnow() if one_shot else None,
            )
            s.add(alert)
            s.commit()
            s.refresh(alert)
            slug = app.slug
        status = "firing"
        return alert, _payloads(alert, slug, self.app_url(slug), status)

    def _resolve(self, app_id: str, key: str, message: str) -> tuple[Alert, dict[str, dict[str, Any]]] | None:
        with self.db.session() as s:
            alert = s.exec(
                select(Alert).where(Alert.app_id == app_id, Alert.key == key, Alert.status == "firing")
            ).first()
            app = s.get(App, app_id)
            if alert is None or app is None:
                return None
            alert.status, alert.resolved_at = "resolved", utcnow()
            s.add(alert)
            s.commit()
            s.refresh(alert)
            slug = app.slug
        return alert, _payloads(alert, slug, self.app_url(slug), "resolved", message)

    # -- sending ---------------------------------------------------------------------------------------

    def _send(self, alert: Alert, payloads: dict[str, dict[str, Any]]) -> None:
        task = asyncio.get_running_loop().create_task(
            self._deliver(alert, payloads), name=f"alert-send-{alert.id}"
        )
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _deliver(self, alert: Alert, payloads: dict[str, dict[str, Any]]) -> None:
        hooks = await asyncio.to_thread(self._hooks, alert.app_id)
        results = await asyncio.gather(*(self._post(hook, payloads) for hook in hooks))
        if results:
            await asyncio.to_thread(self._note_deliveries, alert.id, results)

    async def send_test(self, hook: Webhook, app_slug: str) -> dict[str, Any]:
        """A test message to one webhook (``POST /apps/{id}/webhooks/{id}/test``): what it answered."""
        now = datetime.now(UTC).isoformat()
        message = f"A test alert from fastapi-deploy for {app_slug}: this webhook works."
        payloads: dict[str, dict[str, Any]] = {
            "json": {"version": 1, "type": "test", "app": app_slug, "message": message, "at": now},
            "slack": {"text": f":wave: {message}"},
        }
        return await self._post(hook, payloads)

    async def _post(self, hook: Webhook, payloads: dict[str, dict[str, Any]]) -> dict[str, Any]:
        body = json.dumps(payloads["slack" if hook.kind == "slack" else "json"]).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "fastapi-deploy-alerts"}
        if hook.kind != "slack":
            digest = hmac.new(hook.secret.encode(), body, hashlib.sha256).hexdigest()
            headers["X-FastAPI-Deploy-Signature"] = f"sha256={digest}"
        error = ""
        status = 0
        async with httpx.AsyncClient(timeout=5) as client:
            for delay in _ATTEMPTS:
                await asyncio.sleep(delay)
                try:
                    response = await client.post(hook.url, content=body, headers=headers)
                except httpx.HTTPError as exc:
                    error, status = str(exc) or type(exc).__name__, 0
                    continue
                status = response.status_code
                if status < 300:
                    error = ""
                    break
                error = f"HTTP {status}"
                if 400 <= status < 500 and status not in (408, 429):
                    break  # refused: another try would be refused too
        if error:
            log.warning("alert webhook %s failed: %s", hook.url, error)
        return {
            "webhook": hook.id,
            "status": status,
            "at": datetime.now(UTC).isoformat(),
            "error": error or None,
        }

    def _hooks(self, app_id: str) -> list[Webhook]:
        with self.db.session() as s:
            return list(s.exec(select(Webhook).where(Webhook.app_id == app_id)).all())

    def _note_deliveries(self, alert_id: str, results: list[dict[str, Any]]) -> None:
        with self.db.session() as s:
            alert = s.get(Alert, alert_id)
            if alert is not None:
                alert.deliveries = json.dumps([*json.loads(alert.deliveries or "[]"), *results])
                s.add(alert)
                s.commit()


def _payloads(
    alert: Alert, slug: str, url: str, status: str, message: str | None = None
) -> dict[str, dict[str, Any]]:
    text = message or alert.message
    icon = ":white_check_mark:" if status == "resolved" else ":rotating_light:"
    title = f"{status.upper()} ({alert.severity}): {alert.kind.replace('_', ' ')} on {slug}"
    return {
        "json": {
            "version": 1,
            "type": "app_alert",
            "kind": alert.kind,
            "status": status,
            "severity": alert.severity,
            "app": slug,
            "message": text,
            "data": json.loads(alert.data or "{}"),
            "started_at": alert.started_at.astimezone(UTC).isoformat(),
            "at": datetime.now(UTC).isoformat(),
            "url": url,
        },
        "slack": {
            "text": f"{icon} {title}: {text}",
            "blocks": [
                {"type": "header", "text": {"type": "plain_text", "text": title[:150]}},
                {"type": "section", "text": {"type": "mrkdwn", "text": f"{icon} {text}"}},
                {
                    "type": "actions",
                    "elements": [
                        {"type": "button", "text": {"type": "plain_text", "text": "Open"}, "url": url}
                    ],
                },
            ],
        },
    }
