"""Tracing with no code changes, inside the instance: OpenTelemetry around the user's app.

Loaded by the launcher (by path, not as a package: the app's own modules stay first on ``sys.path``) when
the control plane set ``FASTAPI_DEPLOY_OTLP_ENDPOINT``. The OpenTelemetry packages come from the
platform's layer (``FASTAPI_DEPLOY_OTEL_PATH``, built by ``runtime/otel_layer.py`` for the app's Python
and for the app's own OpenTelemetry version when it ships one, as ``fastapi[standard]`` does), appended
to ``sys.path`` after the app's own packages, so the app's copies win. A layer of another version than
the app's is not used (two versions of the API in one namespace package would be worse than no traces).

Three steps, because of fork templates (``launcher.py --template``)::

    prepare()      before the app is imported: patch httpx, requests, SQLAlchemy, ... (no threads)
    wrap(config)   after the import: the server-span middleware around the app
    start()        in the serving process: the tracer provider, the tail sampler, the exporter thread

The server span is the platform's own (:class:`ServerSpans`), not OpenTelemetry's ASGI instrumentation:
per request it costs a header scan, a random id and a context variable; the span object is built only
for traces that are kept. The spans of the libraries (a SQL query, an outgoing HTTP call) are the
contrib instrumentations', recorded by the SDK as children of it.

Sampling happens at the tail, per trace (:class:`TailSampler`): a trace is exported when a span failed
or the response was a 5xx, the request took ``FASTAPI_DEPLOY_TRACE_SLOW_MS`` or more, or its id falls
in ``FASTAPI_DEPLOY_TRACE_SAMPLE`` — the same ratio test on the trace id as the router's, so the edge
span and the app's spans agree. Export is OTLP/HTTP protobuf over the standard library's
``http.client`` on a kept-alive connection (the layer brings no HTTP client into the app); a kept server
span is plain data written straight to protobuf in the exporter thread (:class:`_ServerSpan`), the
libraries' spans go through the SDK's encoder.
"""

from __future__ import annotations

import functools
import http.client
import importlib
import importlib.util
import itertools
import os
import random
import struct
import sys
import threading
import time
import traceback
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

# (module the app must have, instrumentor "module:Class"); each applied only when both import.
_LIBRARIES = (
    ("httpx", "opentelemetry.instrumentation.httpx:HTTPXClientInstrumentor"),
    ("requests", "opentelemetry.instrumentation.requests:RequestsInstrumentor"),
    ("sqlalchemy", "opentelemetry.instrumentation.sqlalchemy:SQLAlchemyInstrumentor"),
    ("psycopg", "opentelemetry.instrumentation.psycopg:PsycopgInstrumentor"),
    ("psycopg2", "opentelemetry.instrumentation.psycopg2:Psycopg2Instrumentor"),
    ("asyncpg", "opentelemetry.instrumentation.asyncpg:AsyncPGInstrumentor"),
    ("redis", "opentelemetry.instrumentation.redis:RedisInstrumentor"),
)
_MAX_PENDING_TRACES = 10_000
_METRICS_SECONDS = 10.0  # how often the loop's lag histogram is sent
_MAX_DECIDED = 20_000
_MAX_DROPPED = 256  # dropped requests a block report can still bring back (the last few)


def _say(message: str) -> None:
    print(f"fastapi-deploy: {message}", file=sys.stderr, flush=True)


def _block_ms() -> float:
    """How long a callback must hold the event loop to be reported as a block."""
    return float(os.environ.get("FASTAPI_DEPLOY_LOOP_BLOCK_MS", "100") or 100)


def _own_opentelemetry() -> str | None:
    """The opentelemetry-api version the app's environment ships (looked up before the layer is added)."""
    try:
        from importlib.metadata import version

        return version("opentelemetry-api")
    except Exception:
        return None


