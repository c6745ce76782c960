"""One request/response cycle through the router: route, wait, pick an instance, relay, account.

    dispatch ─► no route ──────────────────────────────► 404
       │     └► empty pool ─► queued ─► set_app ─► pick   (queue_timeout / queue full: 503)
       └► pick (least outstanding) ─► pooled connection, or wait for one ─► attach ─► relay ─► finish
                                       (_connections)      └► connect failed: next instance, else 502

An exchange holds one in-flight slot of its instance from the pick until the response is fully relayed
(or fails); `State.instance_done` gives it back. A request that waited in the app's queue is answered
with ``X-Queue-Time: <ms>``, and ``X-Cold-Start: 1`` if the app had no instance when it arrived.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from ._connections import connection_free, request_connection
from ._http import BODY_CLOSE, RequestHead, error_response, new_request_id, rewrite_response
from ._upstream import PAUSE_BUFFER, PAUSE_UPSTREAM, UpstreamConnection

if TYPE_CHECKING:
    from ._client import ClientConnection
    from ._pool import AppPool, Instance

logger = logging.getLogger("runtime.router")

# How the request body travels to the instance.
REQ_NONE = 0
REQ_LENGTH = 1  # Content-Length: bytes copied as they come
REQ_CHUNKED = 2  # re-chunked as they come (httptools hands over decoded chunk data)
REQ_RAW = 3  # after an Upgrade request head: everything the client sends, untouched

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_now = time.monotonic
_LAST_CHUNK = b"0\r\n\r\n"


class Exchange:
    __slots__ = (
        "attached_at",
        "body",
        "broken",
        "buffer",
        "buffered",
        "client",
        "cold",
        "error",
        "failures",
        "finished",
        "head",
        "http10",
        "inst",
        "keep_alive",
        "method",
        "pool",
        "queued",
        "queued_at",
        "received",
        "request_done",
        "request_id",
        "responded",
        "response_done",
        "retried",
        "sent",
        "started",
        "status",
        "timer",
        "tried",
        "up",
        "upgrade",
        "upstream_id",
        "waited",
        "waiting",
    )

    def __init__(
        self,
        client: ClientConnection,
        method: bytes,
        head: RequestHead | None,
        keep_alive: bool,
        http10: bool,
        upgrade: bool,
        body: int,
    ) -> None:
        self.client = client
        self.method = method
        self.head = head
        self.request_id = head.request_id if head is not None else new_request_id()
        self.keep_alive = keep_alive
        self.http10 = http10
        self.upgrade = upgrade
        self.body = body
        self.buffer: list[bytes] | None = None
        self.buffered = 0
        self.received = 0  # request body bytes from the client
        self.sent = 0  # response bytes from the instance (head and body, as they came)
        self.attached_at = 0.0  # when the request went to an instance (0: never)
        self.request_done = False
        self.pool: AppPool | None = None
        self.inst: Instance | None = None  # holds an in-flight slot while set
        self.upstream_id: str | None = None
        self.up: UpstreamConnection | None = None
        self.status = 0
        self.responded = self.response_done = self.finished = False
        self.queued = self.retried = self.broken = self.waiting = self.cold = False
        self.queued_at = 0.0
        self.waited = -1.0  # seconds in the app's queue, once it left it (-1: never queued)
        self.timer: asyncio.TimerHandle | None = None
        self.tried: list[Instance] | None = None
        self.failures: list[str] | None = None
        self.error: tuple[str, str] | None = None  # answer this instead of proxying, in its turn
        # time.monotonic, not loop.time(): uvloop's clock ticks in milliseconds, too coarse for latencies
        self.started = _now()

    # -- routing

    def dispatch(self) -> None:
        """Called when it is this request's turn on its client connection."""
        if self.client.closing:
            return
        if self.error is not None:
            self.respond_error(*self.error)
            return
        assert self.head is not None
        pool = self.client.state.apps.get(self.head.host)
        if pool is None:
            host = self.head.host.decode("latin-1")
            self.respond_error("no_such_app", f"No app is deployed at host '{host}'.")
            return
        self.pool = pool
        if pool.waiting and pool.instances and pool.limit and self.waited < 0:
            self._enqueue(pool)  # first come, first served: the queue goes before new arrivals
            return
        self._pick()

    def _pick(self) -> None:
        pool = self.pool
        assert pool is not None
        inst = pool.pick(self.tried)
        if inst is None:
            if self.failures:
                failures = "; ".join(self.failures)
                self.respond_error("bad_gateway", f"App '{pool.app_id}' could not be reached: {failures}.")
            else:
                self._enqueue(pool)
            return
        inst.acquire()
        self.inst = inst
        self.upstream_id = inst.id
        request_connection(self.client.state, self, inst)

    def _enqueue(self, pool: AppPool) -> None:
        state = self.client.state
        config = state.config
        if state.stopping:
            self.respond_error("no_capacity", "The router is shutting down.", retry_after=config.retry_after)
            return
        if len(pool.waiting) >= config.max_queue_per_app or state.queued >= config.max_queue_total:
            what = "has no instance ready" if not pool.instances else "has no instance free"
            self.respond_error(
                "no_capacity",
                f"App '{pool.app_id}' {what} and {len(pool.waiting)} requests are already waiting for one.",
                retry_after=config.retry_after,
            )
            return
        assert state.loop is not None
        pool.waiting.append(self)
        state.queued += 1
        self.queued = True
        self.queued_at = state.loop.time()
        stats = pool.stats
        stats.queued += 1
        stats.queued_total += 1
        if not pool.instances:
            self.cold = True
            stats.cold_starts += 1
        self.timer = state.loop.call_later(config.queue_timeout, self._queue_expired)
        hook = state.on_queue
        if hook is not None:  # last: it may well set_app at once, which dispatches this request
            try:
                hook(pool.app_id)
            except Exception:
                logger.exception("router: on_queue hook failed")

    def unqueue_and_dispatch(self) -> None:
        """The app got instances (or was removed): try again. The caller popped us from the queue."""
        self._unqueued()
        if not self.finished:
            self.dispatch()

    def _unqueued(self) -> None:
        self.queued = False
        self.client.state.queued -= 1
        loop = self.client.state.loop
        assert loop is not None
        self.waited = loop.time() - self.queued_at
        if self.pool is not None:
            stats = self.pool.stats
            stats.queued -= 1
            stats.queue_wait_seconds += self.waited
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _queue_expired(self) -> None:
        self.timer = None
        pool = self.pool
        assert pool is not None
        pool.waiting.remove(self)
        self._unqueued()
        config = self.client.state.config
        self.respond_error(
            "no_capacity",
            f"App '{pool.app_id}' had no instance {'ready' if not pool.instances else 'free'} to serve the "
            f"request within {config.queue_timeout:g} s.",
            retry_after=config.retry_after,
        )

    def connect_failed(self, inst: Instance, reason: str) -> None:
        """No connection to ``inst`` could be opened for this request (it was waiting for one)."""
        if self.inst is not inst:
            return
        self.inst = None
        self.client.state.instance_done(inst)
        # Nothing was sent yet, so any other instance of the pool may take the request.
        self.tried = [*(self.tried or ()), inst]
        self.failures = [*(self.failures or ()), f"instance {inst.id} ({inst.host}:{inst.port}): {reason}"]
        if not self.finished:
            self._pick()

    def attach(self, conn: UpstreamConnection) -> None:
        """Send the request on ``conn`` (pooled, freed by another request or just opened)."""
        self.up = conn
        head = self.head
        assert head is not None
        if not self.attached_at:
            self.attached_at = _now()
        buffer = self.buffer
        if not buffer and (self.body != REQ_CHUNKED or not self.request_done):
            conn.attach(self, head.data)  # the usual case: nothing but the head to send yet
        else:
            self._attach_with_body(conn, head.data, buffer)
        if head.expect_continue and not self.request_done and not self.http10 and self.body != REQ_NONE:
            self.client.transport.write(_CONTINUE)

    def _attach_with_body(self, conn: UpstreamConnection, head: bytes, buffer: list[bytes] | None) -> None:
        data = [head]
        if buffer:
            self.buffer = None
            self.buffered = 0
            if self.body == REQ_CHUNKED:
                for chunk in buffer:
                    data += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
            else:
                data += buffer
            self.client.resume(PAUSE_BUFFER)
        if self.request_done and self.body == REQ_CHUNKED:
            data.append(_LAST_CHUNK)
        conn.attach(self, data)

    # -- request side, driven by the client connection

    def body_data(self, data: bytes) -> None:
        self.received += len(data)
        up = self.up
        if up is not None:
            assert up.transport is not None
            if self.body == REQ_CHUNKED:
                up.transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
            else:
                up.transport.write(data)
        elif not self.response_done and self.error is None:
            if self.buffer is None:
                self.buffer = []
            self.buffer.append(data)
            self.buffered += len(data)
            if self.buffered > self.client.state.config.buffer_bytes:
                self.client.pause(PAUSE_BUFFER)
        # else: answered already; the rest of the body is read and dropped to keep the connection

    def request_complete(self) -> None:
        self.request_done = True
        up = self.up
        if up is not None:
            if self.body == REQ_CHUNKED:
                assert up.transport is not None
                up.transport.write(_LAST_CHUNK)
            if self.body != REQ_NONE:
                up.request_sent()
        if self.response_done:
            self._finish()

    def fail(self, code: str, message: str) -> None:
        """The client's request turned out bad (body too large, broken chunking) after routing began."""
        self.error = (code, message)
        if self is not self.client.current:
            return  # pipelined: answered in its turn
        self._detach()
        if self.responded:  # the answer has started (or was early and is done): just hang up
            self.broken = not self.response_done
            self.client.abort()
            self._finish()
        else:
            self.respond_error(code, message)

    def client_stalled(self) -> None:
        """No upload progress for read_timeout: give up on the client."""
        self._detach()
        self.client.abort()

    def cancel(self) -> None:
        """The client connection is gone."""
        if self.finished:
            return
        self._detach(graceful=self.upgrade)
        if not self.responded:
            self.status = 499  # nginx's "client closed request"
        self._finish()

    # -- response side, driven by the upstream connection

    def start_response(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], no_body: bool
    ) -> tuple[bytes, int, int]:
        """The head to send the client, and how the body is framed upstream and to the client."""
        client = self.client
        keep_alive = self.keep_alive and not self.upgrade and not client.state.stopping
        head, upstream_mode, mode = rewrite_response(
            status,
            reason,
            headers,
            self.request_id,
            no_body=no_body,
            keep_alive=keep_alive,
            http10=self.http10,
            extra=self._extra_headers(),
        )
        self.keep_alive = keep_alive and mode != BODY_CLOSE
        self.status = status
        self.responded = True
        return head, upstream_mode, mode

    def response_complete(self, conn: UpstreamConnection, keep_alive: bool) -> None:
        self.response_done = True
        self.up = None
        conn.ex = None
        inst = self.inst
        self.inst = None
        state = self.client.state
        if keep_alive and self.request_done and not self.upgrade and inst is not None:
            conn.reused = True
            connection_free(state, inst, conn)  # to a request waiting for it, or into the pool
        else:
            conn.close()
        if inst is not None:
            state.instance_done(inst)
        client = self.client
        if client.paused & PAUSE_UPSTREAM:
            client.resume(PAUSE_UPSTREAM)
        if self.request_done:
            self._finish()
        else:
            client.response_sent_early()

    def upstream_failed(self, conn: UpstreamConnection, message: str, *, timeout: bool = False) -> None:
        if conn.ex is not self:
            return
        retry = (
            not self.retried
            and conn.reused
            and not conn.headers_done
            and not timeout
            and self.body == REQ_NONE
            and self.request_done
        )
        self._detach()
        if self.responded:  # mid-response: too late for a status, the client must see the break
            self.broken = True
            self.client.abort()
            self._finish()
        elif retry:
            # A pooled connection the instance closed just as we reused it; nothing was processed.
            self.retried = True
            self._pick()
        else:
            self.respond_error("gateway_timeout" if timeout else "bad_gateway", message)

    def tunnel_closed(self, conn: UpstreamConnection) -> None:
        if conn.ex is not self:
            return
        self._detach(graceful=True)
        self.response_done = True
        self.client.close()
        self._finish()

    # -- endings

    def respond_error(self, code: str, message: str, *, retry_after: int | None = None) -> None:
        client = self.client
        keep_alive = (
            self.keep_alive
            and not self.upgrade
            and (self.request_done or self.body == REQ_NONE)
            and not client.state.stopping
            and self.error is None
        )
        self.status, data = error_response(
            code,
            message,
            self.request_id,
            keep_alive=keep_alive,
            http10=self.http10,
            head_only=self.method == b"HEAD",
            retry_after=retry_after,
            extra=self._extra_headers(),
        )
        self.keep_alive = keep_alive
        self.responded = self.response_done = True
        if not client.closing:
            client.transport.write(data)
            if not keep_alive:
                client.close()
        if self.request_done or not keep_alive:
            self._finish()

    def _extra_headers(self) -> bytes:
        """``X-Trace-Id`` (find the request's trace), and how it waited if it did."""
        head = self.head
        trace = b"" if head is None else b"X-Trace-Id: %s\r\n" % head.trace_id
        if self.waited < 0:
            return trace
        ms = round(self.waited * 1000)
        if self.cold:
            return trace + b"X-Queue-Time: %d\r\nX-Cold-Start: 1\r\n" % ms
        return trace + b"X-Queue-Time: %d\r\n" % ms

    def _detach(self, *, graceful: bool = False) -> None:
        """Let go of the queue slot, the upstream connection and the in-flight slot, whichever are held."""
        if self.queued:
            assert self.pool is not None
            self.pool.waiting.remove(self)
            self._unqueued()
        if self.waiting:  # for a connection to its instance
            assert self.inst is not None
            self.waiting = False
            self.inst.waiters.remove(self)
        up = self.up
        if up is not None:
            self.up = None
            up.ex = None
            # Mid-exchange the connection's state is unknown: it can't go back to the pool.
            if graceful:
                up.close()
            else:
                up.abort()
        inst = self.inst
        if inst is not None:
            self.inst = None
            self.client.state.instance_done(inst)
        self.client.resume(PAUSE_UPSTREAM)

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        pool = self.pool
        if pool is not None:
            stats = pool.stats
            stats.requests += 1
            if self.status >= 500 or self.broken:
                stats.errors += 1
            hook = self.client.state.on_request_done
            if hook is not None:
                try:
                    hook(pool.app_id, self, _now())
                except Exception:
                    logger.exception("router: on_request_done hook failed")
        self.client.exchange_done(self)
