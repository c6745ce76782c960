"""The edge router next to nginx and a direct connection: throughput, latency, CPU, memory, new clients.

Run it with ``.venv/bin/python bench/router.py`` (three to four minutes; needs ``wrk`` and ``nginx`` from
Debian: ``apt-get install -y wrk nginx``). One upstream app (uvicorn, one worker, uvloop + httptools, a
raw ASGI app answering a small JSON) is put behind, in turn, nothing, nginx and our `Router`, and ``wrk``
drives each at 1, 50 and 256 connections. Then:

* **new clients under load**: ``wrk`` at 256 connections while a second client opens 200 fresh
  connections one after the other: time from ``connect()`` to the first byte of the response.
* **idle keep-alive memory**: 10,000 client connections that made one request each and stay open; how
  much a freshly started proxy's RSS grows per connection; then it serves a load beside them, and 200 of
  them make another request.
* **one core**: the router alone on its core in front of a raw asyncio upstream that answers a fixed
  response as fast as it can, so that the router is the bottleneck.

The last table puts the issue's targets next to the measured values. See ``bench/README.md``.

Every process is a child of this one (started in its own session, stopped in ``finally``), everything
listens on and connects to 127.0.0.1, and every load run is bounded in time. The same file also plays
the helper processes (``python bench/router.py _role NAME ARGS...``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOST = "bench.localhost"
BODY = b'{"hello":"world"}'
RAW_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(BODY),
    BODY,
)
CONNECTIONS = (1, 50, 256)
NOISY = 0.2  # a round during which other processes used more than this many cores is disturbed
START_TIMEOUT = 20.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The targets.
TARGET_THROUGHPUT = 0.95  # of nginx's requests/s, at 50 and 256 connections
TARGET_CPU_RATIO = 1.3  # router CPU per request / nginx's
TARGET_ONE_CORE = 30_000  # requests/s on one core, trivial upstream
TARGET_HOP_US = 100.0  # added p50 latency at one connection
TARGET_NEW_P99_MS = 50.0  # a new connection's first response under full load
TARGET_IDLE_BYTES = 2048  # per idle keep-alive client connection


def raise_nofile() -> None:
    """Lift the soft open-files limit to the hard one (10,000 idle connections need 10,000 fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- helper processes (`_role NAME`) ----------------------------------------------------------------


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The trivial upstream app: a small JSON answer."""
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


def role_uvicorn(port: int) -> None:
    import uvicorn

    raise_nofile()
    uvicorn.run(
        asgi_app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        backlog=2048,
    )


class _RawUpstream(asyncio.Protocol):
    """Answers each request head with a fixed response: an upstream that costs next to nothing."""

    def __init__(self) -> None:
        self.tail = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        data = self.tail + data if self.tail else data
        count = data.count(b"\r\n\r\n")  # GETs only: no bodies
        self.tail = data[data.rfind(b"\r\n\r\n") + 4 :] if count else data
        if count and self.transport is not None:
            self.transport.write(RAW_RESPONSE * count)


def _serve_until_terminated(start: Callable[[], Any]) -> None:
    """Run ``await start()`` on uvloop, then wait for SIGTERM."""
    import uvloop

    raise_nofile()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        done = await start()
        await stop.wait()
        await done()

    uvloop.run(main())


def role_raw_upstream(port: int) -> None:
    async def start() -> Callable[[], Any]:
        server = await asyncio.get_running_loop().create_server(_RawUpstream, "127.0.0.1", port, backlog=2048)

        async def done() -> None:
            server.close()

        return done

    _serve_until_terminated(start)


def role_router(port: int, upstream_port: int, src: str) -> None:
    sys.path.insert(0, src)
    from runtime.router import Router, Upstream

    async def start() -> Callable[[], Any]:
        router = Router()
        await router.start("127.0.0.1", port)
        router.set_app(HOST, "bench", [Upstream(id="bench-1", host="127.0.0.1", port=upstream_port)])
        return lambda: router.stop(timeout=1)

    _serve_until_terminated(start)


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % HOST.encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer: {head[:100]!r}")
    match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    if match is None:
        raise RuntimeError("no content-length in the answer")
    await reader.readexactly(int(match[1]))


def role_idle_clients(port: int, count: int) -> None:
    """Open ``count`` keep-alive connections, one request each, print ``ready N``; then obey stdin:
    ``check N`` (a request on N of them at random, print ``ok N``), ``quit``."""
    import uvloop

    raise_nofile()

    async def main() -> None:
        conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        limit = asyncio.Semaphore(100)

        async def open_one() -> None:
            async with limit:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=4096)
                await _request(reader, writer)
                conns.append((reader, writer))

        async with asyncio.timeout(120):
            await asyncio.gather(*(open_one() for _ in range(count)))
        print(f"ready {len(conns)}", flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
            if not line or line[0] == "quit":
                break
            sample = random.sample(conns, min(int(line[1]), len(conns)))
            async with asyncio.timeout(60):
                await asyncio.gather(*(_request(r, w) for r, w in sample))
            print(f"ok {len(sample)}", flush=True)
        for _, writer in conns:
            writer.close()

    uvloop.run(main())


def role_fresh_clients(port: int, count: int, delay: float) -> None:
    """After ``delay`` s, open ``count`` connections one after the other; print each one's seconds from
    ``connect()`` to the first byte of the response (a JSON list; a failure counts as 10 s)."""
    time.sleep(delay)
    request = b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % HOST.encode()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(request)
                if not sock.recv(65536):
                    raise OSError("closed")
                times.append(time.perf_counter() - started)
        except OSError:
            times.append(10.0)
    print(json.dumps(times), flush=True)


ROLES: dict[str, Callable[[list[str]], None]] = {
    "uvicorn": lambda a: role_uvicorn(int(a[0])),
    "raw-upstream": lambda a: role_raw_upstream(int(a[0])),
    "router": lambda a: role_router(int(a[0]), int(a[1]), a[2]),
    "idle-clients": lambda a: role_idle_clients(int(a[0]), int(a[1])),
    "fresh-clients": lambda a: role_fresh_clients(int(a[0]), int(a[1]), float(a[2])),
}


# -- process plumbing ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cpus:
    """Where each process runs (``taskset``), so that runs compare like with like on a small machine.

    The upstream always has its own cpu (1), the proxy another (0). wrk goes:

    * at 1 connection, on the proxy's cpu: there is no contention at one connection, and a request then
      crosses between cpus as often through a proxy as directly (wrk -> upstream -> wrk against
      wrk = proxy -> upstream -> proxy = wrk), so the difference is the hop itself, not wake-ups;
    * at 50 and 256 connections, on the upstream's cpu: the proxy has its core to itself, as in
      production, and the upstream app is the bottleneck, so a proxy only costs throughput if it
      cannot keep up. ``--layout shared`` puts wrk on the proxy's cpu at every level instead, where
      throughput also shows how much CPU the proxy takes from the load generator; ``own-core`` puts
      it on the upstream's at every level.

    With three cores or more, wrk gets the third.
    """

    def __init__(self, layout: str) -> None:
        cpus = sorted(os.sched_getaffinity(0))
        self.layout = layout
        self.proxy = cpus[0]
        self.upstream = cpus[1] if len(cpus) > 1 else cpus[0]
        self.spare = cpus[2] if len(cpus) > 2 else None

    def load(self, connections: int) -> int:
        """The cpu for wrk at this many connections."""
        if self.spare is not None:
            return self.spare
        if self.layout == "shared" or (self.layout == "auto" and connections == 1):
            return self.proxy
        return self.upstream


def pinned(cpu: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv]


class Procs:
    """Children started in their own sessions; all stopped (TERM, then KILL) when the block ends."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[str]:
        proc = subprocess.Popen(argv, start_new_session=True, text=True, **kwargs)
        self.procs.append(proc)
        return proc

    def role(self, cpu: int, name: str, *args: object, **kwargs: Any) -> subprocess.Popen[str]:
        argv = [sys.executable, str(Path(__file__).resolve()), "_role", name, *map(str, args)]
        return self.start(pinned(cpu, argv), **kwargs)

    def stop(self, proc: subprocess.Popen[str]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # our own child's session, nothing else
                proc.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_pid(self, pid: int) -> None:
        for proc in list(self.procs):
            if proc.pid == pid:
                self.stop(proc)

    def stop_all(self) -> None:
        while self.procs:
            self.stop(self.procs[-1])


@contextmanager
def processes() -> Iterator[Procs]:
    procs = Procs()
    try:
        yield procs
    finally:
        procs.stop_all()


def wait_listening(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {START_TIMEOUT:g} s")


def family(pid: int) -> list[int]:
    """``pid`` and its children (nginx: the master and its worker)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(child) for child in (task / "children").read_text().split()]
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
    return total / CLK_TCK


def others_cpu(exclude: set[int]) -> dict[int, float]:
    """CPU seconds so far of every process on the machine but ``exclude`` (other people's load)."""
    seen: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in exclude:
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            seen[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return seen


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


# -- wrk ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    connections: int
    requests: int
    rps: float
    p50_us: float
    p99_us: float
    errors: int
    cpu_us: float | None  # the proxy's CPU (user + system) per request, if there is a proxy
    other_cpu: float  # cores' worth of CPU used meanwhile by other processes on the machine (noise)


_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def _micros(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def wrk(port: int, connections: int, seconds: float, cpu: int, ours: list[int], proxy: list[int]) -> Run:
    """One bounded wrk run against 127.0.0.1:port. ``proxy``: the processes whose CPU per request is
    reported; ``ours``: the bench's long-running processes (any other process's CPU is noise)."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s", "--latency"]
    argv += ["-H", f"Host: {HOST}", f"http://127.0.0.1:{port}/"]
    exclude = {os.getpid(), *ours}
    others = others_cpu(exclude)
    proxy_before = cpu_seconds(proxy)
    started = time.monotonic()
    out = subprocess.run(pinned(cpu, argv), capture_output=True, text=True, timeout=seconds + 30)
    elapsed = time.monotonic() - started
    proxy_cpu = cpu_seconds(proxy) - proxy_before
    # Processes that ran all along (a short-lived one is missed: this is a lower bound).
    other = sum(now - others[pid] for pid, now in others_cpu(exclude).items() if pid in others)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed: {out.stderr}")
    text = out.stdout
    done = re.search(r"(\d+) requests in", text)
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not (done and p50 and p99 and rps):
        raise RuntimeError(f"cannot read wrk's output:\n{text}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = int(non_2xx[1]) if non_2xx else 0
    errors += sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    requests = int(done[1])
    return Run(
        connections,
        requests,
        float(rps[1]),
        _micros(p50[1]),
        _micros(p99[1]),
        errors,
        proxy_cpu / requests * 1e6 if proxy and requests else None,
        max(0.0, other / elapsed),
    )


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


@dataclass
class Rounds:
    """The runs of every target at one level, round by round (in a round, the targets ran one right
    after the other, so a slow minute of the machine falls on all of them alike)."""

    rounds: list[dict[str, Run]]

    def quiet(self) -> list[dict[str, Run]]:
        """The rounds no other process disturbed (all of them, if every one was)."""
        calm = [r for r in self.rounds if all(run.other_cpu <= NOISY for run in r.values())]
        return calm or self.rounds

    def median(self, name: str, value: Callable[[Run], float | None]) -> float:
        return median([value(r[name]) or 0.0 for r in self.quiet()])

    def paired(self, value: Callable[[dict[str, Run]], float]) -> tuple[float, float, float]:
        """(median, lowest, highest) of a figure computed within each round."""
        values = [value(r) for r in self.quiet()]
        return median(values), min(values), max(values)


def ratio(name: str, base: str, value: Callable[[Run], float | None]) -> Callable[[dict[str, Run]], float]:
    return lambda r: (value(r[name]) or 0.0) / (value(r[base]) or 1.0)


def rps(run: Run) -> float:
    return run.rps


def cpu(run: Run) -> float | None:
    return run.cpu_us


def p50(run: Run) -> float:
    return run.p50_us


def p99(run: Run) -> float:
    return run.p99_us


def noise(run: Run) -> float:
    return run.other_cpu


def spread(figure: tuple[float, float, float], fmt: str = "{:.2f}x") -> str:
    mid, low, high = figure
    return f"{fmt.format(mid)} ({fmt.format(low)}..{fmt.format(high)})"


# -- the targets --------------------------------------------------------------------------------------


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections {nofile}; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream app {{ server 127.0.0.1:{upstream}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port} backlog=2048;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # The same work as our router: keep Host, add the forwarding headers and a request id.
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Request-ID $request_id;
        }}
    }}
}}
"""


@dataclass
class Target:
    name: str
    port: int
    pids: list[int]  # the proxy's processes (none for direct); the first is the one started


def start_nginx(procs: Procs, tmp: Path, cpus: Cpus, upstream: int) -> Target:
    port = free_port()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = min(hard if hard != resource.RLIM_INFINITY else 65536, 65536)
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, upstream=upstream, port=port, nofile=nofile))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    with open(tmp / "nginx.out", "w") as log:
        proc = procs.start(
            pinned(cpus.proxy, [nginx, "-p", str(tmp), "-c", str(conf)]), stdout=log, stderr=subprocess.STDOUT
        )
    wait_listening(port, proc)
    deadline = time.monotonic() + START_TIMEOUT
    while len(pids := family(proc.pid)) < 2:  # the master forks its worker after binding
        if time.monotonic() > deadline:
            raise RuntimeError("nginx started no worker")
        time.sleep(0.05)
    return Target("nginx", port, pids)


def start_router(procs: Procs, cpus: Cpus, upstream: int, src: str) -> Target:
    port = free_port()
    proc = procs.role(cpus.proxy, "router", port, upstream, src)
    wait_listening(port, proc)
    return Target("router", port, [proc.pid])


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def fresh_connections(
    procs: Procs, target: Target, cpus: Cpus, seconds: float, ours: list[int]
) -> tuple[Run, list[float]]:
    """wrk at 256 connections and, meanwhile, 200 new connections one after the other."""
    cpu = cpus.load(256)
    wrk(target.port, 256, 1, cpu, ours, target.pids)  # warm up at that concurrency
    fresh = procs.role(cpu, "fresh-clients", target.port, 200, min(1.0, seconds / 4), stdout=subprocess.PIPE)
    try:
        run = wrk(target.port, 256, seconds, cpu, ours, target.pids)
        out, _ = fresh.communicate(timeout=60)
    finally:
        procs.stop(fresh)
    return run, sorted(json.loads(out))


@dataclass
class Memory:
    connections: int
    bytes_each: float  # RSS growth once they are all open and idle
    bytes_each_after_load: float  # ... and after serving a load on other connections meanwhile
    rps_while_held: float
    rechecked: int  # idle connections that served another request afterwards


def idle_memory(procs: Procs, target: Target, cpus: Cpus, count: int, ours: list[int]) -> Memory:
    """RSS growth of the proxy per idle keep-alive client connection, then a load while they are held."""
    pid = target.pids[-1]  # nginx: its worker
    time.sleep(1.0)
    before = rss_bytes(pid)
    cpu = cpus.load(50)
    clients = procs.role(
        cpu, "idle-clients", target.port, count, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert clients.stdin is not None and clients.stdout is not None
    try:
        line = clients.stdout.readline().split()
        if not line or line[0] != "ready":
            raise RuntimeError("the idle clients did not connect")
        opened = int(line[1])
        time.sleep(1.0)
        held = rss_bytes(pid)
        run = wrk(target.port, 50, 3, cpu, ours, target.pids)
        clients.stdin.write("check 200\n")
        clients.stdin.flush()
        checked = clients.stdout.readline().split()
        after = rss_bytes(pid)
        clients.stdin.write("quit\n")
        clients.stdin.flush()
        clients.wait(30)
    finally:
        procs.stop(clients)
    return Memory(
        opened,
        (held - before) / opened,
        (after - before) / opened,
        run.rps,
        int(checked[1]) if checked and checked[0] == "ok" else 0,
    )


# -- the report ---------------------------------------------------------------------------------------


def fmt_us(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def print_runs(results: dict[int, Rounds]) -> None:
    print(
        f"\n{'target':<8} {'conns':>5} {'req/s':>9} {'p50':>9} {'p99':>9} {'errors':>6} "
        f"{'CPU/req':>9} {'vs nginx':>20} {'noise':>6}"
    )
    for c in CONNECTIONS:
        level = results[c]
        for name in ("direct", "nginx", "router"):
            cpu_us = f"{level.median(name, cpu):.1f} µs" if name != "direct" else ""
            vs = spread(level.paired(ratio(name, "nginx", cpu))) if name == "router" else ""
            errors = sum(r[name].errors for r in level.rounds)
            print(
                f"{name:<8} {c:>5} {level.median(name, rps):>9.0f} {fmt_us(level.median(name, p50)):>9} "
                f"{fmt_us(level.median(name, p99)):>9} {errors:>6} {cpu_us:>9} {vs:>20} "
                f"{level.median(name, noise):>6.0%}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds of runs of every target at every level (default 5)"
    )
    parser.add_argument(
        "--idle", type=int, default=10_000, help="idle keep-alive connections (default 10000)"
    )
    parser.add_argument(
        "--layout", choices=("auto", "own-core", "shared"), default="auto", help="where wrk runs (see Cpus)"
    )
    parser.add_argument(
        "--router-src",
        default=str(ROOT),
        help="a directory holding runtime/router to benchmark (default: this checkout), e.g. an older copy",
    )
    args = parser.parse_args()
    for tool in ("wrk", "nginx", "taskset"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"Error: {tool} is not installed (apt-get install -y wrk nginx util-linux)")
    raise_nofile()
    cpus = Cpus(args.layout)
    seconds = args.duration
    began = time.monotonic()
    print(
        f"layout {args.layout}: proxy on cpu {cpus.proxy}, upstream on cpu {cpus.upstream}, wrk on cpu "
        f"{cpus.load(1)} (1 connection) / {cpus.load(50)} (50, 256); load average "
        f"{os.getloadavg()[0]:.2f}; router from {args.router_src}"
    )

    results = {c: Rounds([]) for c in CONNECTIONS}
    fresh: dict[str, tuple[Run, list[float]]] = {}
    memory: dict[str, Memory] = {}
    alone = Rounds([])  # each proxy alone on its core, raw upstream, 256 connections
    saturated: dict[str, tuple[Run, list[float]]] = {}  # new connections meanwhile
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-router-")))
        procs = stack.enter_context(processes())

        # 1. The same uvicorn behind nothing, nginx and the router, turn by turn at each level, so that
        #    load from elsewhere on the machine falls on all three alike.
        upstream_port = free_port()
        upstream = procs.role(cpus.upstream, "uvicorn", upstream_port)
        wait_listening(upstream_port, upstream)
        targets = [
            Target("direct", upstream_port, []),
            start_nginx(procs, tmp, cpus, upstream_port),
            start_router(procs, cpus, upstream_port, args.router_src),
        ]
        ours = [upstream.pid, *(pid for t in targets for pid in t.pids)]
        for _ in range(args.rounds):
            for c in CONNECTIONS:
                this_round = {}
                for t in targets:
                    # Warm up at the same level: both proxies let pooled connections go while the others
                    # run (uvicorn closes them after 5 s idle), and pools are sized by concurrency.
                    wrk(t.port, c, 1, cpus.load(c), ours, t.pids)
                    this_round[t.name] = wrk(t.port, c, seconds, cpus.load(c), ours, t.pids)
                results[c].rounds.append(this_round)
        for t in targets:
            fresh[t.name] = fresh_connections(procs, t, cpus, seconds, ours)

        # 2. Idle keep-alive memory, each proxy started afresh (and warmed up by a short load).
        for t in targets[1:]:
            procs.stop_pid(t.pids[0])
        starters: list[Callable[[], Target]] = [
            lambda: start_nginx(procs, tmp, cpus, upstream_port),
            lambda: start_router(procs, cpus, upstream_port, args.router_src),
        ]
        for start in starters:
            t = start()
            mine = [upstream.pid, *t.pids]
            wrk(t.port, 50, 1, cpus.load(50), mine, t.pids)
            memory[t.name] = idle_memory(procs, t, cpus, args.idle, mine)
            procs.stop_pid(t.pids[0])
        procs.stop_all()

        # 3. Each proxy alone on its core, in front of an upstream that costs next to nothing: the proxy
        #    is the bottleneck (at full load), so this is what it serves per core, and how long a new
        #    client waits for its first byte while it is saturated.
        raw_port = free_port()
        raw = procs.role(cpus.upstream, "raw-upstream", raw_port)
        wait_listening(raw_port, raw)
        load = cpus.upstream if cpus.spare is None else cpus.spare
        proxies = [
            start_nginx(procs, tmp, cpus, raw_port),
            start_router(procs, cpus, raw_port, args.router_src),
        ]
        ours = [raw.pid, *(pid for t in proxies for pid in t.pids)]
        for _ in range(args.rounds):
            this_round = {}
            for t in proxies:
                wrk(t.port, 256, 1, load, ours, t.pids)
                this_round[t.name] = wrk(t.port, 256, seconds, load, ours, t.pids)
            alone.rounds.append(this_round)
        for t in proxies:
            saturated[t.name] = fresh_connections(procs, t, cpus, seconds, ours)

    print_runs(results)
    calm = ", ".join(f"{len(results[c].quiet())} at {c}" for c in CONNECTIONS)
    print(
        f"(medians of {args.rounds} rounds ({calm} undisturbed); vs nginx: the median of each round's "
        "ratio, with the lowest and highest; CPU/req: the proxy's user + system CPU per request; noise: "
        "CPU used meanwhile by other processes on the machine, in cores)"
    )
    print("\nnew connections while wrk holds 256 (time to first response byte)")
    for name, (run, times) in fresh.items():
        print(
            f"  {name:<8} wrk {run.rps:>7.0f} req/s, p99 {fmt_us(run.p99_us)}; new connections: p50 "
            f"{fmt_us(percentile(times, 50) * 1e6)}, p99 {fmt_us(percentile(times, 99) * 1e6)}, "
            f"max {fmt_us(times[-1] * 1e6)}"
        )
    print("\nidle keep-alive client connections (RSS growth of a freshly started proxy)")
    for name, m in memory.items():
        print(
            f"  {name:<8} {m.connections} open: {m.bytes_each:.0f} B each, {m.bytes_each_after_load:.0f} B "
            f"after serving {m.rps_while_held:.0f} req/s beside them; {m.rechecked}/200 re-used fine"
        )
    print(f"\neach proxy alone on cpu {cpus.proxy}, raw upstream, 256 connections (the proxy at full load)")
    for name in ("nginx", "router"):
        cpu_us = alone.median(name, cpu)
        times = saturated[name][1]
        print(
            f"  {name:<8} {alone.median(name, rps):>7.0f} req/s, p99 {fmt_us(alone.median(name, p99))}, "
            f"{cpu_us:.1f} µs CPU/req = {1e6 / cpu_us:.0f} req per CPU second; new connections meanwhile: "
            f"p50 {fmt_us(percentile(times, 50) * 1e6)}, p99 {fmt_us(percentile(times, 99) * 1e6)}, "
            f"max {fmt_us(times[-1] * 1e6)}"
        )
    share = spread(alone.paired(ratio("router", "nginx", rps)), "{:.0%}")
    print(f"  router vs nginx: req/s {share}, CPU/req {spread(alone.paired(ratio('router', 'nginx', cpu)))}")

    rows: list[tuple[str, str, bool]] = []
    for c in (50, 256):
        share_c = results[c].paired(ratio("router", "nginx", rps))
        rows.append(
            (
                f"throughput at {c} conns >= 95% of nginx's",
                spread(share_c, "{:.0%}"),
                share_c[0] >= TARGET_THROUGHPUT,
            )
        )
        r99, n99 = results[c].median("router", p99), results[c].median("nginx", p99)
        rows.append((f"p99 at {c} conns <= nginx's", f"{fmt_us(r99)} vs {fmt_us(n99)}", r99 <= n99))
    ratios = [results[c].paired(ratio("router", "nginx", cpu)) for c in CONNECTIONS]
    rows.append(
        (
            "CPU/request <= 1.3x nginx's (1, 50, 256 conns)",
            " / ".join(f"{x[0]:.2f}x" for x in ratios),
            max(x[0] for x in ratios) <= TARGET_CPU_RATIO,
        )
    )
    router_alone, nginx_alone = alone.median("router", rps), alone.median("nginx", rps)
    rows.append(
        (
            ">= 30k req/s on one core, trivial upstream",
            f"{router_alone:.0f} req/s (nginx {nginx_alone:.0f}: {router_alone / nginx_alone:.0%})",
            router_alone >= TARGET_ONE_CORE,
        )
    )
    hop = results[1].paired(lambda r: r["router"].p50_us - r["direct"].p50_us)
    nginx_hop = results[1].paired(lambda r: r["nginx"].p50_us - r["direct"].p50_us)[0]
    rows.append(
        (
            "added p50 latency per hop at 1 conn <= 100 µs",
            f"{spread(hop, '{:.0f}')} µs (nginx {nginx_hop:.0f})",
            hop[0] <= TARGET_HOP_US,
        )
    )
    # A new client at full load: while the router is saturated (alone on its core), and while the app
    # behind it is (uvicorn with 256 requests queued: the app's own queue, which `direct` shows, is
    # most of that wait, so what the router adds to it is shown too).
    new_p99 = percentile(saturated["router"][1], 99) * 1e3
    nginx_new = percentile(saturated["nginx"][1], 99) * 1e3
    rows.append(
        (
            "new connection's first response p99 <= 50 ms",
            f"{new_p99:.1f} ms (nginx {nginx_new:.1f} ms)",
            new_p99 <= TARGET_NEW_P99_MS,
        )
    )
    app_p99 = {name: percentile(times, 99) * 1e3 for name, (_, times) in fresh.items()}
    added, nginx_added = app_p99["router"] - app_p99["direct"], app_p99["nginx"] - app_p99["direct"]
    rows.append(
        (
            "  ... the app saturated instead: added to direct",
            f"{added:+.1f} ms of {app_p99['router']:.1f} (nginx {nginx_added:+.1f})",
            added <= TARGET_NEW_P99_MS,
        )
    )
    each = max(memory["router"].bytes_each, memory["router"].bytes_each_after_load)
    rows.append(
        (
            f"{memory['router'].connections:,} idle keep-alive conns <= 2 KB each",
            f"{each:.0f} B (nginx {memory['nginx'].bytes_each_after_load:.0f} B)",
            each <= TARGET_IDLE_BYTES and memory["router"].rechecked == 200,
        )
    )
    print(f"\n{'the issue asks':<48} {'measured':<34} met")
    for what, value, ok in rows:
        print(f"{what:<48} {value:<34} {'yes' if ok else 'NO'}")
    print(f"\n({time.monotonic() - began:.0f} s; load average now {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_role":
        ROLES[sys.argv[2]](sys.argv[3:])
    else:
        main()
