"""HTTP/1.1 head rewriting for the proxy (RFC 7230 §6.1 hop-by-hop headers) and the JSON error answers.

Everything here works on ``bytes`` as ``httptools`` hands them over, so no request pays for decoding.
"""

from __future__ import annotations

import json
import random
import re
from http import HTTPStatus

import httptools

# Dropped on the way in; the router re-frames the body and adds its own forwarding headers.
_REQUEST_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",  # the router answers 100-continue itself once an instance is ready
        b"x-forwarded-proto",
        b"x-forwarded-host",
    }
)
_RESPONSE_HOP = frozenset(
    {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"x-request-id"}
)
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")

# How the response body travels to the client.
BODY_NONE = 0  # HEAD, 1xx, 204, 304: nothing follows the head
BODY_LENGTH = 1  # Content-Length passed through, bytes copied as they come
BODY_CHUNKED = 2  # re-chunked: upstream chunked or read-until-close, client speaks HTTP/1.1
BODY_CLOSE = 3  # delimited by closing the connection (HTTP/1.0 client)


class BadRequest(Exception):
    """The request head parsed but cannot be proxied; the message says why."""


class RequestHead:
    """A client request head rewritten for the upstream, plus what the router needs to know about it."""

    __slots__ = ("chunked", "content_length", "data", "expect_continue", "host", "request_id")

    def __init__(self, data: bytes, host: bytes, request_id: bytes, length: int, chunked: bool, expect: bool):
        self.data = data
        self.host = host  # the routing key
        self.request_id = request_id
        self.content_length = length  # -1: none declared
        self.chunked = chunked
        self.expect_continue = expect


def new_request_id() -> bytes:
    """A uuid4 in hex, as ``uuid.uuid4().hex`` but without its per-call ``os.urandom`` system call: an id
    needs to be unique, not secret."""
    value = random.getrandbits(128)
    value = (value & ~(0xC000 << 48)) | (0x8000 << 48)  # RFC 4122 variant
    value = (value & ~(0xF000 << 64)) | (4 << 76)  # version 4
    return b"%032x" % value


def route_key(host: bytes) -> bytes:
    """``Host`` header value -> routing key: lower-case, no port, no trailing dot."""
    host = host.strip().lower()
    if host.startswith(b"["):  # IPv6 literal: the port follows the bracket
        host = host[: host.find(b"]") + 1]
    else:
        host = host.partition(b":")[0]
    return host.rstrip(b".")


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
    lines = [b"%s %s HTTP/1.1\r\n" % (method, url)]
    host: bytes | None = None
    forwarded_for = request_id = upgrade_to = transfer_encoding = b""
    connection_tokens: list[bytes] = []
    length = -1
    expect = False
    for name, value in headers:
        lname = name.lower()
        if lname == b"host":
            if host is not None:
                raise BadRequest("The request has more than one Host header.")
            host = value
        elif lname == b"content-length":
            length = int(value)  # llhttp has validated it already
        elif lname == b"x-forwarded-for":
            forwarded_for = forwarded_for + b", " + value if forwarded_for else value
            continue
        elif lname == b"x-request-id":
            if not request_id and _REQUEST_ID.fullmatch(value):
                request_id = value
            continue
        elif lname in _REQUEST_HOP or lname.startswith(b"proxy-"):
            if lname == b"connection":
                connection_tokens.extend(t.strip().lower() for t in value.split(b","))
            elif lname == b"upgrade":
                upgrade_to = value
            elif lname == b"transfer-encoding":
                transfer_encoding = value
            elif lname == b"expect":
                expect = value.lower() == b"100-continue"
            continue
        lines.append(b"%s: %s\r\n" % (name, value))

    if url[:1] != b"/" and url != b"*" and method != b"CONNECT":
        # absolute-form (RFC 7230 §5.3.2): the URL's authority wins over the Host header
        try:
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError as exc:
            raise BadRequest("The request target is not a valid URL.") from exc
        if parsed.host:
            host = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
            target = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
            lines[0] = b"%s %s HTTP/1.1\r\n" % (method, target)
            lines = [line for line in lines if not line[:5].lower() == b"host:"]
            lines.append(b"Host: %s\r\n" % host)
    if not host:
        raise BadRequest("The request has no Host header.")

    extra = [t for t in connection_tokens if t and t not in _CONNECTION_OPTIONS]
    if extra:  # RFC 7230 §6.1: headers named in Connection are hop-by-hop too
        lines = [lines[0], *(line for line in lines[1:] if line.partition(b":")[0].lower() not in extra)]

    client = forwarded_for + b", " + client_ip if forwarded_for else client_ip
    request_id = request_id or new_request_id()
    lines.append(
        b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: %s\r\nX-Request-ID: %s\r\n"
        % (client, host, request_id)
    )
    if upgrade:
        # The rest of the client's bytes are relayed raw, so its framing headers must stay as they were.
        lines.append(b"Connection: upgrade\r\nUpgrade: %s\r\n" % upgrade_to)
        if transfer_encoding:
            lines.append(b"Transfer-Encoding: %s\r\n" % transfer_encoding)
    elif transfer_encoding:
        lines.append(b"Transfer-Encoding: chunked\r\n")  # llhttp only accepts requests ending in chunked
    lines.append(b"\r\n")
    return RequestHead(b"".join(lines), route_key(host), request_id, length, bool(transfer_encoding), expect)


