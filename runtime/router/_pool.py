"""The router's shared state: which hosts map to which instances, and the per-instance connection pools.

    State                      one per Router: config, routes, instances, live client connections,
    │                          the sweep of idle connections
    ├── AppPool (per Host)     the instances serving a host, least-outstanding pick, the waiting queue
    └── Instance (per id)      in-flight count, idle keep-alive connections (LIFO), requests waiting for
                               a connection and connects in flight (policy: _connections), drain waiters

Instances are keyed by id and shared by every host that routes to them, so an app reachable under two
names is balanced on one set of counts, and a redeploy that keeps an instance keeps its warm connections.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from ._config import AppStats, QueueHook, RequestDoneHook, RouterConfig, Upstream

if TYPE_CHECKING:
    from ._client import ClientConnection
    from ._exchange import Exchange
    from ._upstream import UpstreamConnection


def route_key(hostname: str) -> bytes:
    """The routing key of a configured host name; matches `_http.route_key` of a ``Host`` header."""
    return hostname.strip().lower().rstrip(".").encode("idna")


class Instance:
    """Bookkeeping of one upstream instance (by id)."""

    __slots__ = (
        "address",
        "connecting",
        "drained",
        "host",
        "id",
        "idle",
        "in_flight",
        "pools",
        "port",
        "routed",
        "upstream",
        "waiters",
    )

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.id = upstream.id
        self.host = upstream.host
        self.port = upstream.port
        self.address = (self.host, self.port)  # a new tuple when the instance moves: compared by identity
        self.in_flight = 0
        self.idle: list[UpstreamConnection] = []  # most recently used last: reuse the warmest
        self.waiters: deque[Exchange] = deque()  # requests waiting for a connection, first come first served
        self.connecting = 0  # connects in flight
        self.drained: list[asyncio.Future[None]] = []
        self.routed = True  # still in some host's pool; unrouted and drained -> forgotten
        self.pools: list[AppPool] = []  # the pools routing to it (whose queued requests a freed slot takes)

    def adopt(self, upstream: Upstream) -> None:
        """A newer `Upstream` object for the same id: it carries the count from now on."""
        upstream.in_flight = self.in_flight
        self.upstream = upstream
        if (upstream.host, upstream.port) != self.address:
            self.host, self.port = upstream.host, upstream.port
            self.address = (self.host, self.port)
            self.close_idle()  # connections to the old address stay with the requests using them

    def acquire(self) -> None:
        self.in_flight += 1
        self.upstream.in_flight = self.in_flight

    def notify_drained(self) -> None:
        for waiter in self.drained:
            if not waiter.done():
                waiter.set_result(None)
        self.drained.clear()

    def take_idle(self, now: float, max_idle: float) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            transport = conn.transport  # conn.closing(), inlined: once per request
            if transport is None or transport.is_closing():  # the instance hung up; not lost yet
                continue
            if now - conn.idle_since < max_idle:
                return conn
            # The newest is too old, so are all the others.
            conn.close()
            self.close_idle()
        return None

    def forget(self, conn: UpstreamConnection) -> None:
        """An idle connection was closed by the instance."""
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def sweep(self, now: float, max_idle: float) -> None:
        idle = self.idle
        stale = 0
        while stale < len(idle) and now - idle[stale].idle_since >= max_idle:
            stale += 1
        if stale:
            old, self.idle = idle[:stale], idle[stale:]
            for conn in old:
                conn.close()

    def close_idle(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()


class AppPool:
    """The instances behind one Host name, and the requests waiting for one."""

    __slots__ = ("app_id", "hostname", "instances", "limit", "next", "stats", "waiting")

    def __init__(self, hostname: str, app_id: str, stats: AppStats) -> None:
        self.hostname = hostname
        self.app_id = app_id
        self.stats = stats
        self.instances: list[Instance] = []
        self.limit = 0  # requests in flight per instance before new ones wait in the queue (0: no limit)
        self.next = 0  # round-robin start, so ties rotate
        self.waiting: deque[Exchange] = deque()

    def free_slots(self) -> int:
        """How many queued requests the instances can take now (all of them, without a limit)."""
        if not self.instances:
            return 0
        limit = self.limit
        if not limit:
            return len(self.waiting)
        return sum(max(0, limit - inst.in_flight) for inst in self.instances)

    def pick(self, exclude: list[Instance] | None) -> Instance | None:
        """Least outstanding requests; ties go round robin. None if every instance is excluded, or at
        the pool's limit."""
        instances = self.instances
        count = len(instances)
        if count == 1 and exclude is None:
            inst = instances[0]
            return None if self.limit and inst.in_flight >= self.limit else inst
        best: Instance | None = None
        best_at = 0
        start = self.next if self.next < count else 0
        for offset in range(count):
            at = start + offset
            if at >= count:
                at -= count
            inst = instances[at]
            if exclude is not None and inst in exclude:
                continue
            if best is None or inst.in_flight < best.in_flight:
                best, best_at = inst, at
                if not inst.in_flight:
                    break
        self.next = best_at + 1
        if best is not None and self.limit and best.in_flight >= self.limit:
            return None  # the least loaded is full: they all are
        return best


