"""The public face of the edge router: lifecycle and route table."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ._client import ClientConnection
from ._config import AppStats, QueueHook, RequestDoneHook, RouterConfig, Upstream
from ._listener import Listener
from ._pool import State, route_key

logger = logging.getLogger("runtime.router")


class Router:
    """An HTTP/1.1 reverse proxy routing by ``Host`` to pools of app instances.

    Runs on the caller's event loop (the control plane's), built on asyncio protocols and httptools.
    Every method must be called from that loop's thread.
    """

    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()
        self._state = State(self.config)
        self._listener: Listener | None = None
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle

    async def start(self, host: str, port: int) -> None:
        """Bind ``host:port`` (port 0: any free port, see `port`) and accept connections.

        Raises `OSError` if the address cannot be bound."""
        if self._listener is not None:
            raise RuntimeError("the router is already started")
        loop = asyncio.get_running_loop()
        state = self._state
        state.loop = loop
        state.stopping = False
        listener = Listener(loop, lambda ip: ClientConnection(state, ip), state.spawn, self.config.backlog)
        listener.bind(host, port)
        self._listener = listener
        self._sweeper = loop.create_task(self._sweep(), name="router:sweeper")

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, close idle connections, let requests in progress finish for up to ``timeout``
        seconds, then close everything. Requests waiting for an instance get ``503`` at once."""
        listener, state = self._listener, self._state
        if listener is None:
            return
        self._listener = None
        state.stopping = True
        state.all_closed = asyncio.Event()
        listener.close()
        for pool in state.apps.values():
            while pool.waiting:
                pool.waiting.popleft().unqueue_and_dispatch()  # -> 503: shutting down
        for client in list(state.clients):
            if client.current is None:
                client.close()
        if state.clients:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await state.all_closed.wait()
        for client in list(state.clients):
            client.abort()
        tasks = list(state.tasks)
        if self._sweeper is not None:
            tasks.append(self._sweeper)
            self._sweeper = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for inst in state.instances.values():
            inst.close_idle()

    @property
    def port(self) -> int:
        """The port actually bound (useful after ``start(host, 0)``)."""
        if self._listener is None or not self._listener.sockets:
            raise RuntimeError("the router is not started")
        port: int = self._listener.sockets[0].getsockname()[1]
        return port

    # -- routes

    def set_app(self, hostname: str, app_id: str, upstreams: list[Upstream], *, limit: int = 0) -> None:
        """Route ``hostname`` (lower-case, no port) to these instances, atomically.

        Requests in flight keep their instance; new ones use the new pool; requests queued for this
        host are released to it. ``limit``: requests in flight per instance; past it new requests wait
        in the app's queue (bounded, deadline-aware) until a slot frees (0: no limit, a request waits
        only while the app has no instance). ``Upstream.in_flight`` of the given objects is kept up to
        date."""
        self._state.set_app(hostname, app_id, list(upstreams), limit)

    def remove_app(self, hostname: str) -> None:
        """Stop routing ``hostname``: new requests (and queued ones) get ``404 no_such_app``."""
        self._state.remove_app(hostname)

    def upstreams(self, hostname: str) -> list[Upstream]:
        """The instances currently serving ``hostname`` (empty if unknown)."""
        pool = self._state.apps.get(route_key(hostname))
        return [inst.upstream for inst in pool.instances] if pool is not None else []

    # -- signals for the control plane (autoscaler, drain, metrics)

    def in_flight(self) -> dict[str, int]:
        """Requests in flight per instance id, across all apps (instances still draining included)."""
        return {inst_id: inst.in_flight for inst_id, inst in self._state.instances.items()}

    def queued(self) -> dict[str, int]:
        """Requests waiting for an instance, per app id: the scale-from-zero signal."""
        return {app_id: stats.queued for app_id, stats in self._state.stats.items()}

    def idle_connections(self) -> dict[str, int]:
        """Pooled keep-alive connections per instance id."""
        return {inst_id: len(inst.idle) for inst_id, inst in self._state.instances.items()}

    @property
    def stats(self) -> dict[str, AppStats]:
        """Live counters per app id (do not mutate)."""
        return self._state.stats

    async def wait_drained(self, upstream_id: str, timeout: float) -> bool:
        """Wait until no request is in flight on ``upstream_id``: True, or False after ``timeout`` s."""
        inst = self._state.instances.get(upstream_id)
        if inst is None or not inst.in_flight:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        inst.drained.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            return False
        finally:
            if waiter in inst.drained:
                inst.drained.remove(waiter)
        return True

    @property
    def on_request_done(self) -> RequestDoneHook | None:
        """Called as ``hook(app_id, upstream_id | None, status, duration_s)`` after each routed request."""
        return self._state.on_request_done

    @on_request_done.setter
    def on_request_done(self, hook: RequestDoneHook | None) -> None:
        self._state.on_request_done = hook

    @property
    def on_queue(self) -> QueueHook | None:
        """Called as ``hook(app_id)`` when a request starts waiting in the app's queue (no instance yet):
        the signal to start capacity now rather than at the next autoscaler tick. None by default."""
        return self._state.on_queue

    @on_queue.setter
    def on_queue(self, hook: QueueHook | None) -> None:
        self._state.on_queue = hook

    # -- internals

    async def _sweep(self) -> None:
        # One timer for all connections instead of one each: closes client connections idle past
        # idle_timeout and pooled upstream connections idle past upstream_idle_timeout (the pick skips
        # stale ones too, so that only frees sockets sooner). A timeout is enforced within a quarter of
        # itself (at most a second) late.
        config = self.config
        interval = max(0.05, min(1.0, config.upstream_idle_timeout / 4, config.idle_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                self._state.sweep()
            except Exception:  # never let the sweeper die quietly
                logger.exception("router: sweeping idle connections failed")
