"""The fleet: which revision of each app serves, on which instances, and the router's table.

A revision goes live only through :meth:`Fleet.activate`, which switches the router atomically and
then drains the previous revision (its in-flight requests finish, up to the drain timeout) before
stopping it. An instance of a serving revision that crashes is taken out of the pool at once and
replaced, with an exponential backoff when an app crash-loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from runtime.backends.base import Backend, Instance, InstanceSpec, InstanceState
from runtime.router import Router, Upstream

log = logging.getLogger("fastapi_deploy.fleet")

_CRASH_WINDOW = 60.0
_MAX_BACKOFF = 60.0


@dataclass(eq=False)
class Revision:
    app_id: str
    deployment_id: str
    hostname: str
    spec: InstanceSpec
    desired: int
    instances: list[Instance] = field(default_factory=list)


@dataclass
class _CrashHistory:
    times: list[float] = field(default_factory=list)

    def record(self, now: float) -> float:
        """Register a crash; the delay before the next start (0 for a first crash)."""
        self.times = [t for t in self.times if now - t < _CRASH_WINDOW] + [now]
        n = len(self.times) - 1
        return 0.0 if n == 0 else min(_MAX_BACKOFF, 0.5 * 2**n)


class Fleet:
    def __init__(self, backend: Backend, router: Router, *, verify_timeout: float, drain_timeout: float):
        self.backend = backend
        self.router = router
        self.verify_timeout = verify_timeout
        self.drain_timeout = drain_timeout
        self.serving: dict[str, Revision] = {}
        self._crashes: dict[str, _CrashHistory] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start_instances(self, spec: InstanceSpec, count: int) -> list[Instance]:
        """Start ``count`` ready instances of one revision, or none: on a failure the started ones stop."""
        results = await asyncio.gather(
            *(self.backend.start(spec, timeout=self.verify_timeout) for _ in range(max(1, count))),
            return_exceptions=True,
        )
        started = [r for r in results if isinstance(r, Instance)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await asyncio.gather(*(self.backend.stop(i) for i in started))
            raise errors[0]
        return started

    async def activate(self, revision: Revision) -> None:
        """Route the app's host to ``revision`` and retire the revision that served before."""
        for instance in revision.instances:
            instance.transition(InstanceState.SERVING)
        old = self.serving.get(revision.app_id)
        self.serving[revision.app_id] = revision
        if old is not None and old.hostname != revision.hostname:
            self.router.remove_app(old.hostname)
        self._route(revision)
        if old is not None and old is not revision:
            self._spawn(self._drain(old.instances), f"drain-{old.deployment_id}")

    async def remove(self, app_id: str) -> None:
        revision = self.serving.pop(app_id, None)
        if revision is None:
            return
        self.router.remove_app(revision.hostname)
        await self._drain(revision.instances, timeout=2.0)

    def instances_of(self, app_id: str) -> list[Instance]:
        revision = self.serving.get(app_id)
        serving = list(revision.instances) if revision else []
        others = [
            i
            for i in self.backend.instances()
            if i.spec.app_id == app_id and all(i is not s for s in serving)
        ]
        return serving + others

    def on_exit(self, instance: Instance) -> None:
        """Backend callback: an instance died unasked. Take it out of rotation and replace it."""
        revision = self.serving.get(instance.spec.app_id)
        if revision is None or instance not in revision.instances or self._closing:
            return
        revision.instances.remove(instance)
        self._route(revision)
        delay = self._crashes.setdefault(revision.app_id, _CrashHistory()).record(time.monotonic())
        self._spawn(self._replace(revision, delay), f"replace-{instance.id}")

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
        upstreams = [Upstream(id=i.id, host=i.host, port=i.port) for i in revision.instances]
        self.router.set_app(revision.hostname, revision.app_id, upstreams)

    async def _replace(self, revision: Revision, delay: float) -> None:
        if delay:
            log.warning("app %s is crash-looping; next start in %.1fs", revision.app_id, delay)
            await asyncio.sleep(delay)
        while self.serving.get(revision.app_id) is revision and len(revision.instances) < revision.desired:
            try:
                instance = await self.backend.start(revision.spec, timeout=self.verify_timeout)
            except Exception as exc:
                history = self._crashes.setdefault(revision.app_id, _CrashHistory())
                delay = max(1.0, history.record(time.monotonic()))
                log.warning(
                    "replacing an instance of %s failed (%s); retrying in %.1fs", revision.app_id, exc, delay
                )
                await asyncio.sleep(delay)
                continue
            if self.serving.get(revision.app_id) is not revision:
                await self.backend.stop(instance)
                return
            instance.transition(InstanceState.SERVING)
            revision.instances.append(instance)
            self._route(revision)

    async def _drain(self, instances: list[Instance], timeout: float | None = None) -> None:
        limit = self.drain_timeout if timeout is None else timeout

        async def one(instance: Instance) -> None:
            if instance.state == InstanceState.SERVING:
                instance.transition(InstanceState.DRAINING)
            with contextlib.suppress(Exception):
                await self.router.wait_drained(instance.id, limit)
            await self.backend.stop(instance)

        await asyncio.gather(*(one(i) for i in list(instances)))

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("fleet task %s failed", task.get_name(), exc_info=task.exception())
