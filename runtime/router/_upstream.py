"""One keep-alive HTTP/1.1 connection from the router to an instance; parses responses as they stream in.

A connection serves one exchange at a time. It copies the response to the client as bytes arrive (no
awaits on the data path), pauses reading when the client's write buffer is full, and becomes a raw byte
pipe after a ``101 Switching Protocols``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

import httptools

from ._http import BODY_CHUNKED, BODY_CLOSE, BODY_NONE

if TYPE_CHECKING:
    from ._exchange import Exchange
    from ._pool import Instance, State


#: Why a client connection stopped reading (a bit each; reading resumes when none is left).
PAUSE_UPSTREAM = 1  # the instance's write buffer is full: it reads the body slower than the client sends
PAUSE_BUFFER = 2  # body bytes pile up while no upstream connection is ready
PAUSE_PIPELINE = 4  # a pipelined request waits for the one before it
PAUSE_DEAD = 8  # the request stream is unusable (error answered or about to be)


class _BadResponse(Exception):
    """The instance answered something we cannot relay."""


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "address",
        "client_transport",
        "ex",
        "head_keep_alive",
        "headers",
        "headers_done",
        "host",
        "idle_since",
        "inst",
        "interim",
        "mode",
        "out",
        "parser",
        "port",
        "progress",
        "read_paused",
        "reason",
        "reused",
        "skip_body",
        "state",
        "timer",
        "transport",
        "tunnel",
        "upstream_mode",
        "wait_since",
    )

    def __init__(self, state: State, inst: Instance, address: tuple[str, int]) -> None:
        self.state = state
        self.inst = inst
        self.address = address  # where it really goes: the instance's address when it was opened
        self.host, self.port = address
        self.transport: asyncio.Transport | None = None
        self.client_transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.ex: Exchange | None = None
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        # What one read produces for the client (head, body pieces, chunk framing) goes out in one write:
        # uvloop sends on every write() call, and a syscall costs more than the copy into a list.
        self.out: list[bytes] = []
        self.headers_done = self.interim = self.skip_body = self.tunnel = self.head_keep_alive = False
        self.mode = self.upstream_mode = BODY_NONE
        self.idle_since = 0.0
        self.reused = False
        self.read_paused = False
        self.timer: asyncio.TimerHandle | None = None
        self.wait_since = 0.0
        self.progress = -1

    # -- driven by the exchange

    def attach(self, ex: Exchange, data: bytes | list[bytes]) -> None:
        """Serve ``ex``: send its head (and any body bytes already received)."""
        transport = self.transport
        assert transport is not None
        self.ex = ex
        self.client_transport = ex.client.transport
        self.headers_done = False
        self.progress = -1
        if isinstance(data, bytes):
            transport.write(data)
        else:
            transport.writelines(data)
        self.request_sent()

    def request_sent(self) -> None:
        """The (rest of the) request went out: the read timeout counts from now.

        One lazy timer per connection, re-armed only when it fires, so a busy keep-alive connection costs
        no timer allocation per request."""
        loop = self.state.loop
        assert loop is not None
        self.wait_since = loop.time()
        if self.timer is None:
            self.timer = loop.call_later(self.state.config.read_timeout, self._check_timeout)

    def _check_timeout(self) -> None:
        self.timer = None
        ex = self.ex
        if ex is None or self.headers_done:
            return
        loop = self.state.loop
        assert loop is not None
        timeout = self.state.config.read_timeout
        if not ex.request_done:
            if ex.received != self.progress:  # the client is still uploading: fine
                self.progress = ex.received
                self.timer = loop.call_later(timeout, self._check_timeout)
            else:
                ex.client_stalled()
            return
        remaining = self.wait_since + timeout - loop.time()
        if remaining > 0:
            self.timer = loop.call_later(remaining, self._check_timeout)
            return
        ex.upstream_failed(
            self,
            f"Instance {self.inst.id} ({self.host}:{self.port}) sent no response headers "
            f"within {timeout:g} s.",
            timeout=True,
        )

    def pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()

    def closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        ex = self.ex
        if ex is None:
            self.inst.forget(self)  # an idle pooled connection, closed by the instance or by us
        elif self.tunnel:
            ex.tunnel_closed(self)
        elif self.headers_done and self.upstream_mode == BODY_CLOSE and exc is None:
            # The end of a body delimited by the connection closing.
            if self.mode == BODY_CHUNKED and self.client_transport is not None:
                self.client_transport.write(b"0\r\n\r\n")
            self._complete(keep_alive=False)
        else:
            where = "while sending the response" if self.headers_done else "before responding"
            ex.upstream_failed(
                self, f"Instance {self.inst.id} ({self.host}:{self.port}) closed the connection {where}."
            )

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is None:  # bytes nobody asked for: this connection cannot be trusted any more
            self.abort()
            return
        ex.sent += len(data)
        if self.tunnel:
            assert self.client_transport is not None
            self.client_transport.write(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._flush()
            self._start_tunnel(data[upgrade.args[0] :])
            return
        except httptools.HttpParserError as exc:
            self._flush()
            if self.ex is ex:
                reason = exc.__context__ if isinstance(exc.__context__, _BadResponse) else exc
                ex.upstream_failed(
                    self,
                    f"Instance {self.inst.id} ({self.host}:{self.port}) sent an invalid response: {reason}.",
                )
            return
        if self.out:
            self._flush()
        if self.skip_body:
            # A HEAD response: llhttp expects the body its headers announce, so start a fresh parser.
            self.skip_body = False
            self.parser = httptools.HttpResponseParser(self)
            self._complete(self.head_keep_alive)

    def eof_received(self) -> bool | None:
        return False  # close; connection_lost decides what the end means

    def pause_writing(self) -> None:
        # The instance reads the request body slower than the client sends it.
        if self.ex is not None:
            self.ex.client.pause(PAUSE_UPSTREAM)

    def resume_writing(self) -> None:
        if self.ex is not None:
            self.ex.client.resume(PAUSE_UPSTREAM)

    # -- httptools callbacks

    # No on_message_begin (a callback less per response): on_headers_complete leaves reason and headers
    # empty for the next response.

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self.ex
        assert ex is not None
        status = self.parser.get_status_code()
        reason, headers = self.reason, self.headers
        self.reason, self.headers = b"", []
        if status < 200 and status != 101:
            self.interim = True  # 100 Continue, 103 Early Hints: the router handles Expect itself
            return
        if status == 101 and not ex.upgrade:
            raise _BadResponse("101 Switching Protocols to a request that asked for no upgrade")
        self.headers_done = True
        head_request = ex.method == b"HEAD"
        head, self.upstream_mode, self.mode = ex.start_response(
            status, reason, headers, head_request or status in (101, 204, 304)
        )
        self.out.append(head)
        self.skip_body = head_request
        if head_request:
            self.head_keep_alive = self.parser.should_keep_alive()  # valid only inside callbacks
        if ex.client.write_paused:
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        if self.skip_body:
            return
        if self.mode == BODY_CHUNKED:
            self.out += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.skip_body or self.ex is None or self.ex.status == 101:
            return  # HEAD: completed after feed_data; 101: the tunnel starts after feed_data
        if self.mode == BODY_CHUNKED:
            self.out.append(b"0\r\n\r\n")
        self._flush()  # before anything else (a pipelined answer) may write to the client
        self._complete(self.parser.should_keep_alive())

    # -- internals

    def _flush(self) -> None:
        out = self.out
        if out:
            transport = self.client_transport
            assert transport is not None
            if len(out) == 1:
                transport.write(out[0])
            else:
                transport.writelines(out)
            out.clear()

    def _complete(self, keep_alive: bool) -> None:
        ex = self.ex
        assert ex is not None
        if self.read_paused:
            self.resume_reading()  # pooled connections must keep reading to notice a close
        ex.response_complete(self, keep_alive)

    def _start_tunnel(self, rest: bytes) -> None:
        self.tunnel = True
        if rest:
            assert self.client_transport is not None
            self.client_transport.write(rest)
