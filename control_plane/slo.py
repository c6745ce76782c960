"""Service level objectives: error budgets, burn rates, and multi-window multi-burn-rate alerts.

Pure functions of counts and time, after the Google SRE workbook ("Alerting on SLOs", approach 6). An
SLO says which fraction of events must be good over a window: ``availability`` (good = not a 5xx) or
``latency`` (good = answered within ``threshold_ms``; "p99 <= 300 ms" is ``target=0.99``). The *burn
rate* of a window is its error ratio over the error budget ``1 - target``: at 1x the budget lasts exactly
the SLO window, at 14.4x a 30-day budget loses 2 % per hour.

A rule fires when its long *and* its short window burn faster than its rate; the long window proves the
problem is big enough, the short one that it is still happening, so the alert resolves soon after the
errors stop. ``standard_rules()`` are the workbook's: page at 14.4x over 1 h and 5 min or 6x over 6 h and
30 min, ticket at 3x over 24 h and 2 h or 1x over 3 d and 6 h.

``evaluate(state, windows, now)`` is the alert of one SLO as a state machine: one incident, announced
once (``firing``, later ``escalated`` if a page-level rule joins a ticket), and closed once
(``resolved``) when no rule of the severity it opened with, or above, has its short window over its rate
any more. A rule that took part in an incident cannot open another one until it has been quiet: slower
rules whose long windows still remember a burst do not re-fire it (no flapping). Time is an input:
nothing reads a clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal

__all__ = [
    "DEFAULT_RULES",
    "SLO",
    "AlertState",
    "Budget",
    "BurnRateRule",
    "Counts",
    "Notification",
    "burn_rate",
    "counts_from_histogram",
    "error_budget",
    "evaluate",
    "required_windows",
    "slack_payload",
    "standard_rules",
    "webhook_payload",
]

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
Severity = Literal["page", "ticket"]
_RANK = {"ticket": 1, "page": 2}


@dataclass(frozen=True)
class SLO:
    name: str
    kind: Literal["availability", "latency"]
    target: float
    """The fraction of events that must be good, e.g. 0.999."""
    window_s: float = 30 * DAY
    threshold_ms: float | None = None
    """Latency SLOs: an event is good when it was answered within this many milliseconds."""

    def __post_init__(self) -> None:
        if not 0 < self.target < 1:
            raise ValueError(f"SLO target must be between 0 and 1 (exclusive), not {self.target}")
        if self.window_s <= 0:
            raise ValueError("SLO window must be positive")
        if self.kind == "latency" and (self.threshold_ms is None or self.threshold_ms <= 0):
            raise ValueError("a latency SLO needs a positive threshold_ms")

    @classmethod
    def availability(cls, name: str, target: float = 0.999, window_s: float = 30 * DAY) -> SLO:
        return cls(name, "availability", target, window_s)

    @classmethod
    def latency(
        cls, name: str, threshold_ms: float, quantile: float = 0.99, window_s: float = 30 * DAY
    ) -> SLO:
        """``quantile`` of the requests answered within ``threshold_ms`` (p99 <= 300 ms: 0.99, 300)."""
        return cls(name, "latency", quantile, window_s, threshold_ms)

    @property
    def error_budget(self) -> float:
        return 1 - self.target


@dataclass(frozen=True)
class Counts:
    """Events in one window: all of them, and the bad ones (5xx; or slower than the threshold)."""

    total: float
    bad: float

    @property
    def error_ratio(self) -> float:
        return self.bad / self.total if self.total > 0 else 0.0


@dataclass(frozen=True)
class Budget:
    allowed: float
    """Bad events the SLO allows for the events counted."""
    spent: float
    remaining: float
    """Fraction of the budget left: 1 untouched, 0 used up, negative overspent."""


@dataclass(frozen=True)
class BurnRateRule:
    severity: Severity
    long_window_s: float
    short_window_s: float
    burn_rate: float

    @property
    def name(self) -> str:
        windows = f"{_duration(self.long_window_s)}/{_duration(self.short_window_s)}"
        return f"{self.severity}:{windows}@{self.burn_rate:g}x"


def standard_rules(period_s: float = 30 * DAY) -> tuple[BurnRateRule, ...]:
    """The workbook's rules for an SLO window of ``period_s``: page when 2 % of the budget goes in an
    hour or 5 % in six hours, ticket when 10 % goes in a day or in three days."""
    spec: list[tuple[Severity, float, float, float]] = [
        ("page", HOUR, 5 * MINUTE, 0.02),
        ("page", 6 * HOUR, 30 * MINUTE, 0.05),
        ("ticket", DAY, 2 * HOUR, 0.10),
        ("ticket", 3 * DAY, 6 * HOUR, 0.10),
    ]
    return tuple(
        BurnRateRule(sev, long, short, round(share * period_s / long, 6)) for sev, long, short, share in spec
    )


DEFAULT_RULES = standard_rules()


def burn_rate(slo: SLO, counts: Counts) -> float:
    """How many times faster than sustainable the window spends the budget (1.0: exactly on budget)."""
    return counts.error_ratio / slo.error_budget


def error_budget(slo: SLO, counts: Counts) -> Budget:
    """The budget for ``counts`` (the events of the SLO window), what was spent and what is left."""
    allowed = counts.total * slo.error_budget
    remaining = 1 - counts.bad / allowed if allowed > 0 else 1.0
    return Budget(allowed, counts.bad, remaining)


def counts_from_histogram(
    bounds_ms: Sequence[float], cumulative: Sequence[float], threshold_ms: float
) -> Counts:
    """Latency SLO counts from a cumulative histogram (``cumulative[i]``: events <= ``bounds_ms[i]``, the
    last entry the total, as Prometheus' ``+Inf``). Between bounds, events are taken as evenly spread;
    past the last bound they count as slow."""
    if len(cumulative) != len(bounds_ms) + 1:
        raise ValueError("cumulative needs one count per bound plus the total")
    # Beyond the last bound the latency is unknown: those events count as bad.
    total, good = float(cumulative[-1]), float(cumulative[-2]) if bounds_ms else 0.0
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds_ms, cumulative, strict=False):
        if threshold_ms <= bound:
            share = (threshold_ms - lower) / (bound - lower) if bound > lower else 1.0
            good = below + (count - below) * share
            break
        lower, below = bound, float(count)
    return Counts(total, total - good)


def required_windows(slo: SLO, rules: Sequence[BurnRateRule] = DEFAULT_RULES) -> list[float]:
    """The window lengths (seconds) ``evaluate`` reads: every rule's two, and the SLO's for the budget."""
    return sorted({slo.window_s, *(r.long_window_s for r in rules), *(r.short_window_s for r in rules)})


@dataclass(frozen=True)
class Notification:
    status: Literal["firing", "escalated", "resolved"]
    slo: SLO
    severity: Severity
    rule: BurnRateRule
    """The rule that fired (for ``resolved``: the one that opened or escalated the incident)."""
    at: float
    since: float
    """When the incident opened (Unix seconds)."""
    long_burn_rate: float
    short_burn_rate: float
    budget_remaining: float | None

    @property
    def message(self) -> str:
        slo = self.slo
        if self.status == "resolved":
            after = _duration(self.at - self.since)
            return f"SLO {slo.name} recovered: the error rate is back under budget after {after}"
        budget = (
            ""
            if self.budget_remaining is None
            else f"; {max(self.budget_remaining, 0):.0%} of the budget left"
        )
        return (
            f"SLO {slo.name} ({slo.target:.2%} {slo.kind}) is burning its error budget "
            f"{self.short_burn_rate:.1f}x too fast over {_duration(self.rule.short_window_s)} "
            f"({self.long_burn_rate:.1f}x over {_duration(self.rule.long_window_s)}){budget}"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            **asdict(self),
            "rule": {**asdict(self.rule), "name": self.rule.name},
            "message": self.message,
        }


@dataclass(frozen=True)
class AlertState:
    """The alert of one SLO. Start with ``AlertState(slo)``; keep what ``evaluate`` returns."""

    slo: SLO
    rules: tuple[BurnRateRule, ...] = DEFAULT_RULES
    min_events: float = 1
    """A rule's short window needs at least this many events to count (quiet apps do not page)."""
    resolve_hold_s: float = 0.0
    """How long the incident must look over before it resolves (0: at the first evaluation)."""
    status: Literal["ok", "firing"] = "ok"
    severity: Severity | None = None
    """The severity last notified (``escalated`` raises it)."""
    opened: Severity | None = None
    """The severity the incident opened with: it stays open while a rule of this severity or above is
    over its rate in its short window."""
    rule: BurnRateRule | None = None
    since: float | None = None
    quiet_since: float | None = None
    """Firing only: since when no rule of its severity or above has been over the rate."""
    spent: frozenset[str] = field(default_factory=frozenset)
    """Rules that took part in the last incident and have not been quiet since."""

    def as_dict(self) -> dict[str, object]:
        """The dynamic part, JSON-serialisable, to persist between evaluations (see ``restore``)."""
        return {
            "status": self.status,
            "severity": self.severity,
            "opened": self.opened,
            "rule": None if self.rule is None else self.rule.name,
            "since": self.since,
            "quiet_since": self.quiet_since,
            "spent": sorted(self.spent),
        }

    def restore(self, data: Mapping[str, object]) -> AlertState:
        """This configuration with the dynamic part ``as_dict`` saved (unknown rule names are dropped)."""
        rules = {rule.name: rule for rule in self.rules}
        rule = rules.get(str(data.get("rule")))
        since, quiet, spent = data.get("since"), data.get("quiet_since"), data.get("spent")
        names = frozenset(s for s in spent if s in rules) if isinstance(spent, list) else frozenset()
        if data.get("status") != "firing" or rule is None or not isinstance(since, int | float):
            closed = replace(self, status="ok", severity=None, opened=None, rule=None, since=None)
            return replace(closed, quiet_since=None, spent=names)
        return replace(
            self,
            status="firing",
            severity=rule.severity,
            opened="ticket" if data.get("opened") == "ticket" else rule.severity,
            rule=rule,
            since=float(since),
            quiet_since=float(quiet) if isinstance(quiet, int | float) else None,
            spent=names,
        )


def evaluate(
    state: AlertState, windows_data: Mapping[float, Counts], now: float
) -> tuple[AlertState, list[Notification]]:
    """One evaluation: the alert's new state and the notifications to send (zero or one).

    ``windows_data`` maps a window length in seconds (``required_windows``) to the counts of the last
    window of that length ending at ``now``. A missing window makes its rules inactive."""
    slo = state.slo
    rates: dict[str, tuple[float, float]] = {}
    for rule in state.rules:
        long, short = windows_data.get(rule.long_window_s), windows_data.get(rule.short_window_s)
        if long is not None and short is not None and short.total >= state.min_events:
            rates[rule.name] = (burn_rate(slo, long), burn_rate(slo, short))
    active = [r for r in state.rules if r.name in rates and min(rates[r.name]) > r.burn_rate]
    hot = [r for r in state.rules if r.name in rates and rates[r.name][1] > r.burn_rate]
    spent = frozenset(name for name in state.spent if name in {r.name for r in active})
    fresh = sorted(
        (r for r in active if r.name not in spent), key=lambda r: (_RANK[r.severity], rates[r.name][1])
    )
    budget = windows_data.get(slo.window_s)
    remaining = None if budget is None else error_budget(slo, budget).remaining

    def notify(
        status: Literal["firing", "escalated", "resolved"], rule: BurnRateRule, since: float
    ) -> Notification:
        long_rate, short_rate = rates.get(rule.name, (0.0, 0.0))
        return Notification(status, slo, rule.severity, rule, now, since, long_rate, short_rate, remaining)

    spent |= {r.name for r in active}
    if state.status == "ok":
        if not fresh:
            return replace(state, spent=spent), []
        top = fresh[-1]
        opened = replace(
            state, status="firing", severity=top.severity, opened=top.severity, rule=top, since=now
        )
        return replace(opened, quiet_since=None, spent=spent), [notify("firing", top, now)]

    assert state.severity is not None and state.rule is not None and state.since is not None
    if fresh and _RANK[fresh[-1].severity] > _RANK[state.severity]:
        top = fresh[-1]
        new = replace(state, severity=top.severity, rule=top, quiet_since=None, spent=spent)
        return new, [notify("escalated", top, state.since)]
    floor = _RANK[state.opened or state.severity]
    if any(_RANK[r.severity] >= floor for r in hot):
        return replace(state, quiet_since=None, spent=spent), []
    quiet_since = now if state.quiet_since is None else state.quiet_since
    if now - quiet_since < state.resolve_hold_s:
        return replace(state, quiet_since=quiet_since, spent=spent), []
    resolved = notify("resolved", state.rule, state.since)
    closed = replace(state, status="ok", severity=None, opened=None, rule=None, since=None, quiet_since=None)
    return replace(closed, spent=spent), [resolved]


def webhook_payload(
    notification: Notification, *, app: str | None = None, url: str | None = None
) -> dict[str, object]:
    """The generic JSON webhook body (``version`` 1): one alert event, everything a receiver needs."""
    n = notification
    return {
        "version": 1,
        "type": "slo_alert",
        "status": n.status,
        "severity": n.severity,
        "app": app,
        "slo": {"name": n.slo.name, "kind": n.slo.kind, "target": n.slo.target, "window_s": n.slo.window_s}
        | ({"threshold_ms": n.slo.threshold_ms} if n.slo.threshold_ms is not None else {}),
        "rule": {**asdict(n.rule), "name": n.rule.name},
        "burn_rate": {"long": round(n.long_burn_rate, 3), "short": round(n.short_burn_rate, 3)},
        "budget_remaining": None if n.budget_remaining is None else round(n.budget_remaining, 6),
        "started_at": _iso(n.since),
        "at": _iso(n.at),
        "message": n.message,
        "url": url,
    }


def slack_payload(
    notification: Notification, *, app: str | None = None, url: str | None = None
) -> dict[str, object]:
    """A Slack-compatible message (incoming webhooks): ``text`` for notifications, ``blocks`` to show."""
    n, budget = notification, notification.budget_remaining
    icon = {"firing": ":rotating_light:", "escalated": ":rotating_light:", "resolved": ":white_check_mark:"}[
        n.status
    ]
    where = f" on {app}" if app else ""
    title = f"{n.status.upper()} ({n.severity}): SLO {n.slo.name}{where}"
    fields = [
        f"*Burn rate ({_duration(n.rule.short_window_s)})*\n{n.short_burn_rate:.1f}x",
        f"*Burn rate ({_duration(n.rule.long_window_s)})*\n{n.long_burn_rate:.1f}x",
        f"*Threshold*\n{n.rule.burn_rate:g}x",
        f"*Budget left*\n{'n/a' if budget is None else format(max(budget, 0), '.1%')}",
    ]
    blocks: list[dict[str, object]] = [
        {"type": "header", "text": {"type": "plain_text", "text": title[:150]}},
        {"type": "section", "text": {"type": "mrkdwn", "text": f"{icon} {n.message}"}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": text} for text in fields]},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": f"fastapi-deploy · {_iso(n.at)}"}]},
    ]
    if url:
        button = {"type": "button", "text": {"type": "plain_text", "text": "Open dashboard"}, "url": url}
        blocks.append({"type": "actions", "elements": [button]})
    return {"text": f"{icon} {title}: {n.message}", "blocks": blocks}


def _duration(seconds: float) -> str:
    for unit, size in (("d", DAY), ("h", HOUR), ("m", MINUTE)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds // MINUTE)}m" if seconds >= MINUTE else f"{int(seconds)}s"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")
