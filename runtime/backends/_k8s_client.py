"""The Kubernetes API calls the ``kubernetes`` backend makes, on plain dicts, through the official client.

The official ``kubernetes`` package is imported here, lazily (optional extra ``kubernetes``): its
configuration loading (kubeconfig or the pod's service account), authentication, TLS and connection
pool. Requests go through its ``ApiClient`` by REST path, so every resource — typed or not, apply
patches, the scale subresource, watches, pod logs — takes the same road and comes back as JSON.

Errors are translated at this boundary::

    KubeError                 any API failure: status, reason, message (from the API's Status)
    ├── NotFound              404
    ├── Conflict              409: a stale resourceVersion, an apply conflict, AlreadyExists
    └── Gone                  410: a watch's resourceVersion is too old (list again)

All methods block: the backend calls them from worker threads.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

FIELD_MANAGER = "fastapi-deploy"

# kind -> (apiVersion, plural, namespaced)
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "Namespace": ("v1", "namespaces", False),
    "Pod": ("v1", "pods", True),
    "Service": ("v1", "services", True),
    "Secret": ("v1", "secrets", True),
    "ConfigMap": ("v1", "configmaps", True),
    "Deployment": ("apps/v1", "deployments", True),
    "ReplicaSet": ("apps/v1", "replicasets", True),
    "EndpointSlice": ("discovery.k8s.io/v1", "endpointslices", True),
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets", True),
    "HorizontalPodAutoscaler": ("autoscaling/v2", "horizontalpodautoscalers", True),
    "PriorityClass": ("scheduling.k8s.io/v1", "priorityclasses", False),
    "Ingress": ("networking.k8s.io/v1", "ingresses", True),
    "NetworkPolicy": ("networking.k8s.io/v1", "networkpolicies", True),
    "Lease": ("coordination.k8s.io/v1", "leases", True),
}


class KubeError(Exception):
    """A failed API call: ``status`` (HTTP), ``reason`` (``NotFound``, ``Conflict``...) and ``message``."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    pass


class Gone(KubeError):
    pass


def _error(status: int, body: bytes | str | None) -> KubeError:
    reason, message = "", ""
    try:
        parsed = json.loads(body or b"{}")
        reason, message = str(parsed.get("reason", "")), str(parsed.get("message", ""))
    except (ValueError, AttributeError):
        message = (body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body or ""))[:500]
    cls = {404: NotFound, 409: Conflict, 410: Gone}.get(status, KubeError)
    return cls(status, reason, message)


