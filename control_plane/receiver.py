"""The OTLP/HTTP traces receiver: what ``POST /v1/traces`` does, on the API's port and, for instances
that cannot reach it (containers on the docker backend's bridge network), on a side listener bound to
that network's gateway.

Instances authenticate with their app's telemetry token (``Authorization: Bearer``); the spans are
attributed to that app whatever their resource says, so an instance cannot write into another app's
traces.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from control_plane.otlp import (
    MAX_BODY,
    OTLPError,
    decode,
    decode_loop_metrics,
    decompress,
    metrics_response_body,
    response_body,
)

if TYPE_CHECKING:
    from control_plane.platform import Platform

log = logging.getLogger("fastapi_deploy.receiver")

_MAX_HEAD = 16 * 1024


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str


def _instance_app(platform: Platform, authorization: str | None, body: bytes) -> str | Answer:
    """The app whose instance sent this (its telemetry token), or the error to answer."""
    token = authorization[7:].strip() if authorization and authorization.lower().startswith("bearer ") else ""
    app_id = platform.telemetry_app(token)
    if app_id is None:
        return _error(401, "This receiver takes telemetry from the platform's instances (a telemetry token).")
    if len(body) > MAX_BODY:
        return _error(413, f"OTLP requests are limited to {MAX_BODY} bytes.")
    return app_id


def receive(
    platform: Platform,
    authorization: str | None,
    content_type: str | None,
    content_encoding: str | None,
    body: bytes,
) -> Answer:
    """``POST /v1/traces``: authenticate, decode and hand the spans to the trace pipeline (on the loop)."""
    app_id = _instance_app(platform, authorization, body)
    if isinstance(app_id, Answer):
        return app_id
    try:
        spans = decode(decompress(body, content_encoding), content_type)
    except OTLPError as exc:
        return _error(400, str(exc))
    platform.traces.ingest(app_id, spans)
    for span in spans:
        if span.name == BLOCK_SPAN and span.scope == "fastapi-deploy.looplag":
            platform.loop_blocked(app_id, span)
    data, media_type = response_body(content_type)
    return Answer(200, data, media_type)


def receive_metrics(
    platform: Platform,
    authorization: str | None,
    content_type: str | None,
    content_encoding: str | None,
    body: bytes,
) -> Answer:
    """``POST /v1/metrics``: the instances' event-loop lag and thread-pool readings."""
    app_id = _instance_app(platform, authorization, body)
    if isinstance(app_id, Answer):
        return app_id
    try:
        readings = decode_loop_metrics(decompress(body, content_encoding), content_type)
    except OTLPError as exc:
        return _error(400, str(exc))
    for reading in readings:
        platform.metrics.observe_loop(app_id, reading)
    return Answer(200, metrics_response_body(), "application/x-protobuf")


BLOCK_SPAN = "event loop blocked"


def _error(status: int, message: str) -> Answer:
    import json

    return Answer(status, json.dumps({"error": {"message": message}}).encode(), "application/json")


class SideListener:
    """``POST /v1/traces`` and ``/v1/metrics`` alone, on another address (HTTP/1.1, keep-alive,
    Content-Length bodies)."""

    def __init__(self, platform: Platform, host: str, port: int) -> None:
        self.platform = platform
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        log.info("OTLP receiver for instances on http://%s:%d/v1/traces", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                    return
                if len(head) > _MAX_HEAD:
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, _, rest = lines[0].partition(" ")
                path = rest.partition(" ")[0]
                headers = {}
                for line in lines[1:]:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                length = headers.get("content-length", "")
                route = path.split("?")[0]
                if method != "POST" or route not in ("/v1/traces", "/v1/metrics"):
                    answer = _error(404, "Only POST /v1/traces and /v1/metrics here.")
                elif not length.isdigit():
                    answer = _error(411, "A Content-Length is required.")
                elif int(length) > MAX_BODY:
                    answer = _error(413, f"OTLP requests are limited to {MAX_BODY} bytes.")
                else:
                    body = await reader.readexactly(int(length))
                    answer = (receive if route == "/v1/traces" else receive_metrics)(
                        self.platform,
                        headers.get("authorization"),
                        headers.get("content-type"),
                        headers.get("content-encoding"),
                        body,
                    )
                close = answer.status in (411, 413) or headers.get("connection", "").lower() == "close"
                writer.write(
                    b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n"
                    % (
                        answer.status,
                        b"OK" if answer.status == 200 else b"Error",
                        answer.content_type.encode(),
                        len(answer.body),
                        b"Connection: close\r\n" if close else b"",
                    )
                    + answer.body
                )
                await writer.drain()
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
