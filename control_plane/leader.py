"""Leader election over a Kubernetes Lease: one control-plane replica runs the reconciler and the autoscaler.

Every replica serves the API; the one holding the ``coordination.k8s.io/v1`` Lease also drives the
fleet. The rules are client-go's ``leaderelection``, as a pure function of (lease, me, now)::

    no lease                         → acquire (create it)
    held by me                       → renew every ``retry_period``; if no renewal succeeded within
                                       ``renew_deadline`` → step down (even if the API is unreachable)
    held by another, renewed within
      ``lease_duration``             → follow
    held by another, expired (or
      released: no holder)           → take over (``leaseTransitions`` + 1)

Writes carry the resourceVersion that was read: of two replicas taking over at once, one gets 409 and
follows. ``renew_deadline`` < ``lease_duration``: a leader that cannot renew stops leading before anyone
else may start. :func:`decide` is pure (tests drive it with a fake clock); :class:`LeaderElector` runs
it against the API (``runtime/backends/_k8s_client.py``: the only place the ``kubernetes`` package is
imported) and calls ``on_started``/``on_stopped``; :meth:`LeaderElector.release` hands the lease over at
a graceful stop. With ``pod`` set, the leader's pod is labelled ``fastapi-deploy.dev/leader=true`` so a
Service can select it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

log = logging.getLogger("fastapi_deploy.leader")

LEADER_LABEL = "fastapi-deploy.dev/leader"


class Action(enum.Enum):
    ACQUIRE = "acquire"
    RENEW = "renew"
    TAKE_OVER = "take_over"
    FOLLOW = "follow"
    STEP_DOWN = "step_down"


@dataclass(frozen=True)
class Timing:
    """client-go's defaults (seconds)."""

    lease_duration: float = 15.0
    """How long a lease is valid after its last renewal: followers wait this long before taking over."""
    renew_deadline: float = 10.0
    """How long a leader keeps leading without a successful renewal (must be < ``lease_duration``)."""
    retry_period: float = 2.0
    """Seconds between attempts (renewals by the leader, checks by followers)."""

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("leader election needs 0 < retry_period < renew_deadline < lease_duration")


@dataclass(frozen=True)
class Lease:
    """The fields of a Lease's spec that election reads."""

    holder: str
    renewed: datetime | None
    duration: float
    transitions: int = 0
    acquired: datetime | None = None


def decide(
    lease: Lease | None, me: str, now: datetime, timing: Timing, *, last_renewed: datetime | None
) -> Action:
    """What ``me`` does next. ``last_renewed``: when my last renewal succeeded (``None``: I do not lead)."""
    if lease is None:
        return Action.ACQUIRE
    if lease.holder == me:
        if last_renewed is not None and now - last_renewed > timedelta(seconds=timing.renew_deadline):
            return Action.STEP_DOWN
        return Action.RENEW
    if last_renewed is not None:
        return Action.STEP_DOWN  # someone else holds it: I lost it
    expired = lease.renewed is None or now > lease.renewed + timedelta(seconds=lease.duration)
    return Action.TAKE_OVER if not lease.holder or expired else Action.FOLLOW


def _stamp(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: str | None) -> datetime | None:
    if not value:
        return None
    text = value.rstrip("Z")
    head, _, fraction = text.partition(".")
    parsed = datetime.fromisoformat(head).replace(tzinfo=UTC)
    return parsed.replace(microsecond=int(fraction[:6].ljust(6, "0"))) if fraction else parsed


def lease_of(obj: dict[str, Any]) -> Lease:
    spec = obj.get("spec") or {}
    return Lease(
        holder=str(spec.get("holderIdentity") or ""),
        renewed=_parse(spec.get("renewTime")),
        duration=float(spec.get("leaseDurationSeconds") or 15),
        transitions=int(spec.get("leaseTransitions") or 0),
        acquired=_parse(spec.get("acquireTime")),
    )


Callback = Callable[[], Awaitable[None]]


