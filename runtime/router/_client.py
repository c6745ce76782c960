"""One client connection to the router: parses requests with httptools and runs them one at a time.

Requests are handled strictly in order (pipelined ones wait, their bodies buffered up to a bound), so
responses can never interleave. Everything runs in protocol callbacks: no task and no await per request.

Idle keep-alive connections are kept small, since there can be tens of thousands: no timer each (the
router's sweep enforces the idle timeout), the parser is created when bytes arrive and freed when the
connection goes idle after its first request (and by the sweep once it idles later), the pipeline queue
exists only while requests are pipelined.
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


#: The headers of no request: what an idle connection holds (never appended to: every request starts
#: with on_message_begin, which gives it a list of its own).
_NO_HEADERS: list[tuple[bytes, bytes]] = []


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
        "feeding",
        "head_continues",
        "headers",
        "idle_since",
        "in_head",
        "loop",
        "parser",
        "parsing",
        "paused",
        "pipeline",
        "raw",
        "raw_size",
        "served",
        "state",
        "transport",
        "url",
        "write_paused",
    )
    transport: asyncio.Transport

    def __init__(self, state: State, client_ip: bytes) -> None:
        assert state.loop is not None
        self.state = state
        self.config = state.config
        self.loop = state.loop
        self.parser: httptools.HttpRequestParser | None = None  # while bytes of a request may be in it
        self.client_ip = client_ip
        self.url = b""
        self.headers = _NO_HEADERS
        self.raw_size = 0  # raw bytes received while in a head (of reads before the one being parsed)
        self.in_head = self.head_continues = self.ended_here = False
        self.parsing: Exchange | None = None  # the request whose body is arriving
        self.current: Exchange | None = None  # the request being served
        self.pipeline: deque[Exchange] | None = None  # requests parsed and waiting their turn
        self.paused = 0  # PAUSE_* bits
        self.write_paused = False
        self.closing = self.dead = self.raw = self.eof = self.advancing = self.served = False
        self.feeding = 0  # the size of the read being parsed (0: not parsing)
        self.idle_since = 0.0

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.state.clients.add(self)
        if self.state.stopping:
            self.close()
            return
        self.idle_since = self.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        ex = self.current
        if ex is not None:
            ex.cancel()
        self.current = self.parsing = self.pipeline = self.parser = None
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
        parser = self.parser
        if parser is None:
            parser = self.parser = httptools.HttpRequestParser(self)
        self.feeding = len(data)
        try:
            parser.feed_data(data)
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
        finally:
            self.feeding = 0
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
        self.raw_size = 0
        self.in_head = True
        self.head_continues = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        config = self.config
        limit = config.max_header_bytes
        if self.head_continues or self.feeding > limit:
            # Only a head that came in more than one read, or in one larger than the limit, can be over
            # it: the others are not counted, which spares every header a callback's worth of sums.
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > limit:
                self._headers_too_large(size)
                raise _Stop
        parser = self.parser
        assert parser is not None
        method = parser.get_method()
        if method == b"CONNECT":
            self.fail("bad_request", "CONNECT is not supported: this is a reverse proxy.")
            raise _Stop
        upgrade = parser.should_upgrade()
        url, headers = self.url, self.headers
        self.url, self.headers = b"", _NO_HEADERS  # not kept while the connection idles
        try:
            head = rewrite_request(method, url, headers, self.client_ip, upgrade=upgrade)
        except BadRequest as exc:
            self.fail("bad_request", str(exc))
            raise _Stop from None
        if upgrade:
            body = REQ_RAW
        elif head.chunked:
            body = REQ_CHUNKED
        else:
            body = REQ_LENGTH if head.content_length > 0 else REQ_NONE
        keep_alive = parser.should_keep_alive()
        # Without a Connection header (llhttp reads Proxy-Connection too), llhttp keeps HTTP/1.1 alive and
        # closes HTTP/1.0: the version is known without get_http_version, which formats a string.
        http10 = parser.get_http_version() == "1.0" if head.connection else not keep_alive
        ex = Exchange(self, method, head, keep_alive, http10, upgrade, body)
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
        ex = Exchange(self, b"", None, False, False, False, REQ_NONE)  # no keep-alive, HTTP/1.1, no upgrade
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
            if self.pipeline is None:
                self.pipeline = deque()
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
                        self.pipeline = None
                        self.resume(PAUSE_PIPELINE)
                    ex.dispatch()
                    continue
                elif self.eof:
                    self.close()
                else:
                    self.idle_since = self.loop.time()
                    if not self.served:
                        # Most connections that idle after their first request make no other soon; one
                        # that does reuse its connection keeps its parser until the sweep finds it idle.
                        self.served = True
                        self._drop_parser()
                return
        finally:
            self.advancing = False

    def response_sent_early(self) -> None:
        """Answered before the body was all read: the rest is dropped, within the idle timeout."""
        self.idle_since = self.loop.time()

    def sweep(self, deadline: float) -> bool:
        """Called by the router's sweep: True if the connection has been idle since before ``deadline``
        (no request in progress, or one whose head or rest of body is overdue) and must be closed."""
        if self.closing:
            return False
        ex = self.current
        if self.raw or (ex is not None and not ex.response_done):
            return False  # busy: a request in progress has timeouts of its own
        if self.idle_since <= deadline:
            return True
        if ex is None:
            self._drop_parser()
        return False

    def _drop_parser(self) -> None:
        # Only between requests (nothing of a next one may be in the parser yet), and not from within
        # its own callbacks (what is left of the data would go on through it).
        if not self.feeding and not self.in_head and self.parsing is None and not self.dead:
            self.parser = None

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
