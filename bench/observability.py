"""What tracing costs an app: requests/s and latency of one instance with and without instrumentation.

Run it with ``.venv/bin/python bench/observability.py [--seconds S] [--connections N] [--rounds R]``.
It needs ``wrk`` (Debian: ``apt-get install -y wrk``) and ``taskset``.

The app is ``examples/hello`` (``GET /items/{item_id}``: path parameter, query, JSON), run by the real
launcher (``runtime/launcher.py``) in this venv's Python, pinned to cpu 1; wrk runs on cpu 0 with
``traceparent`` headers like the router's. An OTLP sink (a raw asyncio server that reads each request and
answers 200) stands in for the control plane's receiver. The variants, all measured in one run, turn by
turn, best of ``--rounds``:

* ``off``: no instrumentation (the launcher without ``FASTAPI_DEPLOY_OTLP_ENDPOINT``);
* ``sampled``: the platform's default: every request traced, 10 % of the traces exported (the tail
  sampler keeps errors and slow requests too; none here);
* ``all``: every trace exported (``FASTAPI_DEPLOY_TRACE_SAMPLE=1``), the upper bound.

Target (issue 4): ≤ 10 % throughput cost at the default sampling. The table shows requests/s, p50, p99,
the cost against ``off``, and the spans the sink received.

Bounded: every wrk run lasts ``--seconds``; every process is on 127.0.0.1 and stopped at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime.builder import find_uv  # noqa: E402
from runtime.otel_layer import SDK, ensure_layer  # noqa: E402

LAUNCHER = ROOT / "runtime" / "launcher.py"
APP_DIR = ROOT / "examples" / "hello"
PATH = "/items/42?q=x"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sink:
    """An OTLP/HTTP receiver that only counts: request bodies, and spans (from the protobuf)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests = 0
        self.spans = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head)[1])  # type: ignore[index]
                body = await reader.readexactly(length)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                self.requests += 1
                self.spans += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)


@contextlib.contextmanager
def instance(env: dict[str, str], cpu: int) -> Iterator[int]:
    """The launcher serving examples/hello; yields its port once it reported ready."""
    read, write = os.pipe()
    argv = [sys.executable, str(LAUNCHER), "--app", "main:app", "--app-dir", str(APP_DIR), "--port", "0"]
    argv += ["--ready-fd", str(write)]
    proc = subprocess.Popen(
        ["taskset", "-c", str(cpu), *argv],
        env=env,
        pass_fds=(write,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(write)
    try:
        with os.fdopen(read) as ready:
            line = ready.readline()
        if not line:
            raise RuntimeError(f"the instance did not start: {proc.stderr.read() if proc.stderr else ''}")
        yield int(json.loads(line)["port"])
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(text)
    return float(match[1]) * _UNITS[match[2]]


def wrk(port: int, connections: int, seconds: float, cpu: int) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) of one bounded wrk run with router-like traceparent headers."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    # A fresh trace id per request, as the router sends (flags 01: sampled).
    script.write_text(
        "math.randomseed(os.time())\n"
        "local function word() return string.format('%08x', math.random(0, 0xffffffff)) end\n"
        "request = function()\n"
        "  local t = word() .. word() .. word() .. word()\n"
        "  local parent = '00-' .. t .. '-00f067aa0ba902b7-01'\n"
        "  local headers = {['traceparent'] = parent, ['Host'] = 'bench.localhost'}\n"
        f"  return wrk.format('GET', '{PATH}', headers)\n"
        "end\n"
    )
    try:
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script)]
        out = subprocess.run(
            ["taskset", "-c", str(cpu), *argv, f"http://127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
        )
    finally:
        script.unlink(missing_ok=True)
    text = out.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    if not (rps and p50 and p99) or "Non-2xx" in text:
        raise RuntimeError(f"wrk: {out.stderr}\n{text}")
    return float(rps[1]), _ms(p50[1]), _ms(p99[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per wrk run (default 5)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant; the best counts")
    args = parser.parse_args()
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed (apt-get install -y {tool})")
    layers = Path(tempfile.mkdtemp(prefix="fdp-otel-bench-"))
    try:
        try:  # the layer matches the app environment's own OpenTelemetry, as the platform does
            from importlib.metadata import version

            sdk = version("opentelemetry-api")
        except Exception:
            sdk = SDK
        print(f"building the observability layer (OpenTelemetry {sdk}) for {sys.executable} ...", flush=True)
        layer = ensure_layer(layers, find_uv(None), python=sys.executable, sdk=sdk)
        sink = Sink()
        sink.start()
        base = {k: v for k, v in os.environ.items() if not k.startswith("FASTAPI_DEPLOY_")}
        base.update(FASTAPI_DEPLOY_APP_ID="bench", FASTAPI_DEPLOY_INSTANCE_ID="bench-1", PYTHONUNBUFFERED="1")
        traced = {
            **base,
            "FASTAPI_DEPLOY_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}/v1/traces",
            "FASTAPI_DEPLOY_OTEL_PATH": str(layer),
            "FASTAPI_DEPLOY_OTEL_VERSION": sdk,
            "FASTAPI_DEPLOY_TRACE_SLOW_MS": "10000",
        }
        variants = {
            "off": base,
            "sampled": {**traced, "FASTAPI_DEPLOY_TRACE_SAMPLE": "0.1"},
            "all": {**traced, "FASTAPI_DEPLOY_TRACE_SAMPLE": "1.0"},
        }
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
        spans: dict[str, int] = {name: 0 for name in variants}
        for round_ in range(args.rounds):
            for name, env in variants.items():
                with instance(env, cpu=1) as port:
                    wrk(port, args.connections, 1.0, cpu=0)  # warm-up
                    before = sink.spans
                    results[name].append(wrk(port, args.connections, args.seconds, cpu=0))
                    time.sleep(1.5)  # the exporter's last batch
                    spans[name] += sink.spans - before
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
        sink.stop()
        off = max(r[0] for r in results["off"])
        print()
        print(f"{'variant':<10}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'cost':>9}{'spans/req':>11}")
        for name, runs in results.items():
            rps, p50, p99 = max(runs, key=lambda r: r[0])
            requests = sum(r[0] * args.seconds for r in runs)
            per_request = spans[name] / requests if requests else 0.0
            cost = f"{(1 - rps / off) * 100:+.1f}%" if name != "off" else "-"
            print(f"{name:<10}{rps:>10.0f}{p50:>10.2f}{p99:>10.2f}{cost:>9}{per_request:>11.3f}")
        sampled = max(r[0] for r in results["sampled"])
        verdict = "met" if sampled >= 0.9 * off else "NOT met"
        cost = (1 - sampled / off) * 100
        print(f"\ntarget: default sampling costs <= 10% of throughput: {verdict} ({cost:.1f}%)")
    finally:
        shutil.rmtree(layers, ignore_errors=True)


if __name__ == "__main__":
    main()