class Telemetry:
    """The instance's tracing: created by :func:`prepare`, None when tracing is off."""

    def __init__(self, endpoint: str, token: str) -> None:
        self.endpoint = endpoint
        self.token = token
        self.provider: Any = None
        self.monitor: Any = None
        self.late: Any = None
        self.sampler: TailSampler | None = None
        self.instrumented: list[str] = []
        self.request_ids: Callable[[], tuple[str, str]] | None = None  # once wrap() put ServerSpans in

    # -- step 2: the app ---------------------------------------------------------------------------

    def wrap(self, config: Any) -> None:
        """Put the server-span middleware around the loaded app (``uvicorn.Config`` after ``load()``).
        It also notes the request's ids for the access log (:func:`request_ids`)."""
        config.loaded_app = ServerSpans(config.loaded_app, self)
        self.request_ids = request_ids

    # -- step 3: exporting -------------------------------------------------------------------------

    def start(self) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON

        env = os.environ
        self.resource = Resource.create(
            {
                "service.name": env.get("FASTAPI_DEPLOY_APP_NAME") or env.get("FASTAPI_DEPLOY_APP_ID", "app"),
                "service.instance.id": env.get("FASTAPI_DEPLOY_INSTANCE_ID", ""),
                "fastapi_deploy.app_id": env.get("FASTAPI_DEPLOY_APP_ID", ""),
                "fastapi_deploy.deployment_id": env.get("FASTAPI_DEPLOY_DEPLOYMENT_ID", ""),
                "fastapi_deploy.instance_id": env.get("FASTAPI_DEPLOY_INSTANCE_ID", ""),
            }
        )
        provider = TracerProvider(resource=self.resource, sampler=ALWAYS_ON)
        # Small batches: the exporter thread encodes a batch holding the GIL, and a big one would stall
        # the app's event loop for that long.
        batch = BatchSpanProcessor(
            _exporter(self.endpoint, self.token, self.resource),
            schedule_delay_millis=1000,
            max_queue_size=8192,
            max_export_batch_size=64,
        )
        ratio = float(env.get("FASTAPI_DEPLOY_TRACE_SAMPLE", "0.1") or 0.1)
        slow_ms = float(env.get("FASTAPI_DEPLOY_TRACE_SLOW_MS", "500") or 500)
        self.sampler = _processor(TailSampler)(
            batch, ratio=ratio, slow_ns=int(slow_ms * 1e6), block_ns=int(_block_ms() * 1e6)
        )
        provider.add_span_processor(self.sampler)
        # Not the global provider: the platform's tracing stays out of the app's own OpenTelemetry (its
        # providers, FastAPI's native telemetry and its per-operation spans stay as the app set them).
        self.late.provider = provider
        self.provider = provider

    # -- the event loop ---------------------------------------------------------------------------

    def watch_loop(self) -> None:
        """Start the event-loop lag monitor (``runtime/looplag.py``, beside this file) in the running
        loop: its lag histogram goes to the control plane every 10 s, and each block (a callback that
        held the loop ``FASTAPI_DEPLOY_LOOP_BLOCK_MS``, 100, or longer) becomes a span in the trace of
        the request it stalled, with the stack of the blocking code. Never fails the app."""
        if self.sampler is None:
            return
        try:
            module = _sibling("looplag")
            self.monitor = module.LoopLagMonitor(
                threshold_ms=_block_ms(),
                context=CURRENT_SPAN,
                describe=_describe_span,
                on_block=self._blocked,
            )
            self.monitor.start()
        except Exception as exc:
            _say(f"no event-loop monitoring: {exc!r}")
            self.monitor = None
            return
        self._metrics = _MetricsPusher(self)
        self._metrics.start()

    async def unwatch_loop(self) -> None:
        if self.monitor is not None:
            await self.monitor.stop()
        pusher = getattr(self, "_metrics", None)
        if pusher is not None:
            pusher.stop()

    def _blocked(self, event: Any) -> None:
        """A block event (on the loop thread): a span, exported now; its trace is kept."""
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode

        sampler = self.sampler
        if sampler is None:
            return
        trace_id = span_id = 0
        if event.context:
            trace_hex, _, span_hex = str(event.context).partition(" ")
            with _suppress():
                trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
        if not trace_id:
            trace_id = random.getrandbits(128) or 1
        here = os.getcwd().rstrip("/") + "/"  # the project's root: show paths as the author knows them

        def relative(frame: str) -> str:
            return frame[len(here) :] if frame.startswith(here) else frame

        end = int(event.at * 1e9)
        start = end - int(event.duration_ms * 1e6)
        attributes: dict[str, Any] = {
            "fastapi_deploy.block.duration_ms": float(event.duration_ms),
            "fastapi_deploy.block.samples": int(event.samples),
            "code.stacktrace": "\n".join(relative(frame) for frame in event.stack[-40:]),
        }
        if event.user_frame:  # file:line:function, the innermost frame of the app's own code
            user_frame = relative(event.user_frame)
            attributes["fastapi_deploy.block.user_frame"] = user_frame
            parts = user_frame.rsplit(":", 2)
            if len(parts) == 3 and parts[1].isdigit():
                attributes["code.filepath"] = parts[0]
                attributes["code.lineno"] = int(parts[1])
                attributes["code.function"] = parts[2]
        span = ReadableSpan(
            name="event loop blocked",
            context=SpanContext(trace_id, random.getrandbits(64) or 1, False, self._sampled_flags()),
            parent=SpanContext(trace_id, span_id, False) if span_id else None,
            resource=self.resource,
            attributes=attributes,
            kind=SpanKind.INTERNAL,
            status=Status(StatusCode.ERROR, f"the event loop was blocked for {event.duration_ms:.0f} ms"),
            start_time=start,
            end_time=end,
            instrumentation_scope=InstrumentationScope("fastapi-deploy.looplag"),
        )
        sampler.force(trace_id, span)

    @staticmethod
    def _sampled_flags() -> Any:
        from opentelemetry.trace import TraceFlags

        return TraceFlags(TraceFlags.SAMPLED)

    def shutdown(self) -> None:
        """Export what is buffered (after uvicorn stopped: the lifespan shutdown's spans too)."""
        pusher = getattr(self, "_metrics", None)
        if pusher is not None:
            pusher.stop()
            pusher.push()  # the last reading
        if self.provider is not None:
            try:
                self.provider.shutdown()
            except Exception as exc:
                _say(f"flushing traces failed: {exc}")


