"""The predictive warm floor (control_plane/forecast.py): slots by time of week, weighted weeks, the
lead into the next slot, persistence across restarts; how the policy uses it (it only raises the
warm floor); and the real fleet acting on it ahead of a weekly surge. Time is an input: fake datetimes,
no sleeps."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from control_plane import fleet as fleet_module
from control_plane.db import Database
from control_plane.events import EventLog
from control_plane.fleet import Fleet, Revision
from control_plane.forecast import SLOTS_PER_WEEK, Forecaster, fold, predict, slot_of
from runtime.autoscaler import PolicyState, Sample, ScalingSettings, decide
from runtime.backends.base import Instance, InstanceSpec, InstanceState
from runtime.router import Router

MONDAY_9 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)  # a Monday


def test_slots_cover_the_week_in_quarter_hours() -> None:
    assert slot_of(MONDAY_9) == 9 * 4
    assert slot_of(MONDAY_9 + timedelta(minutes=14, seconds=59)) == 36
    assert slot_of(MONDAY_9 + timedelta(minutes=15)) == 37
    assert slot_of(datetime(2026, 12, 6, 23, 59, tzinfo=UTC)) == SLOTS_PER_WEEK - 1  # Sunday night
    assert slot_of(MONDAY_9 + timedelta(weeks=1)) == slot_of(MONDAY_9)


def test_weeks_are_weighted_newest_first() -> None:
    assert fold(0.0, 0, 40.0) == 40.0  # a first week is taken as it is
    assert fold(40.0, 1, 20.0) == 30.0
    assert fold(30.0, 2, 0.0) == 15.0  # a quiet week halves the memory of a busy one


def test_the_next_slot_counts_five_minutes_ahead() -> None:
    history = {36: 5.0, 37: 50.0}
    assert predict(history, MONDAY_9) == 5.0
    assert predict(history, MONDAY_9 + timedelta(minutes=10)) == 50.0  # the rise at 9:15 is near
    assert predict(history, MONDAY_9 + timedelta(minutes=30)) is None  # never seen


@pytest.mark.anyio
async def test_peaks_fold_in_when_a_slot_ends_and_survive_a_restart(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.migrate()
    forecaster = Forecaster(db)
    for minute, concurrency in ((0, 3.0), (5, 12.0), (10, 7.0)):
        forecaster.observe("app", concurrency, MONDAY_9 + timedelta(minutes=minute))
    assert forecaster.forecast("app", MONDAY_9) is None  # the slot is still open
    forecaster.observe("app", 1.0, MONDAY_9 + timedelta(minutes=15))  # 9:15: 9:00 closes at its peak
    assert forecaster.forecast("app", MONDAY_9 + timedelta(weeks=1)) == 12.0
    await asyncio.gather(*forecaster._tasks)
    again = Forecaster(db)
    again.load()
    assert again.forecast("app", MONDAY_9 + timedelta(weeks=1)) == 12.0
    # A second week at 4 in flight: 0.5 * 4 + 0.5 * 12.
    again.observe("app", 4.0, MONDAY_9 + timedelta(weeks=1))
    again.observe("app", 0.0, MONDAY_9 + timedelta(weeks=1, minutes=15))
    assert again.forecast("app", MONDAY_9 + timedelta(weeks=2)) == 8.0
    await asyncio.gather(*again._tasks)
    again.forget("app")
    assert again.forecast("app", MONDAY_9) is None


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_the_forecast_raises_the_warm_floor_and_never_lowers_serving() -> None:
    settings = ScalingSettings(min_instances=1, max_instances=10, target_concurrency=10)
    quiet = [Sample(at=float(t), concurrency=2.0) for t in range(60)]
    plain = decide(quiet, 1, settings, PolicyState(), 60.0, None)
    predicted = decide(quiet, 1, settings, PolicyState(), 60.0, 45.0)  # 45 in flight expected soon
    assert plain.serving == predicted.serving == 1  # live traffic decides what serves
    assert predicted.warm > plain.warm  # the forecast warms spares ahead of the rise
    busy = [Sample(at=float(t), concurrency=80.0) for t in range(60)]
    low_forecast = decide(busy, 8, settings, PolicyState(), 60.0, 5.0)
    assert low_forecast.serving >= 8  # a low forecast never lowers what live traffic needs


# -- the forecast reaches the fleet ---------------------------------------------------------------------


class FakeBackend:
    """A fake backend: instances are ready the moment they are asked for (no processes: what is under
    test is which instances the fleet asks for and when, not how they run)."""

    name = "fake"

    def __init__(self) -> None:
        self.on_exit = None
        self.running: list[Instance] = []
        self.started = 0

    async def start(self, spec: InstanceSpec, *, timeout: float) -> Instance:
        self.started += 1
        instance = Instance(id=f"fake-{self.started}", spec=spec, port=10_000 + self.started)
        instance.transition(InstanceState.WARM)
        self.running.append(instance)
        return instance

    async def stop(self, instance: Instance, *, timeout: float = 10.0) -> None:
        if instance.alive:
            instance.transition(InstanceState.STOPPED)
        if instance in self.running:
            self.running.remove(instance)

    def instances(self) -> list[Instance]:
        return list(self.running)

    def output_tail(self, instance_id: str, lines: int = 50) -> list[str]:
        return []

    async def recover(self) -> list[Instance]:
        return []

    async def release(self, deployment_id: str) -> None:
        pass

    async def close(self, *, timeout: float = 10.0) -> None:
        for instance in list(self.running):
            await self.stop(instance)


SURGE = 40.0
"""In flight every Monday from 9:15 to 9:30 (UTC); 2 the rest of the time."""


def weekly_traffic(when: datetime) -> float:
    return SURGE if when.weekday() == 0 and when.hour == 9 and 15 <= when.minute < 30 else 2.0


class FleetOnAFakeClock:
    """A real fleet and router over the fake backend; wall time and monotonic time are the test's, and
    the router's in-flight count (the fleet's only traffic signal) is the weekly curve at that time."""

    APP = "app-forecast"

    def __init__(self, db: Database, monkeypatch: pytest.MonkeyPatch, start: datetime) -> None:
        self.now = start
        self.epoch = start
        monkeypatch.setattr(fleet_module, "utcnow", lambda: self.now)
        self.backend = FakeBackend()
        self.router = Router()
        self.forecaster = Forecaster(db)
        self.forecaster.load()  # what earlier weeks (an earlier control plane) left in the database
        self.events = EventLog(db)
        self.fleet = Fleet(
            self.backend,  # type: ignore[arg-type]
            self.router,
            verify_timeout=5,
            drain_timeout=1,
            events=self.events,
            forecaster=self.forecaster,
            clock=lambda: (self.now - self.epoch).total_seconds(),
        )
        monkeypatch.setattr(self.router, "in_flight", self._in_flight)

    def _in_flight(self) -> dict[str, int]:
        revision = self.fleet.serving.get(self.APP)
        if revision is None or not revision.serving:
            return {}
        return {revision.serving[0].id: int(weekly_traffic(self.now))}

    @property
    def revision(self) -> Revision:
        return self.fleet.serving[self.APP]

    async def deploy(self, settings: ScalingSettings) -> None:
        spec = InstanceSpec(
            app_id=self.APP,
            deployment_id="dep-1",
            hostname="forecast.localhost",
            python=Path(sys.executable),
            entrypoint="main:app",
            app_dir=Path("."),
        )
        first = await self.backend.start(spec, timeout=5)
        await self.fleet.activate(
            Revision(
                app_id=self.APP,
                deployment_id="dep-1",
                hostname="forecast.localhost",
                spec=spec,
                settings=settings,
                serving=[first],
            )
        )

    async def tick_until(self, end: datetime, step: timedelta = timedelta(seconds=30)) -> None:
        """Tick every ``step`` of fake time up to ``end``; what a tick starts is ready before the next."""
        while self.now < end:
            self.now = min(end, self.now + step)
            self.fleet.tick()
            for _ in range(5):  # the fake backend's starts finish within a few loop iterations
                await asyncio.sleep(0)

    async def close(self) -> None:
        await self.fleet.close()
        await asyncio.gather(*self.forecaster._tasks)
        await self.events.stop()


@pytest.mark.anyio
async def test_a_weekly_surge_is_warmed_for_before_it_comes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two Mondays of history (a surge to 40 in flight at 9:15) seen by the fleet; on the third Monday,
    after a restart, the fleet warms the instances the surge needs before 9:15 while live traffic is
    still 2, and the surge is then served from the warm pool without starting anything."""
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.migrate()
    settings = ScalingSettings(min_instances=1, max_instances=10, target_concurrency=10)

    history = FleetOnAFakeClock(db, monkeypatch, MONDAY_9 - timedelta(minutes=15))
    await history.deploy(settings)
    for week in (0, 1):
        history.now = MONDAY_9 + timedelta(weeks=week) - timedelta(minutes=15)
        await history.tick_until(history.now + timedelta(hours=1))
    assert history.forecaster.forecast(history.APP, MONDAY_9 + timedelta(weeks=2, minutes=20)) == SURGE
    await history.close()

    third = MONDAY_9 + timedelta(weeks=2)
    live = FleetOnAFakeClock(db, monkeypatch, third - timedelta(minutes=10))
    await live.deploy(settings)
    await live.tick_until(third + timedelta(minutes=5))
    decision = live.revision.decision
    assert decision is not None and live.revision.forecast == 2.0  # this quarter-hour was quiet
    assert (decision.serving, decision.warm, len(live.revision.warm)) == (1, 0, 0)

    # 9:10:30: the 9:15 slot is within the lead; live traffic is still 2 in flight.
    await live.tick_until(third + timedelta(minutes=10, seconds=30))
    decision = live.revision.decision
    assert decision is not None and live.revision.forecast == SURGE
    assert decision.serving == 1  # what serves is live traffic's to decide
    assert decision.warm == 3  # ceil(40 / 10) - 1 serving: warmed ahead of the surge
    assert len(live.revision.warm) == 3 and len(live.revision.serving) == 1
    assert len(live.router.upstreams("forecast.localhost")) == 1  # warm, not routed
    started_before_surge = live.backend.started

    # 9:15: the surge arrives and is served by promoting the warm instances: no cold start.
    await live.tick_until(third + timedelta(minutes=15, seconds=30))
    assert live.revision.decision is not None and live.revision.decision.serving == 4
    assert len(live.revision.serving) == 4 and live.revision.pool_hits == 3
    assert len(live.router.upstreams("forecast.localhost")) == 4
    assert live.backend.started == started_before_surge
    scale_events = [e for e in live.events.list(live.APP, limit=500) if e.kind == "scale"]
    assert any(json.loads(e.data).get("forecast") == SURGE for e in scale_events)
    await live.close()
