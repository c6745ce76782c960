"""The edge router, through real sockets: real uvicorn apps upstream, real HTTP and WebSocket clients.

Upstream apps run in uvicorn servers on background threads (one per instance, shared by the module);
each test starts its own Router on 127.0.0.1:0 with the limits it needs. Nothing sleeps to wait: tests
poll state with a deadline or wait on events; only the apps sleep, to play slow handlers.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httptools
import httpx
import pytest
import uvicorn
from websockets.asyncio.client import connect as ws_connect

from runtime.router import Router, RouterConfig, Upstream

HOST = "app.test"
TIMEOUT = 10.0  # generous upper bound for any single wait; tests normally finish far sooner

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        # The control plane runs under uvloop: its transports differ (write buffering, pause/resume).
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    backend: tuple[str, dict[str, Any]] = request.param
    return backend


# -- upstream apps -------------------------------------------------------------------------------------


Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def _json(send: Send, data: object, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(data).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _wait_for(event: threading.Event) -> None:
    # The event is set from the test's thread, so wait for it on a worker thread of the app's loop.
    await asyncio.to_thread(event.wait, TIMEOUT)


class App:
    """A small ASGI app playing one instance; it reports what it saw so tests can check the proxying."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.first_chunk = threading.Event()  # /upload received its first body message
        self.gate = threading.Event()  # /sse and /gated wait for it
        self.started = threading.Event()  # /gated began

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self.websocket(receive, send)
            return
        assert scope["type"] == "http"
        path = scope["path"]
        query = dict(pair.split("=") for pair in scope["query_string"].decode().split("&") if pair)
        chunks = size = 0
        if path == "/early":  # answers without reading the body
            await _json(send, {"instance": self.name})
            return
        if path == "/gated-upload":  # reads the body only once let through
            self.started.set()
            await _wait_for(self.gate)
        if path != "/sse":
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                if message.get("body"):
                    chunks += 1
                    size += len(message["body"])
                    if path == "/upload":
                        self.first_chunk.set()
                more = message.get("more_body", False)
        if path == "/slow":
            await asyncio.sleep(float(query.get("delay", "0.5")))
        elif path == "/gated":
            self.started.set()
            await _wait_for(self.gate)
        elif path == "/sse":
            await self.sse(send)
            return
        elif path == "/stream":
            await self.stream(send, int(query["n"]), int(query["size"]))
            return
        elif path == "/hop":
            headers = [(b"keep-alive", b"timeout=99"), (b"x-hop", b"1"), (b"connection", b"x-hop")]
            await _json(send, {"instance": self.name}, headers=headers)
            return
        await _json(
            send,
            {
                "instance": self.name,
                "method": scope["method"],
                "path": path,
                "client_port": scope["client"][1],
                "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
                "chunks": chunks,
                "size": size,
            },
        )

    async def sse(self, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"data: one\n\n", "more_body": True})
        await _wait_for(self.gate)  # the test reads event one before it lets event two go
        await send({"type": "http.response.body", "body": b"data: two\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def stream(self, send: Send, n: int, size: int) -> None:
        headers = [(b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        chunk = b"x" * size
        for _ in range(n):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def websocket(self, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"]})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"]})


class AppServer:
    """``App`` served by a real uvicorn on 127.0.0.1, on a background thread."""

    def __init__(self, name: str) -> None:
        self.app = App(name)
        # IPPROTO_TCP, as the launcher: asyncio sets TCP_NODELAY only on accepted sockets whose proto says
        # TCP; with 0, Nagle and the client's delayed ACK add ~40 ms to each response of two writes.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="off",
            loop="asyncio",
            http="httptools",
            ws="websockets-sansio",
            timeout_graceful_shutdown=1,
            proxy_headers=False,  # the app reports the real peer: the router's pooled connection
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name=f"uvicorn-{name}", daemon=True
        )

    def upstream(self, instance_id: str | None = None) -> Upstream:
        return Upstream(id=instance_id or self.app.name, host="127.0.0.1", port=self.port)

    def __enter__(self) -> AppServer:
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(TIMEOUT)
        self.sock.close()


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[AppServer, AppServer]]:
    with AppServer("a") as a, AppServer("b") as b:
        yield a, b


@pytest.fixture
def apps(servers: tuple[AppServer, AppServer]) -> Iterator[tuple[AppServer, AppServer]]:
    for server in servers:
        server.app.gate.clear()
        server.app.first_chunk.clear()
        server.app.started.clear()
    yield servers
    for server in servers:
        server.app.gate.set()  # release anything a failed test left waiting


@asynccontextmanager
async def running(config: RouterConfig | None = None) -> AsyncIterator[Router]:
    router = Router(config)
    await router.start("127.0.0.1", 0)
    try:
        yield router
    finally:
        await router.stop(timeout=2)
        while RawClient.opened:
            RawClient.opened.pop().close()


@asynccontextmanager
async def client(router: Router, host: str = HOST) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{router.port}", headers={"Host": host}, timeout=TIMEOUT, trust_env=False
    ) as http:
        yield http


async def eventually(check: Callable[[], bool], what: str) -> None:
    """Poll ``check`` until true; fail after TIMEOUT seconds."""
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def error_of(response: httpx.Response | Raw, status: int, code: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]
    error: dict[str, str] = json.loads(response.content)["error"]
    assert error["code"] == code
    assert error["title"] and error["message"] and error["hint"]
    return error


# -- a raw HTTP/1.1 client, for what httpx will not do (pipelining, HTTP/1.0, broken requests) ---------


