"""Traffic surges against the autoscaler: a square wave of concurrent clients, with and without a warm pool,
and a surge from zero.

Run it with ``.venv/bin/python bench/surge.py [--period S] [--low N] [--high N] [--cycles N]
[--zero-rounds N]``. It starts its own server on loopback and deploys an app whose handler sleeps 20 ms
(``target_concurrency`` 10) three times. First, while nothing else runs, ``--zero-rounds`` times: the
app scales to zero, then ``--low`` clients arrive at once. Then it steps the number of concurrent
keep-alive clients from ``--low`` to ``--high`` and back, ``--cycles`` times, for ``prewarm`` 0 and
``prewarm`` 3. Per phase it prints p50/p95/p99, errors, requests that met a cold start (``X-Cold-Start``), the
instances over time, and the time from each step up to the first added capacity (an instance routed
beyond what served before the step).

Targets (the issue): with pre-warm, 0 errors, p99 <= handler time + 15 ms throughout the surge, first added
capacity <= 1 s after the step, no instance churn at the square wave's edges; from zero, 0 errors and max
latency <= one instance start + 100 ms. On a 2-core machine the load generator, the router and every instance
share the CPUs, so the high phase saturates them well before 100 clients: read the figures side by side.

Bounded: every loop has a deadline; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from _server import CLI, BenchServer, running  # bench/ is on sys.path when run as a script

HANDLER_SECONDS = 0.02
APP = """
import asyncio
from fastapi import FastAPI

app = FastAPI()


@app.get("/")
async def root() -> dict[str, str]:
    await asyncio.sleep(0.02)
    return {"ok": "yes"}
"""


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    cold: int = 0

    def row(self) -> list[str]:
        lat = sorted(self.latencies)

        def pct(p: float) -> str:
            if not lat:
                return "-"
            return f"{lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1e3:.1f}"

        return [
            self.name,
            str(len(lat)),
            pct(50),
            pct(95),
            pct(99),
            f"{max(lat) * 1e3:.1f}" if lat else "-",
            str(self.errors),
            str(self.cold),
        ]


class Load:
    """N keep-alive clients hammering one app through the router; the count can change while running."""

    def __init__(self, port: int, host: str) -> None:
        self.port, self.host = port, host
        self.phase = Phase("idle")
        self._workers: list[asyncio.Task[None]] = []

    async def set_clients(self, n: int) -> None:
        while len(self._workers) < n:
            self._workers.append(asyncio.create_task(self._client()))
        while len(self._workers) > n:
            task = self._workers.pop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _client(self) -> None:
        request = f"GET / HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode()
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            while True:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                assert reader is not None
                start = time.perf_counter()
                phase = self.phase
                try:
                    writer.write(request)
                    status_line = await asyncio.wait_for(reader.readline(), 30)
                    headers = {}
                    while (line := await reader.readline()) not in (b"\r\n", b""):
                        k, _, v = line.decode().partition(":")
                        headers[k.strip().lower()] = v.strip()
                    await reader.readexactly(int(headers.get("content-length", "0")))
                except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                    phase.errors += 1
                    writer.close()
                    writer = None
                    await asyncio.sleep(0.05)
                    continue
                phase.latencies.append(time.perf_counter() - start)
                if not status_line.startswith(b"HTTP/1.1 200"):
                    phase.errors += 1
                if headers.get("x-cold-start") == "1":
                    phase.cold += 1
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                    writer = None
        finally:
            if writer is not None:
                writer.close()


class Watcher:
    """Polls the app's scaling state; remembers (time, serving, warm)."""

    def __init__(self, server: BenchServer, app_id: str) -> None:
        self.client = httpx.AsyncClient(
            base_url=f"{server.url}/api/v1", headers={"Authorization": f"Bearer {server.token}"}, timeout=60
        )
        self.app_id = app_id
        self.timeline: list[tuple[float, int, int]] = []
        self.slowest = 0.0  # the slowest answer of the control plane's API while the load ran
        self._task: asyncio.Task[None] | None = None

    async def state(self) -> dict[str, int]:
        r = await self.client.get(f"/apps/{self.app_id}/scaling")
        current = r.json()["current"] or {}
        return current

    async def _run(self) -> None:
        while True:
            asked = time.monotonic()
            current = await self.state()
            self.slowest = max(self.slowest, time.monotonic() - asked)
            self.timeline.append(
                (time.monotonic(), int(current.get("serving", 0)), int(current.get("warm", 0)))
            )
            await asyncio.sleep(0.1)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.aclose()

    def first_capacity_after(self, t0: float, before: int) -> float | None:
        for t, serving, _warm in self.timeline:
            if t >= t0 and serving > before:
                return t - t0
        return None

    def serving_at(self, t0: float) -> int:
        older = [s for t, s, _ in self.timeline if t <= t0]
        return older[-1] if older else 0


async def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


