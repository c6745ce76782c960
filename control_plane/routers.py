"""The edge router as the fleet sees it: the control plane's own router plus remote ones.

On one machine the router runs inside the control plane (``runtime/router``). On Kubernetes it also
runs as a Deployment of its own (``fastapi-deploy router``, ``runtime/edge.py``), several replicas behind
the apps' Service, so the apps keep being served while the control plane restarts or fails over. The
fleet does not tell them apart: :class:`RouterHub` has the router's interface and fans it out::

    fleet ── set_app / remove_app ──> RouterHub ──> the local Router
                                          └──(WebSocket /internal/routers, one per remote router)──>
                                              snapshot, then "set" / "remove" (sequence-numbered)
    fleet <── in_flight / queued ───── RouterHub <── "report" every 250 ms: in flight per instance,
                                                     queued per app, counters, finished requests
    fleet <── on_queue ─────────────── RouterHub <── "queue": a request waits (scale from zero), at once

Finished requests come back as compact records and go through the same ``on_request_done`` hook as the
local router's (live metrics, edge spans), with the remote router's wall clock mapped onto this
process's monotonic clock. A remote router's numbers count while its reports are fresh
(:data:`STALE_SECONDS`); one that disconnects keeps serving its last table and resynchronises from a
snapshot when it reconnects (to whichever control plane leads then). Only the leader answers: a
standby closes the socket with 1013 (try again) so the router keeps looking.

Draining waits for every remote router to have applied the change that removed the instance (its
report acknowledges the sequence number) and to report nothing in flight on it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from runtime.router import AppStats, QueueHook, RequestDoneHook, Router, Upstream

log = logging.getLogger("fastapi_deploy.routers")

STALE_SECONDS = 3.0
"""A remote router's report older than this no longer counts (it stopped reporting: gone or stuck)."""
OUTBOX = 10_000
"""Route changes queued for one remote router; one that falls this far behind is disconnected (it
reconnects and gets a snapshot)."""
PROTOCOL = 1


class Socket(Protocol):
    """What the hub needs of a WebSocket (Starlette's)."""

    async def send_text(self, data: str) -> None: ...

    async def receive_text(self) -> str: ...

    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...


@dataclass(slots=True)
class _RemoteHead:
    path: bytes
    request_id: bytes
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes


@dataclass(slots=True)
class _RemoteRequest:
    """A finished request from a remote router, shaped like ``runtime.router.RequestInfo``."""

    head: _RemoteHead | None
    method: bytes
    status: int
    upstream_id: str | None
    started: float
    attached_at: float
    waited: float
    cold: bool
    retried: bool
    broken: bool
    received: int
    sent: int


@dataclass(eq=False)
class _Remote:
    name: str
    outbox: asyncio.Queue[str] = field(default_factory=lambda: asyncio.Queue(OUTBOX))
    in_flight: dict[str, int] = field(default_factory=dict)
    queued: dict[str, int] = field(default_factory=dict)
    counters: dict[str, list[float]] = field(default_factory=dict)
    acked: int = 0
    seen: float = 0.0
    overflowed: bool = False