@dataclass
class Raw:
    status_code: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes = b""

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class RawClient:
    opened: list[RawClient] = []  # closed when the test's router stops

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.opened.append(self)
        self.parser = httptools.HttpResponseParser(self)
        self.done: deque[Raw] = deque()
        self.current = Raw()

    @classmethod
    async def open(cls, router: Router) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self) -> Raw:
        async with asyncio.timeout(TIMEOUT):
            while not self.done:
                data = await self.reader.read(65536)
                if not data:
                    if self.current.status_code and "content-length" not in self.current.headers:
                        self.done.append(self.current)  # delimited by the close
                        self.current = Raw()
                        break
                    raise EOFError("connection closed before a full response")
                self.parser.feed_data(data)
        return self.done.popleft()

    async def closed(self) -> bool:
        """True once the router closes the connection (all data before that is discarded)."""
        async with asyncio.timeout(TIMEOUT):
            try:
                while await self.reader.read(65536):
                    pass
            except ConnectionResetError:
                pass
        self.writer.close()
        return True

    def close(self) -> None:
        self.writer.close()

    def on_message_begin(self) -> None:
        self.current = Raw()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self.current.status_code = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.current.content += body

    def on_message_complete(self) -> None:
        self.done.append(self.current)
        self.current = Raw()