async def scenario(
    server: BenchServer, app_id: str, slug: str, prewarm: int, args: argparse.Namespace
) -> None:
    api = httpx.AsyncClient(
        base_url=f"{server.url}/api/v1", headers={"Authorization": f"Bearer {server.token}"}
    )
    await api.patch(
        f"/apps/{app_id}/scaling",
        json={"min_instances": 1, "max_instances": args.max, "target_concurrency": 10, "prewarm": prewarm},
    )
    watcher = Watcher(server, app_id)

    async def settled() -> bool:
        s = await watcher.state()
        return s.get("warm", 0) >= prewarm and s.get("starting", 1) == 0

    await wait_for(settled, 60, "the warm pool")
    watcher.start()
    load = Load(server.router_port, f"{slug}.localhost:{server.router_port}")
    phases: list[Phase] = []
    steps: list[str] = []
    started_total = (await api.get(f"/apps/{app_id}/scaling")).json()["current"]["instances_started"]
    try:
        for cycle in range(args.cycles):
            for name, clients in (("low", args.low), ("high", args.high)):
                load.phase = Phase(f"prewarm={prewarm} c{cycle + 1} {name} ({clients})")
                phases.append(load.phase)
                t0 = time.monotonic()
                before = watcher.serving_at(t0)
                await load.set_clients(clients)
                await asyncio.sleep(args.period)
                if name == "high":
                    cap = watcher.first_capacity_after(t0, before)
                    steps.append(f"c{cycle + 1}: {'-' if cap is None else f'{cap * 1e3:.0f} ms'}")
        load.phase = Phase("drain")
        await load.set_clients(0)
    finally:
        await load.set_clients(0)
        await watcher.stop()
    after = (await api.get(f"/apps/{app_id}/scaling", timeout=60)).json()["current"]
    await api.aclose()
    print_table(phases)
    print(f"  first added capacity after each step up: {', '.join(steps)}")
    print(
        f"  instances started during the run: {after['instances_started'] - started_total}, "
        f"pool hits: {after['pool_hits']}, serving now {after['serving']}, warm {after['warm']}"
    )
    print(f"  instances over time (serving/warm): {compress(watcher.timeline)}")
    print(f"  slowest answer of the control plane's API (polled every 0.1 s): {watcher.slowest * 1e3:.0f} ms")


async def from_zero(server: BenchServer, app_id: str, slug: str, args: argparse.Namespace) -> None:
    """``--zero-rounds`` times: wait until the app has no instance at all, then ``--low`` clients at once
    for 3 s; a row per round (its max is the first requests' wait for the start)."""
    api = httpx.AsyncClient(
        base_url=f"{server.url}/api/v1", headers={"Authorization": f"Bearer {server.token}"}
    )
    await api.patch(
        f"/apps/{app_id}/scaling", json={"min_instances": 0, "prewarm": 0, "scale_to_zero_after": 3}
    )

    async def zero() -> bool:
        current = (await api.get(f"/apps/{app_id}/scaling")).json()["current"]
        return current["serving"] == 0 and current["warm"] == 0 and current["starting"] == 0

    phases = []
    for n in range(args.zero_rounds):
        await wait_for(zero, 120, "scale to zero")
        await asyncio.sleep(1)  # the stopped instances' exits are not part of the start
        load = Load(server.router_port, f"{slug}.localhost:{server.router_port}")
        load.phase = Phase(f"from zero #{n + 1} ({args.low} clients, 3 s)")
        phases.append(load.phase)
        await load.set_clients(args.low)
        await asyncio.sleep(3)
        await load.set_clients(0)
    await api.aclose()
    print_table(phases)


def compress(timeline: list[tuple[float, int, int]]) -> str:
    out: list[str] = []
    last = None
    t0 = timeline[0][0] if timeline else 0
    for t, s, w in timeline:
        if (s, w) != last:
            out.append(f"{t - t0:.1f}s:{s}/{w}")
            last = (s, w)
    return " ".join(out)


def print_table(phases: list[Phase]) -> None:
    head = ["phase", "requests", "p50 ms", "p95 ms", "p99 ms", "max ms", "errors", "cold"]
    rows = [head] + [p.row() for p in phases]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


async def run_all(server: BenchServer, apps: dict[str, str], args: argparse.Namespace) -> None:
    # From zero first, while nothing else runs: what it measures is the start, not a machine still busy
    # with the surges' twenty instances (their scale-down comes 60 s after the load).
    print("\nfrom zero")
    await from_zero(server, apps["surge-zero"], "surge-zero", args)
    # An app of its own per scenario: each starts at its floor (one instance, its pool full), not with
    # what the one before scaled up to (scaling down takes the stable window, 60 s).
    for prewarm in (0, 3):
        print(f"\nprewarm {prewarm}")
        slug = f"surge-{prewarm}"
        await scenario(server, apps[slug], slug, prewarm, args)


def deploy(server: BenchServer, project: Path, slug: str) -> str:
    subprocess.run(
        [CLI, "push", str(project), "--app", slug, "--json"],
        env=server.cli_env(),
        check=True,
        capture_output=True,
    )
    headers = {"Authorization": f"Bearer {server.token}"}
    apps = httpx.get(f"{server.url}/api/v1/apps/", headers=headers).json()
    return str(next(a["id"] for a in apps["data"] if a["slug"] == slug))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--low", type=int, default=10)
    parser.add_argument("--high", type=int, default=100)
    parser.add_argument("--period", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--max", type=int, default=10, help="max_instances")
    parser.add_argument("--zero-rounds", type=int, default=3, help="surges from zero (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fdp-surge-") as tmp:
        project = Path(tmp) / "surge"
        project.mkdir()
        (project / "main.py").write_text(APP)
        with running(Path(tmp) / "server") as server:
            apps = {slug: deploy(server, project, slug) for slug in ("surge-0", "surge-3", "surge-zero")}
            print(
                f"handler {HANDLER_SECONDS * 1e3:.0f} ms, target_concurrency 10, "
                f"{args.low} -> {args.high} clients, {args.period:g} s per phase, {args.cycles} cycles"
            )
            asyncio.run(run_all(server, apps, args))


if __name__ == "__main__":
    main()
