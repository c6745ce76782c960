"""OTLP/HTTP traces: decoding what instances and collectors send (protobuf and JSON), encoding what the
platform forwards, and the forwarder to a collector of the platform team's choosing.

Both decoders produce :class:`SpanData`, the platform's own span record (hex ids, integer nanoseconds,
plain-Python attribute values), so the receiver, the edge spans of the router and the storage speak one
shape. OTLP/JSON differs from protobuf's JSON mapping in two ways that matter: ids are hex (not base64)
and enums may be integers; both are handled here, not by ``json_format``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import logging
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Status
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

log = logging.getLogger("fastapi_deploy.otlp")

MAX_BODY = 8 * 2**20
"""Largest OTLP request accepted (after decompression): 8 MiB."""


class OTLPError(ValueError):
    """The body is not an OTLP traces request."""


@dataclass
class SpanData:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int  # OTLP: 1 internal, 2 server, 3 client, 4 producer, 5 consumer
    start_ns: int
    end_ns: int
    status_code: int = 0  # 0 unset, 1 ok, 2 error
    status_message: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""

    @property
    def service(self) -> str:
        return str(self.resource.get("service.name", ""))

    @property
    def duration_ms(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e6


# -- decoding -----------------------------------------------------------------------------------------


def decompress(body: bytes, encoding: str | None) -> bytes:
    encoding = (encoding or "").strip().lower()
    try:
        if encoding == "gzip":
            data = gzip.decompress(body)
        elif encoding == "deflate":
            data = zlib.decompress(body)
        elif encoding in ("", "identity"):
            data = body
        else:
            raise OTLPError(f"unsupported Content-Encoding {encoding!r}")
    except (OSError, zlib.error, EOFError) as exc:
        raise OTLPError(f"the body does not decompress: {exc}") from exc
    if len(data) > MAX_BODY:
        raise OTLPError(f"the body is over {MAX_BODY} bytes")
    return data


def _pb_value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_pb_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _pb_value(kv.value) for kv in value.kvlist_value.values}
    if which == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    return getattr(value, which)


def _pb_attrs(attributes: Any) -> dict[str, Any]:
    return {kv.key: _pb_value(kv.value) for kv in attributes}


def decode_protobuf(body: bytes) -> list[SpanData]:
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except Exception as exc:
        raise OTLPError(f"not an OTLP protobuf traces request: {exc}") from exc
    out = []
    for rs in request.resource_spans:
        resource = _pb_attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for span in ss.spans:
                out.append(
                    SpanData(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        kind=int(span.kind),
                        start_ns=int(span.start_time_unix_nano),
                        end_ns=int(span.end_time_unix_nano),
                        status_code=int(span.status.code),
                        status_message=span.status.message,
                        attributes=_pb_attrs(span.attributes),
                        events=[
                            {
                                "name": e.name,
                                "time_ns": int(e.time_unix_nano),
                                "attributes": _pb_attrs(e.attributes),
                            }
                            for e in span.events
                        ],
                        resource=resource,
                        scope=ss.scope.name,
                    )
                )
    return out


_KINDS = {
    f"SPAN_KIND_{n}": i
    for i, n in enumerate(("UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER"))
}
_STATUS = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}


def _json_value(value: Any) -> Any:
    if not isinstance(value, dict) or not value:
        return None
    key, inner = next(iter(value.items()))
    if key == "intValue":
        return int(inner)
    if key == "doubleValue":
        return float(inner)
    if key == "arrayValue":
        return [_json_value(v) for v in (inner or {}).get("values", [])]
    if key == "kvlistValue":
        return _json_attrs((inner or {}).get("values", []))
    return inner  # stringValue, boolValue, bytesValue (base64 already)


def _json_attrs(items: Any) -> dict[str, Any]:
    if not isinstance(items, list):
        return {}
    return {str(kv.get("key")): _json_value(kv.get("value")) for kv in items if isinstance(kv, dict)}


def _hex_id(value: Any, size: int) -> str:
    text = str(value or "")
    if len(text) == size * 2:
        try:
            int(text, 16)
            return text.lower()
        except ValueError:
            pass
    try:  # protobuf's canonical JSON mapping: base64; some exporters send that
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raw = b""
    return raw.hex() if len(raw) == size else ""


def _enum(value: Any, names: dict[str, int]) -> int:
    if isinstance(value, int):
        return value
    return names.get(str(value), 0)


def decode_json(body: bytes) -> list[SpanData]:
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise OTLPError(f"not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise OTLPError("an OTLP JSON traces request is an object with resourceSpans")
    out = []
    for rs in doc.get("resourceSpans") or doc.get("resource_spans") or []:
        if not isinstance(rs, dict):
            continue
        resource = _json_attrs((rs.get("resource") or {}).get("attributes"))
        for ss in rs.get("scopeSpans") or rs.get("instrumentationLibrarySpans") or []:
            scope = (ss.get("scope") or ss.get("instrumentationLibrary") or {}).get("name", "")
            for span in ss.get("spans") or []:
                trace_id, span_id = _hex_id(span.get("traceId"), 16), _hex_id(span.get("spanId"), 8)
                if not trace_id or not span_id:
                    raise OTLPError("a span without a valid traceId or spanId")
                status = span.get("status") or {}
                out.append(
                    SpanData(
                        trace_id=trace_id,
                        span_id=span_id,
                        parent_span_id=_hex_id(span.get("parentSpanId"), 8),
                        name=str(span.get("name", "")),
                        kind=_enum(span.get("kind"), _KINDS),
                        start_ns=int(span.get("startTimeUnixNano") or 0),
                        end_ns=int(span.get("endTimeUnixNano") or 0),
                        status_code=_enum(status.get("code"), _STATUS),
                        status_message=str(status.get("message", "")),
                        attributes=_json_attrs(span.get("attributes")),
                        events=[
                            {
                                "name": str(e.get("name", "")),
                                "time_ns": int(e.get("timeUnixNano") or 0),
                                "attributes": _json_attrs(e.get("attributes")),
                            }
                            for e in span.get("events") or []
                            if isinstance(e, dict)
                        ],
                        resource=resource,
                        scope=str(scope),
                    )
                )
    return out


@dataclass
class LoopReading:
    """One instance's event-loop numbers (``runtime/instrument.py`` sends them every 10 s)."""

    instance_id: str
    bounds_ms: list[float]
    counts: list[int]  # per bucket, cumulative since the instance started (OTLP CUMULATIVE)
    count: int
    sum_ms: float
    max_ms: float
    gauges: dict[str, int] = field(default_factory=dict)


