"""The autoscaling policy: how many instances of an app should serve, and how many warm spares should wait.

A pure function in the manner of Knative's Pod Autoscaler (KPA): :func:`decide` maps (concurrency samples,
current serving count, settings, the state carried from the previous tick, ``now``, an optional forecast)
to a :class:`Decision`. No I/O, no clock reads, no randomness: the same inputs give the same decision, so
tests drive it with plain floats. :func:`plan` turns a decision into instance moves. All times are seconds
on the caller's monotonic clock; concurrency is requests in flight plus queued at the router, summed over
the app's instances; ``serving`` counts the instances routed or being started to be routed.

Signal. Each window averages the samples with ``now - window < at <= now`` (a plain mean: the caller samples
at a fixed tick). Samples newer than ``now`` are ignored. A policy that has seen less than a window averages
what it has (Knative's metric buckets do the same). No sample in the stable window means *no data*: serving
is held (only clamped into the bounds), as the KPA returns no scale until metrics arrive. A panic window
with no sample while the stable window has some (sparse sampling) takes the newest sample's value.

Stable mode. ``stable want = ceil(stable avg / target)`` (a quotient within 1e-9 of an integer counts as that
integer, so float noise never adds an instance). A scale down may at most divide serving by
``max_scale_down_rate`` per decision: the result is at least ``ceil(serving / rate)`` (Knative floors;
ceiling keeps one instance at 1, where the scale-to-zero rule takes over). With ``scale_down_delay`` the want
is the max of the wants of the last ``scale_down_delay`` seconds (Knative's ``scale-down-delay``), carried
in :attr:`PolicyState.recent_wants`.

Panic mode. ``panic want = ceil(panic avg / target)``. The panic condition is ``panic want >=
panic_threshold x max(serving, 1)`` and ``panic want > serving``. In panic, serving is ``max(serving,
panic want, stable want)``: scale up uncapped (to ``max_instances``), never down, as the KPA. Panic ends
once a full stable window has passed since the condition was last true (the surge is then inside the
stable average).

Bounds and zero. Serving is clamped to ``[min_instances, max_instances]``. With ``min_instances == 0`` the
app goes to 0 only when nothing is in flight now and there was no traffic for ``max(scale_to_zero_after,
scale_down_delay)`` seconds (counted from the first decision while no traffic was ever seen), and not in
panic; that step ignores the rate limit (idleness is the whole judge). Until then a serving app keeps at
least 1. Traffic in the newest sample while nothing serves means at least 1 at once (scale from zero).
Knative's idle time is its stable window plus ``scale-to-zero-grace-period``; here one knob says it.

Warm pool and forecast. ``warm = prewarm``; a forecast (predicted concurrency for the near future, from
the app's weekly history) raises it to ``ceil(forecast / target) - serving`` when that is larger. It never
lowers anything and never touches serving. ``serving + warm`` is capped at ``max_instances + prewarm``.

Parking (:func:`plan`). Promote warm instances before starting new ones; park scaled-down serving instances
in the warm pool instead of stopping them. The pool may hold the warm target plus a *parking allowance* of
extra instances before any is stopped; only warm instances beyond that are stopped, and a pool below its
target is refilled at once. The allowance is ``max(1, serving, peak - serving)``, where ``peak`` is the
highest serving count decided in the last stable window (:attr:`PolicyState.recent_serving`): the
instances that served within a stable window are kept booted, so a square-wave load reuses them at the next
rising edge instead of stopping and restarting them (``max(1, serving)`` alone is not enough: with a 60 s
average of a 10x wave, serving dips to 4 between peaks of 10). Once nothing has served for a whole stable
window (scaled to zero) the allowance is 0, so zero really means zero.

Defaults and why: ``min_instances=1`` (no cold start unless asked for), ``max_instances=10`` (a bound on
cost), ``target_concurrency=10`` (a sync FastAPI worker pool is 40 threads; 10 keeps latency flat),
``prewarm=0``, ``scale_to_zero_after=300`` (five idle minutes: cold starts stay rare), and the KPA's own
defaults for the rest: stable window 60 s, panic window 6 s (10 %), panic threshold 2.0 (200 %),
max scale-down rate 2.0, scale-down delay 0 s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "Decision",
    "Plan",
    "PolicyState",
    "Sample",
    "ScalingSettings",
    "decide",
    "parking_allowance",
    "plan",
]


@dataclass(frozen=True)
class ScalingSettings:
    """Per-app knobs. Raises ``ValueError`` on nonsense (negative counts, ``min > max``, ...)."""

    min_instances: int = 1
    """Serving floor; 0 allows scale to zero."""
    max_instances: int = 10
    """Serving ceiling (at least 1)."""
    target_concurrency: float = 10
    """In-flight requests per serving instance we aim for (> 0)."""
    prewarm: int = 0
    """Warm spares kept booted but not routed."""
    scale_to_zero_after: float = 300.0
    """Seconds without any traffic before serving may drop to 0 (only when ``min_instances == 0``)."""
    stable_window: float = 60.0
    """Seconds averaged for the stable decision."""
    panic_window: float = 6.0
    """Seconds averaged for the panic decision (at most ``stable_window``)."""
    panic_threshold: float = 2.0
    """Panic when the panic want reaches this multiple of current serving (>= 1)."""
    max_scale_down_rate: float = 2.0
    """One decision may at most divide serving by this (> 1)."""
    scale_down_delay: float = 0.0
    """Seconds over which the max want is held before scaling down (Knative's ``scale-down-delay``)."""
    max_concurrency: int = 0
    """Hard limit of requests in flight per instance, enforced by the router: past it requests wait in
    the app's queue (Knative's ``containerConcurrency``; 0: no limit). Not an input of the policy."""

    def __post_init__(self) -> None:
        for name in ("min_instances", "max_instances", "prewarm", "max_concurrency"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("target_concurrency", "scale_to_zero_after", "stable_window", "panic_window"):
            value = getattr(self, name)
            if not _finite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of {_UNITS[name]}, got {value!r}")
        if self.max_instances < 1:
            raise ValueError("max_instances must be at least 1")
        if self.min_instances > self.max_instances:
            raise ValueError(
                f"min_instances ({self.min_instances}) must not exceed max_instances ({self.max_instances})"
            )
        if self.panic_window > self.stable_window:
            raise ValueError(
                f"panic_window ({self.panic_window}s) must not exceed stable_window ({self.stable_window}s)"
            )
        if not _finite(self.panic_threshold) or self.panic_threshold < 1:
            raise ValueError(f"panic_threshold must be at least 1.0, got {self.panic_threshold!r}")
        if not _finite(self.max_scale_down_rate) or self.max_scale_down_rate <= 1:
            raise ValueError(f"max_scale_down_rate must be greater than 1, got {self.max_scale_down_rate!r}")
        if not _finite(self.scale_down_delay) or self.scale_down_delay < 0:
            raise ValueError(f"scale_down_delay must be >= 0 seconds, got {self.scale_down_delay!r}")


_UNITS = {
    "target_concurrency": "requests",
    "scale_to_zero_after": "seconds",
    "stable_window": "seconds",
    "panic_window": "seconds",
}


@dataclass(frozen=True)
class Sample:
    """The app's concurrency (in flight + queued, summed over instances) at ``at`` seconds."""

    at: float
    concurrency: float


@dataclass(frozen=True)
class PolicyState:
    """What one decision hands to the next (``Decision.state``); start with ``PolicyState()``."""

    panic_since: float | None = None
    """When the current panic began (``None``: not panicking)."""
    panic_condition_at: float | None = None
    """The last time the panic condition held; panic ends a stable window after it."""
    last_traffic_at: float | None = None
    """The newest sample time with concurrency > 0."""
    started_at: float | None = None
    """The first decision's time (or its oldest sample): the idle clock before any traffic."""
    recent_wants: tuple[tuple[float, int], ...] = field(default=())
    """``(at, want)`` of the last ``scale_down_delay`` seconds (only entries that can still be the max)."""
    recent_serving: tuple[tuple[float, int], ...] = field(default=())
    """``(at, serving)`` decided in the last stable window (likewise); :func:`plan` parks up to its peak."""

    def peak_serving(self) -> int | None:
        """The highest serving count decided in the last stable window (``None``: no decision yet)."""
        return max((n for _, n in self.recent_serving), default=None)


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` wants now, why, and the state to pass to the next call."""

    serving: int
    """Instances that should be routed."""
    warm: int
    """Warm spares that should exist besides."""
    panic: bool
    reason: str
    """One human sentence, e.g. ``stable: avg 23.4 in flight over 60s / target 10 -> 3``."""
    state: PolicyState
    stable_concurrency: float
    panic_concurrency: float


@dataclass(frozen=True)
class Plan:
    """Instance moves that take (serving, warm) to a decision's counts."""

    promote: int = 0
    """Warm -> serving."""
    start_serving: int = 0
    """New instances to start and route (not enough warm ones)."""
    park: int = 0
    """Serving -> warm (unrouted, kept booted)."""
    start_warm: int = 0
    """New warm instances to refill the pool."""
    stop_warm: int = 0
    """Warm instances beyond the target and the parking allowance, to stop."""


def decide(
    samples: Sequence[Sample],
    serving: int,
    settings: ScalingSettings,
    state: PolicyState,
    now: float,
    forecast: float | None = None,
) -> Decision:
    """The scaling decision at ``now``; see the module docstring for the rules.

    ``serving`` counts the instances routed or on their way to it. Raises ``ValueError`` on a negative
    ``serving``, a negative or non-finite concurrency or forecast.
    """
    if serving < 0:
        raise ValueError(f"serving must be >= 0, got {serving}")
    if forecast is not None and (not _finite(forecast) or forecast < 0):
        raise ValueError(f"forecast must be a non-negative number of requests, got {forecast!r}")
    if not _finite(now):
        raise ValueError(f"now must be a finite number of seconds, got {now!r}")
    for x in samples:
        if not _finite(x.at) or not _finite(x.concurrency) or x.concurrency < 0:
            raise ValueError(f"bad sample {x!r}: at and concurrency must be finite, concurrency >= 0")
    s = settings
    seen = [x for x in samples if x.at <= now]
    stable_vals = [x.concurrency for x in seen if x.at > now - s.stable_window]
    panic_vals = [x.concurrency for x in seen if x.at > now - s.panic_window]
    newest = max(seen, key=lambda x: x.at) if seen else None
    busy_now = newest is not None and newest.concurrency > 0

    started_at = state.started_at
    if started_at is None:
        started_at = min([now, *(x.at for x in seen)])
    last_traffic_at = state.last_traffic_at
    traffic_times = [x.at for x in seen if x.concurrency > 0]
    if traffic_times:
        last_traffic_at = max(traffic_times if last_traffic_at is None else [last_traffic_at, *traffic_times])

    if not stable_vals:
        held = min(max(serving, s.min_instances), s.max_instances)
        new_state = PolicyState(
            state.panic_since,
            state.panic_condition_at,
            last_traffic_at,
            started_at,
            state.recent_wants,
            _push_max(state.recent_serving, now, held, s.stable_window),
        )
        reason = f"no data: no samples in the last {s.stable_window:g}s, holding {held}"
        return _finish(held, reason, s, new_state, forecast, state.panic_since is not None, 0.0, 0.0)

    stable_avg = sum(stable_vals) / len(stable_vals)
    if panic_vals:
        panic_avg = sum(panic_vals) / len(panic_vals)
    else:  # sampled more sparsely than the panic window: the newest sample stands for it
        panic_avg = newest.concurrency if newest is not None else 0.0
    stable_want = _ceil(stable_avg / s.target_concurrency)
    panic_want = _ceil(panic_avg / s.target_concurrency)

    panic_since, panic_condition_at = state.panic_since, state.panic_condition_at
    if panic_want >= s.panic_threshold * max(serving, 1) and panic_want > serving:
        panic_condition_at = now
        if panic_since is None:
            panic_since = now
    elif panic_condition_at is not None and now - panic_condition_at >= s.stable_window:
        panic_since = panic_condition_at = None
    panicking = panic_since is not None

    if panicking:
        want = max(serving, panic_want, stable_want)
        reason = (
            f"panic: avg {_fmt(panic_avg)} in flight over {s.panic_window:g}s / target "
            f"{s.target_concurrency:g} -> {panic_want}"
        )
        if want != panic_want:
            reason += f", never below {want} while panicking"
    else:
        want = stable_want
        reason = (
            f"stable: avg {_fmt(stable_avg)} in flight over {s.stable_window:g}s / target "
            f"{s.target_concurrency:g} -> {want}"
        )

    recent: tuple[tuple[float, int], ...] = ()
    if s.scale_down_delay > 0:
        recent = _push_max(state.recent_wants, now, want, s.scale_down_delay)
        delayed = max(w for _, w in recent)
        if delayed > want:
            want = delayed
            reason += f", held by scale_down_delay {s.scale_down_delay:g}s -> {want}"

    if want < serving:
        slowest = _ceil(serving / s.max_scale_down_rate)
        if want < slowest:
            want = slowest
            reason += f", scale down limited by max_scale_down_rate {s.max_scale_down_rate:g} -> {want}"

    idle_for = now - (last_traffic_at if last_traffic_at is not None else started_at)
    quiet_needed = max(s.scale_to_zero_after, s.scale_down_delay)
    if s.min_instances == 0 and not panicking and not busy_now and idle_for >= quiet_needed:
        target = 0
        reason = f"scale to zero: idle {idle_for:g}s (scale_to_zero_after {s.scale_to_zero_after:g}s)"
    else:
        floor = s.min_instances
        if floor == 0 and (busy_now or (serving > 0 and idle_for < quiet_needed)):
            floor = 1
        target = min(max(want, floor), s.max_instances)
        if target > want:
            if s.min_instances > 0:
                reason += f", min_instances floor -> {target}"
            elif serving > 0:
                reason += f", keeping 1 until idle for {quiet_needed:g}s -> {target}"
        elif target < want:
            reason += f", max_instances cap -> {target}"
        if serving == 0 < target:
            reason += ", scale from zero"

    new_state = PolicyState(
        panic_since,
        panic_condition_at,
        last_traffic_at,
        started_at,
        recent,
        _push_max(state.recent_serving, now, target, s.stable_window),
    )
    return _finish(target, reason, s, new_state, forecast, panicking, stable_avg, panic_avg)


def _finish(
    serving: int,
    reason: str,
    s: ScalingSettings,
    state: PolicyState,
    forecast: float | None,
    panicking: bool,
    stable_avg: float,
    panic_avg: float,
) -> Decision:
    warm = s.prewarm
    if forecast is not None:
        forecasted = _ceil(forecast / s.target_concurrency) - serving
        if forecasted > warm:
            warm = min(forecasted, s.max_instances + s.prewarm - serving)
            if warm > s.prewarm:
                reason += f"; forecast {forecast:.1f} in flight raises the warm floor to {warm}"
    return Decision(serving, warm, panicking, reason, state, stable_avg, panic_avg)


def plan(current_serving: int, current_warm: int, decision: Decision) -> Plan:
    """The moves from (``current_serving``, ``current_warm``) to ``decision``; see "Parking" above.

    Conserves instances: ``serving - park + promote + start_serving == decision.serving`` and the warm
    pool ends within ``[decision.warm, decision.warm + parking_allowance(decision)]``. Never both starts
    and stops warm instances, never both promotes and parks. Raises ``ValueError`` on negative counts.
    """
    if current_serving < 0 or current_warm < 0:
        raise ValueError(f"counts must be >= 0, got serving={current_serving} warm={current_warm}")
    promote = start_serving = park = 0
    if decision.serving > current_serving:
        promote = min(decision.serving - current_serving, current_warm)
        start_serving = decision.serving - current_serving - promote
    else:
        park = current_serving - decision.serving
    warm = current_warm - promote + park
    ceiling = decision.warm + parking_allowance(decision)
    return Plan(
        promote=promote,
        start_serving=start_serving,
        park=park,
        start_warm=max(0, decision.warm - warm),
        stop_warm=max(0, warm - ceiling),
    )


def parking_allowance(decision: Decision) -> int:
    """How many warm instances beyond ``decision.warm`` :func:`plan` keeps rather than stops.

    ``max(1, serving, peak - serving)`` with ``peak`` the highest serving decided in the last stable
    window; 0 once that peak is 0 (nothing served for a whole stable window). A decision that carries no
    history (``PolicyState()``) gets ``max(1, serving)``.
    """
    peak = decision.state.peak_serving()
    if peak is None:
        return max(1, decision.serving)
    if peak == 0:
        return 0
    return max(1, decision.serving, peak - decision.serving)


def _push_max(
    entries: tuple[tuple[float, int], ...], now: float, value: int, window: float
) -> tuple[tuple[float, int], ...]:
    """A sliding-window max: keeps the ``(at, value)`` entries of ``(now - window, now]`` that can still
    be the max (a later entry at least as large makes an earlier one useless), then appends this one."""
    kept = [e for e in entries if now - window < e[0] <= now and e[1] > value]
    return (*kept, (now, value))


def _fmt(x: float) -> str:
    return f"{x:.1f}" if x == 0 or x >= 0.1 else f"{x:.2g}"


def _ceil(x: float) -> int:
    nearest = round(x)
    return int(nearest) if math.isclose(x, nearest, rel_tol=1e-9, abs_tol=1e-12) else math.ceil(x)


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
