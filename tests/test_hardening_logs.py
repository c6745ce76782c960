"""Build-log streams and app-log retention, through the API (in process, SQLite and PostgreSQL).

Build logs (``control_plane/buildlogs.py``): heartbeats while nothing happens, ``timeout`` to end a
connection that lived long enough, ``last_id`` resuming strictly after a line, lines appended while a
client waits reaching it at once, and ``complete`` / ``failed`` at the end. The stream's intervals are
shortened for the test (module constants), so it takes a fraction of a second.

App logs (``control_plane/logstore.py``): kept per app up to ``log_retention_bytes``; the oldest
segments go first, the newest lines stay readable through ``/logs/stream``. Whole segments older than
``log_retention_days`` go too, whatever the size allows (also when the platform starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from control_plane import buildlogs
from control_plane.config import Settings
from control_plane.logstore import format_ts
from control_plane.models import Deployment
from runtime.backends.base import LogRecord
from tests.test_api import ADMIN, Env, running
from tests.test_api import anyio_backend as anyio_backend
from tests.test_api import env as env


async def stream(env: Env, deployment_id: str, **params: str) -> list[dict[str, Any]]:
    r = await env.get(f"/deployments/{deployment_id}/build-logs", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


async def waiting_deployment(env: Env, name: str) -> str:
    app = await env.create_app(name)
    r = await env.post(f"/apps/{app['id']}/deployments/", json={"archive_size_bytes": 10})
    return str(r.json()["id"])


def set_status(env: Env, deployment_id: str, status: str) -> None:
    with env.platform.db.session() as s:
        dep = s.get(Deployment, deployment_id)
        assert dep is not None
        dep.status = status
        s.add(dep)
        s.commit()
    env.platform.buildlogs.notify(deployment_id)


def messages(lines: list[dict[str, Any]]) -> list[str]:
    return [line["message"] for line in lines if line["type"] == "message"]


@pytest.mark.anyio
async def test_heartbeats_then_timeout_while_nothing_happens(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(buildlogs, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(buildlogs, "CONNECTION_SECONDS", 0.4)
    dep = await waiting_deployment(env, "quiet")
    for text in ("one", "two\nthree"):  # a message with a newline is two lines
        env.platform.buildlogs.append(dep, text)

    lines = await stream(env, dep)

    assert messages(lines) == ["one", "two", "three"]
    ids = [line["id"] for line in lines if line["type"] == "message"]
    assert all(isinstance(i, str) for i in ids) and [int(i) for i in ids] == sorted(int(i) for i in ids)
    rest = lines[3:]
    assert rest[-1] == {"type": "timeout", "id": ids[-1]}  # reconnect, resuming after the last line
    heartbeats = rest[:-1]
    assert len(heartbeats) >= 2 and all(h == {"type": "heartbeat", "id": ids[-1]} for h in heartbeats)


@pytest.mark.anyio
async def test_last_id_resumes_strictly_after_it(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buildlogs, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(buildlogs, "CONNECTION_SECONDS", 0.1)
    dep = await waiting_deployment(env, "resumed")
    for text in ("a", "b", "c"):
        env.platform.buildlogs.append(dep, text)
    ids = [line["id"] for line in await stream(env, dep) if line["type"] == "message"]

    assert messages(await stream(env, dep, last_id=ids[0])) == ["b", "c"]
    after_all = await stream(env, dep, last_id=ids[-1])
    assert messages(after_all) == [] and after_all[-1] == {"type": "timeout", "id": ids[-1]}
    # An id that is not one of ours replays from the start (as the official CLI's retry expects).
    assert messages(await stream(env, dep, last_id="not-a-number")) == ["a", "b", "c"]

    env.platform.buildlogs.append(dep, "d")
    set_status(env, dep, "building_image_failed")
    ended = await stream(env, dep, last_id=ids[-1])
    assert messages(ended) == ["d"]
    assert ended[-1]["type"] == "failed" and ended[-1]["id"] == ended[-2]["id"]
    # A finished deployment replays everything, then says how it ended.
    assert messages(await stream(env, dep)) == ["a", "b", "c", "d"]


@pytest.mark.anyio
async def test_lines_reach_a_waiting_client_at_once(env: Env) -> None:
    # Default intervals (heartbeat 15 s): only the wake-up can deliver within the test's bound.
    dep = await waiting_deployment(env, "live")
    env.platform.buildlogs.append(dep, "before")
    request = asyncio.ensure_future(stream(env, dep))

    async def subscribed() -> None:
        # The stream registers its wake-up event as it starts; there is no event to wait for that.
        while dep not in env.platform.buildlogs._events:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    await asyncio.wait_for(subscribed(), 5)
    env.platform.buildlogs.append(dep, "while waiting")
    set_status(env, dep, "success")
    lines = await asyncio.wait_for(request, 5)
    assert messages(lines) == ["before", "while waiting"]
    assert lines[-1]["type"] == "complete"
    assert not [line for line in lines if line["type"] == "heartbeat"]


RETENTION = 256 * 1024  # segments of 64 KiB (a quarter, at least 64 KiB)


@pytest.fixture
async def small_logs(tmp_path: Path) -> AsyncIterator[Env]:
    settings = Settings(
        data_dir=tmp_path / "data", router_port=0, admin_token=ADMIN, log_retention_bytes=RETENTION
    )
    async with running(settings) as env:
        yield env


@pytest.mark.anyio
async def test_app_logs_are_kept_up_to_the_retention_size(small_logs: Env) -> None:
    env = small_logs
    app = await env.create_app("chatty")
    other = await env.create_app("quiet-neighbour")
    start = datetime.now(UTC) - timedelta(minutes=30)
    total = 4 * 1024 * 1024 // 200  # 4 MiB of ~200-byte lines: 16 times the retention
    store = env.platform.logstore

    def line(app_id: str, n: int) -> LogRecord:
        return LogRecord(
            app_id=app_id,
            deployment_id="d",
            instance_id="i",
            stream="stdout",
            timestamp=start + timedelta(milliseconds=n),
            message=f"line {n:06d} " + "x" * 100,
            level="info",
        )

    store.append(line(other["id"], 0))
    for n in range(total):
        store.append(line(app["id"], n))

    directory = env.platform.paths.logs / app["id"]
    on_disk = sum(p.stat().st_size for p in directory.iterdir())
    assert on_disk <= RETENTION + store.segment_bytes  # closed segments within retention, plus the open one
    assert on_disk >= RETENTION // 2  # and not everything was thrown away
    r = await env.get(
        f"/apps/{app['id']}/logs/stream", params={"tail": 10_000, "since": "1h", "follow": "false"}
    )
    kept = [int(json.loads(entry)["message"].split()[1]) for entry in r.text.splitlines()]
    assert kept == list(range(kept[0], total))  # the newest lines, in order, none missing
    assert kept[0] > 0  # the oldest were dropped
    # Another app's logs are its own: untouched by this app's retention.
    r = await env.get(f"/apps/{other['id']}/logs/stream", params={"since": "1h"})
    assert [json.loads(e)["message"].split()[1] for e in r.text.splitlines()] == ["000000"]


@pytest.mark.anyio
async def test_a_waiting_stream_holds_no_database_connection(env: Env) -> None:
    """A follower can wait for minutes: it must not keep a pooled connection (on PostgreSQL: idle in a
    transaction) for all that time, or a few dozen followers exhaust the pool."""
    dep = await waiting_deployment(env, "held")
    app_id = (await env.create_app("followed"))["id"]
    pool = env.platform.db.engine.pool
    before = pool.checkedout()  # type: ignore[attr-defined]
    build = asyncio.ensure_future(stream(env, dep))

    async def follow_logs() -> None:
        async with env.client.stream(
            "GET", f"/api/v1/apps/{app_id}/logs/stream", params={"follow": "true"}, headers=env.auth()
        ) as r:
            assert r.status_code == 200
            async for _ in r.aiter_lines():
                pass

    logs = asyncio.ensure_future(follow_logs())

    async def both_waiting() -> None:
        while dep not in env.platform.buildlogs._events or not env.platform.logstore._followers:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(both_waiting(), 5)
        await asyncio.sleep(0.1)
        assert pool.checkedout() == before  # type: ignore[attr-defined]
    finally:
        set_status(env, dep, "success")
        await asyncio.wait_for(build, 5)
        logs.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await logs


# -- age retention ---------------------------------------------------------------------------------------

DAY = 86400.0


def age(path: Path, days: float) -> None:
    """Make ``path`` look last written ``days`` ago (its newest line: expiry reads the mtime)."""
    then = time.time() - days * DAY
    os.utime(path, (then, then))


def test_the_retention_in_days_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FASTAPI_DEPLOY_LOG_RETENTION_DAYS", "0.5")
    assert Settings.from_env(data_dir=tmp_path).log_retention_days == 0.5
    monkeypatch.delenv("FASTAPI_DEPLOY_LOG_RETENTION_DAYS")
    assert Settings.from_env(data_dir=tmp_path).log_retention_days == 14.0


@pytest.fixture
async def week_of_logs(tmp_path: Path) -> AsyncIterator[Env]:
    settings = Settings(
        data_dir=tmp_path / "data",
        router_port=0,
        admin_token=ADMIN,
        log_retention_bytes=64 * 1024 * 1024,  # far away: only age decides here
        log_retention_days=7,
    )
    async with running(settings) as env:
        yield env


@pytest.mark.anyio
async def test_segments_older_than_the_retention_go_and_recent_lines_stay(week_of_logs: Env) -> None:
    env = week_of_logs
    store = env.platform.logstore
    assert store.retention_seconds == 7 * DAY  # the setting reaches the store
    app = await env.create_app("aging")
    quiet = await env.create_app("quiet-since-last-month")
    start = datetime.now(UTC) - timedelta(days=10)

    def line(app_id: str, n: int, when: datetime) -> LogRecord:
        message = f"line {n:06d} " + "x" * 200
        return LogRecord(app_id, "d", "i", "stdout", when, message, "info")

    # Three closed segments of old lines (64 KiB each), then the current file with recent ones.
    directory = env.platform.paths.logs / app["id"]
    n = 0
    while len(list(directory.glob("[0-9]*.ndjson"))) < 3:
        store.append(line(app["id"], n, start + timedelta(seconds=n)))
        n += 1
    old_segments = sorted(directory.glob("[0-9]*.ndjson"))
    for i, segment in enumerate(old_segments):
        age(segment, 10 - i)  # 10, 9 and 8 days ago: each past the 7 days
    first_recent = n
    for _ in range(50):
        store.append(line(app["id"], n, datetime.now(UTC) - timedelta(minutes=5)))
        n += 1
    # Another app wrote nothing for a month: its current file is old as a whole.
    store.append(line(quiet["id"], 0, start))
    age(env.platform.paths.logs / quiet["id"] / "current.ndjson", 30)
    # A segment of six days is within the retention and stays.
    recent_segment = directory / f"{time.time_ns():020d}.ndjson"
    six_days_ago = datetime.now(UTC) - timedelta(days=6)
    recent_segment.write_text(
        json.dumps({"timestamp": format_ts(six_days_ago), "message": "six days"}) + "\n"
    )
    age(recent_segment, 6)

    assert store.expire() == len(old_segments) + 1

    assert not any(p.exists() for p in old_segments)
    assert recent_segment.exists() and (directory / "current.ndjson").exists()
    r = await env.get(f"/apps/{app['id']}/logs/stream", params={"tail": 10_000, "since": "30d"})
    messages = [json.loads(e)["message"] for e in r.text.splitlines()]
    assert messages[0] == "six days"
    kept = [int(m.split()[1]) for m in messages[1:]]
    assert kept == list(range(first_recent, n))  # every recent line, nothing older
    assert store.expire() == 0  # nothing left to expire

    # The quiet app's expired current file was closed: its next line starts a new one and is readable.
    store.append(line(quiet["id"], 1, datetime.now(UTC)))
    r = await env.get(f"/apps/{quiet['id']}/logs/stream", params={"since": "30d"})
    assert [json.loads(e)["message"].split()[1] for e in r.text.splitlines()] == ["000001"]


@pytest.mark.anyio
async def test_the_platform_expires_old_segments_when_it_starts(tmp_path: Path) -> None:
    """Segments a previous run left behind go at the first maintenance pass, which runs at start."""
    logs = tmp_path / "data" / "logs" / "some-app"
    logs.mkdir(parents=True)
    old, recent = logs / "00000000000000000001.ndjson", logs / "current.ndjson"
    for path in (old, recent):
        path.write_text(json.dumps({"message": path.name}) + "\n")
    age(old, 3)
    age(recent, 1)
    settings = Settings(data_dir=tmp_path / "data", router_port=0, admin_token=ADMIN, log_retention_days=2)
    async with running(settings):
        deadline = time.monotonic() + 10
        # The maintenance task signals nothing when a pass is done: poll with a deadline.
        while old.exists() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert not old.exists()
        assert recent.exists()
