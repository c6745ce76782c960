"""The fleet: which revision of each app serves, on which instances, with how many warm spares.

A revision goes live only through :meth:`Fleet.activate`, which switches the router atomically and then
drains the previous revision (in-flight requests finish, up to the drain timeout) before stopping it.

From then on the autoscaler drives the revision. Every tick (:data:`TICK_SECONDS`) it samples the app's
concurrency from the router (in flight + queued), asks the pure policy (``runtime/autoscaler.py``) how
many instances should serve and how many should wait warm, and applies the plan: promote warm instances
(milliseconds: they are booted and past their lifespan), park scaled-down ones in the warm pool instead
of stopping them, start or stop instances only for what remains. A request that finds no instance wakes
the loop at once (scale from zero). An instance that crashes is taken out of rotation immediately and
replaced by the next tick, with an exponential hold-off when the app crash-loops.

Health: a revision that crash-loops (a second crash or failed start within ``crash_window``, 60 s), or
whose rollout the backend reports stuck (kubernetes: ``ProgressDeadlineExceeded``), is reported
``degraded`` (``degraded_oom`` when the crash was an OOM kill) through ``on_health``, and healthy again
once it served for ``crash_window`` without a crash and its rollout progresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from control_plane.events import EventLog
from control_plane.forecast import Forecaster
from control_plane.metrics import Metrics
from control_plane.models import utcnow
from control_plane.routers import RouterHub
from runtime.autoscaler import Decision, PolicyState, Sample, ScalingSettings, decide, plan
from runtime.backends.base import Backend, Instance, InstanceSpec, InstanceState
from runtime.router import Router, Upstream

log = logging.getLogger("fastapi_deploy.fleet")

TICK_SECONDS = 0.25
_MAX_BACKOFF = 60.0
ROLLOUT_CHECK_SECONDS = 10.0
"""How often the backend's own view of a revision's rollout is read (backends with ``rollout()``)."""


@dataclass(eq=False)
class Revision:
    app_id: str
    deployment_id: str
    hostname: str
    spec: InstanceSpec
    settings: ScalingSettings
    serving: list[Instance] = field(default_factory=list)
    warm: list[Instance] = field(default_factory=list)
    starting_serving: int = 0
    starting_warm: int = 0
    samples: deque[Sample] = field(default_factory=deque)
    policy: PolicyState = field(default_factory=PolicyState)
    decision: Decision | None = None
    forecast: float | None = None
    hold_starts_until: float = 0.0
    pool_hits: int = 0
    started: int = 0
    stopped: int = 0
    external: bool = False
    """Its replicas are the backend autoscaler's (an HPA), not the fleet's."""
    crashed_at: float | None = None
    """When an instance of it last crashed or failed to start."""
    crash_status: str | None = None
    """``degraded`` / ``degraded_oom`` while it crash-loops, with :attr:`crash_reason`."""
    crash_reason: str = ""
    rollout_problem: str | None = None
    """The backend says its rollout is stuck (the condition's message)."""
    health: str | None = None
    """The status last reported through ``Fleet.on_health`` (None: healthy)."""

    @property
    def instances(self) -> list[Instance]:
        return self.serving + self.warm


@dataclass
class _CrashHistory:
    window: float
    times: list[float] = field(default_factory=list)

    def record(self, now: float) -> float:
        """Register a crash; the delay before the next start (0 for a first crash)."""
        self.times = [t for t in self.times if now - t < self.window] + [now]
        n = len(self.times) - 1
        return 0.0 if n == 0 else min(_MAX_BACKOFF, 0.5 * 2**n)


class Fleet:
    def __init__(
        self,
        backend: Backend,
        router: Router | RouterHub,
        *,
        verify_timeout: float,
        drain_timeout: float,
        events: EventLog,
        forecaster: Forecaster,
        metrics: Metrics | None = None,
        external_scaling: bool = False,
        crash_window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.router = router
        self.verify_timeout = verify_timeout
        self.drain_timeout = drain_timeout
        self.events = events
        self.forecaster = forecaster
        self.metrics = metrics or Metrics()
        self.external_scaling = external_scaling
        """Replicas belong to the backend's own autoscaler (kubernetes ``hpa`` scaling): after the switch
        the fleet hands each revision over (``backend.autoscale``, ``publish``) and never scales it."""
        self.crash_window = crash_window
        self.clock = clock
        self.serving: dict[str, Revision] = {}
        self._crashes: dict[str, _CrashHistory] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._closing = False
        self.router.on_queue = self._on_queue
        self.on_alert: Callable[..., None] | None = None
        """``on_alert(app_id, kind, message, **data)``: crash loops and OOM kills (control_plane/alerting)."""
        self.on_health: Callable[[str, str, str | None, str], None] | None = None
        """``on_health(app_id, deployment_id, status, reason)``: a serving revision became ``degraded`` /
        ``degraded_oom``, or healthy again (``None``); the deployer records it on the deployment."""
        self._rollouts_checked = 0.0

    # -- deploys ---------------------------------------------------------------------------------

    async def start_instances(self, spec: InstanceSpec, count: int) -> list[Instance]:
        """Start ``count`` ready instances of one revision, or none: on a failure the started ones stop."""
        prepare = getattr(self.backend, "prepare", None)
        if prepare is not None:
            with contextlib.suppress(Exception):  # the backend falls back to a plain start
                await prepare(spec)
        results = await asyncio.gather(
            *(self.backend.start(spec, timeout=self.verify_timeout) for _ in range(max(1, count))),
            return_exceptions=True,
        )
        started = [r for r in results if isinstance(r, Instance)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await asyncio.gather(*(self.backend.stop(i) for i in started))
            await self._release(spec.deployment_id)
            raise errors[0]
        return started

    def initial_count(self, app_id: str, settings: ScalingSettings) -> int:
        """How many instances a new revision starts with: what serves now (so a deploy under load does
        not shrink capacity), at least the floor and one (to verify it), at most the ceiling."""
        current = self.serving.get(app_id)
        now_serving = len(current.serving) if current else 0
        return max(1, min(settings.max_instances, max(settings.min_instances, now_serving)))

    async def activate(self, revision: Revision) -> None:
        """Route the app's host to ``revision`` and retire the revision that served before."""
        for instance in revision.serving:
            instance.transition(InstanceState.SERVING)
        revision.started += len(revision.serving)
        old = self.serving.get(revision.app_id)
        self.serving[revision.app_id] = revision
        if old is not None and old.hostname != revision.hostname:
            self.router.remove_app(old.hostname)
        self._route(revision)
        self.events.emit(
            revision.app_id,
            "deploy",
            f"Revision {revision.deployment_id[:8]} serves on {len(revision.serving)} instance(s)",
            deployment_id=revision.deployment_id,
        )
        if self.external_scaling:
            await self._hand_over(revision)
        if old is not None and old is not revision:
            self._spawn(self._retire(old), f"retire-{old.deployment_id}")
        self._wake.set()

    async def _hand_over(self, revision: Revision) -> None:
        """The backend's autoscaler owns the revision's replicas from now on (floor: min + pre-warm)."""
        autoscale = getattr(self.backend, "autoscale", None)
        publish = getattr(self.backend, "publish", None)
        if autoscale is None or publish is None:
            return
        revision.external = True
        s = revision.settings
        await autoscale(
            revision.spec,
            min_replicas=max(1, s.min_instances) + s.prewarm,
            max_replicas=max(1, s.max_instances, s.min_instances + s.prewarm),
        )
        await publish(revision.spec, ingress=True)

    async def remove(self, app_id: str) -> None:
        revision = self.serving.pop(app_id, None)
        self.forecaster.forget(app_id)
        self.metrics.forget_app(app_id)
        if revision is None:
            return
        self.router.remove_app(revision.hostname)
        await self._retire(revision, timeout=2.0)

    def update_settings(self, app_id: str, settings: ScalingSettings) -> None:
        revision = self.serving.get(app_id)
        if revision is not None:
            revision.settings = settings
            if revision.external:  # new floor and ceiling for the backend's autoscaler
                self._spawn(self._hand_over(revision), f"autoscale-{revision.deployment_id}")
            self._route(revision)  # the concurrency limit, at once
            self._wake.set()

    def instances_of(self, app_id: str) -> list[Instance]:
        revision = self.serving.get(app_id)
        mine = revision.instances if revision else []
        others = [
            i for i in self.backend.instances() if i.spec.app_id == app_id and all(i is not m for m in mine)
        ]
        return mine + others

    # -- the autoscaler loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Tick forever (owned by the platform, cancelled at shutdown)."""
        while True:
            try:
                self.tick()
            except Exception:
                log.exception("autoscaler tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_SECONDS)
            self._wake.clear()

    def tick(self) -> None:
        now = self.clock()
        wall = utcnow()
        in_flight = self.router.in_flight()
        queued = self.router.queued()
        for revision in list(self.serving.values()):
            concurrency = float(
                sum(in_flight.get(i.id, 0) for i in revision.serving) + queued.get(revision.app_id, 0)
            )
            self._sample(revision, Sample(at=now, concurrency=concurrency))
            self.metrics.observe_fleet(
                revision.app_id, concurrency, len(revision.serving), len(revision.warm)
            )
            self.forecaster.observe(revision.app_id, concurrency, wall)
            revision.forecast = self.forecaster.forecast(revision.app_id, wall)
            if not revision.external:
                self._scale(revision, now)
            if (
                revision.crash_status is not None
                and revision.serving
                and now - (revision.crashed_at or now) >= self.crash_window
            ):
                revision.crash_status, revision.crash_reason = None, ""
                self._report_health(revision)
        rollout = getattr(self.backend, "rollout", None)
        if rollout is not None and self.serving and now - self._rollouts_checked >= ROLLOUT_CHECK_SECONDS:
            self._rollouts_checked = now
            for revision in list(self.serving.values()):
                self._spawn(self._check_rollout(revision, rollout), f"rollout-{revision.deployment_id}")

    def _sample(self, revision: Revision, sample: Sample) -> None:
        revision.samples.append(sample)
        horizon = sample.at - max(revision.settings.stable_window, revision.settings.scale_to_zero_after) - 1
        while revision.samples and revision.samples[0].at < horizon:
            revision.samples.popleft()

    def _scale(self, revision: Revision, now: float) -> None:
        settings = revision.settings
        serving_now = len(revision.serving) + revision.starting_serving
        decision = decide(revision.samples, serving_now, settings, revision.policy, now, revision.forecast)
        previous = revision.decision
        revision.policy = decision.state
        revision.decision = decision
        if previous is not None and previous.serving != decision.serving:
            self.metrics.scaled(revision.app_id, "up" if decision.serving > previous.serving else "down")
        if previous is None or (previous.serving, previous.warm, previous.panic) != (
            decision.serving,
            decision.warm,
            decision.panic,
        ):
            self.events.emit(
                revision.app_id,
                "scale",
                decision.reason,
                serving=decision.serving,
                warm=decision.warm,
                panic=decision.panic,
                stable_concurrency=round(decision.stable_concurrency, 2),
                panic_concurrency=round(decision.panic_concurrency, 2),
                forecast=revision.forecast,
            )
        steps = plan(serving_now, len(revision.warm) + revision.starting_warm, decision)
        self._apply(revision, steps, now)

    def _apply(self, revision: Revision, steps: Any, now: float) -> None:
        changed = False
        for _ in range(min(steps.promote, len(revision.warm))):
            instance = revision.warm.pop()  # the most recently parked: the warmest caches
            instance.transition(InstanceState.SERVING)
            revision.serving.append(instance)
            revision.pool_hits += 1
            self.metrics.pool_hit(revision.app_id)
            self.events.emit(
                revision.app_id, "instance", f"Promoted warm instance {instance.id}", instance=instance.id
            )
            changed = True
        for _ in range(min(steps.park, len(revision.serving))):
            instance = revision.serving.pop()
            instance.transition(InstanceState.WARM)
            revision.warm.append(instance)
            self.events.emit(
                revision.app_id, "instance", f"Parked instance {instance.id} as warm", instance=instance.id
            )
            changed = True
        if changed:
            self._route(revision)
        stop = steps.stop_warm
        if revision.decision is not None and revision.decision.serving == 0:
            # Scaled to zero: the app was idle for scale_to_zero_after; parked instances go too.
            stop = max(stop, len(revision.warm) + revision.starting_warm - revision.decision.warm)
        for _ in range(min(stop, len(revision.warm))):
            instance = revision.warm.pop(0)  # the longest parked
            revision.stopped += 1
            self.events.emit(
                revision.app_id, "instance", f"Stopping spare instance {instance.id}", instance=instance.id
            )
            self._spawn(self.backend.stop(instance), f"stop-{instance.id}")
        if now < revision.hold_starts_until:
            return
        for _ in range(steps.start_serving):
            revision.starting_serving += 1
            self._spawn(self._start(revision, serve=True), f"start-{revision.app_id}")
        for _ in range(steps.start_warm):
            revision.starting_warm += 1
            self._spawn(self._start(revision, serve=False), f"prewarm-{revision.app_id}")

    async def _start(self, revision: Revision, *, serve: bool) -> None:
        try:
            instance = await self.backend.start(revision.spec, timeout=self.verify_timeout)
        except Exception as exc:
            delay = self._record_crash(revision.app_id)
            revision.hold_starts_until = self.clock() + max(1.0, delay)
            self.events.emit(
                revision.app_id, "instance", f"Starting an instance failed: {exc}", level="error"
            )
            oom = getattr(exc, "code", "") == "verification_failed_oom"
            self._crashed(revision, delay, oom=oom, what=f"a new instance did not start ({exc})")
            return
        finally:
            if serve:
                revision.starting_serving -= 1
            else:
                revision.starting_warm -= 1
        revision.started += 1
        if self.serving.get(revision.app_id) is not revision or self._closing:
            await self.backend.stop(instance)
            return
        # Whatever it was started for, the policy's latest numbers decide where it goes now.
        wanted = revision.decision.serving if revision.decision else 1
        # Instances still starting for the serving set will fill it; a spare only serves if they won't.
        if len(revision.serving) + (0 if serve else revision.starting_serving) < wanted:
            instance.transition(InstanceState.SERVING)
            revision.serving.append(instance)
            self._route(revision)
            self.events.emit(
                revision.app_id, "instance", f"Started instance {instance.id}", instance=instance.id
            )
        else:
            revision.warm.append(instance)
            self.events.emit(
                revision.app_id, "instance", f"Started warm instance {instance.id}", instance=instance.id
            )
        self._wake.set()

    def _on_queue(self, app_id: str) -> None:
        self._wake.set()

    # -- crashes ---------------------------------------------------------------------------------

    def on_exit(self, instance: Instance) -> None:
        """Backend callback: an instance died unasked. Take it out of rotation; the loop replaces it."""
        revision = self.serving.get(instance.spec.app_id)
        self.events.emit(
            instance.spec.app_id,
            "instance",
            f"Instance {instance.id} exited unexpectedly (exit code {instance.exit_code})",
            instance=instance.id,
            exit_code=instance.exit_code,
            level="error",
        )
        if revision is None or self._closing:
            return
        if instance in revision.serving:
            revision.serving.remove(instance)
            self._route(revision)
        elif instance in revision.warm:
            revision.warm.remove(instance)
        else:
            return
        delay = self._record_crash(revision.app_id)
        self._crashed(
            revision,
            delay,
            oom=instance.oom,
            what=f"instance {instance.id} exited with code {instance.exit_code}"
            + (" (out of memory)" if instance.oom else ""),
        )
        if instance.oom and self.on_alert is not None:
            limit = instance.spec.memory_mb
            self.on_alert(
                revision.app_id,
                "oom",
                f"Instance {instance.id} was killed: out of memory (limit {limit} MiB)",
                key=f"oom-{instance.id}",
                instance=instance.id,
                memory_mb=limit,
            )
        if delay:
            log.warning("app %s is crash-looping; next start in %.1fs", revision.app_id, delay)
            revision.hold_starts_until = self.clock() + delay
            if self.on_alert is not None:
                self.on_alert(
                    revision.app_id,
                    "crash_loop",
                    f"The app is crash-looping: instance {instance.id} exited with code {instance.exit_code} "
                    f"({len(self._crashes[revision.app_id].times)} crashes in {self.crash_window:.0f} s); "
                    f"next start in {delay:.1f} s",
                    instance=instance.id,
                    exit_code=instance.exit_code,
                )
        self._wake.set()

    # -- health ----------------------------------------------------------------------------------

    def _record_crash(self, app_id: str) -> float:
        """Count a crash or failed start; the hold-off before the next start (0 after a first one)."""
        return self._crashes.setdefault(app_id, _CrashHistory(self.crash_window)).record(self.clock())

    def _crashed(self, revision: Revision, delay: float, *, oom: bool, what: str) -> None:
        revision.crashed_at = self.clock()
        if not delay:  # a first crash: replaced, nothing more
            return
        crashes = len(self._crashes[revision.app_id].times)
        if revision.crash_status != "degraded_oom":  # an OOM kill in the loop marks it until it recovers
            revision.crash_status = "degraded_oom" if oom else "degraded"
        revision.crash_reason = f"crash-looping, {crashes} crashes in {self.crash_window:.0f} s: last, {what}"
        self._report_health(revision)

    async def _check_rollout(self, revision: Revision, rollout: Callable[[str], Any]) -> None:
        try:
            state = await rollout(revision.deployment_id)
        except Exception as exc:
            log.debug("rollout of %s not read: %s", revision.deployment_id, exc)
            return
        if not state.get("exists") or self.serving.get(revision.app_id) is not revision:
            return
        progressing = state.get("progressing") or {}
        if progressing.get("reason") == "ProgressDeadlineExceeded":
            revision.rollout_problem = str(
                progressing.get("message") or "the rollout did not progress within its deadline"
            )
        else:
            revision.rollout_problem = None
        self._report_health(revision)

    def _report_health(self, revision: Revision) -> None:
        if revision.crash_status is not None:
            status, reason = revision.crash_status, revision.crash_reason
        elif revision.rollout_problem is not None:
            status, reason = "degraded", f"the rollout is stuck: {revision.rollout_problem}"
        else:
            status, reason = None, f"serving without a crash for {self.crash_window:.0f} s, rollout on track"
        if status == revision.health:
            return
        revision.health = status
        short = revision.deployment_id[:8]
        self.events.emit(
            revision.app_id,
            "health",
            f"Revision {short} is {status}: {reason}" if status else f"Revision {short} is healthy again",
            deployment_id=revision.deployment_id,
            status=status or "success",
            level="error" if status else "info",
        )
        if self.on_health is not None:
            try:
                self.on_health(revision.app_id, revision.deployment_id, status, reason)
            except Exception:  # the callback's bug must not break the fleet
                log.exception("on_health callback failed")

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for revision in self.serving.values():
            self.router.remove_app(revision.hostname)
        self.serving.clear()
        await self.backend.close()

    # -- internals ------------------------------------------------------------------------------

    def _route(self, revision: Revision) -> None:
        self.metrics.set_instances(revision.app_id, revision.deployment_id, (i.id for i in revision.serving))
        upstreams = [Upstream(id=i.id, host=i.host, port=i.port) for i in revision.serving]
        self.router.set_app(
            revision.hostname, revision.app_id, upstreams, limit=revision.settings.max_concurrency
        )

    async def _retire(self, revision: Revision, timeout: float | None = None) -> None:
        limit = self.drain_timeout if timeout is None else timeout
        instances = revision.instances
        revision.serving, revision.warm = [], []

        async def one(instance: Instance) -> None:
            if instance.state in (InstanceState.SERVING, InstanceState.WARM):
                instance.transition(InstanceState.DRAINING)
            with contextlib.suppress(Exception):
                await self.router.wait_drained(instance.id, limit)
            await self.backend.stop(instance)

        await asyncio.gather(*(one(i) for i in instances))
        await self._release(revision.deployment_id)

    async def _release(self, deployment_id: str) -> None:
        release = getattr(self.backend, "release", None)
        if release is not None:
            with contextlib.suppress(Exception):
                await release(deployment_id)

    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("fleet task %s failed", task.get_name(), exc_info=task.exception())
