"""The predictive warm floor: each app's traffic by time of week.

A week is cut into 672 quarter-hour slots (UTC). While a slot is current the control plane tracks the
app's peak concurrency in it; when the slot ends, the peak is folded into that slot's history as an
exponentially weighted average (recent weeks count more). The forecast for *now* is the larger of the
current slot's history and the next slot's (a rise predicted in the coming quarter-hour warms
instances ahead of it). It only ever raises the warm floor; live traffic decides the rest.
"""

from __future__ import annotations

import asyncio
import math
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlmodel import select

from control_plane.db import Database
from control_plane.models import TrafficSlot, utcnow

SLOTS_PER_WEEK = 7 * 96
SLOT = timedelta(minutes=15)
WEIGHT = 0.5
"""Weight of the newest week in the average."""
LEAD = timedelta(minutes=5)
"""How far ahead the next slot's history starts to count."""


def slot_of(when: datetime) -> int:
    return when.weekday() * 96 + when.hour * 4 + when.minute // 15


def fold(previous: float, weeks: int, observed: float) -> float:
    """The new history value of a slot after one more week was observed."""
    if weeks <= 0:
        return observed
    return WEIGHT * observed + (1 - WEIGHT) * previous


def predict(history: dict[int, float], now: datetime) -> float | None:
    """Expected peak concurrency around ``now``; None when this time of week was never seen."""
    slots = {slot_of(now), slot_of(now + LEAD)}
    values = [history[s] for s in slots if s in history]
    return max(values) if values else None


@dataclass
class _AppTraffic:
    slot: int
    peak: float = 0.0
    history: dict[int, float] = field(default_factory=dict)
    weeks: dict[int, int] = field(default_factory=dict)


class Forecaster:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._apps: dict[str, _AppTraffic] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Two closes of one slot can be written by two worker threads at once (both would insert).
        self._persisting = threading.Lock()

    def load(self) -> None:
        with self.db.session() as s:
            for row in s.exec(select(TrafficSlot)).all():
                traffic = self._apps.setdefault(row.app_id, _AppTraffic(slot=slot_of(utcnow())))
                traffic.history[row.slot] = row.peak
                traffic.weeks[row.slot] = row.weeks

    def observe(self, app_id: str, concurrency: float, now: datetime) -> None:
        """Record one sample; closes the previous slot when a new one began."""
        slot = slot_of(now)
        traffic = self._apps.get(app_id)
        if traffic is None:
            traffic = self._apps[app_id] = _AppTraffic(slot=slot)
        if slot != traffic.slot:
            self._close(app_id, traffic)
            traffic.slot, traffic.peak = slot, 0.0
        traffic.peak = max(traffic.peak, concurrency)

    def forecast(self, app_id: str, now: datetime) -> float | None:
        traffic = self._apps.get(app_id)
        return predict(traffic.history, now) if traffic else None

    def forget(self, app_id: str) -> None:
        self._apps.pop(app_id, None)

    def _close(self, app_id: str, traffic: _AppTraffic) -> None:
        slot, observed = traffic.slot, traffic.peak
        weeks = traffic.weeks.get(slot, 0)
        value = fold(traffic.history.get(slot, 0.0), weeks, observed)
        if math.isfinite(value):
            traffic.history[slot] = value
            traffic.weeks[slot] = weeks + 1
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(self._persist, app_id, slot, value, weeks + 1), name=f"traffic-{app_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _persist(self, app_id: str, slot: int, peak: float, weeks: int) -> None:
        with self._persisting, self.db.session() as s:
            row = s.get(TrafficSlot, (app_id, slot))
            if row is None:
                row = TrafficSlot(app_id=app_id, slot=slot)
            elif row.weeks > weeks:
                return  # a later close of the slot was written first: it already holds this one
            row.peak, row.weeks, row.updated_at = peak, weeks, utcnow()
            s.add(row)
            s.commit()