class LeaderElector:
    """Campaigns for ``name`` in ``namespace`` as ``identity`` until cancelled (:meth:`run`)."""

    def __init__(
        self,
        kube: Any,
        *,
        namespace: str,
        name: str,
        identity: str,
        on_started: Callback,
        on_stopped: Callback,
        timing: Timing = Timing(),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        pod: str | None = None,
    ) -> None:
        self.kube = kube
        self.namespace, self.name, self.identity = namespace, name, identity
        self.on_started, self.on_stopped = on_started, on_stopped
        self.timing, self.clock, self.pod = timing, clock, pod
        self.last_renewed: datetime | None = None

    @property
    def leading(self) -> bool:
        return self.last_renewed is not None

    async def run(self) -> None:
        """Try, lead, renew, every ``retry_period``; stops leading on cancellation (and releases)."""
        try:
            while True:
                await self.step()
                await asyncio.sleep(self.timing.retry_period)
        finally:
            if self.leading:
                await asyncio.shield(self._stop_leading(release=True))

    async def step(self) -> Action:
        """One round: read the lease, decide, write. Returns what was decided."""
        from runtime.backends._k8s_client import Conflict, KubeError

        try:
            found = await asyncio.to_thread(self.kube.get, "Lease", self.namespace, self.name)
        except KubeError as exc:
            log.warning("reading lease %s/%s failed: %s", self.namespace, self.name, exc.message)
            found, unreachable = None, True
        else:
            unreachable = False
        now = self.clock()
        if unreachable:
            if self.leading and now - (self.last_renewed or now) > timedelta(
                seconds=self.timing.renew_deadline
            ):
                await self._stop_leading(release=False)
                return Action.STEP_DOWN
            return Action.FOLLOW
        lease = lease_of(found) if found is not None else None
        action = decide(lease, self.identity, now, self.timing, last_renewed=self.last_renewed)
        if action is Action.STEP_DOWN:
            await self._stop_leading(release=False)
            return action
        if action is Action.FOLLOW:
            return action
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.timing.lease_duration),
            "renewTime": _stamp(now),
            "acquireTime": _stamp(
                lease.acquired if action is Action.RENEW and lease and lease.acquired else now
            ),
            "leaseTransitions": (lease.transitions if lease else 0)
            + (1 if action is Action.TAKE_OVER else 0),
        }
        try:
            if found is None:
                body = {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": spec,
                }
                await asyncio.to_thread(self.kube.create, body)
            else:
                body = {**found, "spec": {**(found.get("spec") or {}), **spec}}
                url = _lease_path(self.namespace, self.name)
                await asyncio.to_thread(self.kube.request, "PUT", url, body=body)
        except Conflict:
            return Action.FOLLOW  # someone else wrote first: read again next round
        except KubeError as exc:
            log.warning("writing lease %s/%s failed: %s", self.namespace, self.name, exc.message)
            return Action.FOLLOW
        was_leading = self.leading
        self.last_renewed = now
        if not was_leading:
            log.info("%s leads %s/%s", self.identity, self.namespace, self.name)
            await self._label(True)
            await self.on_started()
        return action

    async def release(self) -> None:
        """Give the lease up now (a graceful stop): another replica takes over without waiting."""
        await self._stop_leading(release=True)

    async def _stop_leading(self, *, release: bool) -> None:
        from runtime.backends._k8s_client import KubeError

        if not self.leading:
            return
        self.last_renewed = None
        log.info("%s stops leading %s/%s", self.identity, self.namespace, self.name)
        try:
            await self.on_stopped()
        finally:
            if release:
                with contextlib.suppress(KubeError):
                    found = await asyncio.to_thread(self.kube.get, "Lease", self.namespace, self.name)
                    if found is not None and (found.get("spec") or {}).get("holderIdentity") == self.identity:
                        found["spec"]["holderIdentity"] = ""
                        await asyncio.to_thread(
                            self.kube.request, "PUT", _lease_path(self.namespace, self.name), body=found
                        )
            await self._label(False)

    async def _label(self, leading: bool) -> None:
        if not self.pod:
            return
        from runtime.backends._k8s_client import KubeError

        patch = {"metadata": {"labels": {LEADER_LABEL: "true" if leading else None}}}
        try:
            await asyncio.to_thread(self.kube.merge_patch, "Pod", self.namespace, self.pod, patch)
        except KubeError as exc:
            log.warning("labelling pod %s failed: %s", self.pod, exc.message)


def _lease_path(namespace: str, name: str) -> str:
    from runtime.backends._k8s_client import path

    return path("Lease", namespace, name)
