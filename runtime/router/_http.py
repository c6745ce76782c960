"""HTTP/1.1 head rewriting for the proxy (RFC 7230 §6.1 hop-by-hop headers) and the JSON error answers.

Everything here works on ``bytes`` as ``httptools`` hands them over, so no request pays for decoding.
"""

from __future__ import annotations

import binascii
import json
import os
import random
import re
from http import HTTPStatus

import httptools

# What the rewriting does with a header, by lower-case name (one dict lookup per header); any other
# header is copied, unless it starts with "proxy-" (hop-by-hop by convention).
_COPY = 0  # copied, but the router needs its value
_DROP = 1  # hop-by-hop, or set by the router itself
_CONNECTION = 2
_UPGRADE = 3
_TRANSFER_ENCODING = 4
_HOST = 5
_CONTENT_LENGTH = 6
_FORWARDED_FOR = 7
_REQUEST_ID = 8
_EXPECT = 9  # the router answers 100-continue itself once an instance is ready
_TRACEPARENT = 10  # W3C trace context: the client's trace continues, with the router's edge span in it

_REQUEST_HEADERS = {
    b"host": _HOST,
    b"content-length": _CONTENT_LENGTH,
    b"x-forwarded-for": _FORWARDED_FOR,
    b"x-request-id": _REQUEST_ID,
    b"connection": _CONNECTION,
    b"upgrade": _UPGRADE,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"expect": _EXPECT,
    b"traceparent": _TRACEPARENT,
    b"keep-alive": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"x-forwarded-proto": _DROP,
    b"x-forwarded-host": _DROP,
}
_RESPONSE_HEADERS = {
    b"content-length": _CONTENT_LENGTH,
    b"connection": _CONNECTION,
    b"upgrade": _UPGRADE,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"keep-alive": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"x-request-id": _DROP,
    b"x-queue-time": _DROP,  # the router's to say
    b"x-cold-start": _DROP,
    b"x-trace-id": _DROP,
}
_PROXY = 11  # "proxy-*": hop-by-hop by convention
_OTHER = 12  # any other header: copied as it is

#: Header names as they are spelled on the wire -> kind, learned as heads go by. Clients and apps use a
#: handful of spellings, so a head costs one dict lookup per header instead of a ``lower()`` and a
#: lookup; bounded in entries and in name length, since the names are the peer's choice (past the
#: bounds, names are lowered each time as before).
_KIND_CACHE_SIZE = 2048
_CACHED_NAME_BYTES = 64
_request_kinds: dict[bytes, int] = {}
_response_kinds: dict[bytes, int] = {}
#: status -> (reason, status line) of the last response with that status: apps repeat themselves.
_status_lines: dict[int, tuple[bytes, bytes]] = {}


def _kind(name: bytes, kinds: dict[bytes, int], cache: dict[bytes, int]) -> int:
    lname = name.lower()
    kind = kinds.get(lname)
    if kind is None:
        kind = _PROXY if lname[:6] == b"proxy-" else _OTHER
    if len(cache) < _KIND_CACHE_SIZE and len(name) <= _CACHED_NAME_BYTES:
        cache[name] = kind
    return kind