def prepare() -> Telemetry | None:
    """Step 1, before the app module is imported. None when tracing is off or cannot work here."""
    env = os.environ
    endpoint = env.get("FASTAPI_DEPLOY_OTLP_ENDPOINT", "")
    if not endpoint:
        return None
    own = _own_opentelemetry()
    layer = env.get("FASTAPI_DEPLOY_OTEL_PATH", "")
    layer_version = env.get("FASTAPI_DEPLOY_OTEL_VERSION", "")
    # The layer is built for the app's own OpenTelemetry version when it has one; a layer of another
    # version would mix two APIs in one namespace package, so the app then has to bring it all itself.
    if layer and layer not in sys.path and (own is None or own == layer_version):
        sys.path.append(layer)  # after the app's own packages: the app's copies win
    try:
        importlib.import_module("opentelemetry.sdk.trace")
        importlib.import_module("opentelemetry.exporter.otlp.proto.common.trace_encoder")
    except ImportError as exc:
        why = f"the app's opentelemetry-api {own} comes without" if own else "missing"
        _say(f"tracing is off: {why} {exc.name or exc}")
        return None
    telemetry = Telemetry(endpoint, env.get("FASTAPI_DEPLOY_TELEMETRY_TOKEN", ""))
    telemetry.late = _late_provider()
    for module, target in _LIBRARIES:
        if importlib.util.find_spec(module) is None:
            continue
        path, _, name = target.partition(":")
        try:
            instrumentor = getattr(importlib.import_module(path), name)()
        except ImportError:
            continue  # not in the layer (it resolved without that instrumentation)
        try:
            instrumentor.instrument(tracer_provider=telemetry.late)
        except Exception as exc:  # an incompatible version: no spans for that library, the app runs
            _say(f"no {module} spans: {exc}")
            continue
        if instrumentor.is_instrumented_by_opentelemetry:
            telemetry.instrumented.append(module)
    return telemetry


# -- the server span ------------------------------------------------------------------------------------


class ServerSpans:
    """ASGI middleware: one SERVER span per HTTP request, parented by the router's ``traceparent``.

    While the request runs, the span's context is the current one (a non-recording span: cheap), so the
    libraries' spans become its children; when the response is done the tail sampler decides, and only
    a kept trace pays for building the span record (:meth:`TailSampler.finish`)."""

    def __init__(self, app: Any, telemetry: Telemetry) -> None:
        self.app = app
        self.telemetry = telemetry
        from opentelemetry import context
        from opentelemetry.trace import SpanContext, TraceFlags

        self._attach, self._detach = context.attach, context.detach
        self._span_context = SpanContext
        self._sampled = TraceFlags(TraceFlags.SAMPLED)
        # The libraries' spans need the request's span as the current one. Where OpenTelemetry keeps its
        # context in a context variable (its default), the request's span is made only when something
        # asks for the current context (:func:`_derive_request_context`); otherwise it is attached.
        self._contexts = _derive_request_context()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        sampler = self.telemetry.sampler
        if scope["type"] != "http" or sampler is None:
            await self.app(scope, receive, send)
            return
        # Per request, as little as can be: every line here runs for every request, sampled or not
        # (in a ~250 µs request each C call costs about a microsecond, a context variable set five).
        trace_id = parent_id = 0
        request_id = b"-"
        for name, value in scope["headers"]:
            if name == b"traceparent":
                # version-traceid-parentid-flags in hex (int() alone would also take "+", "_", " ")
                if len(value) == 55 and value[3:35].isalnum() and value[36:52].isalnum():
                    try:
                        trace_id, parent_id = int(value[3:35], 16), int(value[36:52], 16)
                    except ValueError:
                        pass
            elif name == b"x-request-id":
                request_id = value
        if not trace_id:
            trace_id = random.getrandbits(128) or 1
        span_id = random.getrandbits(64) or 1
        # One context variable for all that asks which request this is: OpenTelemetry's current
        # context (derived from it), the loop monitor, the access log (:data:`CURRENT_SPAN`).
        contexts = self._contexts
        if contexts is not None:
            token = None
            current = CURRENT_SPAN.set([trace_id, span_id, contexts.get(), None, request_id])
        else:
            token = self._attach(
                _request_context(self._span_context(trace_id, span_id, False, self._sampled))
            )
            current = CURRENT_SPAN.set([trace_id, span_id, None, None, request_id])
        status = [0]

        async def send_status(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        start = time.time_ns()
        failure: BaseException | None = None
        try:
            await self.app(scope, receive, send_status)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            if token is not None:
                self._detach(token)
            CURRENT_SPAN.reset(current)
            end = time.time_ns()
            code = status[0] or (500 if failure is not None else 0)
            error = code >= 500 or (failure is not None and not isinstance(failure, _CANCELLED))
            # The span is built only if the trace is kept (or held for a late block report), at once.
            sampler.finish(
                trace_id,
                end - start,
                error,
                self._span,
                scope,
                trace_id,
                span_id,
                parent_id,
                start,
                end,
                code,
                failure if error else None,
            )

    def _span(
        self,
        scope: Any,
        trace_id: int,
        span_id: int,
        parent_id: int,
        start: int,
        end: int,
        code: int,
        failure: BaseException | None,
    ) -> _ServerSpan:
        """The request's span (:class:`_ServerSpan`: plain data, encoded by the exporter thread)."""
        method = scope.get("method", "GET")
        route = getattr(scope.get("route"), "path", None)  # Starlette >= 0.34 says which route matched
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "url.path": scope.get("path", ""),
            "url.scheme": scope.get("scheme", "http"),
            "network.protocol.version": scope.get("http_version", "1.1"),
            "http.response.status_code": code,
        }
        if route:
            attributes["http.route"] = route
        query = scope.get("query_string", b"")
        if query:
            attributes["url.query"] = query.decode("latin-1")
        for name, value in scope["headers"]:
            if name == b"host":
                attributes["server.address"] = value.decode("latin-1").rsplit(":", 1)[0]
            elif name == b"user-agent":
                attributes["user_agent.original"] = value.decode("latin-1")
        client = scope.get("client")
        if client:
            attributes["client.address"] = client[0]
        events: list[tuple[str, int, dict[str, Any]]] = []
        status, message = 0, ""
        if failure is not None and not isinstance(failure, _CANCELLED):
            exception = {
                "exception.type": type(failure).__qualname__,
                "exception.message": str(failure),
                "exception.stacktrace": "".join(traceback.format_exception(failure)),
            }
            events.append(("exception", end, exception))
            status, message = 2, type(failure).__qualname__
        elif code >= 500:
            status, message = 2, f"HTTP {code}"
        return _ServerSpan(
            self._span_context(trace_id, span_id, False, self._sampled),
            parent_id,
            f"{method} {route}" if route else method,
            start,
            end,
            attributes,
            events,
            status,
            message,
        )


