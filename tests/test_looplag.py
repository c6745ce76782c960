"""The event-loop lag monitor (runtime/looplag.py) on real loops: asyncio's and uvloop's.

The blocking code is a deliberate ``time.sleep`` in a coroutine of this file; the tests assert that the
block event names this file and that line. Waiting is done by polling with a deadline, never by sleeping
for a guessed time.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import anyio.to_thread
import pytest
import uvloop

from runtime import instrument, launcher
from runtime.looplag import BUCKETS_MS, BlockEvent, LoopLagMonitor, _default_is_user_file

ROUTE: contextvars.ContextVar[str] = contextvars.ContextVar("route")
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


async def _blocking_endpoint(route: str, seconds: float) -> None:
    ROUTE.set(route)
    time.sleep(seconds)  # noqa: ASYNC251 - the offending line: every test below looks for it


BLOCKING_LINE = _blocking_endpoint.__code__.co_firstlineno + 2
USER_FRAME = f"{__file__}:{BLOCKING_LINE}:_blocking_endpoint"


async def _wait_in_stdlib(event: threading.Event, seconds: float) -> None:
    event.wait(seconds)  # blocks inside threading.py: the user frame is this line, not the stdlib's


def _run(loop: str, scenario: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(scenario())


async def _until(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the monitor")
        await asyncio.sleep(0.01)
    return value


async def _beats(monitor: LoopLagMonitor, count: int) -> None:
    await _until(lambda: _lag(monitor)["count"] >= count)


def _lag(monitor: LoopLagMonitor) -> dict[str, Any]:
    lag = monitor.snapshot()["lag_ms"]
    assert isinstance(lag, dict)
    return lag


@pytest.mark.parametrize("loop", LOOPS)
def test_a_blocking_coroutine_is_recorded_with_its_line_and_route(loop: str) -> None:
    seen: list[BlockEvent] = []

    async def scenario() -> LoopLagMonitor:
        async with LoopLagMonitor(context=ROUTE, on_block=seen.append) as monitor:
            await _beats(monitor, 2)
            await asyncio.create_task(_blocking_endpoint("GET /slow", 0.3))
            await _until(lambda: monitor.events)
        return monitor

    monitor = _run(loop, scenario)

    [event] = monitor.events
    assert seen == [event]
    assert event.user_frame == USER_FRAME
    assert event.stack[-1] == USER_FRAME  # time.sleep is C: the coroutine is the innermost frame
    assert any("asyncio" in frame or "uvloop" in frame for frame in event.stack[:-1])
    assert event.context == "GET /slow"
    assert 200 <= event.duration_ms < 5000
    assert event.samples >= 2  # sampled several times while it stayed blocked
    snapshot = json.loads(json.dumps(monitor.snapshot()))
    assert snapshot["blocks_total"] == 1 and snapshot["running"] is False
    assert snapshot["blocks"] == [event.as_dict()]
    assert snapshot["lag_ms"]["buckets"]["100"] < snapshot["lag_ms"]["buckets"]["+Inf"]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_loop_that_never_blocks_records_nothing(loop: str) -> None:
    async def busy_but_cooperative() -> None:
        for _ in range(50):
            await asyncio.sleep(0.005)
            sum(range(1000))

    async def scenario() -> LoopLagMonitor:
        async with LoopLagMonitor(context=ROUTE) as monitor:
            await asyncio.gather(*(busy_but_cooperative() for _ in range(20)))
            await _beats(monitor, 5)
        return monitor

    monitor = _run(loop, scenario)

    assert monitor.events == []
    snapshot = monitor.snapshot()
    lag = snapshot["lag_ms"]
    assert isinstance(lag, dict)
    assert lag["count"] >= 5 and lag["max"] < monitor.threshold_ms
    assert snapshot["blocks_total"] == 0 and snapshot["blocks"] == []


def test_the_user_frame_skips_the_standard_library() -> None:
    async def scenario() -> LoopLagMonitor:
        async with LoopLagMonitor() as monitor:
            await _beats(monitor, 2)
            await _wait_in_stdlib(threading.Event(), 0.3)
            await _until(lambda: monitor.events)
        return monitor

    [event] = _run("asyncio", scenario).events

    assert event.stack[-1].startswith(threading.__file__)
    expected_line = _wait_in_stdlib.__code__.co_firstlineno + 1
    assert event.user_frame == f"{__file__}:{expected_line}:_wait_in_stdlib"
    assert event.context is None


def test_the_platforms_own_frames_are_not_the_apps() -> None:
    # A block in FastAPI called through the instrumentation's ASGI wrapper was blamed on the wrapper
    # (runtime/instrument.py, the innermost frame outside site-packages).
    is_user_file = _default_is_user_file()
    assert is_user_file(__file__)
    assert not is_user_file(instrument.__file__) and not is_user_file(launcher.__file__)
    assert not is_user_file(threading.__file__)


def test_a_tuple_context_as_the_launcher_keeps_it() -> None:
    request: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar("request", default=("-", "-"))

    async def endpoint() -> None:
        request.set(("req-1", "4bf92f3577b34da6a3ce929d0e0e4736"))
        await _wait_in_stdlib(threading.Event(), 0.3)

    async def scenario() -> list[BlockEvent]:
        async with LoopLagMonitor(context=request) as monitor:
            await _beats(monitor, 2)
            await asyncio.create_task(endpoint())
            await _until(lambda: monitor.events)
            await _wait_in_stdlib(threading.Event(), 0.3)  # outside the request: the variable is unset
            await _until(lambda: len(monitor.events) == 2)
        return monitor.events

    first, second = _run("uvloop", scenario)

    assert first.context == "req-1 4bf92f3577b34da6a3ce929d0e0e4736"
    assert second.context is None


def test_a_custom_user_code_filter() -> None:
    async def scenario() -> LoopLagMonitor:
        async with LoopLagMonitor(is_user_file=lambda name: name == threading.__file__) as monitor:
            await _beats(monitor, 2)
            await _wait_in_stdlib(threading.Event(), 0.3)
            await _until(lambda: monitor.events)
        return monitor

    [event] = _run("asyncio", scenario).events

    assert event.user_frame is not None and event.user_frame.startswith(threading.__file__)


def test_a_stall_in_progress_shows_in_the_snapshot() -> None:
    during: list[dict[str, object]] = []

    async def scenario() -> LoopLagMonitor:
        async with LoopLagMonitor(threshold_ms=50) as monitor:
            await _beats(monitor, 2)
            reader = threading.Timer(0.25, lambda: during.append(monitor.snapshot()))
            reader.start()
            await _blocking_endpoint("GET /stuck", 0.4)
            reader.join()
            await _until(lambda: monitor.events)
        return monitor

    _run("asyncio", scenario)

    [snapshot] = during
    assert isinstance(snapshot["blocked_now_ms"], float) and snapshot["blocked_now_ms"] >= 100


@pytest.mark.parametrize("loop", LOOPS)
def test_thread_pool_saturation(loop: str) -> None:
    release = threading.Event()

    async def scenario() -> dict[str, object]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 2
        async with LoopLagMonitor() as monitor:
            workers = [asyncio.create_task(anyio.to_thread.run_sync(release.wait, 10)) for _ in range(4)]

            def saturated() -> bool:
                pool = monitor.snapshot()["threadpool"]
                return isinstance(pool, dict) and pool["saturated_beats"] >= 2

            await _until(saturated)
            release.set()
            await asyncio.gather(*workers)
            await _until(lambda: monitor.snapshot()["threadpool"]["borrowed"] == 0)  # type: ignore[index]
            pool = monitor.snapshot()["threadpool"]
        assert isinstance(pool, dict)
        return pool

    pool = _run(loop, scenario)

    assert pool["total"] == 2 and pool["peak"] == 2 and pool["borrowed"] == 0
    assert isinstance(pool["beats"], int) and pool["beats"] > pool["saturated_beats"]  # type: ignore[operator]


def test_lifecycle() -> None:
    monitor = LoopLagMonitor()
    with pytest.raises(RuntimeError):
        monitor.start()  # no running loop

    async def scenario() -> None:
        monitor.start()
        with pytest.raises(RuntimeError, match="already running"):
            monitor.start()
        assert monitor.snapshot()["running"] is True
        await _beats(monitor, 1)
        await monitor.stop()
        await monitor.stop()
        assert not any(t.name == "looplag-watchdog" for t in threading.enumerate())
        assert not any(t.get_name() == "looplag-heartbeat" for t in asyncio.all_tasks())
        monitor.start()  # restartable; the counts carry on
        await _beats(monitor, 2)
        await monitor.stop()

    _run("asyncio", scenario)

    snapshot = monitor.snapshot()
    lag = snapshot["lag_ms"]
    assert isinstance(lag, dict)
    buckets = list(lag["buckets"].items())
    assert [bound for bound, _ in buckets] == [f"{b:g}" for b in BUCKETS_MS] + ["+Inf"]
    assert [count for _, count in buckets] == sorted(count for _, count in buckets)
    assert buckets[-1][1] == lag["count"] >= 2
    assert snapshot["running"] is False and snapshot["threshold_ms"] == 100.0


def test_a_failing_callback_goes_to_the_loops_exception_handler() -> None:
    errors: list[dict[str, Any]] = []

    def broken(event: BlockEvent) -> None:
        raise ValueError("boom")

    async def scenario() -> LoopLagMonitor:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        async with LoopLagMonitor(on_block=broken) as monitor:
            await _beats(monitor, 2)
            await _blocking_endpoint("GET /x", 0.25)
            await _until(lambda: errors)
        return monitor

    monitor = _run("asyncio", scenario)

    assert len(monitor.events) == 1
    assert isinstance(errors[0]["exception"], ValueError)
    assert "on_block" in errors[0]["message"]
