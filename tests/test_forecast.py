"""The predictive warm floor (control_plane/forecast.py): slots by time of week, weighted weeks, the
lead into the next slot, persistence across restarts; and how the policy uses it (it only raises the
warm floor). Time is an input: fake datetimes, no sleeps."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from control_plane.db import Database
from control_plane.forecast import SLOTS_PER_WEEK, Forecaster, fold, predict, slot_of
from runtime.autoscaler import PolicyState, Sample, ScalingSettings, decide

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
