"""Connections from the router to an instance: who gets one, when one is opened.

A request takes the warmest pooled connection of its instance, else waits (first come, first served) for
the next one that frees up or opens. At most ``upstream_connects`` connects per instance are in flight,
and never more than there are requests waiting: under a burst the router queues rather than opening
hundreds of connections at once, which a loaded uvicorn would accept slowly (that is where nginx's p99
comes from, with its request cap per upstream connection). The pool still grows to the peak concurrency,
a connection carries any number of requests, and it is retired once idle for ``upstream_idle_timeout``
(before uvicorn's own 5 s keep-alive timeout closes it under a request).

A connect that fails sends every request waiting for that instance elsewhere (or to a ``502``): the
instance is not taking connections, so waiting for the other connects in flight would only add delay.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from typing import TYPE_CHECKING

from ._upstream import UpstreamConnection

if TYPE_CHECKING:
    from ._exchange import Exchange
    from ._pool import Instance, State


def request_connection(state: State, ex: Exchange, inst: Instance) -> None:
    """Attach ``ex`` to a connection to ``inst``: a pooled one now, else the next one free or opened."""
    if inst.idle:
        assert state.loop is not None
        conn = inst.take_idle(state.loop.time(), state.config.upstream_idle_timeout)
        if conn is not None:
            ex.attach(conn)
            return
    ex.waiting = True
    inst.waiters.append(ex)
    _open_for_waiters(state, inst)


def connection_free(state: State, inst: Instance, conn: UpstreamConnection) -> None:
    """``conn`` finished a response (or just opened) and can carry another request: to the first request
    waiting, else into the pool."""
    transport = conn.transport  # conn.closing(), inlined: once per request
    if conn.address is inst.address and transport is not None and not transport.is_closing():
        if inst.waiters:
            ex = inst.waiters.popleft()
            ex.waiting = False
            ex.attach(conn)
            return
        if not state.stopping and inst.routed:
            assert state.loop is not None
            conn.idle_since = state.loop.time()
            inst.idle.append(conn)
            return
    conn.close()  # the instance moved (or is gone, or we are stopping): this one goes
    _open_for_waiters(state, inst)


def _open_for_waiters(state: State, inst: Instance) -> None:
    while inst.connecting < len(inst.waiters) and inst.connecting < state.config.upstream_connects:
        inst.connecting += 1
        state.spawn(_connect(state, inst), f"router:connect:{inst.id}")


async def _connect(state: State, inst: Instance) -> None:
    assert state.loop is not None
    timeout = state.config.connect_timeout
    address = inst.address  # the instance may move meanwhile: the connection knows where it went
    try:
        try:
            async with asyncio.timeout(timeout):
                _, conn = await state.loop.create_connection(
                    lambda: UpstreamConnection(state, inst, address), *address
                )
        finally:
            inst.connecting -= 1
    except TimeoutError:
        _connect_failed(inst, f"connect timed out after {timeout:g} s")
        return
    except OSError as exc:
        _connect_failed(inst, os.strerror(exc.errno).lower() if exc.errno else str(exc))
        return
    connection_free(state, inst, conn)
    _open_for_waiters(state, inst)


def _connect_failed(inst: Instance, reason: str) -> None:
    # Requests arriving from now on wait afresh, with a connect of their own.
    failed, inst.waiters = inst.waiters, deque()
    for ex in failed:
        ex.waiting = False
        ex.connect_failed(inst, reason)
