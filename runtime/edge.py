"""``fastapi-deploy router``: the edge router as a process of its own, several of them in a cluster.

The control plane embeds a router (``runtime/router``); on Kubernetes the apps' traffic goes through
this one instead, run as a Deployment of several replicas (``charts/fastapi-deploy``), so requests are
served while the control plane restarts or fails over. It is the same :class:`~runtime.router.Router`
(queueing, scale from zero, limits, trace context, WebSockets), fed from two sources::

    control plane ──WebSocket /internal/routers──> which instances serve each host (the fleet's choice:
    (the leader)                                   warm and draining instances never get traffic)
    Kubernetes ──EndpointSlice watch────────────> each instance's pod address and condition: a pod the
                                                  slices call not ready or terminating gets no new
                                                  request, even before the control plane reacts

and reporting back every :data:`REPORT_SECONDS`: requests in flight per instance and queued per app
(the autoscaler's input, summed over every router), counters, and each finished request (the control
plane's live metrics and edge spans, as for its own router). A request that starts waiting for an app
with no instance is signalled at once (scale from zero).

When the control plane is unreachable the router keeps serving its last table (and keeps following the
slices), reconnects with backoff and takes the new leader's snapshot. ``/readyz`` on the health port
answers 200 once a first snapshot arrived; ``/routes`` shows the table and what the slices say.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from runtime.router import RequestInfo, Router, RouterConfig, Upstream

log = logging.getLogger("fastapi_deploy.edge")

REPORT_SECONDS = 0.25
MAX_PENDING_REQUESTS = 50_000
"""Finished requests kept for the next report; beyond it they are counted as dropped (the counters
still include them)."""
PROTOCOL = 1
OUTBOX = 64
"""Messages waiting for a stalled link (16 s of reports); past it reports are dropped, not buffered."""


@dataclass(frozen=True)
class EdgeConfig:
    control_plane: str
    """The control plane's URL (``http://fastapi-deploy:80``): its leader answers ``/internal/routers``."""
    token: str
    """``FASTAPI_DEPLOY_ROUTER_TOKEN``, the secret the control plane checks."""
    host: str = "0.0.0.0"
    """A gateway: every interface of its pod."""
    port: int = 8080
    health_port: int = 8081
    name: str = field(default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}")
    endpoint_slices: bool = False
    """Follow EndpointSlices (Kubernetes): addresses and conditions of the pods that serve."""
    namespace: str = ""
    """Whose slices: one namespace, or every namespace when empty (namespace per team)."""
    platform_id: str = ""
    """Only the slices of this platform's revision Services (their labels are mirrored onto them)."""
    kubeconfig: str | None = None


@dataclass(slots=True)
class _Endpoint:
    address: str
    ready: bool
    terminating: bool


