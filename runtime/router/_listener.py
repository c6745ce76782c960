"""The router's listening sockets, accepted greedily: every pending connection at each readiness event.

Why not ``loop.create_server``: under load, a server that accepts a bounded number of connections per
event-loop iteration makes a new client wait for its accept behind every busy connection's callbacks. A
prototype measured 0.4-1.3 s to a new client's first byte that way, and 34-42 ms once the proxy accepted
in a loop until ``EAGAIN`` in one reader callback. Each accepted socket then becomes a transport through
`loop.connect_accepted_socket`, and its protocol gets the peer address from ``accept()`` (no lookup later).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

logger = logging.getLogger("runtime.router")

#: Out of descriptors or memory: the listening socket stays readable, so retrying at once would spin.
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_RESOURCE_PAUSE = 0.5  # seconds without accepting after such an error

#: ``factory(client_ip)``: the protocol for one accepted connection.
ProtocolFactory = Callable[[bytes], asyncio.Protocol]


class Listener:
    """Listening sockets on one address (every family it resolves to), handing connections to a factory.

    ``spawn(coro, name)`` runs the short task that turns an accepted socket into a transport."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        factory: ProtocolFactory,
        spawn: Callable[..., None],
        backlog: int,
    ) -> None:
        self.loop = loop
        self.factory = factory
        self.spawn = spawn
        self.backlog = backlog
        self.sockets: list[socket.socket] = []
        self._ips: dict[str, bytes] = {}  # one bytes object per client address, however many connections
        self._paused: list[asyncio.TimerHandle] = []

    def bind(self, host: str, port: int) -> None:
        """Bind and listen on ``host:port`` (port 0: any free port). Raises `OSError`."""
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):  # de-duplicated, in order
                sock = socket.socket(family, kind, proto)
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # the IPv4 socket is separate
                sock.bind(address)
                sock.listen(self.backlog)
                sock.setblocking(False)
        except OSError:
            self.close()
            raise
        for sock in self.sockets:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop accepting and close the listening sockets (accepted connections are not touched)."""
        for timer in self._paused:
            timer.cancel()
        self._paused.clear()
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self.loop.remove_reader(sock.fileno())
                sock.close()
        self.sockets.clear()

    def _accept(self, sock: socket.socket) -> None:
        # Until EAGAIN, but at most a backlog's worth: a flood of connections must not starve the
        # requests in progress (what is left is accepted at the next iteration).
        ips = self._ips
        for _ in range(self.backlog):
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    logger.warning(
                        "router: cannot accept connections (%s); pausing for %g s", exc, _RESOURCE_PAUSE
                    )
                    self._pause(sock)
                    return
                continue  # ECONNABORTED and kin: that client is gone, the next may not be
            host = address[0] if isinstance(address, tuple) else "unknown"
            ip = ips.get(host)
            if ip is None:
                if len(ips) >= 4096:
                    ips.clear()
                ip = ips[host] = host.encode()
            conn.setblocking(False)
            self.spawn(self._adopt(conn, ip), "router:accept")

    async def _adopt(self, conn: socket.socket, ip: bytes) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: self.factory(ip), conn)
        except OSError:
            conn.close()

    def _pause(self, sock: socket.socket) -> None:
        self.loop.remove_reader(sock.fileno())

        def resume() -> None:
            self._paused.remove(timer)
            if sock.fileno() >= 0:
                self.loop.add_reader(sock.fileno(), self._accept, sock)

        timer = self.loop.call_later(_RESOURCE_PAUSE, resume)
        self._paused.append(timer)
