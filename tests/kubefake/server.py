"""The fake API server's HTTP front: the Kubernetes REST paths, on a real socket on 127.0.0.1.

    /api/v1/...                      core group          /apis/{group}/{version}/...   named groups
    .../namespaces/{ns}/{plural}     list, create, watch (``?watch=1``), deletecollection
    .../{plural}/{name}              get, replace (PUT), patch (merge, strategic, JSON, apply), delete
    .../{name}/status | /scale       the subresources     pods/{name}/log | /eviction | /portforward

Patches by ``Content-Type``: ``application/apply-patch+yaml`` is server-side apply (``fieldManager``
required, ``force``), ``application/merge-patch+json``, ``application/strategic-merge-patch+json``,
``application/json-patch+json``. Watches stream one JSON event per line (chunked), from a
``resourceVersion`` (410 ``Expired`` in the stream when it is too old), with ``allowWatchBookmarks`` and
``timeoutSeconds``. ``pods/{name}/portforward`` is the WebSocket port forward (``v4.channel.k8s.io``: a
data and an error channel per port, each opened with the port number) to the pod's IP, as the client's
``kubernetes.stream.portforward`` uses it. Writes from clients are validated against the official OpenAPI
schemas (``kubernetes-validate``; ``fieldValidation=Strict`` rejects unknown fields). Every request needs
the bearer token of the generated kubeconfig.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import yaml

from tests.kubefake.resources import BY_PATH, KINDS, Kind, SelectorError, kind_of, selector_matches
from tests.kubefake.store import ApiError, Store, invalid

if TYPE_CHECKING:
    from tests.kubefake import FakeCluster

SCHEMA_VERSION = "1.33"


@cache
def _validator(kind: str, api_version: str, strict: bool) -> Any:
    import jsonschema
    import kubernetes_validate.utils as kv
    from referencing import Registry, Resource

    group = api_version.split("/")[0].split(".")[0] + "-" if "/" in api_version else ""
    version = api_version.split("/")[-1]
    directory = f"v{SCHEMA_VERSION}.0-local" + ("-strict" if strict else "")
    schema = kv.schema_contents(
        f"kubernetes-json-schema/{directory}/{kind.lower()}-{group}{version}.json", SCHEMA_VERSION
    )
    definitions = kv.schema_contents(f"kubernetes-json-schema/{directory}/_definitions.json", SCHEMA_VERSION)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())  # type: ignore[var-annotated]
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def validate(kind: Kind, obj: dict[str, Any], strict: bool) -> None:
    """422 ``Invalid`` unless ``obj`` conforms to the Kubernetes OpenAPI schema of its kind."""
    errors = sorted(
        _validator(kind.kind, kind.api_version, strict).iter_errors(obj), key=lambda e: list(e.path)
    )
    if errors:
        first = errors[0]
        where = ".".join(str(p) for p in first.path) or "<root>"
        raise invalid(kind, obj.get("metadata", {}).get("name", ""), f"{where}: {first.message}")


def _self_signed(address: str, cert: Path, key: Path) -> None:
    """A self-signed certificate for the IP ``address`` (its own CA: what ``ca.crt`` holds)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubefake-apiserver")])
    now = datetime.datetime.now(datetime.UTC)
    public = private.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class ApiServer:
    """Serves ``store`` on 127.0.0.1 in a thread (``start``/``stop``), and to pods (``serve_pods``)."""

    def __init__(self, cluster: FakeCluster, token: str) -> None:
        self.cluster = cluster
        self.store: Store = cluster.store
        self.token = token
        self.requests: list[tuple[str, str]] = []
        """(method, path) of every request, for tests that assert what a client did."""
        handler = type("Handler", (_Handler,), {"api": self})
        self._http = _Server(("127.0.0.1", 0), handler)
        self.port = int(self._http.server_address[1])
        self._thread = threading.Thread(target=self._http.serve_forever, name="kubefake-api", daemon=True)
        self._pods: _Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def serve_pods(self, address: str, directory: Path) -> tuple[int, Any]:
        """The in-cluster endpoint: the same API over TLS on ``address`` (the pods' network's gateway),
        its certificate (for that IP) self-signed. The port, and ``namespace -> directory`` of the files a
        pod's service account mounts (``token``, ``ca.crt``, ``namespace``)."""
        import ssl

        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / "ca.crt", directory / "tls.key"
        _self_signed(address, cert, key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        handler = type("Handler", (_Handler,), {"api": self})
        pods = _Server((address, 0), handler)
        pods.socket = context.wrap_socket(pods.socket, server_side=True)
        self._pods = pods
        threading.Thread(target=pods.serve_forever, name="kubefake-api-tls", daemon=True).start()

        def mounted(namespace: str) -> Path:
            where = directory / "accounts" / namespace
            if not where.is_dir():
                where.mkdir(parents=True, exist_ok=True)
                (where / "token").write_text(self.token)
                (where / "namespace").write_text(namespace)
                (where / "ca.crt").write_bytes(cert.read_bytes())
                for path in (where, *where.iterdir()):
                    path.chmod(0o755 if path.is_dir() else 0o644)
            return where

        return int(pods.server_address[1]), mounted

    def stop(self) -> None:
        self.store.close()
        self._http.shutdown()
        self._http.server_close()
        if self._pods is not None:
            self._pods.shutdown()
            self._pods.server_close()


class _Handler(BaseHTTPRequestHandler):
    api: ApiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- plumbing -----------------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        self.api.requests.append((method, url.path))
        try:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            scheme, _, credential = (self.headers.get("Authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or credential.strip() != self.api.token:  # the scheme: any case
                raise ApiError(401, "Unauthorized", "Unauthorized")
            if url.path.rstrip("/") in ("/version", "/healthz", "/readyz", "/livez", "/api", "/apis"):
                self._json(200, self._meta(url.path.rstrip("/")))
                return
            self._resource(method, url.path, query, raw)
        except ApiError as exc:
            self._json(exc.code, exc.status())
        except SelectorError as exc:
            self._json(400, ApiError(400, "BadRequest", str(exc)).status())
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _meta(self, path: str) -> dict[str, Any]:
        if path == "/version":
            return {
                "major": "1",
                "minor": SCHEMA_VERSION.split(".")[1],
                "gitVersion": f"v{SCHEMA_VERSION}.0-kubefake",
                "gitCommit": "kubefake",
                "gitTreeState": "clean",
                "buildDate": "2024-01-01T00:00:00Z",
                "goVersion": "none (Python)",
                "compiler": "cpython",
                "platform": "linux/amd64",
            }
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"]}
        if path == "/apis":
            groups = sorted({(k.group, k.version) for k in KINDS if k.group})
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}]} for g, v in groups
                ],
            }
        return {"status": "ok"}

    def _json(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, chunks: Iterator[bytes], content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in chunks:
                if chunk:
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def _body(self, raw: bytes) -> Any:
        if not raw:
            return {}
        try:
            ctype = self.headers.get("Content-Type", "")
            return yaml.safe_load(raw) if "yaml" in ctype else json.loads(raw)
        except (ValueError, yaml.YAMLError) as exc:
            raise ApiError(400, "BadRequest", f"the body of the request could not be decoded: {exc}") from exc

    # -- resources ----------------------------------------------------------------------------------------

    def _resource(self, method: str, path: str, query: dict[str, str], raw: bytes) -> None:
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["api"] and len(parts) >= 3:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        kind = BY_PATH.get((group, version, rest[0]))
        if kind is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        store = self.api.store
        manager = query.get("fieldManager") or self.headers.get("User-Agent", "unknown").split("/")[0]
        validation = query.get("fieldValidation", "Warn")
        if name is None:
            if method == "GET" and query.get("watch") in ("1", "true"):
                self._watch(kind, namespace, query)
            elif method == "GET":
                self._list(kind, namespace, query)
            elif method == "POST":
                body = self._body(raw)
                obj = store.create(
                    kind,
                    namespace,
                    body,
                    manager=manager,
                    admit=self.api.cluster.admit,
                    validation=validation,
                )
                self._json(201, obj)
            elif method == "DELETE":
                items, _ = store.list(kind, namespace, query.get("labelSelector"), query.get("fieldSelector"))
                for item in items:
                    store.delete(kind, namespace, item["metadata"]["name"])
                self._json(200, {"kind": f"{kind.kind}List", "apiVersion": kind.api_version, "items": items})
            else:
                raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed on a collection")
            return
        if sub == "scale" and kind.scale:
            self._scale(method, kind, namespace, name, raw, manager)
        elif sub == "log" and kind.kind == "Pod":
            self._log(namespace or "default", name, query)
        elif sub == "portforward" and kind.kind == "Pod" and method == "GET":
            self._portforward(namespace or "default", name, query)
        elif sub == "eviction" and kind.kind == "Pod" and method == "POST":
            self._evict(namespace or "default", name, self._body(raw))
        elif sub in (None, "status"):
            self._object(method, kind, namespace, name, sub, query, raw, manager, validation)
        else:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")

    def _object(
        self,
        method: str,
        kind: Kind,
        namespace: str | None,
        name: str,
        sub: str | None,
        query: dict[str, str],
        raw: bytes,
        manager: str,
        validation: str,
    ) -> None:
        store = self.api.store
        if method == "GET":
            self._json(200, store.get(kind, namespace, name))
        elif method == "PUT":
            self._json(
                200,
                store.update(
                    kind,
                    namespace,
                    name,
                    self._body(raw),
                    manager=manager,
                    subresource=sub,
                    validation=validation,
                ),
            )
        elif method == "PATCH":
            ctype = self.headers.get("Content-Type", "").split(";")[0].strip()
            patch_type = {
                "application/apply-patch+yaml": "apply",
                "application/merge-patch+json": "merge",
                "application/strategic-merge-patch+json": "strategic",
                "application/json-patch+json": "json",
            }.get(ctype)
            if patch_type is None:
                raise ApiError(
                    415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {ctype}"
                )
            if patch_type == "apply" and not query.get("fieldManager"):
                raise ApiError(
                    422,
                    "Invalid",
                    'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: '
                    "is required for apply patch",
                )
            if patch_type == "apply" and sub is not None:
                raise ApiError(400, "BadRequest", "apply on subresources is not supported by the fake")
            obj = store.patch(
                kind,
                namespace,
                name,
                self._body(raw),
                patch_type,
                manager=manager,
                subresource=sub,
                force=query.get("force") in ("true", "1"),
                admit=self.api.cluster.admit,
                validation="Strict"
                if patch_type == "apply" and validation == "Strict"
                else (validation if patch_type != "json" else "Warn"),
            )
            self._json(200, obj)
        elif method == "DELETE":
            body = self._body(raw)
            grace = query.get("gracePeriodSeconds", body.get("gracePeriodSeconds"))
            obj = store.delete(
                kind,
                namespace,
                name,
                grace=None if grace in (None, "") else int(grace),
                propagation=query.get("propagationPolicy") or body.get("propagationPolicy"),
                preconditions=body.get("preconditions"),
            )
            self._json(200, obj)
        else:
            raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed")

    def _list(self, kind: Kind, namespace: str | None, query: dict[str, str]) -> None:
        items, rv = self.api.store.list(
            kind, namespace, query.get("labelSelector"), query.get("fieldSelector")
        )
        start = 0
        if query.get("continue"):
            start = int(json.loads(base64.b64decode(query["continue"]))["start"])
        limit = int(query.get("limit") or 0)
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        page = items[start:]
        if limit and len(page) > limit:
            page = page[:limit]
            meta["continue"] = base64.b64encode(json.dumps({"start": start + limit}).encode()).decode()
            meta["remainingItemCount"] = len(items) - start - limit
        self._json(
            200, {"kind": f"{kind.kind}List", "apiVersion": kind.api_version, "metadata": meta, "items": page}
        )

    def _watch(self, kind: Kind, namespace: str | None, query: dict[str, str]) -> None:
        timeout = float(query.get("timeoutSeconds") or 1800)
        events = self.api.store.watch(
            kind,
            namespace,
            query.get("labelSelector"),
            query.get("fieldSelector"),
            query.get("resourceVersion"),
            until=time.monotonic() + timeout,
            bookmarks=query.get("allowWatchBookmarks") in ("true", "1"),
            clock=time.monotonic,
        )
        self.close_connection = True
        self._stream((json.dumps(e).encode() + b"\n" for e in events), "application/json")

    def _scale(
        self, method: str, kind: Kind, namespace: str | None, name: str, raw: bytes, manager: str
    ) -> None:
        store = self.api.store
        if method in ("PUT", "PATCH"):
            body = self._body(raw)
            if method == "PATCH":
                replicas = (body.get("spec") or {}).get("replicas")
                rv = (body.get("metadata") or {}).get("resourceVersion")
            else:
                replicas, rv = (
                    (body.get("spec") or {}).get("replicas", 0),
                    (body.get("metadata") or {}).get("resourceVersion"),
                )
            if not isinstance(replicas, int):
                raise invalid(kind, name, "spec.replicas: Required value")
            obj = store.scale(kind, namespace, name, replicas, manager=manager, rv=rv)
        else:
            obj = store.get(kind, namespace, name)
        selector = obj["spec"].get("selector") or {}
        parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
        self._json(
            200,
            {
                "kind": "Scale",
                "apiVersion": "autoscaling/v1",
                "metadata": {
                    k: obj["metadata"][k]
                    for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                    if k in obj["metadata"]
                },
                "spec": {"replicas": obj["spec"].get("replicas", 0)},
                "status": {
                    "replicas": (obj.get("status") or {}).get("replicas", 0),
                    "selector": ",".join(parts),
                },
            },
        )

    def _log(self, namespace: str, name: str, query: dict[str, str]) -> None:
        pod = self.api.store.get(kind_of("Pod"), namespace, name)
        chunks = self.api.cluster.kubelet.logs(
            pod,
            container=query.get("container"),
            follow=query.get("follow") in ("true", "1"),
            timestamps=query.get("timestamps") in ("true", "1"),
            previous=query.get("previous") in ("true", "1"),
            since_seconds=int(query["sinceSeconds"]) if query.get("sinceSeconds") else None,
            since_time=query.get("sinceTime"),
            tail_lines=int(query["tailLines"]) if query.get("tailLines") else None,
            stream=query.get("stream"),
        )
        self.close_connection = True
        self._stream(chunks, "text/plain")

    def _portforward(self, namespace: str, name: str, query: dict[str, str]) -> None:
        """The WebSocket port forward: channel ``2i`` carries port ``i``'s bytes both ways, ``2i+1`` its
        errors (server to client); each channel's first frame is the port number (2 bytes, little
        endian). The connection ends when the client closes it or every pod connection has ended."""
        pod = self.api.store.get(kind_of("Pod"), namespace, name)
        status = pod.get("status") or {}
        if status.get("phase") != "Running" or not status.get("podIP"):
            raise ApiError(400, "BadRequest", f"pod {name} is not running")
        try:
            ports = [int(p) for p in query.get("ports", "").split(",") if p]
        except ValueError:
            raise ApiError(400, "BadRequest", f"invalid port in {query.get('ports')!r}") from None
        if not ports or not all(0 < p < 65536 for p in ports):
            raise ApiError(400, "BadRequest", 'query parameter "ports" is required: one or more ports')
        key = self.headers.get("Sec-WebSocket-Key", "")
        offered = {p.strip() for p in self.headers.get("Sec-WebSocket-Protocol", "").split(",")}
        if self.headers.get("Upgrade", "").lower() != "websocket" or not key:
            raise ApiError(400, "BadRequest", "Upgrade request required")
        if _CHANNEL_PROTOCOL not in offered:
            raise ApiError(400, "BadRequest", f"unsupported subprotocols {sorted(offered)}")
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.send_header("Sec-WebSocket-Protocol", _CHANNEL_PROTOCOL)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        _PortForward(self.connection, self.rfile, status["podIP"], ports).run()

    def _evict(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        store = self.api.store
        pod = store.get(kind_of("Pod"), namespace, name)
        budgets, _ = store.list(kind_of("PodDisruptionBudget"), namespace)
        for pdb in budgets:
            if selector_matches(pdb["spec"].get("selector"), pod["metadata"].get("labels") or {}):
                if int((pdb.get("status") or {}).get("disruptionsAllowed", 0)) < 1:
                    raise ApiError(
                        429,
                        "TooManyRequests",
                        "Cannot evict pod as it would violate the pod's disruption budget.",
                        details={
                            "causes": [
                                {
                                    "reason": "DisruptionBudget",
                                    "message": f"The disruption budget {pdb['metadata']['name']} needs "
                                    f"{pdb['status'].get('desiredHealthy', 0)} healthy pods and has "
                                    f"{pdb['status'].get('currentHealthy', 0)} currently",
                                }
                            ]
                        },
                    )
        options = body.get("deleteOptions") or {}
        store.delete(kind_of("Pod"), namespace, name, grace=options.get("gracePeriodSeconds"))
        self._json(
            201, {"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201, "metadata": {}}
        )


_CHANNEL_PROTOCOL = "v4.channel.k8s.io"
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class _PortForward:
    """One port-forward WebSocket: client frames to the pod's ports, the pods' bytes back as frames."""

    def __init__(self, conn: socket.socket, rfile: Any, ip: str, ports: list[int]) -> None:
        self.conn, self.rfile, self.ip, self.ports = conn, rfile, ip, ports
        self.lock = threading.Lock()
        self.upstreams: list[socket.socket | None] = [None] * len(ports)
        self.open = 0

    def send(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
        with self.lock:
            self.conn.sendall(head + payload)

    def receive(self) -> tuple[int, bytes] | None:
        head = self.rfile.read(2)
        if len(head) < 2:
            return None
        opcode, length = head[0] & 0x0F, head[1] & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self.rfile.read(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self.rfile.read(8))
        mask = self.rfile.read(4) if head[1] & 0x80 else b""
        payload = self.rfile.read(length)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return opcode, payload

    def run(self) -> None:
        readers = []
        try:
            for i, port in enumerate(self.ports):
                number = struct.pack("<H", port)
                self.send(0x2, bytes([2 * i]) + number)
                self.send(0x2, bytes([2 * i + 1]) + number)
                try:
                    self.upstreams[i] = socket.create_connection((self.ip, port), timeout=5)
                except OSError as exc:
                    message = f"error forwarding port {port} to pod: {exc}"
                    self.send(0x2, bytes([2 * i + 1]) + message.encode())
                    continue
                self.open += 1
                reader = threading.Thread(target=self._pump, args=(i,), daemon=True)
                reader.start()
                readers.append(reader)
            if not readers:
                return
            while (frame := self.receive()) is not None:
                opcode, payload = frame
                if opcode == 0x8:  # close
                    break
                if opcode == 0x9:  # ping
                    self.send(0xA, payload)
                elif opcode in (0x0, 0x2) and payload and payload[0] % 2 == 0:
                    upstream = self.upstreams[payload[0] // 2] if payload[0] // 2 < len(self.ports) else None
                    if upstream is not None and len(payload) > 1:
                        upstream.sendall(payload[1:])
        except OSError:
            pass
        finally:
            for upstream in self.upstreams:
                if upstream is not None:
                    upstream.close()
            for reader in readers:
                reader.join(timeout=5)
            with contextlib.suppress(OSError):
                self.send(0x8, struct.pack("!H", 1000))

    def _pump(self, i: int) -> None:
        upstream = self.upstreams[i]
        assert upstream is not None
        upstream.settimeout(None)
        try:
            while data := upstream.recv(65536):
                self.send(0x2, bytes([2 * i]) + data)
        except OSError:
            pass
        with self.lock:
            self.open -= 1
            last = self.open == 0
        if last:
            # Every pod connection has ended: so does the forward (the client sees the WebSocket close).
            with contextlib.suppress(OSError):
                self.send(0x8, struct.pack("!H", 1000))
                self.conn.shutdown(socket.SHUT_RDWR)
