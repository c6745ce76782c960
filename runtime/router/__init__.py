"""The edge router: an HTTP/1.1 reverse proxy from the Host name to an app's instances.

Embedded in the control plane (same process, same event loop). Built on asyncio protocols and httptools
for speed; streams both ways with flow control, pools keep-alive connections per instance, balances by
least outstanding requests, queues requests for an app with no ready instance, passes WebSockets through.

    _router.py    Router: start/stop, set_app/remove_app, in_flight/wait_drained
    _config.py    RouterConfig, Upstream, AppStats
    _pool.py      State, AppPool (balancing, waiting queue), Instance (in-flight, idle connections)
    _client.py    ClientConnection: parses requests, runs them in order
    _exchange.py  Exchange: one request/response cycle, routing and error answers
    _upstream.py  UpstreamConnection: relays one response at a time, then idles in the pool
    _http.py      hop-by-hop header rewriting, the JSON error answers
"""

from ._config import AppStats, RequestDoneHook, RouterConfig, Upstream
from ._router import Router

__all__ = ["AppStats", "RequestDoneHook", "Router", "RouterConfig", "Upstream"]
