"""SLO math and the burn-rate alert state machine (control_plane/slo.py), driven by a fake clock.

``Traffic`` is a per-minute series of requests and errors; ``_run`` evaluates the alert at the end of
every minute, as the control plane's loop would, with the windows summed from the series. No clock is
read anywhere: time is the minute index.
"""

from __future__ import annotations

import json
from itertools import accumulate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control_plane.slo import (
    DAY,
    DEFAULT_RULES,
    HOUR,
    MINUTE,
    SLO,
    AlertState,
    BurnRateRule,
    Counts,
    Notification,
    burn_rate,
    counts_from_histogram,
    error_budget,
    evaluate,
    required_windows,
    slack_payload,
    standard_rules,
    webhook_payload,
)

T0 = 1_700_000_000.0  # the fake clock's origin
AVAILABILITY = SLO.availability("api", 0.999)
BASELINE = 0.0001  # 0.01 % errors: a tenth of the budget


class Traffic:
    """Requests and errors per minute."""

    def __init__(self, minutes: int, rate: float = 1000.0, error_ratio: float = BASELINE) -> None:
        self.total = [rate] * minutes
        self.bad = [rate * error_ratio] * minutes

    def errors(self, start: int, end: int, ratio: float) -> Traffic:
        for minute in range(start, end):
            self.bad[minute] = self.total[minute] * ratio
        return self

    def windows(self, lengths: list[float]) -> list[dict[float, Counts]]:
        """For each minute, the counts of every window ending with that minute."""
        totals, bads = [0.0, *accumulate(self.total)], [0.0, *accumulate(self.bad)]
        out = []
        for minute in range(len(self.total)):
            end = minute + 1
            data = {}
            for length in lengths:
                start = max(0, end - int(length // MINUTE))
                data[length] = Counts(totals[end] - totals[start], bads[end] - bads[start])
            out.append(data)
        return out


def _run(
    traffic: Traffic, state: AlertState, every: int = 1
) -> tuple[AlertState, list[tuple[int, Notification]]]:
    """Evaluate at the end of every ``every``-th minute; the notifications sent, by minute."""
    sent: list[tuple[int, Notification]] = []
    for minute, windows in enumerate(traffic.windows(required_windows(state.slo, state.rules))):
        if minute % every:
            continue
        state, notifications = evaluate(state, windows, T0 + (minute + 1) * MINUTE)
        sent.extend((minute, n) for n in notifications)
    return state, sent


def _statuses(sent: list[tuple[int, Notification]]) -> list[tuple[str, str]]:
    return [(n.status, n.severity) for _, n in sent]


def test_standard_rules_are_the_workbooks() -> None:
    assert [(r.severity, r.long_window_s, r.short_window_s, r.burn_rate) for r in DEFAULT_RULES] == [
        ("page", HOUR, 5 * MINUTE, 14.4),
        ("page", 6 * HOUR, 30 * MINUTE, 6.0),
        ("ticket", DAY, 2 * HOUR, 3.0),
        ("ticket", 3 * DAY, 6 * HOUR, 1.0),
    ]
    assert [r.name for r in DEFAULT_RULES] == [
        "page:1h/5m@14.4x",
        "page:6h/30m@6x",
        "ticket:1d/2h@3x",
        "ticket:3d/6h@1x",
    ]
    assert [r.burn_rate for r in standard_rules(7 * DAY)] == [3.36, 1.4, 0.7, 0.233333]
    assert required_windows(AVAILABILITY) == [300, 1800, 3600, 7200, 21600, 86400, 259200, 2592000]


def test_budget_and_burn_rate() -> None:
    month = Counts(total=1_000_000, bad=500)

    assert error_budget(AVAILABILITY, month).allowed == pytest.approx(1000)
    assert error_budget(AVAILABILITY, month).remaining == pytest.approx(0.5)
    assert error_budget(AVAILABILITY, Counts(1_000_000, 2500)).remaining == pytest.approx(-1.5)
    assert error_budget(AVAILABILITY, Counts(0, 0)).remaining == 1.0
    assert burn_rate(AVAILABILITY, Counts(10_000, 144)) == pytest.approx(14.4)
    assert burn_rate(AVAILABILITY, Counts(0, 0)) == 0.0


def test_slo_definitions() -> None:
    p99 = SLO.latency("p99", threshold_ms=300, quantile=0.99, window_s=7 * DAY)
    assert (p99.kind, p99.target, p99.threshold_ms, p99.error_budget) == (
        "latency",
        0.99,
        300,
        pytest.approx(0.01),
    )
    with pytest.raises(ValueError, match="target"):
        SLO.availability("x", 1.0)
    with pytest.raises(ValueError, match="threshold"):
        SLO("x", "latency", 0.99)
    with pytest.raises(ValueError, match="window"):
        SLO.availability("x", 0.99, window_s=0)


def test_latency_counts_from_a_histogram() -> None:
    bounds, cumulative = [100.0, 250.0, 500.0, 1000.0], [50, 80, 95, 99, 100]

    assert counts_from_histogram(bounds, cumulative, 250) == Counts(100, 20)
    assert counts_from_histogram(bounds, cumulative, 300).bad == pytest.approx(17)  # 80 + 15 * 50/250 good
    assert counts_from_histogram(bounds, cumulative, 50).bad == pytest.approx(75)
    assert counts_from_histogram(bounds, cumulative, 5000) == Counts(100, 1)  # past 1000 ms: unknown, slow
    with pytest.raises(ValueError):
        counts_from_histogram(bounds, cumulative[:-1], 250)


def test_an_error_burst_fires_exactly_once_and_resolves_exactly_once() -> None:
    burst = (3 * 1440, 3 * 1440 + 20)  # 20 minutes of 100 % errors, on day 4
    traffic = Traffic(5 * 1440).errors(*burst, 1.0)

    state, sent = _run(traffic, AlertState(AVAILABILITY))

    assert _statuses(sent) == [("firing", "page"), ("resolved", "page")]
    (fired_at, firing), (resolved_at, resolved) = sent
    assert fired_at == burst[0]  # within the first minute: 1.7 % of the hour's requests failed
    assert firing.rule.name == "page:1h/5m@14.4x" and firing.short_burn_rate > 14.4
    assert firing.since == firing.at == T0 + (burst[0] + 1) * MINUTE
    assert firing.budget_remaining is not None and 0 < firing.budget_remaining < 1
    # The 30-minute window of the 6 h rule clears last: resolved half an hour after the burst, not hours
    # later, although the ticket rules' long windows still remember it.
    assert burst[1] + 25 <= resolved_at <= burst[1] + 31
    assert resolved.since == firing.since and resolved.rule == firing.rule
    assert state.status == "ok"


@pytest.mark.parametrize("ratio", [0.0, BASELINE, 0.0008])
def test_no_alert_while_under_budget(ratio: float) -> None:
    _, sent = _run(Traffic(6 * 1440, error_ratio=ratio), AlertState(AVAILABILITY))

    assert sent == []


def test_a_slow_burn_fires_a_ticket() -> None:
    start, stop = 3 * 1440, 5 * 1440  # 0.4 % errors (4x the budget) for two days
    traffic = Traffic(6 * 1440).errors(start, stop, 0.004)

    _, sent = _run(traffic, AlertState(AVAILABILITY))

    assert _statuses(sent) == [("firing", "ticket"), ("resolved", "ticket")]
    (fired_at, firing), (resolved_at, _) = sent
    assert start + 16 * 60 <= fired_at <= start + 20 * 60  # the 1 d and 3 d windows need ~18 h of it
    assert firing.rule.severity == "ticket"
    assert stop + 4 * 60 <= resolved_at <= stop + 5 * 60  # the 6 h window drops under 1x


def test_a_burst_during_a_slow_burn_escalates_the_same_incident() -> None:
    start, stop = 3 * 1440, 5 * 1440
    traffic = Traffic(6 * 1440).errors(start, stop, 0.004).errors(4 * 1440, 4 * 1440 + 20, 1.0)

    _, sent = _run(traffic, AlertState(AVAILABILITY))

    assert _statuses(sent) == [("firing", "ticket"), ("escalated", "page"), ("resolved", "page")]
    assert sent[1][0] == 4 * 1440 and sent[1][1].since == sent[0][1].since
    assert sent[2][0] > stop  # the slow burn keeps the incident open after the burst


def test_a_quiet_app_needs_enough_events() -> None:
    traffic = Traffic(3 * 1440, rate=0.4, error_ratio=0.0).errors(2000, 2001, 1.0)

    assert _statuses(_run(traffic, AlertState(AVAILABILITY, min_events=10))[1]) == []
    assert _statuses(_run(traffic, AlertState(AVAILABILITY))[1]) == [("firing", "page"), ("resolved", "page")]


def test_missing_windows_make_rules_inactive() -> None:
    bad = Counts(1000, 1000)
    state, sent = evaluate(AlertState(AVAILABILITY), {HOUR: bad}, T0)

    assert sent == [] and state.status == "ok"
    state, sent = evaluate(state, {HOUR: bad, 5 * MINUTE: bad}, T0 + 60)
    assert _statuses([(0, n) for n in sent]) == [("firing", "page")]
    assert sent[0].budget_remaining is None


def test_resolve_hold_stops_flapping() -> None:
    rules = (BurnRateRule("page", HOUR, 5 * MINUTE, 14.4),)
    traffic = Traffic(1440)
    for spike in range(600, 720, 10):  # one minute of errors every ten minutes for two hours
        traffic.errors(spike, spike + 1, 1.0)

    _, flapping = _run(traffic, AlertState(AVAILABILITY, rules=rules))
    _, held = _run(traffic, AlertState(AVAILABILITY, rules=rules, resolve_hold_s=15 * MINUTE))

    assert _statuses(flapping).count(("firing", "page")) > 5
    assert _run(traffic, AlertState(AVAILABILITY, rules=rules))[1] == flapping  # deterministic
    assert _statuses(held) == [("firing", "page"), ("resolved", "page")]
    assert held[1][0] == 710 + 5 + 15  # last spike, its 5-minute window, then the hold


def test_state_survives_a_restart() -> None:
    traffic = Traffic(2 * 1440).errors(1440, 1460, 1.0)
    windows = traffic.windows(required_windows(AVAILABILITY))
    state, restored = AlertState(AVAILABILITY), AlertState(AVAILABILITY)
    sent_a, sent_b = [], []
    for minute, data in enumerate(windows):
        now = T0 + (minute + 1) * MINUTE
        state, a = evaluate(state, data, now)
        restored, b = evaluate(restored.restore(json.loads(json.dumps(restored.as_dict()))), data, now)
        sent_a += a
        sent_b += b

    assert [(n.status, n.at) for n in sent_a] == [(n.status, n.at) for n in sent_b]
    assert len(sent_a) == 2
    assert AlertState(AVAILABILITY).restore({"status": "firing", "rule": "nope", "since": 1}).status == "ok"


segments = st.lists(
    st.tuples(st.integers(1, 400), st.sampled_from([0.0, 0.0005, 0.002, 0.004, 0.01, 0.05, 0.3, 1.0])),
    min_size=1,
    max_size=8,
)


@settings(max_examples=30, deadline=None)
@given(segments)
def test_notifications_always_tell_one_consistent_story(plan: list[tuple[int, float]]) -> None:
    traffic = Traffic(sum(minutes for minutes, _ in plan) + 400, error_ratio=0.0)
    minute = 0
    for minutes, ratio in plan:
        traffic.errors(minute, minute + minutes, ratio)
        minute += minutes

    state, sent = _run(traffic, AlertState(AVAILABILITY), every=5)

    open_severity: str | None = None
    for _, notification in sent:
        if notification.status == "firing":
            assert open_severity is None
            open_severity = notification.severity
        elif notification.status == "escalated":
            assert open_severity == "ticket" and notification.severity == "page"
            open_severity = "page"
        else:
            assert open_severity == notification.severity
            open_severity = None
    assert (state.status == "firing") == (open_severity is not None)


def _firing() -> Notification:
    traffic = Traffic(2 * 1440).errors(1440, 1460, 1.0)
    _, sent = _run(traffic, AlertState(AVAILABILITY))
    return sent[0][1]


def test_webhook_payload() -> None:
    payload = json.loads(
        json.dumps(webhook_payload(_firing(), app="shop", url="https://deploy.example/apps/shop"))
    )

    assert payload["version"] == 1 and payload["type"] == "slo_alert"
    assert (payload["status"], payload["severity"], payload["app"]) == ("firing", "page", "shop")
    assert payload["slo"] == {"name": "api", "kind": "availability", "target": 0.999, "window_s": 30 * DAY}
    assert payload["rule"]["name"] == "page:1h/5m@14.4x" and payload["rule"]["burn_rate"] == 14.4
    assert payload["burn_rate"]["short"] > 14.4
    assert payload["at"] == payload["started_at"] and payload["at"].endswith("Z")
    assert payload["message"].startswith("SLO api (99.90% availability) is burning its error budget")
    assert payload["url"] == "https://deploy.example/apps/shop"


def test_slack_payload() -> None:
    firing = _firing()
    message = slack_payload(firing, app="shop", url="https://deploy.example/apps/shop")

    assert isinstance(message["text"], str) and "FIRING (page): SLO api on shop" in message["text"]
    blocks = message["blocks"]
    assert isinstance(blocks, list)
    assert [b["type"] for b in blocks] == ["header", "section", "section", "context", "actions"]
    assert blocks[0]["text"] == {"type": "plain_text", "text": "FIRING (page): SLO api on shop"}
    assert blocks[-1]["elements"][0]["url"] == "https://deploy.example/apps/shop"
    json.dumps(message)
    resolved = Notification("resolved", *list(firing.__dict__.values())[1:])
    quiet = slack_payload(resolved)
    assert ":white_check_mark:" in str(quiet["text"]) and len(quiet["blocks"]) == 4  # type: ignore[arg-type]
    assert "recovered" in resolved.message
