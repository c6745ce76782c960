"""Readiness probing: one HTTP/1.1 GET on the instance's port with the app's own Host."""

from __future__ import annotations

import asyncio
import time


async def probe(host: str, port: int, hostname: str, path: str, *, timeout: float = 2.0) -> int | None:
    """The status code of ``GET path`` (``None`` when nothing answered within ``timeout`` seconds)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: {hostname}\r\nUser-Agent: fastapi-deploy-health\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return None
    parts = line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return int(parts[1])


def is_healthy(status: int | None) -> bool:
    """Any answer below 500 means the app is up (a 404 on ``/`` is a perfectly healthy app)."""
    return status is not None and status < 500


class Unhealthy(Exception):
    """An instance never became healthy; ``str(exc)`` completes "The app ..." ("exited during startup")."""


async def wait_healthy(
    host: str,
    port: int,
    hostname: str,
    path: str,
    *,
    deadline: float,
    exited: asyncio.Event,
    interval: float,
) -> None:
    """Probe until the health path answers below 500; raises :class:`Unhealthy` when the instance exits
    first or ``deadline`` (``time.monotonic()``) passes."""
    last: int | None = None
    while True:
        if exited.is_set():
            raise Unhealthy("exited during startup")
        last = await probe(host, port, hostname, path, timeout=2.0)
        if is_healthy(last):
            return
        if time.monotonic() >= deadline:
            what = "did not answer" if last is None else f"answered {last}"
            raise Unhealthy(f"{what} on its health path {path}")
        await asyncio.sleep(interval)