class RouterHub:
    """The local :class:`Router` and the remote routers connected to this control plane, as one."""

    def __init__(self, local: Router, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.local = local
        self.clock = clock
        self._table: dict[str, dict[str, Any]] = {}
        self._remotes: set[_Remote] = set()
        self._seq = 0
        self._ids = itertools.count(1)
        self._on_queue: QueueHook | None = None
        self._totals: dict[str, AppStats] = {}
        """Counters of requests remote routers finished (sums of their deltas, so a remote router's
        restart does not make them go back)."""

    # -- the router's interface (the fleet's and the platform's side) -------------------------------

    async def start(self, host: str, port: int) -> None:
        await self.local.start(host, port)

    async def stop(self, timeout: float = 10.0) -> None:
        await self.local.stop(timeout=timeout)

    @property
    def port(self) -> int:
        return self.local.port

    def set_app(self, hostname: str, app_id: str, upstreams: list[Upstream], *, limit: int = 0) -> None:
        self.local.set_app(hostname, app_id, upstreams, limit=limit)
        entry = {
            "host": hostname,
            "app_id": app_id,
            "limit": limit,
            "upstreams": [{"id": u.id, "host": u.host, "port": u.port} for u in upstreams],
        }
        self._table[hostname] = entry
        self._broadcast({"type": "set", **entry})

    def remove_app(self, hostname: str) -> None:
        self.local.remove_app(hostname)
        if self._table.pop(hostname, None) is not None:
            self._broadcast({"type": "remove", "host": hostname})

    def upstreams(self, hostname: str) -> list[Upstream]:
        return self.local.upstreams(hostname)

    def in_flight(self) -> dict[str, int]:
        return _summed(self.local.in_flight(), (r.in_flight for r in self._fresh()))

    def queued(self) -> dict[str, int]:
        return _summed(self.local.queued(), (r.queued for r in self._fresh()))

    def idle_connections(self) -> dict[str, int]:
        return self.local.idle_connections()

    @property
    def stats(self) -> dict[str, AppStats]:
        """Counters per app across the local router and every remote one (a new dict each call)."""
        merged: dict[str, AppStats] = {}
        for source in (self.local.stats, self._totals):
            for app_id, s in source.items():
                merged.setdefault(app_id, AppStats()).add(s.counters())
        for app_id, n in self.queued().items():
            merged.setdefault(app_id, AppStats()).queued = n
        return merged

    async def wait_drained(self, upstream_id: str, timeout: float) -> bool:
        """No request in flight on ``upstream_id`` anywhere: here, and at every remote router once it
        applied the route change made before this call."""
        deadline = self.clock() + timeout
        seq = self._seq
        if not await self.local.wait_drained(upstream_id, timeout):
            return False
        while any(r.acked < seq or r.in_flight.get(upstream_id, 0) for r in self._fresh()):
            if self.clock() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    @property
    def on_request_done(self) -> RequestDoneHook | None:
        return self.local.on_request_done

    @on_request_done.setter
    def on_request_done(self, hook: RequestDoneHook | None) -> None:
        self.local.on_request_done = hook

    @property
    def on_queue(self) -> QueueHook | None:
        return self._on_queue

    @on_queue.setter
    def on_queue(self, hook: QueueHook | None) -> None:
        self._on_queue = hook
        self.local.on_queue = hook

    @property
    def remotes(self) -> list[dict[str, Any]]:
        """The connected remote routers (admin status)."""
        now = self.clock()
        return [
            {
                "name": r.name,
                "report_age_seconds": round(now - r.seen, 3) if r.seen else None,
                "in_flight": sum(r.in_flight.values()),
                "queued": sum(r.queued.values()),
                "acked": r.acked,
            }
            for r in self._remotes
        ]

    # -- the remote routers' side (control_plane/api/routers.py) -------------------------------------

    async def serve(self, ws: Socket, ready: asyncio.Event) -> None:
        """One remote router's connection, until it closes: its hello, our snapshot, then route changes
        out and reports in."""
        hello = json.loads(await ws.receive_text())
        if hello.get("type") != "hello" or int(hello.get("protocol", 0)) != PROTOCOL:
            await ws.close(code=1002, reason=f"expected hello with protocol {PROTOCOL}")
            return
        remote = _Remote(name=str(hello.get("name") or f"router-{next(self._ids)}")[:200])
        await ready.wait()  # the apps are restored: a snapshot before that would empty its table
        self._remotes.add(remote)
        log.info("remote router %s connected", remote.name)
        snapshot = {"type": "snapshot", "seq": self._seq, "apps": list(self._table.values())}
        loop = asyncio.get_running_loop()
        tasks = {
            loop.create_task(self._send(ws, remote, json.dumps(snapshot)), name=f"router-out-{remote.name}"),
            loop.create_task(self._listen(ws, remote), name=f"router-in-{remote.name}"),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.info("remote router %s: %r", remote.name, task.exception())
        finally:
            self._remotes.discard(remote)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            log.info("remote router %s disconnected", remote.name)

    async def _listen(self, ws: Socket, remote: _Remote) -> None:
        while True:
            self._receive(remote, json.loads(await ws.receive_text()))

    async def _send(self, ws: Socket, remote: _Remote, first: str) -> None:
        await ws.send_text(first)
        while True:
            message = await remote.outbox.get()
            if remote.overflowed:
                await ws.close(code=1013, reason="too far behind; reconnect for a snapshot")
                return
            await ws.send_text(message)

    def _broadcast(self, message: dict[str, Any]) -> None:
        if not self._remotes:
            return
        self._seq += 1
        text = json.dumps({**message, "seq": self._seq})
        for remote in self._remotes:
            try:
                remote.outbox.put_nowait(text)
            except asyncio.QueueFull:
                remote.overflowed = True

    def _receive(self, remote: _Remote, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "queue":
            app_id = str(message.get("app_id", ""))
            if app_id and self._on_queue is not None:
                self._on_queue(app_id)
            return
        if kind != "report":
            return
        remote.seen = self.clock()
        remote.acked = int(message.get("ack", 0))
        remote.in_flight = {str(k): int(v) for k, v in (message.get("in_flight") or {}).items()}
        remote.queued = {str(k): int(v) for k, v in (message.get("queued") or {}).items()}
        self._count(remote, message.get("counters") or {})
        hook = self.local.on_request_done
        if hook is None:
            return
        offset = time.monotonic() - time.time()  # the remote's wall clock -> this loop's clock
        for record in message.get("requests") or ():
            try:
                app_id, info, finished = _request(record, offset)
            except (TypeError, ValueError, IndexError):
                continue
            try:
                hook(app_id, info, finished)
            except Exception:
                log.exception("on_request_done failed for a remote request")

    def _count(self, remote: _Remote, counters: dict[str, Any]) -> None:
        """Add what the remote's cumulative counters grew by (a restarted router starts again at 0)."""
        size = len(AppStats().counters())
        for app_id, values in counters.items():
            new = [float(v) for v in values][:size]
            if len(new) < size:
                continue
            old = remote.counters.get(app_id, [0.0] * size)
            remote.counters[app_id] = new
            self._totals.setdefault(app_id, AppStats()).add(
                [n - o if n >= o else n for n, o in zip(new, old, strict=True)]
            )

    def _fresh(self) -> list[_Remote]:
        now = self.clock()
        return [r for r in self._remotes if r.seen and now - r.seen <= STALE_SECONDS]


def _summed(local: dict[str, int], remotes: Iterable[dict[str, int]]) -> dict[str, int]:
    """``local`` (the router's own fresh dict) with each remote's counts added, key by key."""
    for counts in remotes:
        for key, n in counts.items():
            local[key] = local.get(key, 0) + n
    return local


def _request(record: list[Any], offset: float) -> tuple[str, _RemoteRequest, float]:
    """A record of ``runtime/edge.py`` (``encode_request``) back into a request and its finish time."""
    (
        app_id,
        method,
        path,
        request_id,
        trace_id,
        span_id,
        parent_span_id,
        status,
        upstream_id,
        started,
        attached,
        finished,
        waited,
        flags,
        received,
        sent,
    ) = record
    head = (
        _RemoteHead(
            path=str(path).encode("latin-1"),
            request_id=str(request_id).encode("latin-1"),
            trace_id=str(trace_id).encode("ascii"),
            span_id=str(span_id).encode("ascii"),
            parent_span_id=str(parent_span_id).encode("ascii"),
        )
        if trace_id
        else None
    )
    flags = int(flags)
    info = _RemoteRequest(
        head=head,
        method=str(method).encode("latin-1"),
        status=int(status),
        upstream_id=str(upstream_id) if upstream_id else None,
        started=float(started) + offset,
        attached_at=float(attached) + offset if attached else 0.0,
        waited=float(waited),
        cold=bool(flags & 1),
        retried=bool(flags & 2),
        broken=bool(flags & 4),
        received=int(received),
        sent=int(sent),
    )
    return str(app_id), info, float(finished) + offset
