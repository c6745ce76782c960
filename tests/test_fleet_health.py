"""Revision health in the fleet (control_plane/fleet.py): a crash loop makes the serving revision
``degraded`` (``degraded_oom`` when an OOM kill is in it) and it is healthy again after ``crash_window``
serving without a crash; a rollout the backend reports stuck (kubernetes ``ProgressDeadlineExceeded``)
degrades it until the backend reports progress. The real fleet and router over a fake backend on a fake
clock (the deployer's side, the database record, is in tests/test_alerts_e2e.py and
tests/test_docker_backend.py)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from control_plane.db import Database
from runtime.autoscaler import ScalingSettings
from runtime.backends.base import Instance, InstanceState
from tests.test_forecast import MONDAY_9, FakeBackend, FleetOnAFakeClock

SETTINGS = ScalingSettings(min_instances=1, max_instances=1, prewarm=0)


class RollingBackend(FakeBackend):
    """The fake backend with Kubernetes' view of a rollout, set by the test."""

    def __init__(self) -> None:
        super().__init__()
        self.progressing: dict[str, Any] = {"reason": "NewReplicaSetAvailable"}

    async def rollout(self, deployment_id: str) -> dict[str, Any]:
        return {"exists": True, "observed": True, "progressing": dict(self.progressing)}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.migrate()
    f = FleetOnAFakeClock(db, monkeypatch, MONDAY_9)
    f.backend = RollingBackend()
    f.fleet.backend = f.backend  # type: ignore[assignment]
    f.fleet.crash_window = 60.0
    f.health = []  # type: ignore[attr-defined]
    f.fleet.on_health = lambda app, dep, status, reason: f.health.append((dep, status, reason))  # type: ignore[attr-defined]
    await f.deploy(SETTINGS)
    try:
        yield f
    finally:
        await f.close()


def crash(f: FleetOnAFakeClock, *, oom: bool = False) -> None:
    """The serving instance dies unasked, as a backend reports it."""
    (instance,) = f.revision.serving
    instance.exit_code = -9 if oom else 1
    instance.oom = oom
    instance.transition(InstanceState.STOPPED)
    f.backend.running.remove(instance)
    f.fleet.on_exit(instance)


async def settle(f: FleetOnAFakeClock, seconds: float) -> None:
    """Tick every second of fake time; a hold-off before a restart passes with it."""
    await f.tick_until(f.now + timedelta(seconds=seconds), step=timedelta(seconds=1))


def serving(f: FleetOnAFakeClock) -> list[Instance]:
    return list(f.revision.serving)


@pytest.mark.anyio
async def test_a_crash_loop_degrades_the_revision_until_it_runs_a_window_without_a_crash(
    fleet: FleetOnAFakeClock,
) -> None:
    health: list[tuple[str, str | None, str]] = fleet.health  # type: ignore[attr-defined]
    crash(fleet)
    await settle(fleet, 3)
    assert health == []  # one crash is replaced, nothing more
    assert serving(fleet)

    crash(fleet)  # a second within the window: a crash loop
    assert [(d, s) for d, s, _ in health] == [("dep-1", "degraded")]
    assert "crash-looping, 2 crashes in 60 s" in health[0][2] and "exited with code 1" in health[0][2]
    assert fleet.revision.health == "degraded"

    await settle(fleet, 30)
    assert serving(fleet) and len(health) == 1  # replaced, still degraded within the window
    crash(fleet, oom=True)  # an OOM kill in the loop: the status says so, and stays so
    assert [s for _, s, _ in health] == ["degraded", "degraded_oom"]
    assert "(out of memory)" in health[-1][2]
    await settle(fleet, 10)
    crash(fleet)
    assert [s for _, s, _ in health] == ["degraded", "degraded_oom"]  # not back to plain degraded

    # A window serving without a crash: healthy again, once.
    await settle(fleet, 59)
    assert [s for _, s, _ in health] == ["degraded", "degraded_oom"]
    await settle(fleet, 80)
    assert [s for _, s, _ in health] == ["degraded", "degraded_oom", None]
    assert health[-1][2] == "serving without a crash for 60 s, rollout on track"
    assert fleet.revision.health is None
    events = fleet.events.list(fleet.APP, kind="health")  # newest first
    assert [json.loads(e.data)["status"] for e in reversed(events)] == ["degraded", "degraded_oom", "success"]
    assert events[0].message == "Revision dep-1 is healthy again"


@pytest.mark.anyio
async def test_a_stuck_rollout_degrades_the_revision_until_it_progresses(fleet: FleetOnAFakeClock) -> None:
    health: list[tuple[str, str | None, str]] = fleet.health  # type: ignore[attr-defined]
    backend: RollingBackend = fleet.backend  # type: ignore[assignment]
    await settle(fleet, 25)
    assert health == []  # the rollout is read every 10 s and it is fine

    backend.progressing = {
        "reason": "ProgressDeadlineExceeded",
        "message": 'ReplicaSet "fdp-rev-1" has timed out progressing.',
    }
    await settle(fleet, 12)
    assert [(d, s) for d, s, _ in health] == [("dep-1", "degraded")]
    assert health[0][2] == 'the rollout is stuck: ReplicaSet "fdp-rev-1" has timed out progressing.'
    await settle(fleet, 30)
    assert len(health) == 1  # said once

    backend.progressing = {"reason": "NewReplicaSetAvailable"}
    await settle(fleet, 12)
    assert [s for _, s, _ in health] == ["degraded", None]


@pytest.mark.anyio
async def test_a_revision_no_longer_serving_is_not_reported(fleet: FleetOnAFakeClock) -> None:
    health: list[tuple[str, str | None, str]] = fleet.health  # type: ignore[attr-defined]
    backend: RollingBackend = fleet.backend  # type: ignore[assignment]
    backend.progressing = {"reason": "ProgressDeadlineExceeded", "message": "stuck"}
    revision = fleet.revision
    await fleet.fleet.remove(fleet.APP)  # the app is deleted while a check is in flight
    await fleet.fleet._check_rollout(revision, backend.rollout)
    assert health == [] and revision.health is None