class Edge:
    """One remote router: the proxy, its link to the control plane, and the slice watch."""

    def __init__(self, config: EdgeConfig, router: Router | None = None) -> None:
        self.config = config
        self.router = router or Router(RouterConfig())
        self.router.on_request_done = self._request_done
        self.router.on_queue = self._queued
        self._table: dict[str, dict[str, Any]] = {}
        self._seq = 0
        self.synced = asyncio.Event()
        """A snapshot arrived: the table is the control plane's (``/readyz``)."""
        self.connected = False
        self._outbox: asyncio.Queue[str] = asyncio.Queue(OUTBOX)
        self._pending: list[list[Any]] = []
        self._dropped = 0
        self._offset = time.time() - time.monotonic()
        self._queue_signals: set[str] = set()
        self._slices: dict[str, list[tuple[str, _Endpoint]]] = {}
        self._endpoints: dict[str, _Endpoint] = {}
        self._seen: set[str] = set()
        """Pods the slices once listed: one no slice lists any more is gone."""
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.refusal = ""
        """Why the control plane last refused us (a wrong token), for ``/routes`` and the logs."""

    # -- running ------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        await self.router.start(self.config.host, self.config.port)
        health = await asyncio.start_server(self._health, self.config.host, self.config.health_port)
        tasks = [
            asyncio.create_task(self._connect_forever(), name="edge:control-plane"),
            asyncio.create_task(self._report_forever(), name="edge:reports"),
        ]
        watcher = None
        if self.config.endpoint_slices:
            watcher = threading.Thread(target=self._watch_slices, name="edge:endpointslices", daemon=True)
            watcher.start()
        log.info(
            "router %s on %s:%d (health %d), control plane %s",
            self.config.name,
            self.config.host,
            self.router.port,
            self.config.health_port,
            self.config.control_plane,
        )
        try:
            await stop.wait()
        finally:
            self._stopping.set()
            health.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.router.stop(timeout=10.0)

    # -- the table ----------------------------------------------------------------------------------

    def _apply(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "snapshot":
            apps = {str(e["host"]): e for e in message.get("apps") or ()}
            for host in set(self._table) - set(apps):
                self.router.remove_app(host)
            self._table = apps
            for host in apps:
                self._route(host)
            self.synced.set()
        elif kind == "set":
            host = str(message["host"])
            self._table[host] = message
            self._route(host)
        elif kind == "remove":
            host = str(message["host"])
            if self._table.pop(host, None) is not None:
                self.router.remove_app(host)
        else:
            return
        self._seq = int(message.get("seq", self._seq))
        if kind == "snapshot":
            listed = {u["id"] for e in self._table.values() for u in e.get("upstreams") or ()}
            self._seen &= listed | set(self._endpoints)

    def _route(self, host: str) -> None:
        entry = self._table[host]
        self.router.set_app(
            host, str(entry["app_id"]), self._upstreams(entry), limit=int(entry.get("limit") or 0)
        )

    def _upstreams(self, entry: dict[str, Any]) -> list[Upstream]:
        """The control plane's serving instances, minus those the slices say not to send requests to."""
        out = []
        for u in entry.get("upstreams") or ():
            pod = str(u["id"])
            endpoint = self._endpoints.get(pod)
            if endpoint is None:
                if pod in self._seen:
                    continue  # the slices listed it, and no longer do: the pod is gone
                out.append(Upstream(id=pod, host=str(u["host"]), port=int(u["port"])))  # slices lag
            elif endpoint.ready and not endpoint.terminating:
                out.append(Upstream(id=pod, host=endpoint.address, port=int(u["port"])))
        return out

    def routes(self) -> dict[str, Any]:
        """What ``/routes`` shows: the table, and for each instance what the slices say."""

        def state(pod: str) -> str:
            e = self._endpoints.get(pod)
            if e is None:
                return "gone" if pod in self._seen else "unknown"
            return "terminating" if e.terminating else "ready" if e.ready else "not-ready"

        return {
            "name": self.config.name,
            "connected": self.connected,
            "synced": self.synced.is_set(),
            "seq": self._seq,
            "refusal": self.refusal,
            "apps": [
                {
                    "host": host,
                    "app_id": e["app_id"],
                    "limit": e.get("limit", 0),
                    "upstreams": [{**u, "endpoint": state(str(u["id"]))} for u in e.get("upstreams") or ()],
                    "routed": [u.id for u in self.router.upstreams(host)],
                }
                for host, e in sorted(self._table.items())
            ],
        }

    # -- the link to the control plane --------------------------------------------------------------

    async def _connect_forever(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidStatus

        url = _ws_url(self.config.control_plane)
        backoff = 0.2
        while True:
            try:
                async with connect(
                    url,
                    additional_headers={"Authorization": f"Bearer {self.config.token}"},
                    open_timeout=10,
                    ping_interval=5,
                    ping_timeout=10,
                    max_size=256 * 1024 * 1024,
                    max_queue=None,
                ) as ws:
                    hello = {"type": "hello", "protocol": PROTOCOL, "name": self.config.name}
                    await ws.send(json.dumps(hello))
                    sender = asyncio.create_task(self._send_forever(ws))
                    self.connected, self.refusal = True, ""
                    log.info("connected to the control plane at %s", url)
                    try:
                        async for raw in ws:
                            self._apply(json.loads(raw))
                            backoff = 0.2
                    finally:
                        self.connected = False
                        sender.cancel()
                        await asyncio.gather(sender, return_exceptions=True)
                    close = ws.close_code
                    if close == 1008:
                        self.refusal = ws.close_reason or "refused"
                        log.error("the control plane refused this router: %s", self.refusal)
            except InvalidStatus as exc:
                status = exc.response.status_code
                self.refusal = f"HTTP {status}"
                level = logging.ERROR if status in (401, 403) else logging.WARNING
                log.log(level, "the control plane answered %d to the router's connection", status)
                backoff = max(backoff, 2.0)
            except (OSError, TimeoutError, ConnectionClosed) as exc:
                log.warning("control plane %s unreachable (%s); serving the last table", url, exc)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the link to the control plane failed")
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(5.0, backoff * 2)

    async def _send_forever(self, ws: Any) -> None:
        while True:
            await ws.send(await self._outbox.get())

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(REPORT_SECONDS)
            try:
                self._report()
            except Exception:
                log.exception("building a report failed")

    def _report(self) -> None:
        self._offset = time.time() - time.monotonic()
        if not self.connected:
            if len(self._pending) > MAX_PENDING_REQUESTS:
                self._dropped += len(self._pending) - MAX_PENDING_REQUESTS
                del self._pending[: len(self._pending) - MAX_PENDING_REQUESTS]
            return
        requests, self._pending = self._pending, []
        counters = {app_id: [round(v, 6) for v in s.counters()] for app_id, s in self.router.stats.items()}
        message = {
            "type": "report",
            "ack": self._seq,
            "in_flight": {k: v for k, v in self.router.in_flight().items() if v},
            "queued": {k: v for k, v in self.router.queued().items() if v},
            "counters": counters,
            "requests": requests,
            "dropped": self._dropped,
        }
        try:
            self._outbox.put_nowait(json.dumps(message))
        except asyncio.QueueFull:  # a stalled link: this report is dropped, its requests counted so
            self._dropped += len(requests)

    def _queued(self, app_id: str) -> None:
        """The router's ``on_queue``: tell the control plane at once (once per app per loop turn)."""
        if app_id in self._queue_signals or not self.connected:
            return
        self._queue_signals.add(app_id)
        with contextlib.suppress(asyncio.QueueFull):
            self._outbox.put_nowait(json.dumps({"type": "queue", "app_id": app_id}))
        loop = self._loop or asyncio.get_running_loop()
        loop.call_soon(self._queue_signals.discard, app_id)

    def _request_done(self, app_id: str, info: RequestInfo, now: float) -> None:
        """The router's ``on_request_done``: one compact record for the next report."""
        if len(self._pending) >= MAX_PENDING_REQUESTS:
            self._dropped += 1
            return
        self._pending.append(encode_request(app_id, info, now, self._offset))

    # -- EndpointSlices ----------------------------------------------------------------------------

    def _watch_slices(self) -> None:
        """In a thread: list, then watch from the list's resourceVersion; list again on 410."""
        from runtime.backends._k8s_client import Kube, KubeError

        kube = Kube(self.config.kubeconfig)
        selector = "fastapi-deploy.dev/role=app"
        if self.config.platform_id:
            from runtime.backends._k8s_manifests import PLATFORM, label_value

            selector += f",{PLATFORM}={label_value(self.config.platform_id)}"
        namespace = self.config.namespace or None
        version = ""
        failures = 0
        while not self._stopping.is_set():
            try:
                if not version:
                    items, version = kube.list("EndpointSlice", namespace, label_selector=selector)
                    self._post(self._slices_listed, items)
                for event in kube.watch(
                    "EndpointSlice", namespace, label_selector=selector, resource_version=version, timeout=120
                ):
                    obj = event.get("object") or {}
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                    if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                        self._post(self._slice_event, event["type"], obj)
                failures = 0
            except KubeError as exc:
                if exc.status == 410:
                    version = ""
                    continue
                failures += 1
                log.warning("EndpointSlice watch failed (%s); retrying", exc.message)
                self._stopping.wait(min(5.0, 0.2 * 2**failures))
            except Exception as exc:
                failures += 1
                if not self._stopping.is_set():
                    log.warning("EndpointSlice watch ended (%r); retrying", exc)
                self._stopping.wait(min(5.0, 0.2 * 2**failures))
        kube.close()

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._stopping.is_set():
            with contextlib.suppress(RuntimeError):  # the loop closed
                self._loop.call_soon_threadsafe(fn, *args)

    def _slices_listed(self, items: list[dict[str, Any]]) -> None:
        self._slices = {}
        for obj in items:
            self._slices[_uid(obj)] = _endpoints_of(obj)
        self._reindex()

    def _slice_event(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "DELETED":
            self._slices.pop(_uid(obj), None)
        else:
            self._slices[_uid(obj)] = _endpoints_of(obj)
        self._reindex()

    def _reindex(self) -> None:
        before = self._endpoints
        index: dict[str, _Endpoint] = {}
        for endpoints in self._slices.values():
            for pod, endpoint in endpoints:
                known = index.get(pod)
                if known is None or (endpoint.ready and not known.ready):
                    index[pod] = endpoint
        self._endpoints = index
        self._seen |= set(index)
        changed = {p for p in set(before) | set(index) if before.get(p) != index.get(p)}
        if not changed:
            return
        for host, entry in self._table.items():
            if any(str(u["id"]) in changed for u in entry.get("upstreams") or ()):
                self._route(host)

    # -- the health port -----------------------------------------------------------------------------

    async def _health(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            target = parts[1] if len(parts) > 1 else "/"
            body: dict[str, Any]
            if target == "/healthz":
                status, body = 200, {"ok": True}
            elif target == "/readyz":
                ready = self.synced.is_set()
                status, body = (200 if ready else 503), {"ready": ready, "connected": self.connected}
            elif target == "/routes":
                status, body = 200, self.routes()
            else:
                status, body = 404, {"error": "not found"}
            data = json.dumps(body).encode()
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


def encode_request(app_id: str, info: RequestInfo, now: float, offset: float) -> list[Any]:
    """One finished request as a JSON-able record (``control_plane/routers.py`` decodes it); times are
    wall-clock seconds (``offset``: wall minus monotonic)."""
    head = info.head
    flags = (1 if info.cold else 0) | (2 if info.retried else 0) | (4 if info.broken else 0)
    return [
        app_id,
        info.method.decode("latin-1"),
        head.path.decode("latin-1") if head is not None else "",
        head.request_id.decode("latin-1") if head is not None else "",
        head.trace_id.decode("ascii") if head is not None else "",
        head.span_id.decode("ascii") if head is not None else "",
        head.parent_span_id.decode("ascii") if head is not None else "",
        info.status,
        info.upstream_id or "",
        round(info.started + offset, 6),
        round(info.attached_at + offset, 6) if info.attached_at else 0,
        round(now + offset, 6),
        round(info.waited, 6),
        flags,
        info.received,
        info.sent,
    ]


def _uid(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return str(meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}")


def _endpoints_of(obj: dict[str, Any]) -> list[tuple[str, _Endpoint]]:
    out = []
    for endpoint in obj.get("endpoints") or ():
        ref = endpoint.get("targetRef") or {}
        addresses = endpoint.get("addresses") or []
        if ref.get("kind") != "Pod" or not ref.get("name") or not addresses:
            continue
        conditions = endpoint.get("conditions") or {}
        # ready: nil means ready (the API's rule); terminating endpoints have ready false.
        ready = conditions.get("ready") is not False
        terminating = bool(conditions.get("terminating"))
        out.append((str(ref["name"]), _Endpoint(str(addresses[0]), ready, terminating)))
    return out


def _ws_url(control_plane: str) -> str:
    parts = urlsplit(control_plane.rstrip("/"))
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}{parts.path}/internal/routers"


def config_from_env(**overrides: Any) -> EdgeConfig:
    """The router's settings: command-line values first, then ``FASTAPI_DEPLOY_*`` variables."""
    env = os.environ

    def pick(key: str, var: str, default: Any) -> Any:
        value = overrides.get(key)
        return value if value is not None else env.get(var, default)

    control_plane = pick("control_plane", "FASTAPI_DEPLOY_CONTROL_PLANE_URL", "")
    token = pick("token", "FASTAPI_DEPLOY_ROUTER_TOKEN", "")
    if not control_plane or not token:
        raise ValueError(
            "The router needs the control plane's URL (--control-plane or FASTAPI_DEPLOY_CONTROL_PLANE_URL) "
            "and the router token (FASTAPI_DEPLOY_ROUTER_TOKEN, the control plane's own)."
        )
    slices = pick("endpoint_slices", "FASTAPI_DEPLOY_ROUTER_ENDPOINTSLICES", "")
    return EdgeConfig(
        control_plane=str(control_plane),
        token=str(token),
        host=str(pick("host", "FASTAPI_DEPLOY_ROUTER_HOST", "0.0.0.0")),
        port=int(pick("port", "FASTAPI_DEPLOY_ROUTER_PORT", 8080)),
        health_port=int(pick("health_port", "FASTAPI_DEPLOY_ROUTER_HEALTH_PORT", 8081)),
        endpoint_slices=str(slices).lower() in ("1", "true", "yes", "on") if slices != "" else False,
        namespace=str(pick("namespace", "FASTAPI_DEPLOY_KUBERNETES_NAMESPACE", "")),
        platform_id=str(pick("platform_id", "FASTAPI_DEPLOY_KUBERNETES_PLATFORM_ID", "")),
        kubeconfig=env.get("KUBECONFIG") or None,
        **({"name": overrides["name"]} if overrides.get("name") else {}),
    )