class State:
    """Everything the protocols share. Owned by `Router`; only touched from its event loop."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.loop: asyncio.AbstractEventLoop | None = None
        self.apps: dict[bytes, AppPool] = {}
        self.instances: dict[str, Instance] = {}
        self.stats: dict[str, AppStats] = {}
        self.clients: set[ClientConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.on_request_done: RequestDoneHook | None = None
        self.on_queue: QueueHook | None = None
        self.queued = 0  # requests waiting, all apps
        self.stopping = False
        self.all_closed: asyncio.Event | None = None

    def set_app(self, hostname: str, app_id: str, upstreams: list[Upstream], limit: int = 0) -> None:
        key = route_key(hostname)
        instances = []
        for upstream in upstreams:
            inst = self.instances.get(upstream.id)
            if inst is None:
                inst = self.instances[upstream.id] = Instance(upstream)
            else:
                inst.adopt(upstream)
                inst.routed = True
            instances.append(inst)
        pool = self.apps.get(key)
        stats = self.stats.setdefault(app_id, AppStats())
        if pool is None:
            pool = self.apps[key] = AppPool(hostname, app_id, stats)
        elif pool.app_id != app_id:
            pool.stats.queued -= len(pool.waiting)
            stats.queued += len(pool.waiting)
            pool.app_id, pool.stats = app_id, stats
        # One assignment: a request picks from either the old list or the new one, never a mix.
        for inst in pool.instances:
            if pool in inst.pools and inst not in instances:
                inst.pools.remove(pool)
        pool.instances = instances
        pool.limit = max(0, limit)
        pool.next = 0
        for inst in instances:
            if pool not in inst.pools:
                inst.pools.append(pool)
        self._forget_unrouted()
        self.release_waiting(pool)

    def release_waiting(self, pool: AppPool) -> None:
        """Dispatch as many of the pool's queued requests as its instances have room for, oldest first."""
        waiting = pool.waiting
        for _ in range(min(len(waiting), pool.free_slots())):
            waiting.popleft().unqueue_and_dispatch()

    def remove_app(self, hostname: str) -> None:
        pool = self.apps.pop(route_key(hostname), None)
        if pool is None:
            return
        self._forget_unrouted()
        waiting = pool.waiting
        while waiting:
            waiting.popleft().unqueue_and_dispatch()  # finds no route now: 404

    def _forget_unrouted(self) -> None:
        routed = {id(inst) for pool in self.apps.values() for inst in pool.instances}
        for inst in list(self.instances.values()):
            inst.routed = id(inst) in routed
            if not inst.routed:
                inst.close_idle()
                if not inst.in_flight:
                    del self.instances[inst.id]

    def instance_done(self, inst: Instance) -> None:
        """Release one request's slot; forget an unrouted instance once it has drained."""
        in_flight = inst.in_flight = inst.in_flight - 1
        inst.upstream.in_flight = in_flight
        if not in_flight:
            if inst.drained:
                inst.notify_drained()
            if not inst.routed and self.instances.get(inst.id) is inst:
                del self.instances[inst.id]
        for pool in inst.pools:  # a freed slot takes the oldest request waiting for this instance's app
            if pool.waiting and pool.limit and in_flight < pool.limit:
                pool.waiting.popleft().unqueue_and_dispatch()
                break

    # -- the sweep

    def sweep(self) -> None:
        """Retire pooled connections idle past ``upstream_idle_timeout``, close client connections idle
        past ``idle_timeout`` (or stuck in a request head that long) and free the parsers of idle ones."""
        assert self.loop is not None
        now = self.loop.time()
        max_idle = self.config.upstream_idle_timeout
        for inst in self.instances.values():
            if inst.idle:
                inst.sweep(now, max_idle)
        deadline = now - self.config.idle_timeout
        expired = [client for client in self.clients if client.sweep(deadline)]
        for client in expired:
            client.close()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run a short-lived task owned by the router (cancelled by `Router.stop`)."""
        assert self.loop is not None
        task = self.loop.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def client_gone(self, client: ClientConnection) -> None:
        self.clients.discard(client)
        if self.stopping and not self.clients and self.all_closed is not None:
            self.all_closed.set()
