"""The fake API server's HTTP front: the Kubernetes REST paths, on a real socket on 127.0.0.1.

    /api/v1/...                      core group          /apis/{group}/{version}/...   named groups
    .../namespaces/{ns}/{plural}     list, create, watch (``?watch=1``), deletecollection
    .../{plural}/{name}              get, replace (PUT), patch (merge, strategic, JSON, apply), delete
    .../{name}/status | /scale       the subresources     pods/{name}/log | /eviction

Patches by ``Content-Type``: ``application/apply-patch+yaml`` is server-side apply (``fieldManager``
required, ``force``), ``application/merge-patch+json``, ``application/strategic-merge-patch+json``,
``application/json-patch+json``. Watches stream one JSON event per line (chunked), from a
``resourceVersion`` (410 ``Expired`` in the stream when it is too old), with ``allowWatchBookmarks`` and
``timeoutSeconds``. Writes from clients are validated against the official OpenAPI schemas
(``kubernetes-validate``; ``fieldValidation=Strict`` rejects unknown fields). Every request needs the
bearer token of the generated kubeconfig.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class ApiServer:
    """Serves ``store`` on 127.0.0.1 in a thread (``start``/``stop``)."""

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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.store.close()
        self._http.shutdown()
        self._http.server_close()


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
            if self.headers.get("Authorization") != f"Bearer {self.api.token}":
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