def path(kind: str, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
    api_version, plural, namespaced = RESOURCES[kind]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespaced and namespace:
        base += f"/namespaces/{quote(namespace)}"
    base += f"/{plural}"
    if name:
        base += f"/{quote(name)}"
    if sub:
        base += f"/{sub}"
    return base


class Kube:
    """One connection pool to one cluster. Thread-safe."""

    def __init__(self, kubeconfig: str | None = None, context: str | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.context = context
        self._client: Any = None
        self._lock = threading.Lock()

    def client(self) -> Any:
        """The official ``kubernetes.client.ApiClient``, configured on first use."""
        with self._lock:
            if self._client is None:
                import os

                from kubernetes import client, config

                configuration = client.Configuration()
                if (
                    self.kubeconfig is None
                    and os.environ.get("KUBERNETES_SERVICE_HOST")
                    and not os.environ.get("KUBECONFIG")
                ):
                    config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
                else:
                    config.load_kube_config(  # type: ignore[no-untyped-call]
                        config_file=self.kubeconfig, context=self.context, client_configuration=configuration
                    )
                configuration.connection_pool_maxsize = 64  # one stream per watch and per followed pod
                self._client = client.ApiClient(configuration)
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # -- requests -----------------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        url: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | tuple[float, float] = 30.0,
        stream: bool = False,
    ) -> Any:
        """The decoded JSON answer (``stream``: the open urllib3 response). Raises KubeError."""
        from kubernetes.client.exceptions import ApiException

        api = self.client()
        params = [
            (k, str(v).lower() if isinstance(v, bool) else str(v))
            for k, v in (query or {}).items()
            if v is not None
        ]
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            prepared = api.param_serialize(
                method=method,
                resource_path=url,
                query_params=params,
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            response = api.call_api(*prepared, _request_timeout=timeout)
        except ApiException as exc:
            raise _error(int(exc.status or 0), exc.body) from exc
        except Exception as exc:  # urllib3: refused, timed out, TLS
            raise KubeError(0, "Unreachable", f"the Kubernetes API could not be reached: {exc}") from exc
        if not 200 <= response.status <= 299:
            raise _error(response.status, response.read())
        if stream:
            return response.response
        data = response.read()
        return json.loads(data) if data else {}

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.request("GET", path(kind, namespace, name))
            return result
        except NotFound:
            return None

    def list(
        self, kind: str, namespace: str | None = None, *, label_selector: str | None = None
    ) -> tuple[list[dict[str, Any]], str]:
        """Items and the list's resourceVersion (what a watch resumes from); every page."""
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            result = self.request(
                "GET",
                path(kind, namespace),
                query={"labelSelector": label_selector, "limit": 500, "continue": token},
            )
            items += result.get("items") or []
            token = (result.get("metadata") or {}).get("continue")
            if not token:
                return items, str((result.get("metadata") or {}).get("resourceVersion", ""))

    def apply(self, obj: dict[str, Any], *, force: bool = True) -> dict[str, Any]:
        """Server-side apply as ``fastapi-deploy`` (unknown fields rejected). ``force`` takes over fields
        another manager set (ours are ours); without it a conflict raises Conflict."""
        meta = obj["metadata"]
        result: dict[str, Any] = self.request(
            "PATCH",
            path(obj["kind"], meta.get("namespace"), meta["name"]),
            query={"fieldManager": FIELD_MANAGER, "force": force, "fieldValidation": "Strict"},
            body=obj,
            content_type="application/apply-patch+yaml",
        )
        return result

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        result: dict[str, Any] = self.request(
            "POST",
            path(obj["kind"], meta.get("namespace")),
            query={"fieldManager": FIELD_MANAGER, "fieldValidation": "Strict"},
            body=obj,
        )
        return result

    def merge_patch(
        self, kind: str, namespace: str | None, name: str, patch: dict[str, Any]
    ) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "PATCH",
            path(kind, namespace, name),
            query={"fieldManager": FIELD_MANAGER},
            body=patch,
            content_type="application/merge-patch+json",
        )
        return result

    def delete(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        *,
        grace: int | None = None,
        uid: str | None = None,
        propagation: str = "Background",
    ) -> bool:
        """Delete (``uid``: only that incarnation). False when it was not there."""
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        if grace is not None:
            body["gracePeriodSeconds"] = grace
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", path(kind, namespace, name), body=body)
            return True
        except NotFound:
            return False
        except Conflict:  # the uid precondition: another incarnation
            return False

    def scale(self, namespace: str, name: str, *, by: int | None = None, to: int | None = None) -> int:
        """Change a Deployment's replicas through the scale subresource, with optimistic concurrency:
        read, change, write with the resourceVersion read, again on a 409. The new count."""
        url = path("Deployment", namespace, name, "scale")
        for attempt in range(20):
            scale = self.request("GET", url)
            current = int((scale.get("spec") or {}).get("replicas") or 0)
            wanted = max(0, current + by) if by is not None else max(0, int(to or 0))
            if wanted == current:
                return current
            body = {
                "apiVersion": "autoscaling/v1",
                "kind": "Scale",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "resourceVersion": scale["metadata"]["resourceVersion"],
                },
                "spec": {"replicas": wanted},
            }
            try:
                self.request("PUT", url, query={"fieldManager": FIELD_MANAGER}, body=body)
                return wanted
            except Conflict:
                time.sleep(min(0.5, 0.01 * 2**attempt))
        raise KubeError(
            409, "Conflict", f"could not scale deployment {namespace}/{name}: too many concurrent changes"
        )

    # -- streams ------------------------------------------------------------------------------------------

    def watch(
        self,
        kind: str,
        namespace: str | None,
        *,
        label_selector: str | None,
        resource_version: str,
        timeout: int = 240,
        on_response: Any = None,
    ) -> Iterator[dict[str, Any]]:
        """Events from ``resource_version`` on, until the server ends the watch (``timeout`` seconds).
        Bookmarks are passed on (they carry the resourceVersion to resume from). Raises Gone."""
        response = self.request(
            "GET",
            path(kind, namespace),
            query={
                "watch": True,
                "labelSelector": label_selector,
                "resourceVersion": resource_version,
                "allowWatchBookmarks": True,
                "timeoutSeconds": timeout,
            },
            timeout=(10.0, timeout + 30.0),
            stream=True,
        )
        if on_response is not None:
            on_response(response)
        try:
            for line in _lines(response):
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    raise _error(int(status.get("code") or 500), json.dumps(status).encode())
                yield event
        finally:
            response.release_conn()

    def logs(
        self,
        namespace: str,
        name: str,
        *,
        follow: bool,
        since_time: str | None = None,
        previous: bool = False,
        stream: str | None = None,
        tail: int | None = None,
        on_response: Any = None,
    ) -> Iterator[str]:
        """Lines of a pod's container log, each ``{RFC3339 timestamp} {line}``."""
        response = self.request(
            "GET",
            path("Pod", namespace, name, "log"),
            query={
                "container": "app",
                "follow": follow,
                "timestamps": True,
                "sinceTime": since_time,
                "previous": previous or None,
                "stream": stream,
                "tailLines": tail,
            },
            timeout=(10.0, None) if follow else 30.0,  # type: ignore[arg-type]
            stream=True,
        )
        if on_response is not None:
            on_response(response)
        try:
            for line in _lines(response):
                yield line.decode("utf-8", "replace")
        finally:
            response.release_conn()


def _lines(response: Any) -> Iterator[bytes]:
    pending = b""
    for chunk in response.stream(65536, decode_content=False):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from (line.rstrip(b"\r") for line in lines if line)
    if pending.strip():
        yield pending