class _ServerSpan:
    """A kept request's SERVER span as plain data: the tail sampler passes it on like an SDK span (it
    has the ``context`` the batch processor looks at), and the exporter writes it straight to OTLP
    protobuf (:meth:`encode`) — the SDK's ``ReadableSpan`` and its generic encoder cost ~5x more."""

    __slots__ = ("attributes", "context", "end", "events", "message", "name", "parent_id", "start", "status")

    def __init__(
        self,
        context: Any,
        parent_id: int,
        name: str,
        start: int,
        end: int,
        attributes: dict[str, Any],
        events: list[tuple[str, int, dict[str, Any]]],
        status: int,
        message: str,
    ) -> None:
        self.context, self.parent_id, self.name = context, parent_id, name
        self.start, self.end, self.attributes, self.events = start, end, attributes, events
        self.status, self.message = status, message  # OTLP status code (0 unset, 2 error) and message

    def encode(self) -> bytes:
        """The ``Span`` message, fields as the SDK's encoder writes them (remote parent: the router's)."""
        context = self.context
        out = [
            b"\x0a\x10" + context.trace_id.to_bytes(16, "big"),
            b"\x12\x08" + context.span_id.to_bytes(8, "big"),
        ]
        if self.parent_id:
            out.append(b"\x22\x08" + self.parent_id.to_bytes(8, "big"))
        out.append(_string(5, self.name))
        out.append(b"\x30\x02")  # kind: SERVER
        out.append(b"\x39" + _FIXED64.pack(self.start) + b"\x41" + _FIXED64.pack(self.end))
        cache = _ATTRIBUTES
        for item in self.attributes.items():
            if item[0] in _UNCACHED:
                out.append(_message(9, _key_value(*item)))
                continue
            key = (*item, type(item[1]))  # the type too: True == 1 as dict keys
            field = cache.get(key)
            if field is None:
                if len(cache) >= _MAX_CACHED_ATTRIBUTES:
                    cache.clear()
                field = cache[key] = _message(9, _key_value(*item))
            out.append(field)
        for name, at, attributes in self.events:
            event = [b"\x09" + _FIXED64.pack(at), _string(2, name)]
            event.extend(_message(3, _key_value(key, value)) for key, value in attributes.items())
            out.append(_message(11, b"".join(event)))
        status = (_string(2, self.message) if self.message else b"") + (
            b"\x18\x02" if self.status == 2 else b""
        )
        out.append(_message(15, status))
        # flags: the parent's remoteness is known (0x100), and it is remote (0x200) when there is one
        out.append(b"\x85\x01" + _FIXED32.pack(0x300 if self.parent_id else 0x100))
        return b"".join(out)


# -- OTLP protobuf, written directly (the few wire types the server span and the resource need) --------

_ATTRIBUTES: dict[tuple[str, Any, type], bytes] = {}
"""Span attribute fields as written, by (key, value, type): most repeat from request to request (method,
status, route, host, client, user agent), and writing one costs ~2 µs. Used by the exporter's thread."""
_MAX_CACHED_ATTRIBUTES = 4096
_UNCACHED = frozenset({"url.path", "url.query"})  # a value per request: they would only crowd the cache

