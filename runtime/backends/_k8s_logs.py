"""Following a pod's log through the pod log API: one thread per container stream, lines handed on with
the timestamps the kubelet recorded."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from runtime.backends._k8s_client import Kube
from runtime.images import CONTAINER_PORT

log = logging.getLogger("fastapi_deploy.backend.kubernetes")

Lines = Callable[[list[tuple[datetime, str]]], None]


def is_ready_line(line: str) -> bool:
    """The launcher's ready line (``{"port": 8000, "pid": 1}``, after the lifespan startup): not output."""
    if not line.startswith('{"port"'):
        return False
    try:
        parsed = json.loads(line)
    except ValueError:
        return False
    return isinstance(parsed, dict) and set(parsed) == {"port", "pid"} and parsed["port"] == CONTAINER_PORT


def parse_stamp(text: str) -> datetime | None:
    """``2024-05-01T10:00:00.123456789Z`` (RFC 3339, nanoseconds) as an aware datetime."""
    try:
        head, _, fraction = text.rstrip("Z").partition(".")
        value = datetime.fromisoformat(head).replace(tzinfo=UTC)
        if fraction:
            value = value.replace(microsecond=int(fraction[:6].ljust(6, "0")))
        return value
    except ValueError:
        return None


class LogFollower:
    """Follows one stream (``Stdout``, ``Stderr``, or ``None``: both as one) of a pod's container until it
    ends (the container exited). A dropped connection is resumed from the last timestamp."""

    def __init__(
        self,
        kube: Kube,
        key: tuple[str, str],
        stream: str | None,
        *,
        since: str | None,
        closing: threading.Event,
        on_lines: Lines,
        on_response: Callable[[Any], None],
    ) -> None:
        self.kube, self.key, self.stream, self.since = kube, key, stream, since
        self.closing, self.on_lines, self.on_response = closing, on_lines, on_response
        self.thread = threading.Thread(target=self._run, name=f"k8s-logs-{key[1]}-{stream}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        since, last, resumed = self.since, None, False
        for _attempt in range(5):
            try:
                for raw in self.kube.logs(
                    self.key[0],
                    self.key[1],
                    follow=True,
                    since_time=since,
                    stream=self.stream,
                    on_response=self.on_response,
                ):
                    stamp_text, _, line = raw.partition(" ")
                    stamp = parse_stamp(stamp_text) or datetime.now(UTC)
                    if resumed and last is not None and stamp <= last:
                        continue  # a resumed stream repeats what we read since the last whole second
                    last = stamp
                    self.on_lines([(stamp, line)])
                return
            except Exception as exc:
                if self.closing.is_set():
                    return
                log.debug("log stream of %s/%s dropped: %r", *self.key, exc)
                if last is None:
                    return
                since, resumed = last.strftime("%Y-%m-%dT%H:%M:%SZ"), True
                self.closing.wait(0.5)
