"""Event-loop lag inside an app instance: how late the loop runs, and what blocked it when it stalls.

Runs in the launcher, in the app's own environment, so it uses the standard library only (AnyIO, which
every FastAPI app has, is imported lazily for the thread-pool reading, and is optional). Two parts:

* a **heartbeat** task on the loop sleeps ``interval_s`` (50 ms) again and again and records how late it
  wakes — the loop's lag — in a histogram; it also reads AnyIO's default thread limiter, the pool that
  runs sync ``def`` endpoints (borrowed vs total tokens: saturation means requests queue for a thread);
* a **watchdog** thread watches the heartbeat's timestamp. Once the heartbeat is overdue by half the
  threshold, the loop is stuck in one callback: the watchdog samples the loop thread's stack
  (``sys._current_frames()``) every ``sample_interval_s`` while it stays stuck. When the heartbeat wakes
  ``threshold_ms`` or more late, the samples become a ``BlockEvent``: the stack, the innermost frame in
  user code (not the standard library, site-packages or the platform's runtime) and, if the caller gave
  a context variable, its value in the blocked task (the route or the trace id the caller's middleware
  set).

Nothing is done per request; the heartbeat costs ~20 wake-ups a second, the watchdog a timestamp compare
every ``sample_interval_s``. Works with asyncio's loop and with uvloop. A block shorter than the
threshold plus the heartbeat interval may show as a smaller lag (the block can start mid-sleep); longer
ones are always recorded. ``start()`` must be called in the loop's thread, after a fork, never before.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import os
import sys
import sysconfig
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any

__all__ = ["BUCKETS_MS", "BlockEvent", "LoopLagMonitor"]

BUCKETS_MS = (1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0)
"""Upper bounds of the lag histogram, in milliseconds (plus +Inf)."""
_MAX_FRAMES = 128


@dataclass(frozen=True)
class BlockEvent:
    """The loop was blocked by one callback for ``duration_ms``."""

    at: float
    """Wall-clock time (Unix seconds) the loop came back."""
    duration_ms: float
    """How late the heartbeat woke: a lower bound of the time the loop was blocked."""
    stack: tuple[str, ...]
    """The blocked thread's stack, ``file:line:function``, outermost first; empty if the block ended
    before the watchdog could sample it."""
    user_frame: str | None
    """The innermost frame in the app's own code, the most common one over the samples."""
    samples: int
    context: str | None
    """The caller's context variable in the blocked task (route, trace id), if it was set."""

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["stack"] = list(self.stack)
        return data


@dataclass
class _Episode:
    """The watchdog's samples of one stall, tagged with the heartbeat it belongs to."""

    beat: int
    stacks: list[tuple[str, ...]] = field(default_factory=list)
    users: list[str | None] = field(default_factory=list)
    last: float = float("-inf")
    context: str | None = None
    context_read: bool = False


