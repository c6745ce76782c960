"""Per-app events: instance state changes, scale decisions and their reasons, deploy milestones.

``emit`` is cheap and synchronous (called from the event loop by the fleet and the autoscaler); a
writer task flushes the queue to the database in batches, so a burst of events costs one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from typing import Any

from sqlmodel import col, select

from control_plane.db import Database
from control_plane.models import Event, utcnow

log = logging.getLogger("fastapi_deploy.events")

FLUSH_SECONDS = 0.25
_MAX_PENDING = 10_000


class EventLog:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._pending: list[Event] = []
        self._lock = threading.Lock()  # emit runs on the loop, flushes in worker threads
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def emit(self, app_id: str, kind: str, message: str, **data: Any) -> None:
        event = Event(
            app_id=app_id, kind=kind, message=message, data=json.dumps(data, default=str), at=utcnow()
        )
        with self._lock:
            if len(self._pending) >= _MAX_PENDING:  # the database is stuck; drop rather than grow
                return
            self._pending.append(event)
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._writer(), name="event-writer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self._flush)

    def list(self, app_id: str, limit: int = 100, kind: str | None = None) -> list[Event]:
        self._flush()
        with self.db.session() as s:
            query = select(Event).where(Event.app_id == app_id)
            if kind:
                query = query.where(Event.kind == kind)
            rows = s.exec(query.order_by(col(Event.id).desc()).limit(limit)).all()
            return list(rows)

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await asyncio.to_thread(self._flush)
            except Exception:
                log.exception("writing events failed")
            await asyncio.sleep(FLUSH_SECONDS)

    def _flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        with self.db.session() as s:
            s.add_all(batch)
            s.commit()
