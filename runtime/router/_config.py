"""The router's settings and the shape of one upstream instance, as the control plane sees them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


class RequestHeadInfo(Protocol):
    """What the router parsed of a request head (bytes, as they came: no decoding per request)."""

    path: bytes
    """The request target without its query string."""
    request_id: bytes
    trace_id: bytes
    """32 hex digits: the client's trace (``traceparent``) or one started by the router."""
    span_id: bytes
    """16 hex digits: the router's edge span, sent to the instance as the parent in ``traceparent``."""
    parent_span_id: bytes
    """The client's span, or ``b""`` when the trace started at the router."""


class RequestInfo(Protocol):
    """One finished request, as ``on_request_done`` sees it. Times are ``time.monotonic()`` seconds."""

    @property
    def head(self) -> RequestHeadInfo | None:
        """None only for requests that failed before their head was parsed (never routed)."""

    method: bytes
    status: int
    """The status the client got (499: the client went away first)."""
    upstream_id: str | None
    """The instance that served it (the last one tried), None when none was reached."""
    started: float
    """When the request head was parsed."""
    attached_at: float
    """When it was sent to an instance (0.0: never)."""
    waited: float
    """Seconds in the app's queue, or -1.0 if it never waited."""
    cold: bool
    """It arrived while the app had no instance at all."""
    retried: bool
    """Sent a second time after a pooled connection turned out closed."""
    broken: bool
    """The response was cut off mid-way."""
    received: int
    """Request body bytes from the client."""
    sent: int
    """Response bytes from the instance (head and body)."""


#: ``on_request_done(app_id, info, now)``: called once per request that was routed to an app, when it
#: finished. ``info`` is only valid during the call (it is the router's own record: read what you need,
#: keep nothing). Runs on the event loop, once per request: keep it cheap.
RequestDoneHook = Callable[[str, RequestInfo, float], None]

#: ``on_queue(app_id)``: a request started waiting in the app's queue (the app has no instance), so the
#: control plane can start capacity at once. Runs on the event loop, once per queued request: keep it cheap.
QueueHook = Callable[[str], None]


@dataclass(frozen=True)
class RouterConfig:
    """Limits and timeouts of the edge router. Sizes in bytes, durations in seconds."""

    max_header_bytes: int = 64 * 1024
    """Request line plus headers. Over it: ``431`` and the connection is closed."""

    max_body_bytes: int = 100 * 1024 * 1024
    """A declared ``Content-Length`` over it, or a chunked body growing over it: ``413``, then close."""

    connect_timeout: float = 5.0
    """Opening a TCP connection to an instance. Over it: the next instance of the pool, else ``502``."""

    read_timeout: float = 300.0
    """From the request being sent (the last byte of its body) until the response headers. Over it: ``504``.
    While the client is still uploading, it is also how long the upload may make no progress."""

    idle_timeout: float = 75.0
    """A client keep-alive connection with no request in progress is closed after this long. It also
    bounds how long a client may take to send a request head (slow-loris)."""

    upstream_idle_timeout: float = 4.0
    """Pooled upstream connections idle this long are retired: before uvicorn's 5 s keep-alive closes them
    from its side, which would race with a request we send on them."""

    upstream_connects: int = 8
    """New connections being opened to one instance at once. Requests beyond that wait (FIFO) for one of
    them or for a pooled connection to free up, whichever comes first: a loaded uvicorn accepts slowly,
    so a burst of connects costs more than the wait, and the pool still grows to the peak concurrency."""

    backlog: int = 2048
    """The listening socket's accept queue. The router empties it at each readiness event."""

    queue_timeout: float = 10.0
    """How long a request waits for an instance when its app has none. Over it: ``503`` + ``Retry-After``."""

    max_queue_total: int = 10_000
    """Requests waiting across all apps: past it, ``503`` at once (no app can exhaust the router)."""
    max_queue_per_app: int = 1000
    """Requests allowed to wait per app; one more gets ``503`` at once."""

    retry_after: int = 1
    """The ``Retry-After`` value (seconds) of ``503 no_capacity`` answers."""

    buffer_bytes: int = 256 * 1024
    """Request body held while no upstream connection is ready (connecting, queued, pipelined) before
    the router stops reading from the client."""


@dataclass(eq=False)
class Upstream:
    """One instance of an app: a uvicorn process listening on ``host:port``.

    Compared by identity (``eq=False``) so it can be hashed; the router keys its own bookkeeping by ``id``.
    """

    id: str
    host: str
    port: int
    in_flight: int = 0
    """Maintained by the router: requests sent to this instance and not finished yet."""


@dataclass(slots=True)
class AppStats:
    """Counters of one app id since the router started (for metrics; cheap to keep)."""

    requests: int = 0
    """Requests routed to the app (that got a response or lost their client)."""
    errors: int = 0
    """Of those, answered with a 5xx status (by the app or by the router) or with the connection dropped."""
    queued: int = 0
    """Requests waiting right now for an instance of the app."""
    queued_total: int = 0
    """Requests that waited in the app's queue (answered ``X-Queue-Time``)."""
    cold_starts: int = 0
    """Of those, requests that arrived while the app had no instance at all (answered ``X-Cold-Start: 1``);
    the others found every instance at its concurrency limit."""
    queue_wait_seconds: float = 0.0
    """Seconds spent waiting in the app's queue, summed over the requests that left it (served, timed out,
    cancelled or refused)."""

    def counters(self) -> list[float]:
        """The cumulative counters in a fixed order (``queued``, a gauge, is not one): what a remote
        router reports, and what :meth:`add` takes."""
        return [self.requests, self.errors, self.queued_total, self.cold_starts, self.queue_wait_seconds]

    def add(self, counters: Sequence[float]) -> None:
        """Add counters given in :meth:`counters`' order (another router's, or how much they grew)."""
        requests, errors, queued_total, cold_starts, waited = counters
        self.requests += int(requests)
        self.errors += int(errors)
        self.queued_total += int(queued_total)
        self.cold_starts += int(cold_starts)
        self.queue_wait_seconds += waited
