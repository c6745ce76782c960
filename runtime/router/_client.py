"""One client connection to the router: parses requests with httptools and runs them one at a time.

Requests are handled strictly in order (pipelined ones wait, their bodies buffered up to a bound), so
responses can never interleave. Everything runs in protocol callbacks: no task and no await per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from ._exchange import REQ_CHUNKED, REQ_LENGTH, REQ_NONE, REQ_RAW, Exchange
from ._http import BadRequest, rewrite_request
from ._upstream import PAUSE_DEAD, PAUSE_PIPELINE

if TYPE_CHECKING:
    from ._pool import State

logger = logging.getLogger("runtime.router")


class _Stop(Exception):
    """Raised in a parser callback to stop parsing what is left of the data."""


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "advancing",
        "client_ip",
        "closing",
        "config",
        "current",
        "dead",
        "ended_here",
        "eof",
        "head_continues",
        "head_size",
        "headers",
        "idle_since",
        "idle_timer",
        "in_head",
        "loop",
        "parser",
        "parsing",
        "paused",
        "pipeline",
        "raw",
        "raw_size",
        "state",
        "transport",
        "url",
        "write_paused",
    )
    transport: asyncio.Transport

    def __init__(self, state: State) -> None:
        assert state.loop is not None
        self.state = state
        self.config = state.config
        self.loop = state.loop
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = self.raw_size = 0  # parsed head bytes; raw bytes received while in a head
        self.in_head = self.head_continues = self.ended_here = False
        self.parsing: Exchange | None = None  # the request whose body is arriving
        self.current: Exchange | None = None  # the request being served
        self.pipeline: deque[Exchange] = deque()  # requests parsed and waiting their turn
        self.paused = 0  # PAUSE_* bits
        self.write_paused = False
        self.closing = self.dead = self.raw = self.eof = self.advancing = False
        self.idle_since = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = str(peer[0]).encode() if isinstance(peer, tuple) else b"unknown"
        self.state.clients.add(self)
        if self.state.stopping:
            self.close()
            return
        self.idle_since = self.loop.time()
        self.idle_timer = self.loop.call_later(self.config.idle_timeout, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        ex = self.current
        if ex is not None:
            ex.cancel()
        self.current = self.parsing = None
        self.pipeline.clear()
        self.state.client_gone(self)

    def eof_received(self) -> bool | None:
        if self.current is None or self.raw:
            return False
        self.eof = True  # a half-closed client still gets its answer, then the connection closes
        return True

    def data_received(self, data: bytes) -> None:
        if self.raw:
            if self.parsing is not None:
                self.parsing.body_data(data)
            return
        if self.dead:
            return
        self.ended_here = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # After an Upgrade request head, the client's bytes go upstream untouched.
            self.raw = True
            rest = data[upgrade.args[0] :]
            if rest and self.parsing is not None:
                self.parsing.body_data(rest)
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if cause is not None and not isinstance(cause, _Stop):
                logger.error("router: error handling a request", exc_info=cause)
            if not self.closing and not self.dead:
                self.fail("bad_request", f"The request could not be parsed: {exc}.")
            return
        if self.in_head:
            # An unfinished head: httptools holds the partial header itself, so count raw bytes. If an
            # earlier (pipelined) request ended in the same read, that read is not counted: the head is
            # then cut off within one more read of the limit.
            if self.head_continues or not self.ended_here:
                self.raw_size += len(data)
                if self.raw_size > self.config.max_header_bytes:
                    self._headers_too_large(self.raw_size)
            self.head_continues = True

    def pause_writing(self) -> None:
        # The client reads slower than the instance sends: stop reading from the instance.
        self.write_paused = True
        ex = self.current
        if ex is not None and ex.up is not None:
            ex.up.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.current
        if ex is not None and ex.up is not None:
            ex.up.resume_reading()

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if self.closing or self.dead:
            raise _Stop
        self.url = b""
        self.headers = []
        self.head_size = self.raw_size = 0
        self.in_head = True
        self.head_continues = False

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self.head_size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        self.in_head = False
        config = self.config
        if self.head_size > config.max_header_bytes:
            self._headers_too_large(self.head_size)
            raise _Stop
        parser = self.parser
        method = parser.get_method()
        if method == b"CONNECT":
            self.fail("bad_request", "CONNECT is not supported: this is a reverse proxy.")
            raise _Stop
        upgrade = parser.should_upgrade()
        try:
            head = rewrite_request(method, self.url, self.headers, self.client_ip, upgrade=upgrade)
        except BadRequest as exc:
            self.fail("bad_request", str(exc))
            raise _Stop from None
        if upgrade:
            body = REQ_RAW
        elif head.chunked:
            body = REQ_CHUNKED
        else:
            body = REQ_LENGTH if head.content_length > 0 else REQ_NONE
        ex = Exchange(
            self,
            method,
            head,
            keep_alive=parser.should_keep_alive(),
            http10=parser.get_http_version() == "1.0",
            upgrade=upgrade,
            body=body,
        )
        self.parsing = ex
        if head.content_length > config.max_body_bytes:
            # Refuse before reading a byte of it; the answer waits for its turn like any other.
            limit = config.max_body_bytes
            ex.error = (
                "payload_too_large",
                f"The request body is {head.content_length} bytes; the limit is {limit} bytes.",
            )
            self.dead = True
            self.pause(PAUSE_DEAD)
            self.parsing = None
            self._enqueue(ex)
            raise _Stop
        self._enqueue(ex)
        if self.closing:
            raise _Stop

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is None:
            return
        if ex.body == REQ_CHUNKED and ex.received + len(body) > self.config.max_body_bytes:
            self.fail(
                "payload_too_large",
                f"The chunked request body exceeds the limit of {self.config.max_body_bytes} bytes.",
            )
            raise _Stop
        ex.body_data(body)

    def on_message_complete(self) -> None:
        self.ended_here = True
        ex = self.parsing
        if ex is None:
            return
        if not ex.upgrade:  # an upgrade keeps the exchange: the raw bytes after the head are its own
            self.parsing = None
        ex.request_complete()

    # -- driven by exchanges and the router

    def fail(self, code: str, message: str) -> None:
        """The request stream is broken: answer ``code`` in turn (or drop the connection), read no more."""
        self.dead = True
        self.pause(PAUSE_DEAD)
        ex, self.parsing = self.parsing, None
        if ex is not None:
            ex.fail(code, message)
            return
        # The error is in a request head: a stand-in exchange carries the answer, in order.
        ex = Exchange(self, b"", None, keep_alive=False, http10=False, upgrade=False, body=REQ_NONE)
        ex.error = (code, message)
        self._enqueue(ex)

    def _headers_too_large(self, size: int) -> None:
        limit = self.config.max_header_bytes
        self.fail("headers_too_large", f"The request line and headers exceed {limit} bytes ({size}).")

    def _enqueue(self, ex: Exchange) -> None:
        if self.current is None:
            self.current = ex
            ex.dispatch()
        else:
            self.pipeline.append(ex)
            self.pause(PAUSE_PIPELINE)

    def exchange_done(self, ex: Exchange) -> None:
        """``ex`` is answered and its request fully read: start the next one, idle, or close."""
        if self.current is ex:
            self.current = None
        if self.advancing:
            return  # called back from the loop below: it carries on
        self.advancing = True
        try:
            # A loop, not recursion: pipelined requests answered at once (404s, say) finish right here.
            while self.current is None and not self.closing:
                if not ex.keep_alive or self.state.stopping:
                    self.close()
                elif self.pipeline:
                    ex = self.current = self.pipeline.popleft()
                    if not self.pipeline:
                        self.resume(PAUSE_PIPELINE)
                    ex.dispatch()
                    continue
                elif self.eof:
                    self.close()
                else:
                    self.idle_since = self.loop.time()
                return
        finally:
            self.advancing = False

    def response_sent_early(self) -> None:
        """Answered before the body was all read: the rest is dropped, within the idle timeout."""
        self.idle_since = self.loop.time()

    def _check_idle(self) -> None:
        # One lazy timer per connection: it fires at the earliest possible deadline and re-arms itself,
        # so requests never schedule or cancel timers.
        self.idle_timer = None
        if self.closing:
            return
        timeout = self.config.idle_timeout
        ex = self.current
        if self.raw or (ex is not None and not ex.response_done):
            delay = timeout  # busy; look again later
        else:
            delay = self.idle_since + timeout - self.loop.time()
            if delay <= 0:
                self.close()
                return
        self.idle_timer = self.loop.call_later(delay, self._check_idle)

    def pause(self, reason: int) -> None:
        if not self.paused and not self.closing:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closing:
                self.transport.resume_reading()

    def close(self) -> None:
        """Close after what was written is flushed."""
        if not self.closing:
            self.closing = True
            self.transport.close()

    def abort(self) -> None:
        """Close at once (a broken response must look broken to the client)."""
        self.closing = True
        self.transport.abort()