def decode_loop_metrics(body: bytes, content_type: str | None) -> list[LoopReading]:
    """The platform's own event-loop metrics out of an OTLP/HTTP protobuf metrics request (others are
    ignored: instances send nothing else, collectors are not asked to send here)."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    if (content_type or "application/x-protobuf").split(";")[0].strip().lower() == "application/json":
        raise OTLPError("OTLP/JSON metrics are not accepted here; send protobuf")
    request = ExportMetricsServiceRequest()
    try:
        request.ParseFromString(body)
    except Exception as exc:
        raise OTLPError(f"not an OTLP protobuf metrics request: {exc}") from exc
    out = []
    for rm in request.resource_metrics:
        resource = _pb_attrs(rm.resource.attributes)
        reading = LoopReading(str(resource.get("fastapi_deploy.instance_id", "")), [], [], 0, 0.0, 0.0)
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == "fastapi_deploy.event_loop.lag" and metric.HasField("histogram"):
                    for point in metric.histogram.data_points[-1:]:
                        reading.bounds_ms = list(point.explicit_bounds)
                        reading.counts = [int(c) for c in point.bucket_counts]
                        reading.count, reading.sum_ms, reading.max_ms = int(point.count), point.sum, point.max
                elif metric.name.startswith("fastapi_deploy.") and metric.HasField("gauge"):
                    for number in metric.gauge.data_points[-1:]:
                        reading.gauges[metric.name.removeprefix("fastapi_deploy.")] = int(number.as_int)
        if reading.instance_id and len(reading.counts) == len(reading.bounds_ms) + 1:
            out.append(reading)
    return out


def metrics_response_body() -> bytes:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

    data: bytes = ExportMetricsServiceResponse().SerializeToString()
    return data


def decode(body: bytes, content_type: str | None) -> list[SpanData]:
    """By ``Content-Type``: ``application/x-protobuf`` (the default) or ``application/json``."""
    kind = (content_type or "application/x-protobuf").split(";")[0].strip().lower()
    if kind == "application/json":
        return decode_json(body)
    if kind in ("application/x-protobuf", "application/protobuf", "application/octet-stream"):
        return decode_protobuf(body)
    raise OTLPError(f"unsupported Content-Type {kind!r} (use application/x-protobuf or application/json)")


def response_body(content_type: str | None) -> tuple[bytes, str]:
    """An empty ExportTraceServiceResponse in the request's encoding."""
    if (content_type or "").split(";")[0].strip().lower() == "application/json":
        return b"{}", "application/json"
    return ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf"