class LoopLagMonitor:
    """The heartbeat and the watchdog of one event loop. Thread-safe; ``snapshot()`` from any thread."""

    def __init__(
        self,
        *,
        threshold_ms: float = 100.0,
        interval_s: float = 0.05,
        sample_interval_s: float = 0.025,
        max_samples: int = 20,
        max_events: int = 100,
        context: contextvars.ContextVar[Any] | None = None,
        describe: Callable[[Any], str] | None = None,
        is_user_file: Callable[[str], bool] | None = None,
        on_block: Callable[[BlockEvent], None] | None = None,
    ) -> None:
        """``threshold_ms``: a lag this long is a block event. ``interval_s``: the heartbeat period.
        ``sample_interval_s``: the watchdog's period, and the spacing of stack samples during a stall.
        ``context``: read in the blocked task for each event; ``describe`` turns its value into the
        event's text (default: a string as is, a tuple's items joined by spaces). ``is_user_file``:
        which frames are the app's own (default: not the standard library, site-packages or the
        platform's runtime, the files beside this module). ``on_block``: called in the loop's thread
        with each event."""
        self.threshold_ms = threshold_ms
        self.interval_s = interval_s
        self.sample_interval_s = sample_interval_s
        self.max_samples = max_samples
        self._context = context
        self._describe = describe or _describe
        self._is_user_file = is_user_file or _default_is_user_file()
        self._on_block = on_block
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._events: deque[BlockEvent] = deque(maxlen=max_events)
        self._blocks_total = 0
        self._counts = [0] * (len(BUCKETS_MS) + 1)
        self._lag_sum_ms = 0.0
        self._lag_max_ms = 0.0
        self._beats = 0
        self._last_beat = time.monotonic()
        self._episode: _Episode | None = None
        self._pool: dict[str, int] = {}
        self._limiter: Callable[[], Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread_id = 0
        self._task: asyncio.Task[None] | None = None
        self._watchdog: threading.Thread | None = None

    def start(self) -> None:
        """Start both parts. Call it in the loop's thread, in a coroutine or a callback of the loop.

        Raises:
            RuntimeError: no running loop in this thread, or already started."""
        if self._task is not None:
            raise RuntimeError("the loop lag monitor is already running")
        loop = asyncio.get_running_loop()
        self._loop, self._thread_id = loop, threading.get_ident()
        self._limiter = _thread_limiter()
        with self._lock:
            self._last_beat, self._episode = time.monotonic(), None
        self._stopping.clear()
        self._task = loop.create_task(self._heartbeat(), name="looplag-heartbeat")
        self._watchdog = threading.Thread(target=self._watch, name="looplag-watchdog", daemon=True)
        self._watchdog.start()

    async def stop(self) -> None:
        """Stop both parts (idempotent). Recorded events and the histogram stay readable."""
        task, self._task = self._task, None
        self._stopping.set()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._watchdog is not None:
            self._watchdog.join(timeout=1.0)  # it waits on _stopping: returns at once
            self._watchdog = None

    async def __aenter__(self) -> LoopLagMonitor:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def events(self) -> list[BlockEvent]:
        with self._lock:
            return list(self._events)

    def snapshot(self) -> dict[str, object]:
        """The histogram (cumulative counts per ``le`` bound, like Prometheus), the recent block events,
        the stall in progress if any, and the thread pool's saturation. JSON-serialisable."""
        with self._lock:
            cumulative, total = {}, 0
            for bound, count in zip([*BUCKETS_MS, float("inf")], self._counts, strict=True):
                total += count
                cumulative["+Inf" if bound == float("inf") else f"{bound:g}"] = total
            overdue_ms = (time.monotonic() - self._last_beat - self.interval_s) * 1000
            return {
                "running": self._task is not None,
                "threshold_ms": self.threshold_ms,
                "interval_ms": self.interval_s * 1000,
                "lag_ms": {
                    "buckets": cumulative,
                    "count": total,
                    "sum": round(self._lag_sum_ms, 3),
                    "max": round(self._lag_max_ms, 3),
                },
                "blocked_now_ms": round(overdue_ms, 1)
                if self._task and overdue_ms >= self.threshold_ms
                else 0.0,
                "blocks_total": self._blocks_total,
                "blocks": [event.as_dict() for event in self._events],
                "threadpool": dict(self._pool) if self._pool else None,
            }

    # -- the heartbeat (loop thread) ------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        while True:
            expected = time.monotonic() + self.interval_s
            await asyncio.sleep(self.interval_s)
            now = time.monotonic()
            self._beat(max(0.0, now - expected) * 1000, now)

    def _beat(self, lag_ms: float, now: float) -> None:
        pool = self._read_pool()
        with self._lock:
            index = next((i for i, bound in enumerate(BUCKETS_MS) if lag_ms <= bound), len(BUCKETS_MS))
            self._counts[index] += 1
            self._lag_sum_ms += lag_ms
            self._lag_max_ms = max(self._lag_max_ms, lag_ms)
            episode = (
                self._episode if self._episode is not None and self._episode.beat == self._beats else None
            )
            self._episode, self._last_beat = None, now
            self._beats += 1
            if pool is not None:
                borrowed, total = pool
                self._pool = {
                    "borrowed": borrowed,
                    "total": total,
                    "peak": max(borrowed, self._pool.get("peak", 0)),
                    "saturated_beats": self._pool.get("saturated_beats", 0) + (borrowed >= total),
                    "beats": self._pool.get("beats", 0) + 1,
                }
        if lag_ms < self.threshold_ms:
            return
        event = _event(episode, lag_ms)
        with self._lock:
            self._events.append(event)
            self._blocks_total += 1
        if self._on_block is not None:
            try:
                self._on_block(event)
            except Exception as exc:
                asyncio.get_running_loop().call_exception_handler(
                    {"message": "loop lag monitor: the on_block callback failed", "exception": exc}
                )

    def _read_pool(self) -> tuple[int, int] | None:
        if self._limiter is None:
            return None
        try:
            limiter = self._limiter()
            return int(limiter.borrowed_tokens), int(limiter.total_tokens)
        except Exception:  # not in an AnyIO-compatible context after all: stop trying
            self._limiter = None
            return None

    # -- the watchdog (its own thread) ----------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stopping.wait(self.sample_interval_s):
            with self._lock:
                beat, last = self._beats, self._last_beat
            if (time.monotonic() - last - self.interval_s) * 1000 >= self.threshold_ms / 2:
                self._sample(beat)

    def _sample(self, beat: int) -> None:
        now = time.monotonic()
        with self._lock:
            episode = self._episode
            if episode is None or episode.beat != beat:
                episode = self._episode = _Episode(beat)
            if len(episode.stacks) >= self.max_samples or now - episode.last < self.sample_interval_s * 0.9:
                return
            episode.last = now
            read_context = not episode.context_read
        frame = sys._current_frames().get(self._thread_id)
        stack, user = self._stack(frame)
        context = self._context_value() if read_context else None
        with self._lock:
            if self._episode is not episode or self._beats != beat:
                return  # the loop came back while we looked: this sample may be of the next callback
            episode.stacks.append(stack)
            episode.users.append(user)
            if read_context:
                episode.context, episode.context_read = context, True

    def _stack(self, frame: FrameType | None) -> tuple[tuple[str, ...], str | None]:
        frames: list[str] = []
        user: str | None = None
        while frame is not None and len(frames) < _MAX_FRAMES:
            code = frame.f_code
            entry = f"{code.co_filename}:{frame.f_lineno}:{code.co_name}"
            if user is None and self._is_user_file(code.co_filename):
                user = entry
            frames.append(entry)
            frame = frame.f_back
        return tuple(reversed(frames)), user

    def _context_value(self) -> str | None:
        """The caller's context variable as the task blocking the loop sees it."""
        if self._context is None or self._loop is None:
            return None
        try:
            task = asyncio.current_task(self._loop)
        except Exception:  # a loop implementation that cannot tell from another thread
            return None
        if task is None:
            return None
        get_context = getattr(task, "get_context", None)  # Python 3.12+
        # 3.11's C Task keeps its context private; the garbage collector's view of it does not.
        contexts = [get_context()] if get_context is not None else gc.get_referents(task)
        for context in contexts:
            if isinstance(context, contextvars.Context) and self._context in context:
                try:
                    return self._describe(context[self._context])
                except Exception:
                    return None
        return None


def _event(episode: _Episode | None, lag_ms: float) -> BlockEvent:
    if episode is None or not episode.stacks:
        return BlockEvent(
            time.time(), round(lag_ms, 1), (), None, 0, None if episode is None else episode.context
        )
    users = Counter(user for user in episode.users if user is not None)
    user = users.most_common(1)[0][0] if users else None
    stack = episode.stacks[episode.users.index(user)] if user is not None else episode.stacks[-1]
    return BlockEvent(time.time(), round(lag_ms, 1), stack, user, len(episode.stacks), episode.context)


def _describe(value: object) -> str:
    if isinstance(value, tuple | list):
        return " ".join(str(item) for item in value)
    return str(value)


def _default_is_user_file(module_file: str = __file__) -> Callable[[str], bool]:
    # The platform's runtime (the launcher, the instrumentation) sits beside this module: a block in
    # a library called through it is the library's, not the platform's.
    platform = os.path.dirname(os.path.abspath(module_file)).rstrip("/") + "/"
    paths = sysconfig.get_paths()
    library = tuple(
        {
            paths[key].rstrip("/") + "/"
            for key in ("stdlib", "platstdlib", "purelib", "platlib")
            if key in paths
        }
    )

    def is_user_file(filename: str) -> bool:
        return not (
            filename.startswith("<")
            or filename.startswith(platform)
            or filename.startswith(library)
            or "/site-packages/" in filename
            or "/dist-packages/" in filename
        )

    return is_user_file


def _thread_limiter() -> Callable[[], Any] | None:
    """AnyIO's ``current_default_thread_limiter``, when AnyIO is installed (it is, with FastAPI)."""
    try:
        from anyio import to_thread
    except ImportError:
        return None
    limiter: Callable[[], Any] = to_thread.current_default_thread_limiter
    return limiter
