"""Autoscaling end to end: settings through the CLI, the warm pool, a shortened surge, scale to and from zero.

A real server, the real CLI, real instances; load from asyncio clients on loopback, bounded in time.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server, wait_until

pytestmark = pytest.mark.e2e

SLOW_APP = """
import asyncio
from fastapi import FastAPI

app = FastAPI()


@app.get("/")
async def root() -> dict[str, str]:
    await asyncio.sleep(0.02)
    return {"ok": "yes"}
"""


def deploy_slow_app(server: Server, tmp: Path, name: str) -> str:
    project = tmp / name
    project.mkdir()
    (project / "main.py").write_text(SLOW_APP)
    out = server.cli_json("push", str(project), "--app", name)
    assert out["status"] == "success", out
    return str(out["app_id"])


def scaling(server: Server, app: str) -> dict[str, Any]:
    result: dict[str, Any] = server.cli_json("scale", app)
    return result


def scrape(server: Server, family: str, app: str) -> dict[str, float]:
    """The samples of one family at ``GET /metrics`` for ``app``: ``{sample name[{le}]: value}``."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {
        sample.name + (f"{{le={sample.labels['le']}}}" if "le" in sample.labels else ""): sample.value
        for f in text_string_to_metric_families(text)
        if f.name == family
        for sample in f.samples
        if sample.labels.get("app") == app
    }