_FIXED64 = struct.Struct("<Q")
_FIXED32 = struct.Struct("<I")
_DOUBLE = struct.Struct("<d")


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _message(field: int, body: bytes) -> bytes:
    size = len(body)
    if field < 16 and size < 0x80:  # most: one byte of tag, one of length
        return bytes((field << 3 | 2, size)) + body
    return _varint(field << 3 | 2) + _varint(size) + body


def _string(field: int, text: str) -> bytes:
    return _message(field, text.encode("utf-8", "surrogatepass"))


def _key_value(key: str, value: Any) -> bytes:
    """A ``KeyValue`` with an ``AnyValue`` of a str, bool, int or float (anything else as its str)."""
    if isinstance(value, bool):
        any_value = b"\x10\x01" if value else b"\x10\x00"
    elif isinstance(value, int):
        any_value = b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)  # int64: two's complement
    elif isinstance(value, float):
        any_value = b"\x21" + _DOUBLE.pack(value)
    else:
        any_value = _string(1, str(value))
    return (_KEYS.get(key) or _string(1, key)) + _message(2, any_value)


_KEYS = {  # the KeyValue.key fields of the server spans' attributes, written once
    key: _string(1, key)
    for key in (
        "http.request.method",
        "url.path",
        "url.scheme",
        "network.protocol.version",
        "http.response.status_code",
        "http.route",
        "url.query",
        "server.address",
        "user_agent.original",
        "client.address",
        "exception.type",
        "exception.message",
        "exception.stacktrace",
    )
}


def _resource_and_scope(resource: Any, scope: str) -> tuple[bytes, bytes]:
    """The ``resource`` field of a ``ResourceSpans`` and the ``scope`` field of a ``ScopeSpans``, for
    :func:`encode_server_spans` (written once per exporter, not per batch)."""
    attributes = b"".join(_message(1, _key_value(k, v)) for k, v in resource.attributes.items())
    return _message(1, attributes), _message(1, _string(1, scope))


def encode_server_spans(resource: bytes, scope: bytes, spans: list[_ServerSpan]) -> bytes:
    """An ``ExportTraceServiceRequest`` with one ``ResourceSpans`` holding ``spans``. Protobuf messages
    concatenate: appended to another request's bytes, its resource spans join that request's."""
    scope_spans = scope + b"".join(_message(2, span.encode()) for span in spans)
    return _message(1, resource + _message(2, scope_spans))


try:
    import asyncio

    _CANCELLED: tuple[type[BaseException], ...] = (asyncio.CancelledError,)
except ImportError:  # pragma: no cover - asyncio is always there
    _CANCELLED = ()


# -- sampling -------------------------------------------------------------------------------------------


def _ratio_bound(ratio: float) -> int:
    return max(0, min(2**64, round(ratio * 2**64)))


def sampled_by_ratio(trace_id: int, bound: int) -> bool:
    """OpenTelemetry's TraceIdRatioBased test: the trace id's low 64 bits below the bound."""
    return (trace_id & 0xFFFFFFFFFFFFFFFF) < bound


class _Recent:
    """A map of the last ``size`` to ``2 * size`` keys set (two generations of plain dicts: when the young
    one is full it becomes the old one and the old one goes). An ``OrderedDict`` evicting one key per
    insert costs several times more on the per-request path."""

    __slots__ = ("_old", "_size", "_young")

    def __init__(self, size: int) -> None:
        self._size = size
        self._young: dict[int, Any] = {}
        self._old: dict[int, Any] = {}

    def __setitem__(self, key: int, value: Any) -> None:
        young = self._young
        young[key] = value
        if len(young) >= self._size:
            self._old, self._young = young, {}

    def get(self, key: int) -> Any:
        value = self._young.get(key)
        return self._old.get(key) if value is None else value

    def pop(self, key: int) -> Any:
        value = self._young.pop(key, None)
        return self._old.pop(key, None) if value is None else value


