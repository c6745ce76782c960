"""Time to a ready instance, spawned vs forked from a template, for ``examples/hello``.

Run it with ``.venv/bin/python bench/instance_start.py [--runs N] [--loop uvloop|asyncio]``. It drives the
process backend directly (no control plane, no router) with this venv's Python as the app's interpreter,
and times ``ProcessBackend.start()``: from the call to its return, i.e. the lifespan startup finished and
the health path answered. Each instance is stopped before the next start (stopping is not timed).

* **spawn**: ``fork=False``: a new interpreter imports uvicorn, FastAPI and the app every time.
* **fork**: ``fork=True``: the revision's template is created once by ``prepare()`` (timed, reported on
  its own line), then every start is a fork of it.

Bounded: ``--runs`` starts per mode, each with a timeout; everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from runtime.backends.base import InstanceSpec
from runtime.backends.process import ProcessBackend, fork_supported

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0


def hello_spec() -> InstanceSpec:
    return InstanceSpec(
        app_id="bench",
        deployment_id="bench-hello",
        hostname="bench.localhost",
        python=Path(sys.executable),
        entrypoint="main:app",
        app_dir=ROOT / "examples" / "hello",
    )


async def measure(fork: bool, runs: int, state_dir: Path) -> tuple[list[float], float | None]:
    """Seconds per start (and the template's preparation, when forking)."""
    backend = ProcessBackend(state_dir, lambda record: None, fork=fork)
    spec = hello_spec()
    prepared: float | None = None
    samples: list[float] = []
    try:
        if fork:
            began = time.perf_counter()
            await backend.prepare(spec)
            prepared = time.perf_counter() - began
            if spec.deployment_id not in backend.template_pids():
                raise SystemExit("the template did not come up: nothing to compare")
        for _ in range(runs):
            began = time.perf_counter()
            instance = await backend.start(spec, timeout=START_TIMEOUT)
            samples.append(time.perf_counter() - began)
            await backend.stop(instance)
        if fork and spec.deployment_id not in backend.template_pids():
            raise SystemExit("the template went away during the runs")
    finally:
        await backend.close()
    return samples, prepared


def p90(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=10)[-1] if len(samples) > 1 else samples[0]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


async def run(runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="fdp-bench-") as tmp:
        spawn, _ = await measure(False, runs, Path(tmp) / "spawn")
        fork, prepared = await measure(True, runs, Path(tmp) / "fork")
    print(f"{'mode':<6} {'median':>11} {'p90':>11} {'min':>11} {'max':>11}")
    for name, samples in (("spawn", spawn), ("fork", fork)):
        print(
            f"{name:<6} {ms(statistics.median(samples))} {ms(p90(samples))} "
            f"{ms(min(samples))} {ms(max(samples))}"
        )
    assert prepared is not None
    print(f"fork template, prepared once: {ms(prepared).strip()}")
    print(
        f"spawn/fork ratio: median {statistics.median(spawn) / statistics.median(fork):.1f}x, "
        f"p90 {p90(spawn) / p90(fork):.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20, help="starts per mode (default 20)")
    parser.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop", help="as the control plane"
    )
    args = parser.parse_args()
    if not fork_supported():
        raise SystemExit("forking instances needs Linux")
    print(
        f"examples/hello, {args.runs} starts per mode, {args.loop}, Python {sys.version.split()[0]}, "
        "time = start() returning (lifespan done + health answered)"
    )
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(run(args.runs))
    else:
        asyncio.run(run(args.runs))


if __name__ == "__main__":
    main()
