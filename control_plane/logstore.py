"""App logs: every line of every instance, kept per app in NDJSON segments with size retention.

Lines are appended to ``logs/<app_id>/current.ndjson``; when it passes a quarter of the retention size it
becomes a closed segment and the oldest segments are dropped until the app is under its retention. Logs
therefore survive the instance that wrote them (a crashed app's last words stay readable) and a
control-plane restart. Followers get new lines through in-process queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from runtime.backends.base import LogRecord
from runtime.logparse import LEVEL_RANK

_MAX_FOLLOWERS_QUEUE = 10_000


def format_ts(ts: datetime) -> str:
    """ISO 8601 with microseconds and ``+00:00``: what the official CLI's ``fromisoformat`` accepts."""
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


# What the launcher appends to the instance's access log lines: the request's id and trace.
_CORRELATION = re.compile(r" request_id=(\S+) trace_id=(\S+)$")


def record_to_entry(record: LogRecord) -> dict[str, Any]:
    entry = {
        "timestamp": format_ts(record.timestamp),
        "message": record.message,
        "level": record.level,
        "stream": record.stream,
        "instance_id": record.instance_id,
        "deployment_id": record.deployment_id,
    }
    if "request_id=" in record.message:
        match = _CORRELATION.search(record.message)
        if match is not None:
            if match.group(1) != "-":
                entry["request_id"] = match.group(1)
            if match.group(2) != "-":
                entry["trace_id"] = match.group(2)
    return entry


class LogFilter:
    """``since``/``until`` (aware datetimes), minimum ``level``, a ``grep`` substring (case-insensitive),
    and exact matches on the entry's fields (``request_id``, ``trace_id``, ``instance_id``, ...)."""

    def __init__(
        self,
        since: datetime | None = None,
        level: str | None = None,
        grep: str | None = None,
        *,
        until: datetime | None = None,
        fields: dict[str, str] | None = None,
    ):
        self.since = format_ts(since) if since else None
        self.until = format_ts(until) if until else None
        self.min_rank = LEVEL_RANK.get(level.lower(), 0) if level else 0
        self.grep = grep.lower() if grep else None
        self.fields = {k: v for k, v in (fields or {}).items() if v}

    def __call__(self, entry: dict[str, Any]) -> bool:
        if self.since is not None and str(entry.get("timestamp", "")) < self.since:
            return False
        if self.until is not None and str(entry.get("timestamp", "")) >= self.until:
            return False
        if self.min_rank and LEVEL_RANK.get(str(entry.get("level")), 1) < self.min_rank:
            return False
        for name, value in self.fields.items():
            if entry.get(name) != value:
                return False
        return not (self.grep and self.grep not in str(entry.get("message", "")).lower())


class LogStore:
    def __init__(self, root: Path, retention_bytes: int, retention_seconds: float | None = None) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.retention_bytes = retention_bytes
        self.retention_seconds = retention_seconds
        self.segment_bytes = max(64 * 1024, retention_bytes // 4)
        self._files: dict[str, IO[str]] = {}
        self._followers: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}

    # -- writing ------------------------------------------------------------------------------

    def append(self, record: LogRecord) -> None:
        """Store one line and hand it to followers. Called on the event loop (the backend's pumps)."""
        entry = record_to_entry(record)
        self._write(record.app_id, entry)
        for queue in self._followers.get(record.app_id, ()):
            with contextlib.suppress(asyncio.QueueFull):  # a stuck follower loses lines, not the app
                queue.put_nowait(entry)

    def _write(self, app_id: str, entry: dict[str, Any]) -> None:
        fh = self._files.get(app_id)
        if fh is None:
            directory = self.root / app_id
            directory.mkdir(parents=True, exist_ok=True)
            fh = open(directory / "current.ndjson", "a", encoding="utf-8", buffering=1)
            self._files[app_id] = fh
        fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
        if fh.tell() >= self.segment_bytes:
            self._rotate(app_id)

    def _rotate(self, app_id: str) -> None:
        fh = self._files.pop(app_id)
        fh.close()
        directory = self.root / app_id
        (directory / "current.ndjson").rename(directory / f"{time.time_ns():020d}.ndjson")
        segments = sorted(directory.glob("[0-9]*.ndjson"), reverse=True)
        total = 0
        for seg in segments:
            total += seg.stat().st_size
            if total > self.retention_bytes:
                seg.unlink(missing_ok=True)

    def expire(self, now: float | None = None) -> int:
        """Drop whole segments whose newest line (the file's mtime) is older than ``retention_seconds``.
        Returns how many went. Called now and then by the platform (and cheap: a stat per segment)."""
        if not self.retention_seconds:
            return 0
        cutoff = (time.time() if now is None else now) - self.retention_seconds
        dropped = 0
        for directory in [d for d in self.root.iterdir() if d.is_dir()]:
            for seg in [*directory.glob("[0-9]*.ndjson"), directory / "current.ndjson"]:
                try:
                    old = seg.stat().st_mtime < cutoff
                except FileNotFoundError:
                    continue
                if not old:
                    continue
                if seg.name == "current.ndjson":
                    fh = self._files.pop(directory.name, None)
                    if fh is not None:
                        fh.close()
                seg.unlink(missing_ok=True)
                dropped += 1
        return dropped

    def delete_app(self, app_id: str) -> None:
        fh = self._files.pop(app_id, None)
        if fh:
            fh.close()
        directory = self.root / app_id
        if directory.is_dir():
            for path in directory.iterdir():
                path.unlink(missing_ok=True)
            directory.rmdir()

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()

    # -- reading ------------------------------------------------------------------------------

    def tail(self, app_id: str, limit: int, match: LogFilter) -> list[dict[str, Any]]:
        """The newest ``limit`` entries that match, oldest first. Reads files backwards, stopping
        early once it has enough lines or has gone past ``since``."""
        out: list[dict[str, Any]] = []
        fh = self._files.get(app_id)
        if fh is not None:
            fh.flush()
        directory = self.root / app_id
        files = [directory / "current.ndjson", *sorted(directory.glob("[0-9]*.ndjson"), reverse=True)]
        for path in files:
            for line in _reverse_lines(path):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if match.since is not None and str(entry.get("timestamp", "")) < match.since:
                    return out[::-1]
                if match(entry):
                    out.append(entry)
                    if len(out) >= limit:
                        return out[::-1]
        return out[::-1]

    def follow(self, app_id: str) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(_MAX_FOLLOWERS_QUEUE)
        self._followers.setdefault(app_id, set()).add(queue)
        return queue

    def unfollow(self, app_id: str, queue: asyncio.Queue[dict[str, Any]]) -> None:
        followers = self._followers.get(app_id)
        if followers is not None:
            followers.discard(queue)
            if not followers:
                del self._followers[app_id]


def _reverse_lines(path: Path, block: int = 64 * 1024) -> Iterator[str]:
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        f.seek(0, os.SEEK_END)
        pos = f.tell()
        rest = b""
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step) + rest
            lines = chunk.split(b"\n")
            rest = lines[0]
            for raw in reversed(lines[1:]):
                if raw:
                    yield raw.decode("utf-8", "replace")
        if rest:
            yield rest.decode("utf-8", "replace")