class TailSampler:
    """A span processor that holds a trace's spans until the trace's request (or other local root)
    ends, then passes them all to ``downstream`` (a BatchSpanProcessor) or drops them all.

    Two ways a trace ends: :meth:`finish`, from :class:`ServerSpans`, with the request's own span built
    only if kept; or :meth:`on_end` of an SDK span that is a local root (work outside a request).
    Thread-safe: sync endpoints end their spans on worker threads."""

    def __init__(self, downstream: Any, *, ratio: float, slow_ns: int, block_ns: int = 100_000_000) -> None:
        """``block_ns``: the loop monitor's threshold. A dropped request that took this long or longer
        is held for a moment, its span built (a late block report may bring it back); a shorter one
        cannot have been stalled by a block that long, and nothing of it is built."""
        self.downstream = downstream
        self.bound = _ratio_bound(ratio)
        self.slow_ns = slow_ns
        self.block_ns = block_ns
        self._quick_ns = min(slow_ns, block_ns)
        self._pending: OrderedDict[int, list[Any]] = OrderedDict()
        self._decided = _Recent(_MAX_DECIDED)  # trace id -> kept (bool)
        self._forced: set[int] = set()
        self._dropped = _Recent(_MAX_DROPPED)  # trace id -> (root span, spans) of a dropped request
        self._lock = threading.Lock()

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: Any) -> None:
        trace_id = span.context.trace_id
        parent = span.parent
        with self._lock:
            decided = self._decided.get(trace_id)
            if decided is not None:  # a late span of a trace already decided (a background task)
                batch = [span] if decided else []
            elif parent is not None and not parent.is_remote:
                spans = self._pending.get(trace_id)
                if spans is None:
                    spans = self._pending[trace_id] = []
                    if len(self._pending) > _MAX_PENDING_TRACES:
                        self._pending.popitem(last=False)  # an unfinished trace, the oldest: dropped
                spans.append(span)
                return
            else:  # a local root of the SDK's own (no request around it)
                spans = [*self._pending.pop(trace_id, ()), span]
                duration = (span.end_time or 0) - (span.start_time or 0)
                keep = self._keep(trace_id, duration, False, spans)
                self._decided[trace_id] = keep
                batch = spans if keep else []
        for item in batch:
            self.downstream.on_end(item)

    def finish(
        self, trace_id: int, duration_ns: int, error: bool, make_root: Callable[..., Any], *args: Any
    ) -> bool:
        """The request of ``trace_id`` is done: keep or drop its spans; returns whether it was kept.
        ``make_root(*args)`` builds the request's own span, called (at once) only if it is needed.

        A dropped request of ``block_ns`` or longer stays in a short list for a moment: the event-loop
        monitor reports a block only once the blocking callback returned, often after the request it
        stalled was answered, and :meth:`force` then brings the request back."""
        if (
            duration_ns < self._quick_ns  # neither slow nor long enough to have been stalled
            and not error
            and (trace_id & 0xFFFFFFFFFFFFFFFF) >= self.bound  # sampled_by_ratio's test, inline
            and not self._pending  # no span of a library to look at (nor of another request)
            and not self._forced
        ):
            # The common case: nothing to keep, nothing to build. Without the lock: at worst a racing
            # generation swap of _Recent loses a decision, and a late span of that trace is held.
            self._decided[trace_id] = False
            return False
        with self._lock:
            spans: Any = self._pending.pop(trace_id, ()) if self._pending else ()
            keep = self._keep(trace_id, duration_ns, error, spans)
            self._decided[trace_id] = keep
        if keep or duration_ns >= self.block_ns:
            try:
                root = make_root(*args)
            except Exception as exc:  # never the request's problem
                _say(f"a server span could not be recorded: {exc!r}")
                root = None
            if not keep:
                with self._lock:
                    self._dropped[trace_id] = (root, spans)
                return False
            for item in spans:
                self.downstream.on_end(item)
            if root is not None:
                self.downstream.on_end(root)
        return keep

    def force(self, trace_id: int, span: Any) -> None:
        """Export ``span`` now and keep its trace (the request's spans too, when it ends)."""
        with self._lock:
            decided = self._decided.get(trace_id)
            self._forced.add(trace_id)
            if len(self._forced) > _MAX_DECIDED:
                self._forced.clear()
            pending = self._pending.pop(trace_id, []) if decided is None else []
            dropped = self._dropped.pop(trace_id)
            if dropped is not None:
                self._decided[trace_id] = True  # its late spans follow it now
        if dropped is not None:
            root, children = dropped
            pending = [*children, *pending]
            if root is not None:
                pending.append(root)
        for item in [*pending, span]:
            self.downstream.on_end(item)

    def _keep(self, trace_id: int, duration_ns: int, error: bool, spans: Any) -> bool:
        if error or duration_ns >= self.slow_ns or (trace_id & 0xFFFFFFFFFFFFFFFF) < self.bound:
            return True  # the last test is sampled_by_ratio's, inline: this runs for every request
        if self._forced and trace_id in self._forced:
            self._forced.discard(trace_id)
            return True
        return bool(spans) and any(span.status.status_code.value == 2 for span in spans)  # StatusCode.ERROR

    def shutdown(self) -> None:
        self.downstream.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self.downstream.force_flush(timeout_millis))


