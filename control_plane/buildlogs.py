"""Build logs: lines stored in the database (so every replica can stream them), streamed as NDJSON.

The stream follows the FastAPI Cloud contract: ``message`` lines with string ids (``last_id`` resumes
strictly after one), a ``heartbeat`` well inside the client's 60 s read timeout, ``timeout`` to cap a
connection's life (the client reconnects with ``last_id``), and a final ``complete`` or ``failed``.
We keep the stream open through deploying and verifying, so the app's own startup errors reach the
user's terminal; ``complete`` comes with success and ``failed`` with any failure.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator

from sqlmodel import col, select

from control_plane.db import Database
from control_plane.models import BuildLogLine, Deployment
from control_plane.statuses import FAILED, SUCCESSFUL

HEARTBEAT_SECONDS = 15.0
CONNECTION_SECONDS = 300.0
_BATCH = 500


class BuildLogs:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, asyncio.Event] = {}
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def append(self, deployment_id: str, message: str) -> None:
        """Store one line (thread-safe: builds run in worker threads) and wake the streams."""
        lines = message.rstrip("\n").split("\n") if message else [""]
        with self._lock, self.db.session() as session:
            for line in lines:
                session.add(BuildLogLine(deployment_id=deployment_id, message=line.rstrip()))
            session.commit()
        self.notify(deployment_id)

    def notify(self, deployment_id: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._wake, deployment_id)

    def _wake(self, deployment_id: str) -> None:
        event = self._events.get(deployment_id)
        if event is not None:
            event.set()

    def lines(self, deployment_id: str, after: int = 0) -> list[BuildLogLine]:
        with self.db.session() as session:
            return list(
                session.exec(
                    select(BuildLogLine)
                    .where(BuildLogLine.deployment_id == deployment_id, col(BuildLogLine.id) > after)
                    .order_by(col(BuildLogLine.id))
                    .limit(_BATCH)
                ).all()
            )

    def _status(self, deployment_id: str) -> str | None:
        with self.db.session() as session:
            dep = session.get(Deployment, deployment_id)
            return dep.status if dep else None

    async def stream(self, deployment_id: str, last_id: str | None) -> AsyncIterator[bytes]:
        """NDJSON lines for one client connection."""
        try:
            after = int(last_id) if last_id else 0
        except ValueError:
            after = 0
        event = self._events.setdefault(deployment_id, asyncio.Event())
        started = time.monotonic()
        while True:
            event.clear()
            status = await asyncio.to_thread(self._status, deployment_id)
            rows = await asyncio.to_thread(self.lines, deployment_id, after)
            for row in rows:
                assert row.id is not None
                after = row.id
                yield _line({"type": "message", "message": row.message, "id": str(row.id)})
            if len(rows) == _BATCH:
                continue
            if status in SUCCESSFUL:
                yield _line({"type": "complete", "id": str(after)})
                return
            if status is None or status in FAILED or status in NEVER_BUILDS:
                yield _line({"type": "failed", "id": str(after)})
                return
            if time.monotonic() - started > CONNECTION_SECONDS:
                yield _line({"type": "timeout", "id": str(after)})
                return
            try:
                await asyncio.wait_for(event.wait(), HEARTBEAT_SECONDS)
            except TimeoutError:
                yield _line({"type": "heartbeat", "id": str(after)})


NEVER_BUILDS = {"upload_cancelled"}


def _line(obj: dict[str, str]) -> bytes:
    return (json.dumps(obj) + "\n").encode()
