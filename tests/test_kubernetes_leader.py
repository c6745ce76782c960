"""Leader election (control_plane/leader.py): the pure rules with a fake clock, then two candidates
campaigning for one Lease on the FAKE API server (real HTTP, resourceVersion conflicts), on the same
fake clock: no test sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

pytest.importorskip("kubernetes")

from control_plane.leader import LEADER_LABEL, Action, LeaderElector, Lease, Timing, decide
from runtime.backends._k8s_client import Kube
from tests.kubefake import FakeCluster

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
TIMING = Timing(lease_duration=15, renew_deadline=10, retry_period=2)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# -- the rules -------------------------------------------------------------------------------------------


def test_no_lease_is_acquired() -> None:
    assert decide(None, "a", T0, TIMING, last_renewed=None) is Action.ACQUIRE


def test_the_holder_renews_until_its_renew_deadline_passes() -> None:
    lease = Lease(holder="a", renewed=at(0), duration=15)

    assert decide(lease, "a", at(9), TIMING, last_renewed=at(0)) is Action.RENEW
    assert decide(lease, "a", at(10.5), TIMING, last_renewed=at(0)) is Action.STEP_DOWN


def test_a_follower_waits_for_the_lease_to_expire() -> None:
    lease = Lease(holder="a", renewed=at(0), duration=15)

    assert decide(lease, "b", at(14), TIMING, last_renewed=None) is Action.FOLLOW
    assert decide(lease, "b", at(15.5), TIMING, last_renewed=None) is Action.TAKE_OVER
    released = Lease(holder="", renewed=at(0), duration=15)
    assert decide(released, "b", at(1), TIMING, last_renewed=None) is Action.TAKE_OVER


def test_a_leader_that_finds_another_holder_steps_down() -> None:
    lease = Lease(holder="b", renewed=at(20), duration=15)

    assert decide(lease, "a", at(21), TIMING, last_renewed=at(18)) is Action.STEP_DOWN


def test_timing_must_let_a_leader_stop_before_another_may_start() -> None:
    with pytest.raises(ValueError):
        Timing(lease_duration=10, renew_deadline=10, retry_period=2)


# -- against the API -------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCluster]:
    with FakeCluster(tmp_path_factory.mktemp("kubefake"), run_pods=False) as c:
        yield c


def candidate(kube: Kube, name: str, clock: Clock, events: list[str], lease: str) -> LeaderElector:
    async def started() -> None:
        events.append(f"{name} leads")

    async def stopped() -> None:
        events.append(f"{name} stops")

    return LeaderElector(
        kube,
        namespace="default",
        name=lease,
        identity=name,
        on_started=started,
        on_stopped=stopped,
        timing=TIMING,
        clock=clock,
    )


def test_one_candidate_leads_and_the_other_takes_over_when_it_stops_renewing(
    cluster: FakeCluster, tmp_path: Path
) -> None:
    kube = Kube(str(cluster.kubeconfig))
    clock, events = Clock(), []
    a, b = candidate(kube, "a", clock, events, "lease-1"), candidate(kube, "b", clock, events, "lease-1")

    async def scenario() -> None:
        assert await a.step() is Action.ACQUIRE
        assert await b.step() is Action.FOLLOW
        clock.advance(2)
        assert await a.step() is Action.RENEW
        clock.advance(14)  # a renewed 14 s ago: still valid
        assert await b.step() is Action.FOLLOW
        clock.advance(2)  # a stopped renewing (partitioned): expired for b, past the deadline for a
        assert await b.step() is Action.TAKE_OVER
        assert await a.step() is Action.STEP_DOWN

    asyncio.run(scenario())
    lease = kube.get("Lease", "default", "lease-1")
    kube.close()

    assert events == ["a leads", "b leads", "a stops"]
    assert (
        lease is not None
        and lease["spec"]["holderIdentity"] == "b"
        and lease["spec"]["leaseTransitions"] == 1
    )
    assert (a.leading, b.leading) == (False, True)


def test_two_candidates_racing_for_an_expired_lease_elect_one(cluster: FakeCluster) -> None:
    kube = Kube(str(cluster.kubeconfig))
    clock, events = Clock(), []
    a, b = candidate(kube, "a", clock, events, "lease-2"), candidate(kube, "b", clock, events, "lease-2")

    async def scenario() -> list[Action]:
        return list(await asyncio.gather(a.step(), b.step()))

    actions = asyncio.run(scenario())
    kube.close()

    assert sorted(action.value for action in actions) == ["acquire", "follow"]
    assert [a.leading, b.leading].count(True) == 1  # the loser's write conflicted (409): it follows
    assert len(events) == 1


def test_release_hands_the_lease_over_at_once_and_labels_follow_the_leader(cluster: FakeCluster) -> None:
    kube = Kube(str(cluster.kubeconfig))
    kube.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "cp-a", "namespace": "default"},
            "spec": {"containers": [{"name": "c", "image": "i"}]},
        }
    )
    clock, events = Clock(), []
    a = candidate(kube, "a", clock, events, "lease-3")
    a.pod = "cp-a"
    b = candidate(kube, "b", clock, events, "lease-3")

    async def scenario() -> None:
        await a.step()
        pod = kube.get("Pod", "default", "cp-a") or {}
        assert pod["metadata"]["labels"][LEADER_LABEL] == "true"
        await a.release()
        assert await b.step() is Action.TAKE_OVER  # no waiting for the lease to expire

    asyncio.run(scenario())
    pod = kube.get("Pod", "default", "cp-a") or {}
    kube.close()

    assert LEADER_LABEL not in (pod["metadata"].get("labels") or {})
    assert events == ["a leads", "a stops", "b leads"]