_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})
#: The usual Connection values, split already.
_COMMON_CONNECTION = {
    v: [v.lower()] for v in (b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade")
}


def _connection_tokens(value: bytes) -> list[bytes]:
    """The options of a ``Connection`` header value, lower-case."""
    tokens = _COMMON_CONNECTION.get(value)
    if tokens is not None:
        return tokens  # += copies it: never mutated
    return [t.strip().lower() for t in value.split(b",")]


_VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")
# version-traceid-parentid-flags (W3C Trace Context §3.2); version ff is invalid, all-zero ids too.
_TRACEPARENT_RE = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16

# How the response body travels to the client.
BODY_NONE = 0  # HEAD, 1xx, 204, 304: nothing follows the head
BODY_LENGTH = 1  # Content-Length passed through, bytes copied as they come
BODY_CHUNKED = 2  # re-chunked: upstream chunked or read-until-close, client speaks HTTP/1.1
BODY_CLOSE = 3  # delimited by closing the connection (HTTP/1.0 client)


class BadRequest(Exception):
    """The request head parsed but cannot be proxied; the message says why."""


class RequestHead:
    """A client request head rewritten for the upstream, plus what the router needs to know about it."""

    __slots__ = (
        "chunked",
        "connection",
        "content_length",
        "data",
        "expect_continue",
        "host",
        "parent_span_id",
        "path",
        "request_id",
        "span_id",
        "trace_id",
    )

    def __init__(
        self,
        data: bytes,
        host: bytes,
        request_id: bytes,
        length: int,
        chunked: bool,
        expect: bool,
        connection: bool,
        path: bytes,
        trace_id: bytes,
        span_id: bytes,
        parent_span_id: bytes,
    ) -> None:
        self.data = data
        self.host = host  # the routing key
        self.request_id = request_id
        self.content_length = length  # -1: none declared
        self.chunked = chunked
        self.expect_continue = expect
        self.connection = connection  # a Connection (or Proxy-*) header was there: llhttp's keep-alive
        # answer then says nothing about the HTTP version
        self.path = path  # the target without its query string
        self.trace_id = trace_id  # 32 hex digits: the client's trace, or a new one
        self.span_id = span_id  # 16 hex digits: the router's edge span, the app's parent
        self.parent_span_id = parent_span_id  # the client's span (b"" when the trace starts here)


class _Ids:
    """Random hex for the ids of requests, made a few kilobytes at a time: each request takes 48
    characters, a request id (the first 32) and a span id (the last 16), for the price of a slice."""

    __slots__ = ("at", "hex")

    _BATCH = 24 * 256  # random bytes per batch: 256 requests

    def __init__(self) -> None:
        self.hex = b""
        self.at = 0

    def take(self) -> bytes:
        at = self.at
        if at >= len(self.hex):
            self.hex = binascii.hexlify(random.randbytes(self._BATCH))
            at = 0
        self.at = at + 48
        return self.hex[at : at + 48]


_ids = _Ids()
_new_ids = _ids.take


def _ids_after_fork() -> None:
    # A forked child must not hand out its parent's ids (random itself reseeds in the child).
    _ids.at = len(_ids.hex)


os.register_at_fork(after_in_child=_ids_after_fork)


def new_request_id() -> bytes:
    """128 random bits in hex (32 characters, like ``uuid.uuid4().hex``), without uuid4's per-call
    ``os.urandom`` system call: an id needs to be unique, not secret."""
    return _new_ids()[:32]


def parse_traceparent(value: bytes) -> tuple[bytes, bytes] | None:
    """(trace id, parent span id) of a valid ``traceparent`` header value, else None (the trace then
    starts at the router, as the spec says a receiver does with an invalid one)."""
    match = _TRACEPARENT_RE.fullmatch(value.strip().lower())
    if match is None or match.group(1) == b"ff":
        return None
    trace_id, parent = match.group(2), match.group(3)
    if trace_id == _ZERO_TRACE or parent == _ZERO_SPAN:
        return None
    return trace_id, parent


#: ``Host`` value -> routing key: a few distinct values carry nearly all requests (a dict lookup is
#: cheaper than an lru_cache call); bounded, emptied when full, and only for values the length of a
#: host name and port (a client may send longer ones).
_route_keys: dict[bytes, bytes] = {}


def route_key(host: bytes) -> bytes:
    """``Host`` header value -> routing key: lower-case, no port, no trailing dot."""
    key = _route_keys.get(host)
    if key is None:
        key = _route_key(host)
        if len(host) <= 270:
            if len(_route_keys) >= 1024:
                _route_keys.clear()
            _route_keys[host] = key
    return key


def _route_key(host: bytes) -> bytes:
    host = host.strip().lower()
    if host.startswith(b"["):  # IPv6 literal: the port follows the bracket
        host = host[: host.find(b"]") + 1]
    else:
        host = host.partition(b":")[0]
    return host.rstrip(b".")


def _without(pieces: list[bytes], names: list[bytes]) -> list[bytes]:
    """``pieces`` (a first line, then four pieces per header: name, ": ", value, CRLF) minus the headers
    named (lower-case). For the rare heads that need it: RFC 7230 §6.1 says headers named in Connection
    are hop-by-hop too."""
    kept = pieces[:1]
    for at in range(1, len(pieces), 4):
        if pieces[at].lower() not in names:
            kept += pieces[at : at + 4]
    return kept


def rewrite_request(
    method: bytes,
    url: bytes,
    headers: list[tuple[bytes, bytes]],
    client_ip: bytes,
    *,
    upgrade: bool,
) -> RequestHead:
    """Build the head sent upstream: original headers minus hop-by-hop ones, plus ``X-Forwarded-*`` and
    ``X-Request-ID``; the original ``Host`` is kept (apps check it). Raises `BadRequest`."""
    out = [method + b" " + url + b" HTTP/1.1\r\n"]
    host: bytes | None = None
    forwarded_for = request_id = upgrade_to = transfer_encoding = traceparent = b""
    connection_tokens: list[bytes] | None = None
    length = -1
    expect = proxy = False
    cache = _request_kinds
    for name, value in headers:
        kind = cache.get(name)
        if kind is None:
            kind = _kind(name, _REQUEST_HEADERS, cache)
        if kind == _OTHER:
            out += (name, b": ", value, b"\r\n")
        elif kind == _HOST:
            if host is not None:
                raise BadRequest("The request has more than one Host header.")
            host = value
            out += (name, b": ", value, b"\r\n")
        elif kind == _CONTENT_LENGTH:
            length = int(value)  # llhttp has validated it already
            out += (name, b": ", value, b"\r\n")
        elif kind == _PROXY:
            proxy = True
        elif kind == _FORWARDED_FOR:
            forwarded_for = forwarded_for + b", " + value if forwarded_for else value
        elif kind == _REQUEST_ID:
            if not request_id and _VALID_REQUEST_ID.fullmatch(value):
                request_id = value
        elif kind == _CONNECTION:
            if connection_tokens is None:
                connection_tokens = []
            connection_tokens += _connection_tokens(value)
        elif kind == _UPGRADE:
            upgrade_to = value
        elif kind == _TRANSFER_ENCODING:
            transfer_encoding = value
        elif kind == _EXPECT:
            expect = value.lower() == b"100-continue"
        elif kind == _TRACEPARENT:
            traceparent = value  # replaced below: the app's parent is the router's edge span

    if url[:1] != b"/" and url != b"*" and method != b"CONNECT":
        # absolute-form (RFC 7230 §5.3.2): the URL's authority wins over the Host header
        try:
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError as exc:
            raise BadRequest("The request target is not a valid URL.") from exc
        if parsed.host:
            host = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
            target = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
            out = _without(out, [b"host"])
            out[0] = b"%s %s HTTP/1.1\r\n" % (method, target)
            out += (b"Host", b": ", host, b"\r\n")
    if not host:
        raise BadRequest("The request has no Host header.")

    if connection_tokens is not None:
        extra = [t for t in connection_tokens if t and t not in _CONNECTION_OPTIONS]
        if extra:
            out = _without(out, extra)

    parent = parse_traceparent(traceparent) if traceparent else None
    ids = _new_ids()  # one random call for a request id (if needed) and the edge span's id
    span_id = ids[32:]
    if request_id:
        trace_id, parent_span_id = parent if parent is not None else (ids[:32], b"")
    else:
        # One random id serves as both when the client sent neither.
        request_id = ids[:32]
        trace_id, parent_span_id = parent if parent is not None else (request_id, b"")
    # Always sampled (flags 01): the instance records every request and samples at the tail
    # (errors, slow requests, and a share of the rest are kept; runtime/telemetry.py).
    client = forwarded_for + b", " + client_ip if forwarded_for else client_ip
    out.append(
        b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: %s\r\nX-Request-ID: %s\r\n"
        b"traceparent: 00-%s-%s-01\r\n" % (client, host, request_id, trace_id, span_id)
    )
    if upgrade:
        # The rest of the client's bytes are relayed raw, so its framing headers must stay as they were.
        out.append(b"Connection: upgrade\r\nUpgrade: %s\r\n" % upgrade_to)
        if transfer_encoding:
            out.append(b"Transfer-Encoding: %s\r\n" % transfer_encoding)
    elif transfer_encoding:
        out.append(b"Transfer-Encoding: chunked\r\n")  # llhttp only accepts requests ending in chunked
    out.append(b"\r\n")
    query = url.find(b"?")
    return RequestHead(
        b"".join(out),
        route_key(host),
        request_id,
        length,
        bool(transfer_encoding),
        expect,
        connection_tokens is not None or proxy,
        url if query < 0 else url[:query],
        trace_id,
        span_id,
        parent_span_id,
    )


def rewrite_response(
    status: int,
    reason: bytes,
    headers: list[tuple[bytes, bytes]],
    request_id: bytes,
    *,
    no_body: bool,
    keep_alive: bool,
    http10: bool,
    extra: bytes = b"",
) -> tuple[bytes, int, int]:
    """The response head for the client: upstream headers minus hop-by-hop ones, our framing and
    ``Connection``, ``X-Request-ID`` and ``extra`` (whole header lines). Returns (head, upstream body
    framing, client body framing)."""
    line = _status_lines.get(status)
    if line is None or line[0] != reason:
        line = (reason, b"HTTP/1.1 %d %s\r\n" % (status, reason))
        if 100 <= status <= 999 and len(reason) <= 64:  # a bounded cache
            _status_lines[status] = line
    out = [line[1]]
    connection_tokens: list[bytes] | None = None
    upgrade_to = b""
    has_length = chunked = False
    cache = _response_kinds
    for name, value in headers:
        kind = cache.get(name)
        if kind is None:
            kind = _kind(name, _RESPONSE_HEADERS, cache)
        if kind == _OTHER:
            out += (name, b": ", value, b"\r\n")
        elif kind == _CONTENT_LENGTH:
            has_length = True
            out += (name, b": ", value, b"\r\n")
        elif kind == _CONNECTION:
            if connection_tokens is None:
                connection_tokens = []
            connection_tokens += _connection_tokens(value)
        elif kind == _UPGRADE:
            upgrade_to = value
        elif kind == _TRANSFER_ENCODING:
            # chunked must be the last coding, else the body runs until close (RFC 7230 §3.3.3)
            chunked = value.rstrip().lower().endswith(b"chunked")
    if connection_tokens is not None:
        hop = [t for t in connection_tokens if t and t not in _CONNECTION_OPTIONS]
        if hop:
            out = _without(out, hop)
    out += (b"X-Request-ID: ", request_id, b"\r\n", extra)
    if status == 101:
        out.append(b"Connection: upgrade\r\nUpgrade: %s\r\n\r\n" % upgrade_to)
        return b"".join(out), BODY_NONE, BODY_NONE
    if no_body:
        upstream = client = BODY_NONE
    elif has_length and not chunked:
        upstream = client = BODY_LENGTH
    else:
        upstream = BODY_CHUNKED if chunked else BODY_CLOSE
        client = BODY_CLOSE if http10 else BODY_CHUNKED
        if http10:
            keep_alive = False
        else:
            out.append(b"Transfer-Encoding: chunked\r\n")
    if not keep_alive:
        out.append(b"Connection: close\r\n\r\n")
    elif http10:
        out.append(b"Connection: keep-alive\r\n\r\n")
    else:
        out.append(b"\r\n")
    return b"".join(out), upstream, client


# code -> (status, title, hint)
ERRORS: dict[str, tuple[int, str, str]] = {
    "bad_request": (400, "Bad request", "Send a well-formed HTTP/1.1 request with a Host header."),
    "no_such_app": (
        404,
        "No such app",
        "Check the URL. If the app was just deployed, its address may take a moment to become active.",
    ),
    "payload_too_large": (413, "Payload too large", "Send a smaller body, or upload large files elsewhere."),
    "headers_too_large": (431, "Request headers too large", "Send fewer or smaller headers (cookies?)."),
    "bad_gateway": (502, "Bad gateway", "The app may be crashing or restarting; check its logs."),
    "no_capacity": (
        503,
        "No capacity",
        "The app is starting or scaling up: retry in a moment. If it persists, check its logs.",
    ),
    "gateway_timeout": (504, "Gateway timeout", "Make the endpoint answer faster, or stream the response."),
}


def error_response(
    code: str,
    message: str,
    request_id: bytes,
    *,
    keep_alive: bool,
    http10: bool = False,
    head_only: bool = False,
    retry_after: int | None = None,
    extra: bytes = b"",
) -> tuple[int, bytes]:
    """A complete JSON error response (status, bytes) in our ``{"error": {...}}`` shape; ``extra``: more
    header lines."""
    status, title, hint = ERRORS[code]
    body = json.dumps(
        {"error": {"code": code, "title": title, "message": message, "hint": hint}}, separators=(",", ":")
    ).encode()
    head = [
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nX-Request-ID: %s\r\n"
        % (status, HTTPStatus(status).phrase.encode(), len(body), request_id)
    ]
    if retry_after is not None:
        head.append(b"Retry-After: %d\r\n" % retry_after)
    if extra:
        head.append(extra)
    if not keep_alive:
        head.append(b"Connection: close\r\n")
    elif http10:
        head.append(b"Connection: keep-alive\r\n")
    head.append(b"\r\n")
    if not head_only:
        head.append(body)
    return status, b"".join(head)