# -- encoding -----------------------------------------------------------------------------------------


def _pb_any(value: Any) -> AnyValue:
    out = AnyValue()
    if isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int):
        out.int_value = value
    elif isinstance(value, float):
        out.double_value = value
    elif isinstance(value, list | tuple):
        out.array_value.values.extend(_pb_any(v) for v in value)
    elif isinstance(value, dict):
        out.kvlist_value.values.extend(KeyValue(key=str(k), value=_pb_any(v)) for k, v in value.items())
    elif value is not None:
        out.string_value = str(value)
    return out


def _pb_kv(attributes: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=_pb_any(v)) for k, v in attributes.items()]


def encode_protobuf(spans: list[SpanData]) -> bytes:
    """Spans as one ExportTraceServiceRequest, grouped by resource."""
    groups: dict[str, tuple[dict[str, Any], list[SpanData]]] = {}
    for span in spans:
        key = json.dumps(span.resource, sort_keys=True, default=str)
        groups.setdefault(key, (span.resource, []))[1].append(span)
    request = ExportTraceServiceRequest()
    for resource, members in groups.values():
        rs = ResourceSpans()
        rs.resource.attributes.extend(_pb_kv(resource))
        ss = ScopeSpans()
        for span in members:
            pb = PbSpan(
                trace_id=bytes.fromhex(span.trace_id),
                span_id=bytes.fromhex(span.span_id),
                parent_span_id=bytes.fromhex(span.parent_span_id) if span.parent_span_id else b"",
                name=span.name,
                kind=span.kind,  # type: ignore[arg-type]
                start_time_unix_nano=span.start_ns,
                end_time_unix_nano=span.end_ns,
                status=Status(code=span.status_code, message=span.status_message),  # type: ignore[arg-type]
            )
            pb.attributes.extend(_pb_kv(span.attributes))
            for event in span.events:
                pb.events.add(
                    name=event.get("name", ""),
                    time_unix_nano=int(event.get("time_ns", 0)),
                    attributes=_pb_kv(event.get("attributes") or {}),
                )
            ss.spans.append(pb)
        rs.scope_spans.append(ss)
        request.resource_spans.append(rs)
    data: bytes = request.SerializeToString()
    return data


# -- forwarding ----------------------------------------------------------------------------------------


class Forwarder:
    """Sends kept spans on to another OTLP/HTTP receiver (``FASTAPI_DEPLOY_OTLP_FORWARD_URL``), in
    batches, with a bounded queue (spans are dropped, never the platform slowed, when it is down)."""

    def __init__(self, url: str, headers: dict[str, str] | None = None, *, max_queue: int = 50_000) -> None:
        self.url = url
        self.headers = {"Content-Type": "application/x-protobuf", **(headers or {})}
        self._queue: deque[SpanData] = deque(maxlen=max_queue)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.failed = 0

    def submit(self, spans: list[SpanData]) -> None:
        self._queue.extend(spans)
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="otlp-forwarder")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(Exception):
            async with httpx.AsyncClient(timeout=5) as client:
                await self._send(client)  # what is left, once

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            backoff = 1.0
            while True:
                await self._wake.wait()
                self._wake.clear()
                await asyncio.sleep(0.5)  # gather a batch
                while self._queue:
                    if await self._send(client):
                        backoff = 1.0
                    else:
                        await asyncio.sleep(backoff)
                        backoff = min(30.0, backoff * 2)

    async def _send(self, client: httpx.AsyncClient) -> bool:
        batch = [self._queue.popleft() for _ in range(min(512, len(self._queue)))]
        if not batch:
            return True
        try:
            response = await client.post(self.url, content=encode_protobuf(batch), headers=self.headers)
            ok = response.status_code < 300
            if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                # The receiver refuses these spans; sending them again would be refused again.
                log.warning("%s refused %d spans: %s", self.url, len(batch), response.status_code)
                self.failed += 1
                return True
        except httpx.HTTPError as exc:
            log.warning("forwarding %d spans to %s failed: %s", len(batch), self.url, exc)
            ok = False
        if ok:
            self.sent += len(batch)
            return True
        self._queue.extendleft(reversed(batch))  # again later, unless the queue overflows meanwhile
        self.failed += 1
        return False