def _late_provider() -> Any:
    """A TracerProvider whose tracers delegate to the real provider once :meth:`Telemetry.start` set it
    (the libraries are instrumented before the app is imported, and before a template forks: the SDK's
    threads must only start in the serving process). Until then, and without it, spans are no-ops."""
    from opentelemetry import trace

    class LateTracer(trace.Tracer):
        def __init__(self, late: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._late, self._args, self._kwargs = late, args, kwargs
            self._tracer: Any = None

        def _real(self) -> Any:
            if self._tracer is None:
                provider = self._late.provider
                if provider is None:
                    return trace.NoOpTracer()
                self._tracer = provider.get_tracer(*self._args, **self._kwargs)
            return self._tracer

        def start_span(self, *args: Any, **kwargs: Any) -> Any:
            return self._real().start_span(*args, **kwargs)

        def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
            return self._real().start_as_current_span(*args, **kwargs)

    class LateProvider(trace.TracerProvider):
        def __init__(self) -> None:
            self.provider: Any = None

        def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
            return LateTracer(self, args, kwargs)

    return LateProvider()


def _processor(cls: type) -> Any:
    """``cls`` as a subclass of the SDK's SpanProcessor too (its newer hooks, ``_on_ending``, default to
    nothing there); the SDK is importable only once the layer is on ``sys.path``."""
    from opentelemetry.sdk.trace import SpanProcessor

    return type(cls.__name__, (cls, SpanProcessor), {})


class _Poster:
    """POSTs protobuf bodies to one OTLP/HTTP endpoint over a kept-alive ``http.client`` connection
    (``urllib``'s new connection per batch took about twice the CPU per POST: ~0.4 ms against ~0.2).

    Thread-safe (the metrics pusher's last push comes from the shutting-down thread while its own may
    still be in one). A connection the receiver closed while idle is noticed on the next POST, which is
    then sent once more on a new connection."""

    _RETRYABLE = (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine)

    def __init__(self, endpoint: str, token: str, timeout: float = 5.0) -> None:
        url = urllib.parse.urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {endpoint!r}")
        self.endpoint = endpoint
        self._https = url.scheme == "https"
        self._address = (url.hostname, url.port)
        self._target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self._timeout = timeout
        self.headers = {"Content-Type": "application/x-protobuf"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def post(self, body: bytes) -> None:
        """Send ``body``; raises ``OSError`` (or ``http.client.HTTPException``) when it was not taken."""
        with self._lock:
            self._post_once_more(body)

    def _post_once_more(self, body: bytes) -> None:
        reused = self._conn is not None
        try:
            status = self._post(body)
        except self._RETRYABLE:
            if not reused:
                raise
            status = self._post(body)  # the kept-alive connection had been closed by the receiver
        if not 200 <= status < 300:
            raise OSError(f"HTTP {status} from {self.endpoint}")

    def _post(self, body: bytes) -> int:
        conn = self._conn
        if conn is None:
            host, port = self._address
            if self._https:
                conn = http.client.HTTPSConnection(host, port, timeout=self._timeout)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self._timeout)
        try:
            conn.request("POST", self._target, body, self.headers)
            response = conn.getresponse()
            response.read()
        except BaseException:
            conn.close()
            self._conn = None
            raise
        if response.will_close:
            conn.close()
            self._conn = None
        else:
            self._conn = conn
        return response.status

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _exporter(endpoint: str, token: str, resource: Any) -> Any:
    """An OTLP/HTTP protobuf span exporter on the standard library (:class:`_Poster`, 5 s timeout). The
    SDK's spans (the libraries', the loop monitor's) go through the SDK's encoder, the server spans
    (:class:`_ServerSpan`, of ``resource``) through :func:`encode_server_spans`."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    resource_field, scope_field = _resource_and_scope(resource, "fastapi-deploy.instance")
    poster = _Poster(endpoint, token)

    class _Exporter(SpanExporter):  # type: ignore[misc]
        def __init__(self) -> None:
            self.failures = 0

        def export(self, spans: Any) -> Any:
            sdk_spans = [span for span in spans if not isinstance(span, _ServerSpan)]
            body = encode_spans(sdk_spans).SerializePartialToString() if sdk_spans else b""
            if len(sdk_spans) < len(spans):
                ours = [span for span in spans if isinstance(span, _ServerSpan)]
                body += encode_server_spans(resource_field, scope_field, ours)
            try:
                poster.post(body)
            except (http.client.HTTPException, OSError) as exc:
                self.failures += 1
                if self.failures in (1, 10, 100) or self.failures % 1000 == 0:
                    _say(f"exporting {len(spans)} spans to {endpoint} failed ({self.failures}x): {exc}")
                return SpanExportResult.FAILURE
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            poster.close()

    return _Exporter()


CURRENT_SPAN: Any = None
"""contextvars.ContextVar of the request being served, ``[trace_id, span_id, base, derived, request_id]``:
the loop monitor reads it in the blocked task, :func:`_derive_request_context` the context it derives
from (``base``) and the one it derived, :func:`request_ids` the router's ``X-Request-ID`` (bytes)."""


def request_ids() -> tuple[str, str]:
    """(request id, trace id) of the request being served, ("-", "-") outside one: the launcher's
    access-log lines end with them."""
    request = CURRENT_SPAN.get()
    if request is None:
        return "-", "-"
    return request[4].decode("latin-1"), f"{request[0]:032x}"


def _init_context() -> None:
    global CURRENT_SPAN
    import contextvars

    CURRENT_SPAN = contextvars.ContextVar("fastapi_deploy_span", default=None)


_init_context()


def _describe_span(value: Any) -> str:
    return f"{value[0]:032x} {value[1]:016x}"


def _request_context(span_context: Any, parent: Any = None) -> Any:
    """An OpenTelemetry context whose current span is the request's (a non-recording span: cheap)."""
    from opentelemetry import trace

    return trace.set_span_in_context(trace.NonRecordingSpan(span_context), parent)


def _derive_request_context() -> Any:
    """Make OpenTelemetry's current context, inside a request, derive from the request's span: returns
    the context variable OpenTelemetry keeps its context in, or None where it keeps it elsewhere (a
    runtime context of the app's choosing: the request's context is then attached per request).

    Attaching a context costs every request ~5 µs, sampled or not, while most never ask for it (an app
    without instrumented libraries, or a request that made no query). So the request only notes its ids
    and the context current when it began (:data:`CURRENT_SPAN`); the first ``get_current()`` inside the
    request, while nothing else was attached, makes the request's context from them, once. What the app
    or a library attaches in the request derives from that, and stays theirs."""
    from opentelemetry import context
    from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
    from opentelemetry.trace import SpanContext, TraceFlags

    runtime = getattr(context, "_RUNTIME_CONTEXT", None)
    if getattr(runtime, "request_variable", None) is CURRENT_SPAN:  # done already (another app)
        return runtime._current_context  # type: ignore[union-attr]
    # Another runtime context, or another copy of this module's (loaded twice in one process).
    if type(runtime) is not ContextVarsRuntimeContext or not hasattr(runtime, "_current_context"):
        return None
    make = functools.partial(SpanContext, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))

    class RequestRuntimeContext(ContextVarsRuntimeContext):
        request_variable = CURRENT_SPAN

        def get_current(self) -> Any:
            current = self._current_context.get()
            request = CURRENT_SPAN.get()
            if request is None or request[2] is not current:
                return current
            derived = request[3]
            if derived is None:
                derived = request[3] = _request_context(make(request[0], request[1]), current)
            return derived

    derived = RequestRuntimeContext.__new__(RequestRuntimeContext)
    derived.__dict__.update(runtime.__dict__)  # the same context variable: what is attached stays
    context._RUNTIME_CONTEXT = derived
    return derived._current_context


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def _sibling(name: str) -> Any:
    """A module beside this file, loaded by path (the launcher's folder is not on ``sys.path``)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_fastapi_deploy_{name}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"no {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class _MetricsPusher:
    """Every 10 s, the loop monitor's snapshot as OTLP metrics (``/v1/metrics`` beside ``/v1/traces``):
    the lag histogram (cumulative, in ms), the thread pool's busy and total threads."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.endpoint = telemetry.endpoint.rsplit("/v1/traces", 1)[0] + "/v1/metrics"
        self._poster = _Poster(self.endpoint, telemetry.token)
        self.started_ns = time.time_ns()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastapi-deploy-metrics", daemon=True)
        self.failures = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(_METRICS_SECONDS):
            self.push()

    def push(self) -> None:
        monitor = self.telemetry.monitor
        if monitor is None:
            return
        try:
            body = self._encode(monitor.snapshot())
        except Exception as exc:
            _say(f"encoding the loop's metrics failed: {exc!r}")
            return
        try:
            self._poster.post(body)
        except (http.client.HTTPException, OSError) as exc:
            self.failures += 1
            if self.failures in (1, 10, 100):
                _say(f"sending the loop's metrics to {self.endpoint} failed ({self.failures}x): {exc}")

    def _encode(self, snapshot: dict[str, Any]) -> bytes:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
        from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
        from opentelemetry.proto.metrics.v1 import metrics_pb2 as pb
        from opentelemetry.proto.resource.v1.resource_pb2 import Resource

        now = time.time_ns()
        lag = snapshot["lag_ms"]
        buckets = lag["buckets"]  # cumulative counts per bound ("+Inf" last)
        bounds = [float(b) for b in buckets if b != "+Inf"]
        cumulative = list(buckets.values())
        counts = [cumulative[0]] + [b - a for a, b in itertools.pairwise(cumulative)]
        histogram = pb.Metric(
            name="fastapi_deploy.event_loop.lag",
            unit="ms",
            histogram=pb.Histogram(
                aggregation_temporality=pb.AGGREGATION_TEMPORALITY_CUMULATIVE,
                data_points=[
                    pb.HistogramDataPoint(
                        start_time_unix_nano=self.started_ns,
                        time_unix_nano=now,
                        count=int(lag["count"]),
                        sum=float(lag["sum"]),
                        max=float(lag["max"]),
                        bucket_counts=[int(c) for c in counts],
                        explicit_bounds=bounds,
                    )
                ],
            ),
        )
        metrics = [histogram]
        gauges = {"fastapi_deploy.event_loop.blocks": snapshot.get("blocks_total", 0)}
        pool = snapshot.get("threadpool") or {}
        for key, name in (("borrowed", "busy"), ("total", "size"), ("saturated_beats", "saturated_beats")):
            if key in pool:
                gauges[f"fastapi_deploy.threadpool.{name}"] = pool[key]
        for name, value in gauges.items():
            metrics.append(
                pb.Metric(
                    name=name,
                    gauge=pb.Gauge(data_points=[pb.NumberDataPoint(time_unix_nano=now, as_int=int(value))]),
                )
            )
        resource = [
            KeyValue(key=k, value=AnyValue(string_value=str(v)))
            for k, v in self.telemetry.resource.attributes.items()
        ]
        request = ExportMetricsServiceRequest(
            resource_metrics=[
                pb.ResourceMetrics(
                    resource=Resource(attributes=resource),
                    scope_metrics=[
                        pb.ScopeMetrics(
                            scope=InstrumentationScope(name="fastapi-deploy.looplag"), metrics=metrics
                        )
                    ],
                )
            ]
        )
        data: bytes = request.SerializeToString()
        return data