def rewrite_response(
    status: int,
    reason: bytes,
    headers: list[tuple[bytes, bytes]],
    request_id: bytes,
    *,
    no_body: bool,
    keep_alive: bool,
    http10: bool,
) -> tuple[bytes, int, int]:
    """The response head for the client: upstream headers minus hop-by-hop ones, our framing and
    ``Connection``, and ``X-Request-ID``. Returns (head, upstream body framing, client body framing)."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    connection_tokens: list[bytes] = []
    upgrade_to = b""
    has_length = chunked = False
    for name, value in headers:
        lname = name.lower()
        if lname == b"content-length":
            has_length = True
        elif lname in _RESPONSE_HOP or lname.startswith(b"proxy-"):
            if lname == b"connection":
                connection_tokens.extend(t.strip().lower() for t in value.split(b","))
            elif lname == b"upgrade":
                upgrade_to = value
            elif lname == b"transfer-encoding":
                # chunked must be the last coding, else the body runs until close (RFC 7230 §3.3.3)
                chunked = value.rstrip().lower().endswith(b"chunked")
            continue
        lines.append(b"%s: %s\r\n" % (name, value))
    extra = [t for t in connection_tokens if t and t not in _CONNECTION_OPTIONS]
    if extra:
        lines = [lines[0], *(line for line in lines[1:] if line.partition(b":")[0].lower() not in extra)]
    lines.append(b"X-Request-ID: %s\r\n" % request_id)
    if status == 101:
        lines.append(b"Connection: upgrade\r\nUpgrade: %s\r\n\r\n" % upgrade_to)
        return b"".join(lines), BODY_NONE, BODY_NONE
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
            lines.append(b"Transfer-Encoding: chunked\r\n")
    if not keep_alive:
        lines.append(b"Connection: close\r\n\r\n")
    elif http10:
        lines.append(b"Connection: keep-alive\r\n\r\n")
    else:
        lines.append(b"\r\n")
    return b"".join(lines), upstream, client


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
) -> tuple[int, bytes]:
    """A complete JSON error response (status, bytes) in our ``{"error": {...}}`` shape."""
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
    if not keep_alive:
        head.append(b"Connection: close\r\n")
    elif http10:
        head.append(b"Connection: keep-alive\r\n")
    head.append(b"\r\n")
    if not head_only:
        head.append(body)
    return status, b"".join(head)