async def load(port: int, host: str, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` keep-alive connections sending requests back to back for ``seconds``."""
    stats: dict[str, Any] = {"ok": 0, "errors": [], "latencies": [], "cold": 0}
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    deadline = time.monotonic() + seconds

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < deadline:
                start = time.perf_counter()
                writer.write(request)
                status = await asyncio.wait_for(reader.readline(), 15)
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    key, _, value = line.decode().partition(":")
                    headers[key.strip().lower()] = value.strip()
                await reader.readexactly(int(headers.get("content-length", "0")))
                stats["latencies"].append(time.perf_counter() - start)
                if status.startswith(b"HTTP/1.1 200"):
                    stats["ok"] += 1
                else:
                    stats["errors"].append(status.decode().strip())
                if headers.get("x-cold-start") == "1":
                    stats["cold"] += 1
                if "x-queue-time" in headers:
                    stats["queued"] = stats.get("queued", 0) + 1
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            stats["errors"].append(repr(exc))
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return stats


def test_scale_settings_persist_and_validate(server: Server, tmp_path: Path) -> None:
    deploy_slow_app(server, tmp_path, "knobs")
    out = server.cli_json(
        "scale",
        "knobs",
        "--min",
        "2",
        "--max",
        "5",
        "--concurrency",
        "4",
        "--prewarm",
        "1",
        "--scale-to-zero-after",
        "120",
    )
    assert (out["min_instances"], out["max_instances"], out["target_concurrency"], out["prewarm"]) == (
        2,
        5,
        4,
        1,
    )
    assert out["scale_to_zero_after"] == 120
    # The autoscaler acts on them: two serving, one warm.
    wait_until(
        lambda: (c := scaling(server, "knobs")["current"]) and c["serving"] == 2 and c["warm"] == 1,
        30,
        what="2 serving + 1 warm",
    )
    states = sorted(i["state"] for i in server.cli_json("status", "knobs")["app"]["instances"])
    assert states == ["serving", "serving", "warm"]
    bad = server.cli("scale", "knobs", "--min", "6", "--json", check=False)
    assert bad.returncode == 1 and "min" in bad.stdout.lower()
    events = server.cli_json("events", "knobs")
    assert any(e["kind"] == "scale" for e in events), events
    assert any("Started warm instance" in e["message"] for e in events), [e["message"] for e in events]


def test_surge_uses_the_warm_pool_without_errors(server: Server, tmp_path: Path) -> None:
    deploy_slow_app(server, tmp_path, "surgy")
    # target 2 in flight per instance: 12 clients want 6 instances; 3 wait warm.
    server.cli("scale", "surgy", "--min", "1", "--max", "6", "--concurrency", "2", "--prewarm", "3")
    wait_until(lambda: scaling(server, "surgy")["current"]["warm"] == 3, 30, what="the warm pool")

    host = f"surgy.localhost:{server.router_port}"
    low = asyncio.run(load(server.router_port, host, 2, 1.5))
    high = asyncio.run(load(server.router_port, host, 12, 4.0))
    assert low["errors"] == [] and high["errors"] == [], (low["errors"][:3], high["errors"][:3])
    assert high["ok"] > 100
    current = scaling(server, "surgy")["current"]
    assert current["pool_hits"] >= 1, current
    assert current["serving"] >= 2, current
    # Prometheus counts the same promotions (read after: a counter only grows), and no cold start.
    hits = scrape(server, "fastapi_deploy_pool_hits", "surgy")
    assert hits["fastapi_deploy_pool_hits_total"] >= current["pool_hits"], hits
    assert scrape(server, "fastapi_deploy_cold_starts", "surgy") == {"fastapi_deploy_cold_starts_total": 0}
    events = server.cli_json("events", "surgy", "--limit", "200")
    assert any(e["message"].startswith("Promoted warm instance") for e in events)
    assert any(e["kind"] == "scale" and e["data"].get("panic") for e in events), "a 6x surge should panic"
    # The pool is refilled once drawn from.
    wait_until(lambda: scaling(server, "surgy")["current"]["warm"] >= 3, 30, what="the pool to refill")


def test_scale_to_zero_and_back(server: Server, tmp_path: Path) -> None:
    deploy_slow_app(server, tmp_path, "sleepy")
    server.cli("scale", "sleepy", "--min", "0", "--scale-to-zero-after", "2")
    wait_until(
        lambda: (
            (c := scaling(server, "sleepy")["current"])["serving"] == 0
            and c["warm"] == 0
            and c["starting"] == 0
        ),
        60,
        what="scale to zero",
    )
    assert [
        i for i in server.cli_json("status", "sleepy")["app"]["instances"] if i["state"] != "stopped"
    ] == []
    # The first request waits in the router's queue while an instance starts; it does not fail.
    start = time.monotonic()
    r = server.get("sleepy")
    elapsed = time.monotonic() - start
    assert r.status_code == 200, r.text
    assert elapsed < 15
    assert r.headers.get("x-cold-start") == "1"
    assert float(r.headers["x-queue-time"]) > 0
    assert scaling(server, "sleepy")["current"]["serving"] >= 1
    # /metrics: one cold start, and the request's wait (X-Queue-Time, in ms) in the queue histogram.
    cold = scrape(server, "fastapi_deploy_cold_starts", "sleepy")
    assert cold == {"fastapi_deploy_cold_starts_total": 1}, cold
    waits = scrape(server, "fastapi_deploy_queue_wait_seconds", "sleepy")
    assert waits["fastapi_deploy_queue_wait_seconds_count"] == 1, waits
    waited = float(r.headers["x-queue-time"]) / 1000
    assert abs(waits["fastapi_deploy_queue_wait_seconds_sum"] - waited) < 0.002, (waits, waited)
    assert waits["fastapi_deploy_queue_wait_seconds_bucket{le=+Inf}"] == 1
    buckets = {float(k.split("{le=")[1][:-1]): n for k, n in waits.items() if "{le=" in k}
    assert all(n == 0 for le, n in buckets.items() if le < waited - 0.001), (buckets, waited)
    assert all(n == 1 for le, n in buckets.items() if le > waited + 0.001), (buckets, waited)


def test_a_surge_past_the_concurrency_limit_queues_then_scales(server: Server, tmp_path: Path) -> None:
    """With a hard limit of 2 in flight per instance, 8 clients are more than one instance takes: the
    rest wait in the router's queue (X-Queue-Time), never fail, and the queue makes the app scale."""
    deploy_slow_app(server, tmp_path, "capped")
    out = server.cli_json(
        "scale", "capped", "--min", "1", "--max", "4", "--concurrency", "2", "--max-concurrency", "2"
    )
    assert out["max_concurrency"] == 2
    host = f"capped.localhost:{server.router_port}"
    stats = asyncio.run(load(server.router_port, host, 8, 4.0))
    assert stats["errors"] == [], stats["errors"][:3]
    assert stats["ok"] > 50 and stats.get("queued", 0) > 0
    current = scaling(server, "capped")["current"]
    assert current["serving"] >= 2, current
    assert current["queued_total"] > 0 and current["cold_starts"] == 0
    waits = scrape(server, "fastapi_deploy_queue_wait_seconds", "capped")
    assert waits["fastapi_deploy_queue_wait_seconds_count"] >= stats["queued"], (waits, stats["queued"])
    assert waits["fastapi_deploy_queue_wait_seconds_sum"] > 0
    assert {"forecast_concurrency", "predicted_instances"} <= set(current)  # predicted next to actual
