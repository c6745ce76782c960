"""The edge router: an HTTP/1.1 reverse proxy from the Host name to an app's instances.

Embedded in the control plane (same process, same event loop). Built on asyncio protocols and httptools
for speed; streams both ways with flow control, pools keep-alive connections per instance, balances by
least outstanding requests, queues requests for an app with no ready instance (and tells the control
plane at once), passes WebSockets through.

    _router.py    Router: start/stop, set_app/remove_app, in_flight/wait_drained, hooks, the sweep
    _config.py    RouterConfig, Upstream, AppStats, the hook signatures
    _listener.py  Listener: the listening sockets, accepted greedily
    _pool.py      State, AppPool (balancing, waiting queue), Instance (in-flight, idle connections)
    _connections.py  which request gets which upstream connection, when one is opened
    _client.py    ClientConnection: parses requests, runs them in order; small while idle
    _exchange.py  Exchange: one request/response cycle, routing, queue headers and error answers
    _upstream.py  UpstreamConnection: relays one response at a time, then idles in the pool
    _http.py      hop-by-hop header rewriting, the JSON error answers

Performance is measured by ``bench/router.py`` against nginx (see ``bench/README.md``): the tail
latency is decided by connection policy (greedy accept, pooled upstream connections with no request
cap, queueing instead of connect bursts), the CPU per request by the Python on the request path.
"""

from ._config import (
    AppStats,
    QueueHook,
    RequestDoneHook,
    RequestHeadInfo,
    RequestInfo,
    RouterConfig,
    Upstream,
)
from ._router import Router

__all__ = [
    "AppStats",
    "QueueHook",
    "RequestDoneHook",
    "RequestHeadInfo",
    "RequestInfo",
    "Router",
    "RouterConfig",
    "Upstream",
]
