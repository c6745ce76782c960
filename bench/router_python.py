"""The edge router's Python per request, without sockets: CPU microseconds per proxied request.

Run it with ``.venv/bin/python bench/router_python.py [--requests N] [--rounds R] [--router-src DIR ...]``
(a few seconds per source). A `Router`'s client and upstream protocols are wired to fake transports that
keep what is written, and each request is one client read (a GET head) and one upstream read (a small
uvicorn response, head and body): parsing, routing, the least-outstanding pick, the pooled connection,
the head rewriting both ways and the accounting, everything the router does per request but the system
calls and the event loop. Times are the thread's CPU time (``time.thread_time``), the best of
``--rounds``, so other load on the machine matters much less than it does to ``bench/router.py``'s
wrk runs; the kernel's share of a real request (most of it) is not in these figures.

``--router-src`` (repeatable) measures the ``runtime/router`` under each directory, each in a process
of its own, turn by turn (e.g. a worktree of the commit before a change next to this checkout).
``--headers browser`` sends a browser's dozen request headers instead of wrk's one; ``--profile``
prints cProfile's top functions instead.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"hello":"world"}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ndate: Wed, 02 Dec 2026 02:16:28 GMT\r\nserver: uvicorn\r\n"
    b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)
)
REQUESTS = {
    "wrk": b"GET / HTTP/1.1\r\nHost: bench.localhost\r\n\r\n",
    "browser": (
        b"GET /api/items?page=2 HTTP/1.1\r\nHost: bench.localhost\r\nUser-Agent: Mozilla/5.0 (X11; Linux "
        b"x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36\r\n"
        b"Accept: application/json\r\nAccept-Language: en-US,en;q=0.9\r\n"
        b"Accept-Encoding: gzip, deflate, br\r\n"
        b"Connection: keep-alive\r\nCookie: session=abcdef0123456789; theme=dark\r\n"
        b"Referer: http://bench.localhost/\r\nSec-Fetch-Mode: cors\r\nSec-Fetch-Site: same-origin\r\n\r\n"
    ),
}


class FakeTransport:
    """Keeps what is written (cleared between rounds); never closes."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writelines(self, data: list[bytes]) -> None:
        self.written.extend(data)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        raise AssertionError("the router closed a connection")

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def measure(src: str, requests: int, rounds: int, headers: str, profile: bool) -> None:
    """In this process: import the router from ``src``, print µs of CPU per request."""
    sys.path.insert(0, src)
    import uvloop

    from runtime.router import Router, Upstream
    from runtime.router._client import ClientConnection
    from runtime.router._connections import connection_free
    from runtime.router._upstream import UpstreamConnection

    router = Router()
    state = router._state
    state.loop = uvloop.new_event_loop()  # for its clock and timers: never run
    router.set_app("bench.localhost", "bench", [Upstream(id="bench-1", host="127.0.0.1", port=9)])
    inst = state.instances["bench-1"]
    upstream = UpstreamConnection(state, inst, inst.address)
    to_instance, to_client = FakeTransport(), FakeTransport()
    upstream.connection_made(to_instance)  # type: ignore[arg-type]
    connection_free(state, inst, upstream)  # into the pool, as after a first request
    client = ClientConnection(state, b"127.0.0.1")
    client.connection_made(to_client)  # type: ignore[arg-type]
    request = REQUESTS[headers]

    def one() -> None:
        client.data_received(request)
        upstream.data_received(RESPONSE)

    for _ in range(2000):
        one()
    answer = b"".join(to_client.written[-2:])
    if b"200 OK" not in answer or not answer.endswith(BODY) or not to_instance.written:
        raise SystemExit(f"{src}: the router did not relay the request: {answer[-300:]!r}")
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(lambda: [one() for _ in range(requests)])
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        return
    best = float("inf")
    for _ in range(rounds):
        to_instance.written.clear()
        to_client.written.clear()
        began = time.thread_time()
        for _ in range(requests):
            one()
        best = min(best, (time.thread_time() - began) / requests)
    print(f"{best * 1e6:6.2f} µs CPU per request  ({headers} headers; router from {src})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=50_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per source: the fastest counts")
    parser.add_argument("--router-src", action="append", help="a directory holding runtime/router")
    parser.add_argument("--headers", choices=sorted(REQUESTS), default="wrk")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--turns", type=int, default=2, help="times each source is measured, in turn")
    args = parser.parse_args()
    sources = args.router_src or [str(ROOT)]
    for _ in range(1 if args.profile else args.turns):
        for src in sources:
            argv = [sys.executable, __file__, "_measure", src, str(args.requests), str(args.rounds)]
            subprocess.run([*argv, args.headers, str(args.profile)], check=True, timeout=600)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":
        src, requests, rounds, headers, profile = sys.argv[2:]
        measure(src, int(requests), int(rounds), headers, profile == "True")
    else:
        main()
