"""The autoscaling policy, driven by a fake clock (plain floats): scenarios, tables and invariants."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.autoscaler import (
    Decision,
    Plan,
    PolicyState,
    Sample,
    ScalingSettings,
    decide,
    parking_allowance,
    plan,
)

TICK = 0.25


def steady(value: float, start: float, end: float, tick: float = TICK) -> list[Sample]:
    """Samples of a constant ``value`` every ``tick`` seconds in ``(start, end]``."""
    n = round((end - start) / tick)
    return [Sample(start + (i + 1) * tick, value) for i in range(n)]


def decision(serving: int, warm: int) -> Decision:
    return Decision(serving, warm, False, "test", PolicyState(), 0.0, 0.0)


@dataclass
class Sim:
    """Ticks ``decide`` every ``tick`` seconds on a fake clock and applies ``plan`` to the instance counts."""

    settings: ScalingSettings
    serving: int = 1
    warm: int = 0
    tick: float = TICK
    now: float = 0.0
    state: PolicyState = field(default_factory=PolicyState)
    samples: deque[Sample] = field(default_factory=deque)
    history: list[tuple[float, int, Decision, Plan]] = field(default_factory=list)

    def run(
        self, load: Callable[[float], float], seconds: float, forecast: float | None = None
    ) -> list[Decision]:
        out = []
        start = self.now
        for i in range(1, round(seconds / self.tick) + 1):
            self.now = start + i * self.tick
            self.samples.append(Sample(self.now, load(self.now)))
            while self.samples[0].at <= self.now - self.settings.stable_window:
                self.samples.popleft()
            before = self.serving
            d = decide(self.samples, self.serving, self.settings, self.state, self.now, forecast)
            p = plan(self.serving, self.warm, d)
            self.warm += p.park - p.promote + p.start_warm - p.stop_warm
            self.serving = d.serving
            self.state = d.state
            self.history.append((self.now, before, d, p))
            out.append(d)
        return out

    def moves(self, after: float = -math.inf) -> dict[str, int]:
        """Instances started and stopped by the plans applied after ``after`` seconds."""
        plans = [p for t, _, _, p in self.history if t > after]
        return {
            "started": sum(p.start_serving + p.start_warm for p in plans),
            "stopped": sum(p.stop_warm for p in plans),
        }


def constant(value: float) -> Callable[[float], float]:
    return lambda _t: value


# -- settings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_instances": -1}, "min_instances must be a non-negative integer"),
        ({"max_instances": 0, "min_instances": 0}, "max_instances must be at least 1"),
        (
            {"min_instances": 5, "max_instances": 3},
            r"min_instances \(5\) must not exceed max_instances \(3\)",
        ),
        ({"min_instances": 1.5}, "min_instances must be a non-negative integer"),
        ({"prewarm": True}, "prewarm must be a non-negative integer"),
        ({"prewarm": -2}, "prewarm must be a non-negative integer"),
        ({"target_concurrency": 0}, "target_concurrency must be a positive number of requests"),
        ({"target_concurrency": -3.0}, "target_concurrency must be a positive"),
        ({"target_concurrency": math.nan}, "target_concurrency must be a positive"),
        ({"scale_to_zero_after": 0}, "scale_to_zero_after must be a positive number of seconds"),
        ({"stable_window": -1}, "stable_window must be a positive"),
        ({"stable_window": math.inf}, "stable_window must be a positive"),
        ({"panic_window": 0}, "panic_window must be a positive"),
        ({"panic_window": 61.0}, r"panic_window \(61.0s\) must not exceed stable_window \(60.0s\)"),
        ({"panic_threshold": 0.5}, "panic_threshold must be at least 1.0"),
        ({"max_scale_down_rate": 1.0}, "max_scale_down_rate must be greater than 1"),
        ({"max_scale_down_rate": 0.5}, "max_scale_down_rate must be greater than 1"),
        ({"scale_down_delay": -1.0}, "scale_down_delay must be >= 0 seconds"),
    ],
)
def test_settings_reject_nonsense(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScalingSettings(**kwargs)


def test_settings_defaults_are_knatives() -> None:
    s = ScalingSettings()
    assert (s.stable_window, s.panic_window, s.panic_threshold, s.max_scale_down_rate) == (60, 6, 2, 2)
    assert (s.min_instances, s.max_instances, s.target_concurrency, s.prewarm) == (1, 10, 10, 0)
    assert ScalingSettings(min_instances=0, max_instances=1, panic_window=60).panic_window == 60


@pytest.mark.parametrize(
    "call",
    [
        lambda: decide([], -1, ScalingSettings(), PolicyState(), 0.0),
        lambda: decide([Sample(0.0, -1.0)], 1, ScalingSettings(), PolicyState(), 0.0),
        lambda: decide([Sample(0.0, math.nan)], 1, ScalingSettings(), PolicyState(), 0.0),
        lambda: decide([Sample(math.nan, 1.0)], 1, ScalingSettings(), PolicyState(), 0.0),
        lambda: decide([], 1, ScalingSettings(), PolicyState(), math.inf),
        lambda: decide([], 1, ScalingSettings(), PolicyState(), 0.0, forecast=-1.0),
        lambda: plan(-1, 0, decision(1, 0)),
    ],
)
def test_bad_inputs_raise(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        call()


# -- stable mode -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("load", "expected"), [(10, 1), (30, 3), (50, 5), (100, 10), (0.5, 1), (10.5, 2)])
def test_steady_load_holds_its_count(load: float, expected: int) -> None:
    sim = Sim(ScalingSettings(), serving=expected)
    decisions = sim.run(constant(load), 180)
    assert {d.serving for d in decisions} == {expected}
    assert not any(d.panic for d in decisions)
    assert decisions[-1].reason == f"stable: avg {load:.1f} in flight over 60s / target 10 -> {expected}"
    assert sim.moves() == {"started": 0, "stopped": 0}


def test_float_noise_never_adds_an_instance() -> None:
    samples = [Sample(float(i), 0.1 * 3 * 10) for i in range(1, 11)]  # 3.0000000000000004 each
    d = decide(samples, 1, ScalingSettings(target_concurrency=1), PolicyState(), 10.0)
    assert d.serving == 3


def test_ramp_up_follows_the_load_and_starts_each_instance_once() -> None:
    sim = Sim(ScalingSettings(max_instances=20))
    sim.run(lambda t: min(100.0, t), 200)  # +1 client a second up to 100, then flat
    for t, _, d, _ in sim.history:
        assert d.serving <= max(1, math.ceil(min(100.0, t) / 10)), t  # never ahead of the load
    assert sim.serving == 10
    # Leaving panic mid-ramp hands over to the lagging 60 s average (as the KPA does) and parks two;
    # they are promoted again, so the ramp starts exactly the nine instances it needs and stops none.
    assert any(p.park for *_, p in sim.history) and any(p.promote for *_, p in sim.history)
    assert sim.moves() == {"started": 9, "stopped": 0}


def test_just_started_policy_averages_what_it_has() -> None:
    d = decide(steady(40, 0, 5), 1, ScalingSettings(), PolicyState(), 5.0)
    assert d.stable_concurrency == 40
    assert d.serving == 4


def test_no_samples_holds_serving_within_bounds() -> None:
    s = ScalingSettings(min_instances=2, max_instances=5)
    assert decide([], 3, s, PolicyState(), 100.0).serving == 3
    assert decide([], 9, s, PolicyState(), 100.0).serving == 5
    old = decide([Sample(10.0, 500.0)], 1, s, PolicyState(), 100.0)  # outside the 60 s window
    assert (old.serving, old.reason) == (2, "no data: no samples in the last 60s, holding 2")


def test_sparse_samples_stand_for_the_panic_window() -> None:
    samples = [Sample(0.0, 10.0), Sample(20.0, 10.0), Sample(40.0, 100.0)]
    d = decide(samples, 1, ScalingSettings(), PolicyState(), 45.0)
    assert d.panic_concurrency == 100.0
    assert d.panic and d.serving == 10


def test_samples_from_the_future_are_ignored() -> None:
    samples = [*steady(10, 0, 60), Sample(61.0, 1000.0)]
    d = decide(samples, 1, ScalingSettings(), PolicyState(), 60.0)
    assert (d.serving, d.panic) == (1, False)


def test_scale_down_is_rate_limited() -> None:
    s = ScalingSettings(max_instances=20)
    d = decide(steady(5, 0, 60), 16, s, PolicyState(), 60.0)
    assert d.serving == 8
    assert d.reason.endswith("scale down limited by max_scale_down_rate 2 -> 8")
    s3 = replace(s, max_scale_down_rate=3.0)
    assert decide(steady(5, 0, 60), 16, s3, PolicyState(), 60.0).serving == 6


@pytest.mark.parametrize("delay", [0.0, 30.0])
def test_scale_down_delay_holds_the_highest_recent_want(delay: float) -> None:
    sim = Sim(ScalingSettings(scale_down_delay=delay), serving=5)
    sim.run(constant(50), 60)
    assert sim.serving == 5
    decisions = sim.run(constant(10), 120)
    first_drop = (next(i for i, d in enumerate(decisions) if d.serving < 5) + 1) * TICK
    # The 60 s average reaches 40 (want 4) 15 s after the drop, so the last want of 5 is one tick
    # earlier; the delay holds it for `delay` s more.
    assert first_drop == (15 if not delay else 15 - TICK + delay)
    if delay:
        assert decisions[round(first_drop / TICK) - 2].reason.endswith("held by scale_down_delay 30s -> 5")
        assert len(sim.state.recent_wants) <= 3  # only the entries that can still be the max
    assert decisions[-1].serving == 1


# -- panic mode ------------------------------------------------------------------------------------------


def test_sudden_10x_surge_panics_within_one_tick_and_scales_up() -> None:
    sim = Sim(ScalingSettings(max_instances=50))
    sim.run(constant(10), 60)
    assert (sim.serving, sim.state.panic_since) == (1, None)
    surge = sim.run(constant(100), 10)
    assert surge[0].panic and surge[0].serving >= 2
    assert surge[0].reason.startswith("panic: avg 13.8 in flight over 6s / target 10 -> 2")
    assert sim.state.panic_since == 60.25
    at_window = surge[round(6 / TICK) - 1]
    assert at_window.serving == 10  # the whole surge inside the panic window: ten instances at once


def test_panic_scale_up_is_uncapped_by_rate() -> None:
    s = ScalingSettings(max_instances=200)
    d = decide(steady(1000, 54, 60), 1, s, PolicyState(), 60.0)
    assert (d.panic, d.serving) == (True, 100)
    assert decide(steady(1000, 54, 60), 1, replace(s, max_instances=40), PolicyState(), 60.0).serving == 40


def test_panic_needs_the_want_above_serving() -> None:
    s = ScalingSettings(panic_threshold=1.0, max_instances=20)
    at_capacity = decide(steady(40, 0, 60), 4, s, PolicyState(), 60.0)
    assert not at_capacity.panic
    assert decide(steady(50, 0, 60), 4, s, PolicyState(), 60.0).panic


def test_surge_ends_no_scale_down_until_a_stable_window_then_rate_limited_steps() -> None:
    sim = Sim(ScalingSettings(max_instances=50))
    sim.run(constant(10), 60)
    sim.run(constant(100), 30)
    assert sim.serving == 10
    last_condition = sim.state.panic_condition_at
    assert last_condition is not None and 60 < last_condition < 67
    after = sim.run(constant(10), 200)
    times = [sim.history[-len(after) + i][0] for i in range(len(after))]
    for t, d in zip(times, after, strict=True):
        if t < last_condition + 60:
            assert d.panic and d.serving == 10, t
    exit_index = next(i for i, d in enumerate(after) if not d.panic)
    assert times[exit_index] == last_condition + 60
    previous = 10
    for d in after[exit_index:]:
        assert d.serving >= math.ceil(previous / 2)
        previous = d.serving
    assert after[-1].serving == 1


# -- zero ------------------------------------------------------------------------------------------------


def test_scale_to_zero_after_idle() -> None:
    sim = Sim(ScalingSettings(min_instances=0), serving=2)
    sim.run(constant(20), 60)
    idle = sim.run(constant(0), 400)
    zero_at = next(i for i, d in enumerate(idle) if d.serving == 0)
    assert zero_at * TICK + TICK == 300
    assert all(d.serving == 1 for d in idle[round(70 / TICK) : zero_at])  # kept at 1 until then
    assert idle[zero_at].reason == "scale to zero: idle 300s (scale_to_zero_after 300s)"
    assert {d.serving for d in idle[zero_at:]} == {0}


def test_scale_to_zero_waits_for_the_scale_down_delay_too() -> None:
    s = ScalingSettings(min_instances=0, scale_to_zero_after=10, scale_down_delay=30)
    assert decide(steady(0, 0, 25), 1, s, PolicyState(started_at=0.0), 25.0).serving == 1
    assert decide(steady(0, 0, 30), 1, s, PolicyState(started_at=0.0), 30.0).serving == 0


def test_fresh_app_without_traffic_goes_to_zero_and_an_app_at_zero_stays_there() -> None:
    s = ScalingSettings(min_instances=0)
    sim = Sim(s, serving=1)
    decisions = sim.run(constant(0), 301)
    assert decisions[round(299 / TICK)].serving == 1
    assert decisions[-1].serving == 0
    cold = Sim(s, serving=0)
    assert {d.serving for d in cold.run(constant(0), 20)} == {0}


def test_scale_from_zero_on_first_traffic() -> None:
    sim = Sim(ScalingSettings(min_instances=0), serving=0)
    sim.run(constant(0), 400)
    assert sim.serving == 0
    first = sim.run(constant(1), TICK)[0]
    assert first.serving == 1
    assert first.reason == "stable: avg 0.0042 in flight over 60s / target 10 -> 1, scale from zero"
    assert sim.history[-1][3] == Plan(start_serving=1)


def test_scale_from_zero_promotes_a_prewarmed_spare() -> None:
    sim = Sim(ScalingSettings(min_instances=0, prewarm=1), serving=0, warm=1)
    sim.run(constant(0), 10)
    sim.run(constant(3), TICK)
    assert sim.history[-1][3] == Plan(promote=1, start_warm=1)
    assert (sim.serving, sim.warm) == (1, 1)


def test_scale_from_zero_with_a_queue_panics_up() -> None:
    d = decide(steady(50, 54, 60), 0, ScalingSettings(min_instances=0), PolicyState(), 60.0)
    assert (d.panic, d.serving) == (True, 5)


def test_min_instances_floor_and_max_cap() -> None:
    s = ScalingSettings(min_instances=3, max_instances=6, max_scale_down_rate=10)
    sim = Sim(s, serving=6)
    decisions = sim.run(constant(0), 400)
    assert {d.serving for d in decisions} == {3}  # never to zero either
    assert decisions[0].reason.endswith("limited by max_scale_down_rate 10 -> 1, min_instances floor -> 3")
    flood = decide(steady(1000, 0, 60), 6, s, PolicyState(), 60.0)
    assert flood.serving == 6
    assert flood.reason.endswith("max_instances cap -> 6")


# -- warm pool and forecast ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("forecast", "prewarm", "warm"),
    [
        (None, 0, 0),
        (None, 2, 2),
        (45.0, 0, 3),  # ceil(45 / 10) - 2 serving
        (45.0, 4, 4),  # prewarm already covers it
        (5.0, 1, 1),  # a forecast below the load lowers nothing
        (0.0, 0, 0),
        (500.0, 1, 9),  # capped: serving + warm <= max_instances + prewarm
    ],
)
def test_forecast_raises_the_warm_floor_only(forecast: float | None, prewarm: int, warm: int) -> None:
    s = ScalingSettings(prewarm=prewarm)
    d = decide(steady(20, 0, 60), 2, s, PolicyState(), 60.0, forecast)
    assert (d.serving, d.warm) == (2, warm)  # 20 in flight: 2 serving, whatever the forecast
    if warm > prewarm:
        assert d.reason.endswith(f"; forecast {forecast:.1f} in flight raises the warm floor to {warm}")


def test_forecast_does_not_keep_an_idle_app_from_zero() -> None:
    s = ScalingSettings(min_instances=0)
    d = decide(steady(0, 0, 60), 1, s, PolicyState(started_at=-400.0), 60.0, forecast=30.0)
    assert (d.serving, d.warm) == (0, 3)


# -- plan ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "target", "expected"),
    [
        ((2, 0), (2, 0), Plan()),
        ((2, 3), (5, 0), Plan(promote=3)),
        ((2, 1), (5, 1), Plan(promote=1, start_serving=2, start_warm=1)),
        ((0, 0), (3, 2), Plan(start_serving=3, start_warm=2)),
        ((10, 0), (5, 0), Plan(park=5)),  # allowance max(1, 5) = 5 parked
        ((10, 0), (3, 1), Plan(park=7, stop_warm=3)),  # keep 1 + 3
        ((1, 0), (0, 0), Plan(park=1)),  # the last one parks (allowance 1)
        ((0, 4), (0, 1), Plan(stop_warm=2)),
        ((3, 2), (3, 2), Plan()),
        ((3, 4), (3, 2), Plan()),  # within allowance: nothing stops
    ],
)
def test_plan_table(current: tuple[int, int], target: tuple[int, int], expected: Plan) -> None:
    """Serving and warm counts before and after; decisions without history (allowance max(1, serving))."""
    assert plan(*current, decision(*target)) == expected


def test_parking_allowance_keeps_the_recent_peak_then_lets_go_at_zero() -> None:
    assert parking_allowance(decision(0, 0)) == 1  # no history: max(1, serving)
    assert parking_allowance(decision(6, 0)) == 6
    s = ScalingSettings(min_instances=0, scale_to_zero_after=30, stable_window=10, panic_window=1)
    sim = Sim(s, serving=10)
    sim.run(constant(100), 10)
    d = sim.run(constant(0), 10)[-1]  # t=20: the average has drained
    assert (d.serving, d.state.peak_serving(), parking_allowance(d)) == (1, 10, 9)
    assert (sim.warm, sim.moves()["stopped"]) == (9, 0)  # every scaled-down instance parked
    d = sim.run(constant(0), 10)[-1]  # t=30: the peak has left the stable window
    assert (parking_allowance(d), sim.warm) == (1, 1)
    d = sim.run(constant(0), 10)[-1]  # t=40: idle 30 s
    assert (d.serving, parking_allowance(d), sim.warm) == (0, 1, 1)  # the last one parks...
    d = sim.run(constant(0), 10)[-1]
    assert (d.state.peak_serving(), parking_allowance(d), sim.warm) == (0, 0, 0)  # ...for a window
    assert sim.moves() == {"started": 0, "stopped": 10}


# -- square wave: parked instances are reused --------------------------------------------------------------


def test_square_wave_does_not_churn_after_the_first_period() -> None:
    def square(t: float) -> float:
        return 10.0 if (t % 40) <= 20 else 100.0  # 10 clients for 20 s, then 100 for 20 s

    sim = Sim(ScalingSettings(max_instances=20))
    sim.run(square, 3 * 40)
    assert sim.moves(after=0)["started"] >= 9  # the first rising edge starts the fleet
    assert sim.moves(after=40) == {"started": 0, "stopped": 0}
    assert any(p.park for t, _, _, p in sim.history if t > 40)
    assert any(p.promote for t, _, _, p in sim.history if t > 40)
    assert max(d.serving for _, _, d, _ in sim.history) == 10


def test_square_wave_without_parking_would_churn() -> None:
    """The control: the same wave, stopping every scaled-down instance, restarts some of them."""
    sim = Sim(ScalingSettings(max_instances=20))
    starts = 0
    sim.run(lambda t: 10.0 if (t % 40) <= 20 else 100.0, 40)
    for _ in range(2 * 40 * 4):
        before = sim.serving
        sim.run(lambda t: 10.0 if (t % 40) <= 20 else 100.0, TICK)
        sim.warm = 0
        starts += max(0, sim.serving - before)
    assert starts > 0


# -- invariants ------------------------------------------------------------------------------------------


@st.composite
def scaling_settings(draw: st.DrawFn) -> ScalingSettings:
    minimum = draw(st.integers(0, 5))
    stable = draw(st.floats(6, 120))
    return ScalingSettings(
        min_instances=minimum,
        max_instances=draw(st.integers(max(minimum, 1), 30)),
        target_concurrency=draw(st.floats(0.5, 50)),
        prewarm=draw(st.integers(0, 3)),
        scale_to_zero_after=draw(st.floats(1, 400)),
        stable_window=stable,
        panic_window=draw(st.floats(1, stable)),
        panic_threshold=draw(st.floats(1, 5)),
        max_scale_down_rate=draw(st.floats(1.01, 10)),
        scale_down_delay=draw(st.sampled_from([0.0, 5.0, 30.0])),
    )


@st.composite
def policy_state(draw: st.DrawFn) -> PolicyState:
    panic = draw(st.booleans())
    since = draw(st.floats(-300, 0))
    return PolicyState(
        panic_since=since if panic else None,
        panic_condition_at=draw(st.floats(since, 0)) if panic else None,
        last_traffic_at=draw(st.none() | st.floats(-500, 0)),
        started_at=draw(st.none() | st.floats(-500, 0)),
        recent_wants=tuple(
            (draw(st.floats(-30, 0)), draw(st.integers(0, 30))) for _ in range(draw(st.integers(0, 3)))
        ),
    )


samples_strategy = st.lists(
    st.builds(Sample, at=st.floats(-130, 0), concurrency=st.floats(0, 2000) | st.just(0.0)), max_size=40
)


@settings(max_examples=200, deadline=None, database=None)
@given(
    samples=samples_strategy,
    serving=st.integers(0, 30),
    s=scaling_settings(),
    state=policy_state(),
    forecast=st.none() | st.floats(0, 3000),
)
def test_decide_invariants(
    samples: list[Sample], serving: int, s: ScalingSettings, state: PolicyState, forecast: float | None
) -> None:
    d = decide(samples, serving, s, state, 0.0, forecast)
    assert d == decide(samples, serving, s, state, 0.0, forecast)  # deterministic
    assert s.min_instances <= d.serving <= s.max_instances
    recent = [x for x in samples if x.at > -s.stable_window]
    newest = max(recent, key=lambda x: x.at) if recent else None
    if serving == 0 and newest is not None and newest.concurrency > 0:
        assert d.serving >= 1  # scale from zero
    if d.panic and serving <= s.max_instances:
        assert d.serving >= serving  # panic never scales down
    if 0 < d.serving < serving:
        assert d.serving >= min(math.ceil(serving / s.max_scale_down_rate - 1e-9), s.max_instances)
    if d.serving == 0 and serving > 0:
        assert d.reason.startswith(("scale to zero", "no data")) or s.max_instances < serving
    assert s.prewarm <= d.warm and d.serving + d.warm <= s.max_instances + s.prewarm
    plain = decide(samples, serving, s, state, 0.0)
    assert (plain.serving, plain.panic, plain.state) == (d.serving, d.panic, d.state)
    assert d.warm >= plain.warm  # a forecast raises, never lowers
    p = plan(serving, 0, d)
    assert serving - p.park + p.promote + p.start_serving == d.serving


@settings(max_examples=300, deadline=None, database=None)
@given(
    serving=st.integers(0, 40),
    warm=st.integers(0, 40),
    target_serving=st.integers(0, 40),
    target_warm=st.integers(0, 10),
    peak=st.none() | st.integers(0, 40),
)
def test_plan_invariants(
    serving: int, warm: int, target_serving: int, target_warm: int, peak: int | None
) -> None:
    history = () if peak is None else ((0.0, max(peak, target_serving)),)
    d = replace(decision(target_serving, target_warm), state=PolicyState(recent_serving=history))
    allowance = parking_allowance(d)
    assert allowance >= (max(1, target_serving) if peak is None or max(peak, target_serving) else 0)
    p = plan(serving, warm, d)
    assert p == plan(serving, warm, d)
    assert min(p.promote, p.start_serving, p.park, p.start_warm, p.stop_warm) >= 0
    assert serving - p.park + p.promote + p.start_serving == target_serving  # conserved
    final_warm = warm + p.park - p.promote + p.start_warm - p.stop_warm
    assert target_warm <= final_warm <= target_warm + allowance
    assert not (p.start_warm and p.stop_warm)
    assert not (p.promote and p.park)
    assert p.start_serving == 0 or p.promote == warm  # warm ones are promoted before starting new ones
    if target_warm <= warm + p.park - p.promote <= target_warm + allowance:
        assert p.start_warm == p.stop_warm == 0  # inside the band: leave the pool alone


@settings(max_examples=40, deadline=None, database=None)
@given(
    loads=st.lists(st.floats(0, 300), min_size=1, max_size=8),
    s=scaling_settings(),
)
def test_panic_never_scales_down_over_a_run(loads: list[float], s: ScalingSettings) -> None:
    sim = Sim(s, serving=max(s.min_instances, 1), tick=1.0)
    for load in loads:
        sim.run(constant(load), 10)
    for _, before, d, _ in sim.history:
        if d.panic:
            assert d.serving >= min(before, s.max_instances)
        elif 0 < d.serving < before:
            assert d.serving >= math.ceil(before / s.max_scale_down_rate - 1e-9)
