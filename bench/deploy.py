"""Push→serving seconds: a cold deploy and warm redeploys of ``examples/hello`` and ``examples/with-deps``.

Run it with ``.venv/bin/python bench/deploy.py [--runs N] [--truly-cold]``. It starts its own
``fastapi-deploy server`` subprocesses on free loopback ports, runs ``fastapi-deploy push`` from a temporary
copy of each example, and times from starting the push subprocess to the first 200 from the router that
carries the new code (each push appends a route answering a fresh marker, so the old revision can never
be mistaken for the new one).

* **cold (uv cache warm)**: a data directory where no environment was ever built, so the dependency
  environment is created from scratch, while uv's cache already holds the wheels. A first, unreported
  deploy of the same example on a throwaway data directory makes sure of that.
* **warm redeploy**: a code-only change of an app that is serving; the environment key is unchanged.
  ``--runs`` of them (default 3): median and min.
* **truly cold** (only with ``--truly-cold``): an empty ``UV_CACHE_DIR`` as well, so every wheel is
  downloaded from the package index.

Bounded: every loop has a count or a deadline, and everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from _server import CLI, BenchServer, running

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BENCH_EXAMPLES = ("hello", "with-deps")
TARGET_WARM_SECONDS = 3.0  # the target for a code-only redeploy

COLD_TIMEOUT = 900.0  # an empty uv cache downloads fastapi[standard] and friends
WARM_TIMEOUT = 120.0
POLL_INTERVAL = 0.02


class Project:
    """A temporary copy of an example; each ``mark`` is a code-only change the router can tell apart."""

    def __init__(self, example: str, dest: Path) -> None:
        shutil.copytree(
            EXAMPLES / example, dest, ignore=shutil.ignore_patterns("__pycache__", ".fastapicloud")
        )
        self.path = dest
        self.app = f"bench-{example}"
        self._main = dest / "main.py"
        self._original = self._main.read_text()

    def mark(self, marker: str) -> None:
        self._main.write_text(
            self._original
            + "\n\n@app.get('/__bench__')\ndef __bench__() -> dict[str, str]:\n"
            + f"    return {{'marker': '{marker}'}}\n"
        )


def push_to_serving(server: BenchServer, project: Project, marker: str, timeout: float) -> float:
    """Seconds from starting ``fastapi-deploy push`` to the router's first 200 carrying ``marker``."""
    project.mark(marker)
    host = f"{project.app}.localhost:{server.router_port}"
    started = time.perf_counter()
    push = subprocess.Popen(
        [CLI, "push", str(project.path), "--app", project.app, "--json"],
        env=server.cli_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + timeout
    serving_at: float | None = None
    with httpx.Client(base_url=f"http://127.0.0.1:{server.router_port}", headers={"Host": host}) as router:
        while serving_at is None and time.monotonic() < deadline:
            try:
                r = router.get("/__bench__", timeout=5)
                if r.status_code == 200 and r.json().get("marker") == marker:
                    serving_at = time.perf_counter()
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if push.poll() not in (None, 0):
                break  # the push failed: no point waiting for the router
            time.sleep(POLL_INTERVAL)
    try:
        stdout, stderr = push.communicate(timeout=max(deadline - time.monotonic(), 10))
    except subprocess.TimeoutExpired:
        push.kill()
        stdout, stderr = push.communicate()
    if push.returncode != 0 or serving_at is None:
        raise RuntimeError(
            f"push of {project.app} ({marker}) exited {push.returncode}, "
            f"{'serving' if serving_at else 'never served'}:\n{stdout.decode()}\n{stderr.decode()}\n"
            f"server log: {server.log_path}"
        )
    return serving_at - started


@dataclass
class Result:
    example: str
    cold: float
    warm: list[float]
    truly_cold: float | None = None


def bench_example(example: str, tmp: Path, runs: int, truly_cold: bool) -> Result:
    # Fill uv's cache for this example's dependencies: the deploy below must find it warm.
    with running(tmp / f"{example}-prime") as server:
        prime = push_to_serving(
            server, Project(example, tmp / f"{example}-prime" / "src"), "prime", COLD_TIMEOUT
        )
        print(f"  {example}: first deploy, uv cache as found (not reported) {prime:.2f} s", file=sys.stderr)

    with running(tmp / f"{example}-measure") as server:
        project = Project(example, tmp / f"{example}-measure" / "src")
        cold = push_to_serving(server, project, "cold", COLD_TIMEOUT)
        print(f"  {example}: cold (uv cache warm) {cold:.2f} s", file=sys.stderr)
        warm = []
        for i in range(runs):
            warm.append(push_to_serving(server, project, f"warm-{i}", WARM_TIMEOUT))
            print(f"  {example}: warm redeploy {i + 1}/{runs} {warm[-1]:.2f} s", file=sys.stderr)

    result = Result(example, cold, warm)
    if truly_cold:
        cache = tmp / f"{example}-uv-cache"
        cache.mkdir()
        with running(tmp / f"{example}-truly-cold", uv_cache_dir=cache) as server:
            project = Project(example, tmp / f"{example}-truly-cold" / "src")
            result.truly_cold = push_to_serving(server, project, "truly-cold", COLD_TIMEOUT)
            print(f"  {example}: truly cold {result.truly_cold:.2f} s", file=sys.stderr)
    return result


def table(results: list[Result], runs: int) -> str:
    headers = ["example", "cold (uv cache warm)", f"warm redeploy median (n={runs})", "warm min", "warm runs"]
    if any(r.truly_cold is not None for r in results):
        headers.insert(1, "truly cold (empty uv cache)")
    rows = []
    for r in results:
        row = [
            r.example,
            f"{r.cold:.2f} s",
            f"{statistics.median(r.warm):.2f} s",
            f"{min(r.warm):.2f} s",
            " ".join(f"{w:.2f}" for w in r.warm),
        ]
        if len(headers) == 6:
            row.insert(1, f"{r.truly_cold:.2f} s" if r.truly_cold is not None else "-")
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="warm redeploys per example (default 3)")
    parser.add_argument("--truly-cold", action="store_true", help="also deploy once with an empty uv cache")
    parser.add_argument("--examples", nargs="+", default=list(BENCH_EXAMPLES), choices=BENCH_EXAMPLES)
    parser.add_argument("--keep", action="store_true", help="keep the temporary data directories")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 50:
        parser.error("--runs must be between 1 and 50")

    tmp = Path(tempfile.mkdtemp(prefix="fdp-bench-"))
    try:
        results = [bench_example(name, tmp, args.runs, args.truly_cold) for name in args.examples]
    finally:
        if args.keep:
            print(f"data kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print("push→serving seconds (fastapi-deploy push, process backend, 127.0.0.1)")
    print(table(results, args.runs))
    worst = max(statistics.median(r.warm) for r in results)
    verdict = "met" if worst <= TARGET_WARM_SECONDS else "NOT met"
    print(
        f"target: warm redeploy ≤ {TARGET_WARM_SECONDS:.0f} s (median): {verdict}, worst median {worst:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