def get(path: str = "/", host: str = HOST, extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: {host}\r\n{extra}\r\n".encode()


def post(path: str, extra: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\n{extra}\r\n".encode()


# -- 1. Host -> app ----------------------------------------------------------------------------------


async def test_routes_by_host_ignoring_port_and_case(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running() as router, client(router, host="APP.Test:8080") as http:
        router.set_app(HOST, "app-1", [a.upstream()])
        response = await http.get("/echo")
        assert response.status_code == 200
        assert response.json()["instance"] == "a"
        assert [u.id for u in router.upstreams("app.test")] == ["a"]


async def test_unknown_host_is_404_json(apps: tuple[AppServer, AppServer]) -> None:
    async with running() as router, client(router, host="nope.test") as http:
        response = await http.get("/")
        error = error_of(response, 404, "no_such_app")
        assert "nope.test" in error["message"]
        # A bodyless request keeps its connection after a 404.
        assert response.headers.get("connection") != "close"


async def test_missing_host_is_400(apps: tuple[AppServer, AppServer]) -> None:
    async with running() as router:
        raw = await RawClient.open(router)
        raw.send(b"GET / HTTP/1.1\r\n\r\n")
        error = error_of(await raw.response(), 400, "bad_request")
        assert "Host" in error["message"]
        assert await raw.closed()


async def test_remove_app_then_404(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running() as router, client(router) as http:
        router.set_app(HOST, "app-1", [a.upstream()])
        assert (await http.get("/")).status_code == 200
        router.remove_app(HOST)
        error_of(await http.get("/"), 404, "no_such_app")
        assert router.upstreams(HOST) == []


# -- 2. least outstanding ----------------------------------------------------------------------------


async def test_ties_go_round_robin(apps: tuple[AppServer, AppServer]) -> None:
    a, b = apps
    async with running() as router, client(router) as http:
        router.set_app(HOST, "app-1", [a.upstream(), b.upstream()])
        seen = [(await http.get("/")).json()["instance"] for _ in range(4)]
        assert seen in (["a", "b", "a", "b"], ["b", "a", "b", "a"])


async def test_least_outstanding_avoids_the_busy_instance(apps: tuple[AppServer, AppServer]) -> None:
    a, b = apps
    up_a, up_b = a.upstream(), b.upstream()
    async with running() as router, client(router) as http:
        router.set_app(HOST, "app-1", [up_a, up_b])
        slow = asyncio.create_task(http.get("/gated"))
        # Whichever instance took the slow request, the next ones all go to the other.
        await eventually(lambda: a.app.started.is_set() or b.app.started.is_set(), "the slow request")
        busy, idle = (a, b) if a.app.started.is_set() else (b, a)
        assert router.in_flight()[busy.app.name] == 1
        assert (up_a if busy is a else up_b).in_flight == 1
        seen = {(await http.get("/")).json()["instance"] for _ in range(5)}
        assert seen == {idle.app.name}
        busy.app.gate.set()
        assert (await slow).json()["instance"] == busy.app.name
        await eventually(lambda: router.in_flight() == {"a": 0, "b": 0}, "in-flight back to 0")
        assert up_a.in_flight == up_b.in_flight == 0


# -- 3. keep-alive -----------------------------------------------------------------------------------


async def test_keep_alive_reuses_client_and_upstream_connections(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running() as router:
        router.set_app(HOST, "app-1", [a.upstream()])
        raw = await RawClient.open(router)
        ports = set()
        for _ in range(3):  # one client connection, several requests
            raw.send(get("/echo"))
            response = await raw.response()
            assert response.status_code == 200
            ports.add(response.json()["client_port"])
        assert len(ports) == 1  # ... and one upstream connection behind them
        assert router.idle_connections() == {"a": 1}
        raw.close()


async def test_pipelined_requests_are_answered_in_order(apps: tuple[AppServer, AppServer]) -> None:
    a, b = apps
    async with running() as router:
        router.set_app(HOST, "app-1", [a.upstream(), b.upstream()])
        raw = await RawClient.open(router)
        raw.send(get("/slow?delay=0.05") + get("/echo") + get("/x", host="nope.test") + get("/last"))
        paths = [(await raw.response()) for _ in range(4)]
        assert [r.status_code for r in paths] == [200, 200, 404, 200]
        assert [paths[0].json()["path"], paths[1].json()["path"], paths[3].json()["path"]] == [
            "/slow",
            "/echo",
            "/last",
        ]
        raw.close()


async def test_pooled_upstream_connections_retire_when_idle(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running(RouterConfig(upstream_idle_timeout=0.2)) as router, client(router) as http:
        router.set_app(HOST, "app-1", [a.upstream()])
        first = (await http.get("/echo")).json()["client_port"]
        assert router.idle_connections() == {"a": 1}
        await eventually(lambda: router.idle_connections() == {"a": 0}, "the idle connection to retire")
        assert (await http.get("/echo")).json()["client_port"] != first


async def test_http10_and_connection_close_are_honoured(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running() as router:
        router.set_app(HOST, "app-1", [a.upstream()])
        raw = await RawClient.open(router)
        raw.send(get("/echo", version="1.0"))
        assert (await raw.response()).status_code == 200
        assert await raw.closed()

        # HTTP/1.0 gets a streamed (chunked upstream) body delimited by the close instead.
        raw = await RawClient.open(router)
        raw.send(get("/stream?n=3&size=10", version="1.0"))
        response = await raw.response()
        assert response.content == b"x" * 30
        assert "transfer-encoding" not in response.headers

        raw = await RawClient.open(router)
        raw.send(get("/echo", extra="Connection: close\r\n"))
        response = await raw.response()
        assert response.headers["connection"] == "close"
        assert await raw.closed()

        # HTTP/1.0 with keep-alive stays open.
        raw = await RawClient.open(router)
        for _ in range(2):
            raw.send(get("/echo", extra="Connection: keep-alive\r\n", version="1.0"))
            response = await raw.response()
            assert response.headers["connection"] == "keep-alive"
        raw.close()


async def test_client_idle_keep_alive_is_closed(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running(RouterConfig(idle_timeout=0.2)) as router:
        router.set_app(HOST, "app-1", [a.upstream()])
        raw = await RawClient.open(router)
        raw.send(get())
        assert (await raw.response()).status_code == 200
        started = time.monotonic()
        assert await raw.closed()
        assert time.monotonic() - started < 2


async def test_head_request_has_no_body_and_keeps_the_connection(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running() as router:
        router.set_app(HOST, "app-1", [a.upstream()])
        reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
        writer.write(f"HEAD /echo HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"content-length: " in head.lower()
        raw = RawClient(reader, writer)
        raw.send(get("/echo"))  # the next response follows at once: no body was sent for HEAD
        assert (await raw.response()).json()["method"] == "GET"
        raw.close()


# -- 4. streaming ------------------------------------------------------------------------------------


async def test_chunked_upload_is_streamed_not_buffered(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running() as router:
        router.set_app(HOST, "app-1", [a.upstream()])
        raw = await RawClient.open(router)
        raw.send(post("/upload", "Transfer-Encoding: chunked\r\n"))
        raw.send(b"5\r\nhello\r\n")
        # The app sees the first chunk while the client has not finished its body.
        assert await anyio.to_thread.run_sync(a.app.first_chunk.wait, TIMEOUT)
        raw.send(b"6\r\n world\r\n0\r\n\r\n")
        response = (await raw.response()).json()
        assert response["size"] == 11
        assert response["chunks"] >= 2
        raw.close()


async def test_large_bodies_both_ways(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running() as router, client(router) as http:
        router.set_app(HOST, "app-1", [a.upstream()])
        upload = await http.post("/echo", content=b"u" * (8 * 1024 * 1024))
        assert upload.json()["size"] == 8 * 1024 * 1024

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(64):
                yield b"c" * 65536

        chunked = await http.post("/echo", content=chunks())
        assert chunked.json()["size"] == 64 * 65536

        size = 0
        async with http.stream("GET", "/stream?n=256&size=65536") as stream:
            async for part in stream.aiter_raw():
                size += len(part)
        assert size == 256 * 65536


async def test_sse_events_arrive_one_by_one(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running() as router, client(router) as http:
        router.set_app(HOST, "app-1", [a.upstream()])
        async with http.stream("GET", "/sse") as stream:
            assert stream.headers["content-type"] == "text/event-stream"
            lines = stream.aiter_lines()
            # The app holds event two until it is told; a buffering proxy would never show event one.
            async with asyncio.timeout(TIMEOUT):
                assert await anext(lines) == "data: one"
            a.app.gate.set()
            rest = [line async for line in lines]
        assert "data: two" in rest


# -- 5. WebSocket ------------------------------------------------------------------------------------


async def test_websocket_echo(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running() as router:
        router.set_app(HOST, "app-1", [a.upstream()])
        async with ws_connect(f"ws://{HOST}/ws", host="127.0.0.1", port=router.port, proxy=None) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            await ws.send(b"\x00\x01" * 50_000)
            assert await ws.recv() == b"\x00\x01" * 50_000
            assert router.in_flight() == {"a": 1}  # an open WebSocket counts as in flight
        await eventually(lambda: router.in_flight() == {"a": 0}, "the websocket to be released")


# -- 6. headers --------------------------------------------------------------------------------------


async def test_forwarding_headers_and_request_id(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running() as router, client(router, host="app.test:8000") as http:
        router.set_app(HOST, "app-1", [a.upstream()])
        response = await http.get(
            "/echo",
            headers={
                "X-Forwarded-For": "1.2.3.4",
                "X-Forwarded-Proto": "https",  # spoofed: overwritten
                "X-Request-ID": "abc-123.X_y",
                "Connection": "keep-alive, X-Secret",
                "X-Secret": "hop",
                "Keep-Alive": "timeout=5",
                "TE": "trailers",
                "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            },
        )
        seen = dict(response.json()["headers"])
        assert seen["host"] == "app.test:8000"
        assert seen["x-forwarded-for"] == "1.2.3.4, 127.0.0.1"
        assert seen["x-forwarded-proto"] == "http"
        assert seen["x-forwarded-host"] == "app.test:8000"
        assert seen["x-request-id"] == "abc-123.X_y"
        for hop in ("connection", "x-secret", "keep-alive", "te", "proxy-authorization"):
            assert hop not in seen
        assert response.headers["x-request-id"] == "abc-123.X_y"

        for bad in ("has space", "x" * 129, "semi;colon"):
            response = await http.get("/echo", headers={"X-Request-ID": bad})
            generated = response.headers["x-request-id"]
            assert len(generated) == 32 and int(generated, 16) >= 0
            assert dict(response.json()["headers"])["x-request-id"] == generated

        response = await http.get("/hop")  # hop-by-hop response headers are not relayed
        assert "keep-alive" not in response.headers
        assert "x-hop" not in response.headers
        assert response.headers.get("connection") != "x-hop"


async def test_header_names_mean_the_same_in_any_case_and_ids_never_repeat(
    apps: tuple[AppServer, AppServer],
) -> None:
    # The router learns header names as spelled on the wire: each spelling must still be what its
    # lower-case name is, the first time and every time after.
    a, _ = apps
    async with running() as router, client(router) as http:
        router.set_app(HOST, "app-1", [a.upstream()])
        ids: set[str] = set()
        for _ in range(3):
            for spelling in (str.lower, str.upper, str.title):
                response = await http.get(
                    "/echo",
                    headers={
                        spelling("X-Forwarded-Proto"): "https",
                        spelling("Keep-Alive"): "timeout=5",
                        spelling("Proxy-Authorization"): "Basic Zm9vOmJhcg==",
                        spelling("X-Kept"): "yes",
                    },
                )
                seen = dict(response.json()["headers"])
                assert seen["x-forwarded-proto"] == "http"
                assert seen["x-kept"] == "yes"
                assert "keep-alive" not in seen and "proxy-authorization" not in seen
                ids.add(response.headers["x-request-id"])
        for _ in range(300):  # past one batch of random ids
            ids.add((await http.get("/echo")).headers["x-request-id"])
        assert len(ids) == 309


# -- 7. limits ---------------------------------------------------------------------------------------


async def test_headers_too_large_is_431(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running(RouterConfig(max_header_bytes=4096)) as router:
        router.set_app(HOST, "app-1", [a.upstream()])
        raw = await RawClient.open(router)
        raw.send(get(extra=f"X-Big: {'x' * 5000}\r\n"))
        error_of(await raw.response(), 431, "headers_too_large")
        assert await raw.closed()

        # Complete, but in two reads, each under the limit (only such heads are counted header by header).
        raw = await RawClient.open(router)
        head = get(extra=f"X-Big: {'x' * 3000}\r\nX-Big-Too: {'x' * 3000}\r\n")
        raw.send(head[:3500])
        await asyncio.sleep(0.05)  # two reads, not one
        raw.send(head[3500:])
        error_of(await raw.response(), 431, "headers_too_large")
        assert await raw.closed()

        # Just under the limit is fine, in one read or two.
        raw = await RawClient.open(router)
        head = get(extra=f"X-Big: {'x' * 3800}\r\n")
        raw.send(head)
        assert (await raw.response()).status_code == 200
        raw.send(head[:2000])
        await asyncio.sleep(0.05)
        raw.send(head[2000:])
        assert (await raw.response()).status_code == 200
        raw.close()

        # A head that never ends is cut off as well.
        raw = await RawClient.open(router)
        raw.send(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nX-Big: ".encode())
        for _ in range(5):
            raw.send(b"y" * 1000)
        error_of(await raw.response(), 431, "headers_too_large")
        assert await raw.closed()


async def test_body_too_large_is_413(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running(RouterConfig(max_body_bytes=1000)) as router:
        router.set_app(HOST, "app-1", [a.upstream()])
        raw = await RawClient.open(router)  # declared: refused before the body is sent
        raw.send(post("/echo", "Content-Length: 5000\r\n"))
        error = error_of(await raw.response(), 413, "payload_too_large")
        assert "1000" in error["message"]
        assert await raw.closed()

        raw = await RawClient.open(router)  # chunked: refused once it grows past the limit
        raw.send(post("/upload", "Transfer-Encoding: chunked\r\n"))
        raw.send(b"258\r\n" + b"z" * 600 + b"\r\n")
        raw.send(b"258\r\n" + b"z" * 600 + b"\r\n")
        error_of(await raw.response(), 413, "payload_too_large")
        assert await raw.closed()
        await eventually(lambda: router.in_flight() == {"a": 0}, "in-flight back to 0")


async def test_malformed_request_is_400(apps: tuple[AppServer, AppServer]) -> None:
    async with running() as router:
        raw = await RawClient.open(router)
        raw.send(b"GARBAGE\r\n\r\n")
        error_of(await raw.response(), 400, "bad_request")
        assert await raw.closed()

        raw = await RawClient.open(router)  # request smuggling shape
        raw.send(post("/", "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n"))
        error_of(await raw.response(), 400, "bad_request")


async def test_expect_100_continue(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running() as router:
        router.set_app(HOST, "app-1", [a.upstream()])
        raw = await RawClient.open(router)
        raw.send(post("/echo", "Content-Length: 4\r\nExpect: 100-continue\r\n"))
        assert (await raw.response()).status_code == 100
        raw.send(b"body")
        assert (await raw.response()).json()["size"] == 4
        raw.close()


# -- 8. upstream failures and timeouts --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_connect_refused_is_502(apps: tuple[AppServer, AppServer]) -> None:
    port = free_port()
    async with running() as router, client(router) as http:
        router.set_app(HOST, "app-1", [Upstream(id="dead-1", host="127.0.0.1", port=port)])
        error = error_of(await http.get("/"), 502, "bad_gateway")
        assert "dead-1" in error["message"] and str(port) in error["message"]
        assert router.in_flight() == {"dead-1": 0}


async def test_connect_failure_tries_the_next_instance(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    dead = Upstream(id="dead-1", host="127.0.0.1", port=free_port())
    async with running() as router, client(router) as http:
        router.set_app(HOST, "app-1", [dead, a.upstream()])
        for _ in range(4):
            response = await http.get("/")
            assert response.status_code == 200
            assert response.json()["instance"] == "a"


async def test_connect_timeout_is_502(apps: tuple[AppServer, AppServer]) -> None:
    # A listener whose accept queue is full: the kernel drops new SYNs, so connecting hangs.
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        filler.connect(("127.0.0.1", port))
        async with running(RouterConfig(connect_timeout=0.2)) as router, client(router) as http:
            router.set_app(HOST, "app-1", [Upstream(id="stuck-1", host="127.0.0.1", port=port)])
            error = error_of(await http.get("/"), 502, "bad_gateway")
            assert "timed out" in error["message"]


async def test_no_response_headers_in_time_is_504(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running(RouterConfig(read_timeout=0.2)) as router, client(router) as http:
        router.set_app(HOST, "app-1", [a.upstream()])
        error = error_of(await http.get("/gated"), 504, "gateway_timeout")
        assert "a" in error["message"]
        assert router.in_flight() == {"a": 0}


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_instance(handle: Handler, instance_id: str = "fake-1") -> AsyncIterator[Upstream]:
    """A fake instance speaking raw TCP (for what uvicorn will not do); waits for its handlers on exit."""
    handlers: set[asyncio.Task[None]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await handle(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the router hung up first
        finally:
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    try:
        yield Upstream(id=instance_id, host="127.0.0.1", port=server.sockets[0].getsockname()[1])
    finally:
        server.close()
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*handlers)


@asynccontextmanager
async def fake_upstream(answer: bytes) -> AsyncIterator[Upstream]:
    """A raw TCP 'instance' that reads a request head, writes ``answer`` and hangs up."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()

    async with raw_instance(handle) as upstream:
        yield upstream


async def test_upstream_dying_mid_response_closes_the_client(apps: tuple[AppServer, AppServer]) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"
    async with fake_upstream(answer) as upstream, running() as router, client(router) as http:
        router.set_app(HOST, "app-1", [upstream])
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get("/")
        await eventually(lambda: router.in_flight() == {"fake-1": 0}, "in-flight back to 0")
        assert router.stats["app-1"].errors == 1


async def test_body_delimited_by_close_is_rechunked(apps: tuple[AppServer, AppServer]) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"
    async with fake_upstream(answer) as upstream, running() as router:
        router.set_app(HOST, "app-1", [upstream])
        raw = await RawClient.open(router)
        raw.send(get())
        response = await raw.response()
        assert response.content == b"until the end"
        assert response.headers["transfer-encoding"] == "chunked"
        raw.send(get())  # the client connection survives
        assert (await raw.response()).content == b"until the end"
        raw.close()


# -- 9. queueing while an app has no instance --------------------------------------------------------


async def test_queued_request_is_served_when_instances_arrive(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running() as router, client(router) as http:
        router.set_app(HOST, "app-1", [])
        waiting = asyncio.create_task(http.post("/echo", content=b"queued body"))
        await eventually(lambda: router.queued() == {"app-1": 1}, "the request to queue")
        router.set_app(HOST, "app-1", [a.upstream()])
        response = await waiting
        assert response.status_code == 200
        assert response.json()["size"] == len(b"queued body")
        assert router.queued() == {"app-1": 0}


async def test_queue_timeout_is_503_with_retry_after(apps: tuple[AppServer, AppServer]) -> None:
    async with running(RouterConfig(queue_timeout=0.1)) as router, client(router) as http:
        router.set_app(HOST, "app-1", [])
        response = await http.get("/")
        error = error_of(response, 503, "no_capacity")
        assert response.headers["retry-after"] == "1"
        assert "app-1" in error["message"]


async def test_full_queue_is_503_at_once(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running(RouterConfig(max_queue_per_app=1)) as router, client(router) as http:
        router.set_app(HOST, "app-1", [])
        waiting = asyncio.create_task(http.get("/"))
        await eventually(lambda: router.queued() == {"app-1": 1}, "the request to queue")
        response = await http.get("/")
        error_of(response, 503, "no_capacity")
        assert response.headers["retry-after"] == "1"
        router.set_app(HOST, "app-1", [a.upstream()])
        assert (await waiting).status_code == 200


async def test_queued_request_reports_its_wait_and_the_cold_start(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    queued: list[str] = []
    async with running() as router, client(router) as http:
        router.on_queue = queued.append
        router.set_app(HOST, "app-1", [])
        started = time.monotonic()
        waiting = asyncio.create_task(http.get("/echo"))
        await eventually(lambda: router.queued() == {"app-1": 1}, "the request to queue")
        assert queued == ["app-1"]  # at once, not at the next autoscaler tick
        router.set_app(HOST, "app-1", [a.upstream()])
        response = await waiting
        elapsed_ms = (time.monotonic() - started) * 1000
        assert response.status_code == 200
        assert 0 <= int(response.headers["x-queue-time"]) <= elapsed_ms + 1
        assert response.headers["x-cold-start"] == "1"
        stats = router.stats["app-1"]
        assert (stats.queued_total, stats.cold_starts, stats.queued) == (1, 1, 0)
        assert abs(stats.queue_wait_seconds * 1000 - int(response.headers["x-queue-time"])) <= 1

        # Served at once: no queue headers, no hook call, no counts.
        response = await http.get("/echo")
        assert "x-queue-time" not in response.headers
        assert "x-cold-start" not in response.headers
        assert queued == ["app-1"]
        assert (router.stats["app-1"].queued_total, router.stats["app-1"].cold_starts) == (1, 1)


async def test_on_queue_may_start_capacity_at_once(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running() as router, client(router) as http:
        router.set_app(HOST, "app-1", [])
        # The hook routes the app before it returns: the request it was told about is served right away.
        router.on_queue = lambda app_id: router.set_app(HOST, app_id, [a.upstream()])
        response = await http.get("/echo")
        assert response.status_code == 200
        # Queued only for the hook's own call (a millisecond on a loaded machine), not for a scale-up.
        assert int(response.headers["x-queue-time"]) < 50
        assert response.headers["x-cold-start"] == "1"
        assert router.queued() == {"app-1": 0}
        assert router.stats["app-1"].queued_total == 1


async def test_queue_timeout_reports_its_wait_despite_a_failing_hook(
    apps: tuple[AppServer, AppServer], caplog: pytest.LogCaptureFixture
) -> None:
    def broken(app_id: str) -> None:
        raise RuntimeError("the control plane is down")

    async with running(RouterConfig(queue_timeout=0.1)) as router, client(router) as http:
        assert router.on_queue is None
        router.on_queue = broken
        router.set_app(HOST, "app-1", [])
        response = await http.get("/")
        error_of(response, 503, "no_capacity")
        assert int(response.headers["x-queue-time"]) >= 99  # loop timers may round to the millisecond
        assert response.headers["x-cold-start"] == "1"
        assert "on_queue hook failed" in caplog.text
        assert router.stats["app-1"].queue_wait_seconds >= 0.099


async def test_apps_cannot_forge_the_queue_headers(apps: tuple[AppServer, AppServer]) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Queue-Time: 999\r\nX-Cold-Start: 1\r\n\r\nok"
    async with fake_upstream(answer) as upstream, running() as router, client(router) as http:
        router.set_app(HOST, "app-1", [upstream])
        response = await http.get("/")
        assert response.text == "ok"
        assert "x-queue-time" not in response.headers
        assert "x-cold-start" not in response.headers


async def test_a_surge_past_the_concurrency_limit_waits_in_order(apps: tuple[AppServer, AppServer]) -> None:
    """With a limit per instance, requests past ``limit x instances`` wait in the app's queue (not on a
    connection to a loaded instance) and are let through oldest first, as slots free."""
    a, _ = apps
    async with running() as router, client(router) as http:
        router.set_app(HOST, "app-1", [a.upstream()], limit=1)
        first = asyncio.create_task(http.get("/slow?delay=0.3"))
        await eventually(lambda: router.in_flight().get("a") == 1, "the first request in flight")
        second = asyncio.create_task(http.get("/slow?delay=0.05", headers={"x-order": "2"}))
        await eventually(lambda: router.queued() == {"app-1": 1}, "the second to queue")
        third = asyncio.create_task(http.get("/slow?delay=0.05", headers={"x-order": "3"}))
        await eventually(lambda: router.queued() == {"app-1": 2}, "the third to queue")
        assert router.in_flight().get("a") == 1  # the instance never got more than its limit
        done = await asyncio.gather(first, second, third)
        assert [r.status_code for r in done] == [200, 200, 200]
        assert "x-queue-time" not in done[0].headers
        assert int(done[1].headers["x-queue-time"]) >= 150 and "x-cold-start" not in done[1].headers
        assert int(done[2].headers["x-queue-time"]) >= int(done[1].headers["x-queue-time"])
        stats = router.stats["app-1"]
        assert (stats.queued_total, stats.cold_starts, stats.queued) == (2, 0, 0)
        # More instances, more room: the queue drains into the new capacity at once.
        router.set_app(HOST, "app-1", [a.upstream()], limit=0)
        assert (await http.get("/echo")).status_code == 200


async def test_scaling_up_releases_the_queue_into_the_new_room(apps: tuple[AppServer, AppServer]) -> None:
    a, b = apps
    async with running() as router, client(router) as http:
        router.set_app(HOST, "app-1", [a.upstream()], limit=1)
        busy = asyncio.create_task(http.get("/slow?delay=1.0"))
        await eventually(lambda: router.in_flight().get("a") == 1, "a busy")
        waiting = asyncio.create_task(http.get("/echo"))
        await eventually(lambda: router.queued() == {"app-1": 1}, "one waiting")
        router.set_app(HOST, "app-1", [a.upstream(), b.upstream()], limit=1)  # the autoscaler adds b
        response = await asyncio.wait_for(waiting, 0.8)  # long before a is free again
        assert response.json()["instance"] == "b"
        assert (await busy).status_code == 200


async def test_the_router_wide_queue_cap_protects_every_app(apps: tuple[AppServer, AppServer]) -> None:
    async with running(RouterConfig(max_queue_total=1, max_queue_per_app=100)) as router:
        router.set_app("one.test", "app-1", [])
        router.set_app("two.test", "app-2", [])
        async with client(router, "one.test") as one, client(router, "two.test") as two:
            waiting = asyncio.create_task(one.get("/"))
            await eventually(lambda: router.queued().get("app-1") == 1, "app-1's request to queue")
            refused = await two.get("/")  # another app, but the router's queue is full
            error_of(refused, 503, "no_capacity")
            waiting.cancel()


# -- 10. upstream connection policy ------------------------------------------------------------------


async def test_upstream_pool_grows_to_peak_concurrency_and_is_reused(
    apps: tuple[AppServer, AppServer],
) -> None:
    a, _ = apps
    async with running() as router, client(router) as http:
        router.set_app(HOST, "app-1", [a.upstream()])
        ports: list[set[int]] = []
        for _ in range(2):
            a.app.gate.clear()
            held = [asyncio.create_task(http.post("/gated")) for _ in range(6)]
            await eventually(lambda: router.in_flight() == {"a": 6}, "six requests in flight")
            a.app.gate.set()
            ports.append({(await t).json()["client_port"] for t in held})
            await eventually(lambda: router.in_flight() == {"a": 0}, "in-flight back to 0")
        # Six at once took six connections; the next six reused them, with no request cap per connection.
        assert len(ports[0]) == 6
        assert ports[1] <= ports[0]
        assert router.idle_connections() == {"a": 6}


async def test_connects_in_flight_are_capped_and_a_failed_one_fails_the_waiters(
    apps: tuple[AppServer, AppServer],
) -> None:
    # A listener whose accept queue is full: the kernel drops new SYNs, so connects hang.
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        filler.connect(("127.0.0.1", port))
        config = RouterConfig(connect_timeout=0.5, upstream_connects=2)
        async with running(config) as router, client(router) as http:
            router.set_app(HOST, "app-1", [Upstream(id="stuck-1", host="127.0.0.1", port=port)])
            requests = [asyncio.create_task(http.get("/")) for _ in range(5)]
            instance = router._state.instances["stuck-1"]  # white box: the policy has no API
            await eventually(lambda: len(instance.waiters) == 5, "five requests waiting for a connection")
            assert instance.connecting == 2
            started = time.monotonic()
            for request in requests:  # all answered when the first connect fails...
                assert "timed out" in error_of(await request, 502, "bad_gateway")["message"]
            assert time.monotonic() - started < 1.2  # ...not one per timeout (that takes 1.5 s)
            assert router.in_flight() == {"stuck-1": 0}


async def test_many_new_connections_at_once_are_all_served(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running() as router:
        router.set_app(HOST, "app-1", [a.upstream()])
        raws = await asyncio.gather(*(RawClient.open(router) for _ in range(200)))
        for raw in raws:
            raw.send(get("/echo"))
        responses = await asyncio.gather(*(raw.response() for raw in raws))
        assert {r.status_code for r in responses} == {200}
        for raw in raws:
            raw.close()


async def test_idle_client_connections_hold_no_parser(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running(RouterConfig(idle_timeout=0.4)) as router:
        router.set_app(HOST, "app-1", [a.upstream()])
        raw = await RawClient.open(router)
        raw.send(get("/echo"))
        assert (await raw.response()).status_code == 200
        conn = _client_of(router)  # white box: memory has no API
        assert conn.parser is None  # freed after the first request
        raw.send(get("/echo"))
        assert (await raw.response()).status_code == 200
        assert conn.parser is not None  # kept while the client reuses its connection...
        await eventually(lambda: conn.parser is None, "the sweep to free the parser")  # ...then freed
        assert conn.pipeline is None
        assert await raw.closed()  # and closed at the idle timeout


# -- atomic switch, drain ----------------------------------------------------------------------------


async def test_set_app_switches_atomically_while_requests_are_in_flight(
    apps: tuple[AppServer, AppServer],
) -> None:
    a, b = apps
    async with running() as router, client(router) as http:
        router.set_app(HOST, "app-1", [a.upstream()])
        old = [asyncio.create_task(http.get("/gated")) for _ in range(3)]
        await eventually(lambda: router.in_flight().get("a") == 3, "three requests in flight on a")
        router.set_app(HOST, "app-1", [b.upstream()])  # a new revision
        new = [(await http.get("/")).json()["instance"] for _ in range(3)]
        assert new == ["b", "b", "b"]
        assert not await router.wait_drained("a", timeout=0.05)
        a.app.gate.set()
        assert await router.wait_drained("a", timeout=TIMEOUT)
        assert [(await t).json()["instance"] for t in old] == ["a", "a", "a"]
        assert "a" not in router.in_flight()  # unrouted and drained: forgotten


# -- 11. stop ----------------------------------------------------------------------------------------


async def test_stop_lets_in_flight_requests_finish(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    router = Router()
    await router.start("127.0.0.1", 0)
    port = router.port
    router.set_app(HOST, "app-1", [a.upstream()])
    idle = await RawClient.open(router)
    idle.send(get())
    assert (await idle.response()).status_code == 200
    async with client(router) as http:
        slow = asyncio.create_task(http.get("/slow?delay=0.2"))
        await eventually(lambda: router.in_flight()["a"] == 1, "the slow request")
        stopping = asyncio.create_task(router.stop(timeout=TIMEOUT))
        assert await idle.closed()  # idle keep-alive connections go first
        response = await slow
        assert response.status_code == 200
        assert response.headers["connection"] == "close"
        await stopping
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


# -- metrics hook ------------------------------------------------------------------------------------


async def test_on_request_done_and_stats(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    done: list[dict[str, Any]] = []

    def hook(app_id: str, info: Any, now: float) -> None:
        head = info.head
        done.append(
            {
                "app": app_id,
                "upstream": info.upstream_id,
                "status": info.status,
                "method": info.method,
                "path": head.path,
                "trace": head.trace_id,
                "span": head.span_id,
                "parent": head.parent_span_id,
                "duration": now - info.started,
                "upstream_time": now - info.attached_at if info.attached_at else None,
                "sent": info.sent,
                "received": info.received,
            }
        )

    async with running() as router, client(router) as http:
        router.on_request_done = hook
        router.set_app(HOST, "app-1", [a.upstream()])
        ok = await http.post("/echo?x=1", content=b"12345")
        router.set_app("dead.test", "app-2", [Upstream(id="dead-1", host="127.0.0.1", port=free_port())])
        parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        dead = await http.get("/nowhere", headers={"Host": "dead.test", "traceparent": parent})
        assert [(d["app"], d["upstream"], d["status"], d["method"], d["path"]) for d in done] == [
            ("app-1", "a", 200, b"POST", b"/echo"),
            ("app-2", "dead-1", 502, b"GET", b"/nowhere"),
        ]
        first, second = done
        assert first["duration"] >= first["upstream_time"] >= 0
        assert first["received"] == 5 and first["sent"] > len(ok.content)
        assert second["upstream_time"] is None and second["sent"] == 0  # no connection: never sent
        # The trace: a new one for the first request, the client's for the second, and its id answered.
        assert len(first["trace"]) == 32 and first["parent"] == b""
        assert ok.headers["x-trace-id"] == first["trace"].decode()
        assert second["trace"] == b"0af7651916cd43dd8448eb211c80319c"
        assert second["parent"] == b"b7ad6b7169203331" and len(second["span"]) == 16
        assert dead.headers["x-trace-id"] == "0af7651916cd43dd8448eb211c80319c"
        assert (router.stats["app-1"].requests, router.stats["app-1"].errors) == (1, 0)
        assert (router.stats["app-2"].requests, router.stats["app-2"].errors) == (1, 1)


async def test_traceparent_sent_to_the_instance(apps: tuple[AppServer, AppServer]) -> None:
    """The instance sees the router's edge span as its parent, in the client's trace or a new one."""
    a, _ = apps
    spans: list[tuple[bytes, bytes]] = []
    async with running() as router, client(router) as http:
        router.on_request_done = lambda app_id, info, now: spans.append(
            (info.head.trace_id, info.head.span_id)
        )
        router.set_app(HOST, "app-1", [a.upstream()])

        async def seen(**headers: str) -> dict[str, str]:
            return dict((await http.get("/headers", headers=headers)).json()["headers"])

        fresh = await seen()
        joined = await seen(traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
        bad = await seen(traceparent="00-zz-00f067aa0ba902b7-01")
        for seen, (trace, span) in zip((fresh, joined, bad), spans, strict=True):
            assert seen["traceparent"] == f"00-{trace.decode()}-{span.decode()}-01"
        assert spans[1][0] == b"4bf92f3577b34da6a3ce929d0e0e4736"
        assert spans[2][0] != b"4bf92f3577b34da6a3ce929d0e0e4736" and len(spans[2][0]) == 32
        # The request id doubles as the trace id when the client sent neither.
        assert fresh["x-request-id"] == spans[0][0].decode()


# -- edges: flow control, early answers, stalls, stale connections ----------------------------------


def _client_of(router: Router) -> Any:
    """White box: the router's client connection, if there is one (flow control has no API)."""
    return next(iter(router._state.clients), None)


def _instance_paused(router: Router) -> bool:
    conn = _client_of(router)
    ex = conn and conn.current
    return bool(ex and ex.up and ex.up.read_paused)


def _client_paused(router: Router) -> bool:
    conn = _client_of(router)
    return bool(conn and conn.paused & 1)


async def test_slow_client_pauses_the_instance_and_vice_versa(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running() as router:
        router.set_app(HOST, "app-1", [a.upstream()])
        # Download: the client reads nothing, so the router must stop reading from the instance.
        raw = await RawClient.open(router)
        raw.send(get("/stream?n=512&size=65536"))  # 32 MiB, far more than the socket buffers hold
        await eventually(lambda: _instance_paused(router), "the instance connection to be paused")
        size = 0
        async with asyncio.timeout(TIMEOUT):
            await raw.reader.readuntil(b"\r\n\r\n")
            while size < 32 * 1024 * 1024:  # chunked: count payload by stripping the framing
                line = await raw.reader.readline()
                chunk = int(line, 16)
                size += chunk
                await raw.reader.readexactly(chunk + 2)
        raw.close()
        await eventually(lambda: not router._state.clients, "the client to go")

        # Upload: the app does not read, so the router must stop reading from the client.
        raw = await RawClient.open(router)
        total = 32 * 1024 * 1024
        raw.send(post("/gated-upload", f"Content-Length: {total}\r\n"))
        block = b"u" * (1024 * 1024)
        sending = asyncio.create_task(_send_all(raw, block, total // len(block)))
        await eventually(lambda: _client_paused(router), "the client connection to be paused")
        a.app.gate.set()
        await sending
        assert (await raw.response()).json()["size"] == total


async def _send_all(raw: RawClient, block: bytes, count: int) -> None:
    for _ in range(count):
        raw.writer.write(block)
        await raw.writer.drain()


async def test_answer_before_the_body_is_read(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running() as router:
        router.set_app(HOST, "app-1", [a.upstream()])
        raw = await RawClient.open(router)
        raw.send(post("/early", "Content-Length: 100000\r\n") + b"x" * 10)
        assert (await raw.response()).status_code == 200
        raw.send(b"x" * 99990)  # the rest is read and dropped; the connection stays usable
        raw.send(get("/echo"))
        assert (await raw.response()).json()["path"] == "/echo"
        await eventually(lambda: router.in_flight() == {"a": 0}, "in-flight back to 0")


async def test_stalled_upload_is_dropped(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running(RouterConfig(read_timeout=0.2)) as router:
        router.set_app(HOST, "app-1", [a.upstream()])
        raw = await RawClient.open(router)
        raw.send(post("/upload", "Content-Length: 100\r\n") + b"x" * 10)
        assert await raw.closed()
        await eventually(lambda: router.in_flight() == {"a": 0}, "in-flight back to 0")


async def test_stale_pooled_connection_is_retried(apps: tuple[AppServer, AppServer]) -> None:
    # An instance that answers the first request of a connection, then hangs up on the next one, as a
    # uvicorn whose keep-alive timer fires just as the router reuses the connection.
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await reader.readuntil(b"\r\n\r\n")

    async with raw_instance(handle) as upstream, running() as router, client(router) as http:
        router.set_app(HOST, "app-1", [upstream])
        for _ in range(3):
            response = await http.get("/")
            assert (response.status_code, response.text) == (200, "ok")
        assert router.stats["app-1"].errors == 0


async def test_absolute_form_request_target(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running() as router:
        router.set_app(HOST, "app-1", [a.upstream()])
        raw = await RawClient.open(router)
        raw.send(b"GET http://app.test/echo?q=1 HTTP/1.1\r\nHost: elsewhere.test\r\n\r\n")
        seen = (await raw.response()).json()
        assert seen["path"] == "/echo"
        assert dict(seen["headers"])["host"] == "app.test"


async def test_refused_upgrade_is_relayed_then_closed(apps: tuple[AppServer, AppServer]) -> None:
    a, _ = apps
    async with running() as router:
        router.set_app(HOST, "app-1", [a.upstream()])
        raw = await RawClient.open(router)
        raw.send(get("/echo", extra="Connection: upgrade\r\nUpgrade: something/1\r\n"))
        response = await raw.response()
        assert response.status_code == 200
        assert dict(response.json()["headers"])["upgrade"] == "something/1"
        assert await raw.closed()


async def test_queued_requests_get_404_on_remove_and_503_on_stop(apps: tuple[AppServer, AppServer]) -> None:
    async with running() as router, client(router) as http:
        router.set_app(HOST, "app-1", [])
        waiting = asyncio.create_task(http.get("/"))
        await eventually(lambda: router.queued() == {"app-1": 1}, "the request to queue")
        router.remove_app(HOST)
        error_of(await waiting, 404, "no_such_app")

        router.set_app(HOST, "app-1", [])
        waiting = asyncio.create_task(http.get("/"))
        await eventually(lambda: router.queued() == {"app-1": 1}, "the request to queue")
        await router.stop(timeout=TIMEOUT)
        error_of(await waiting, 503, "no_capacity")


async def test_new_upstream_objects_for_the_same_instance_keep_its_count(
    apps: tuple[AppServer, AppServer],
) -> None:
    a, _ = apps
    async with running() as router, client(router) as http:
        first = a.upstream()
        router.set_app(HOST, "app-1", [first])
        slow = asyncio.create_task(http.get("/gated"))
        await eventually(lambda: first.in_flight == 1, "the request in flight")
        second = a.upstream()  # the control plane rebuilt its objects: same id
        router.set_app("www.app.test", "app-1", [second])  # and a second name for the same instance
        assert second.in_flight == 1
        assert router.in_flight() == {"a": 1}
        a.app.gate.set()
        assert (await slow).status_code == 200
        await eventually(lambda: second.in_flight == 0, "in-flight back to 0")
        assert router.upstreams("WWW.App.Test.") == [second]
