"""The whole platform on a Kubernetes cluster, as a user runs it, driven from outside the cluster.

One scenario, two callers: tests/test_kubernetes_cluster.py runs it on the REAL cluster ``KUBECONFIG``
points at (skipped without one), tests/test_kubernetes_e2e.py on the FAKE cluster of tests/kubefake in
every CI run, so the real-cluster path cannot rot unseen. Nothing in it knows which cluster it is on:

* the platform's own image (``Dockerfile``) is pushed to a registry the host and the nodes both reach;
* the chart's router objects (Secret, ServiceAccount, Role, RoleBinding, Deployment, Service, PDB),
  rendered by Helm's engine from ``charts/fastapi-deploy``, are applied to a fresh namespace; only the
  routers' control-plane URL is changed, to the control plane this test runs on the host;
* ``fastapi-deploy server --backend kubernetes`` on the host (listening where the pods reach it) builds
  the pushed app into an image, pushes it and runs it as pods; it cannot reach pod IPs from outside a
  cluster, so it leaves readiness to the pods' probes (``FASTAPI_DEPLOY_KUBERNETES_PROBE_PODS=0``);
* every request to an app goes through the in-cluster router, reached with a port forward through the
  API server (``kubernetes.stream.portforward``: what ``kubectl port-forward`` does).

Checked on the way: push → serving by digest, the router's table and its EndpointSlice view, a request
and its trace (the router's edge span and the instance's server span, exported by the pod to the host),
scaling to two pods both in rotation, logs through the pod log API, delete → the Deployment goes and
the router forgets the app.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from control_plane.traces import ROUTER_SERVICE
from tests.conftest import Server, make_server, wait_until
from tests.test_e2e import copy_example, push

ROUTER_PORT, HEALTH_PORT = 8080, 8081
# Where server-side apply sends each kind the chart's router objects are made of.
PLURALS = {
    "Secret": "secrets",
    "ServiceAccount": "serviceaccounts",
    "Service": "services",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Deployment": "deployments",
    "PodDisruptionBudget": "poddisruptionbudgets",
}


@dataclass
class Target:
    """A cluster and what the flow needs around it."""

    kubeconfig: Path
    registry: str
    """``host[:port]`` by which this machine pushes and the nodes pull (one name for both)."""
    host_address: str
    """An address of this machine that pods can connect to (the control plane listens there)."""
    base_image: str
    """What apps are built on (``FASTAPI_DEPLOY_BASE_IMAGE``)."""
    registry_username: str = ""
    registry_password: str = ""
    timeout: float = 180
    """Seconds for one pod to be pulled and ready."""


class PortForward:
    """``kubectl port-forward`` with the official client: a listener on 127.0.0.1 whose every accepted
    connection is one WebSocket port forward to ``port`` of the pod, through the API server."""

    def __init__(self, api_client: Any, namespace: str, pod: str, port: int) -> None:
        from kubernetes import client as k8s

        self.core = k8s.CoreV1Api(api_client)
        self.namespace, self.pod, self.port = namespace, pod, port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.local_port = self.listener.getsockname()[1]
        self.lock = threading.Lock()  # stream.portforward swaps the client's call_api while it connects
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}"

    def close(self) -> None:
        self.closed = True
        self.listener.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._forward, args=(conn,), daemon=True).start()

    def _forward(self, conn: socket.socket) -> None:
        from kubernetes.stream import portforward

        try:
            with self.lock:
                forward = portforward(
                    self.core.connect_get_namespaced_pod_portforward,
                    self.pod,
                    self.namespace,
                    ports=str(self.port),
                )
            remote = forward.socket(self.port)
            remote.setblocking(True)
        except Exception:
            conn.close()
            return

        def pump(src: Any, dst: Any) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pump, args=(remote, conn), daemon=True)
        back.start()
        pump(conn, remote)
        back.join(timeout=30)
        conn.close()
        remote.close()
        # The client's proxy thread closes the WebSocket once its side is closed: wait for it, then make sure.
        deadline = time.monotonic() + 5
        while forward.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        forward.websocket.close()
        forward.websocket.shutdown()  # close() leaves the socket open when the pod's side closed first


def run(target: Target, platform_image: str, tmp: Path) -> None:
    """The whole flow on ``target``; everything it creates is deleted at the end."""
    from kubernetes import config

    from runtime.backends._k8s_client import Kube

    suffix = uuid.uuid4().hex[:6]
    namespace, release = f"fdp-flow-{suffix}", f"flow{suffix}"
    kube = Kube(str(target.kubeconfig))
    api_client = config.new_client_from_config(config_file=str(target.kubeconfig))
    kube.request("POST", "/api/v1/namespaces", body={"metadata": {"name": namespace}})
    forwards: list[PortForward] = []
    srv: Server | None = None
    router_name = router_pod = ""
    try:
        image = push_image(target, platform_image, f"{target.registry}/fdp-flow/platform", suffix)
        router_token = "fdp_flow_router_" + uuid.uuid4().hex
        objects = router_objects(target, release, namespace, image, router_token)
        deployment = next(o for o in objects if o["kind"] == "Deployment")
        router_name = deployment["metadata"]["name"]
        env = {
            e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        platform_id = str(env["FASTAPI_DEPLOY_KUBERNETES_PLATFORM_ID"])

        (tmp / "control-plane").mkdir(parents=True, exist_ok=True)
        srv = make_server(
            tmp / "control-plane",
            FASTAPI_DEPLOY_HOST="0.0.0.0",  # the routers' pods connect to it
            FASTAPI_DEPLOY_BACKEND="kubernetes",
            KUBECONFIG=str(target.kubeconfig),
            FASTAPI_DEPLOY_KUBERNETES_NAMESPACE=namespace,
            FASTAPI_DEPLOY_KUBERNETES_PLATFORM_ID=platform_id,
            FASTAPI_DEPLOY_KUBERNETES_PROBE_PODS="0",  # outside the cluster: pod IPs are not reachable
            FASTAPI_DEPLOY_ROUTER_TOKEN=router_token,
            FASTAPI_DEPLOY_BASE_IMAGE=target.base_image,
            FASTAPI_DEPLOY_REGISTRY=f"{target.registry}/fdp-flow",
            FASTAPI_DEPLOY_REGISTRY_USERNAME=target.registry_username,
            FASTAPI_DEPLOY_REGISTRY_PASSWORD=target.registry_password,
            FASTAPI_DEPLOY_VERIFY_TIMEOUT=str(int(target.timeout)),
            FASTAPI_DEPLOY_TRACE_SAMPLE="1",  # every trace kept: the one asked for below too
        )
        reachable = f"http://{target.host_address}:{srv.port}"
        srv.env["FASTAPI_DEPLOY_INSTANCE_OTLP_URL"] = f"{reachable}/v1/traces"
        set_env(deployment, "FASTAPI_DEPLOY_CONTROL_PLANE_URL", reachable)
        srv.start(timeout=90)
        srv.cli("login", "--url", srv.url, "--token", srv.admin_token)

        for obj in objects:
            apply(kube, obj)
        router_pod = wait_until(
            lambda: ready_pod(
                kube, namespace, f"app.kubernetes.io/instance={release},app.kubernetes.io/component=router"
            ),
            target.timeout,
            interval=1,
            what="the router pod to be ready (its image pulled, its table synced)",
        )
        edge = PortForward(api_client, namespace, router_pod, ROUTER_PORT)
        health = PortForward(api_client, namespace, router_pod, HEALTH_PORT)
        forwards += [edge, health]
        with srv.api() as api:
            status = api.get("/admin/status").json()
        # Listed by the control plane under its pod's hostname: the pod's name.
        (listed,) = status["router"]["remote"]
        assert listed["name"].startswith(f"{router_pod}-"), status["router"]

        # Push: built, pushed, run as a pod by digest; serving once its readiness probe passes.
        out = push(srv, copy_example("hello", tmp), "flow-hello")
        app = srv.app_id("flow-hello")
        (pod,) = app_pods(kube, namespace, app)
        assert "@sha256:" in pod["spec"]["containers"][0]["image"]
        host = "flow-hello.localhost"

        def table() -> dict[str, str]:
            routes = httpx.get(f"{health.url}/routes", timeout=10).json()
            entry = next((a for a in routes["apps"] if a["host"] == host), None)
            return {u["id"]: u["endpoint"] for u in entry["upstreams"]} if entry else {}

        # In the table from the control plane, ready by the pods' EndpointSlices (read with the
        # routers' own service account: the chart's Role).
        wait_until(lambda: table() == {pod["metadata"]["name"]: "ready"}, 60, what="the pod in the router")
        r = get(edge, host, "/")
        assert r.status_code == 200 and r.json() == {"message": "Hello from fastapi-deploy"}, r.text
        trace_id = r.headers["x-trace-id"]

        def joined() -> bool:
            with srv.api() as api:  # type: ignore[union-attr]
                found = api.get(f"/traces/{trace_id}")
            spans = found.json()["spans"] if found.status_code == 200 else []
            edges = [s["span_id"] for s in spans if s["service"] == ROUTER_SERVICE]
            return any(s["parent_span_id"] in edges for s in spans if s["service"] != ROUTER_SERVICE)

        # The router's edge span and the pod's server span (exported by the pod to the host), joined.
        wait_until(joined, 60, interval=1, what="the edge span and the pod's server span, parent and child")

        # Two pods, both in the router's rotation.
        srv.cli("scale", "flow-hello", "--min", "2", "--max", "2", "--prewarm", "0")
        wait_until(
            lambda: len(table()) == 2 and set(table().values()) == {"ready"},
            target.timeout,
            interval=1,
            what="two ready pods in the router's table",
        )
        assert set(table()) == {p["metadata"]["name"] for p in app_pods(kube, namespace, app)}
        routes = httpx.get(f"{health.url}/routes", timeout=10).json()
        assert sorted(next(a["routed"] for a in routes["apps"] if a["host"] == host)) == sorted(table())
        assert {get(edge, host, "/").status_code for _ in range(10)} == {200}

        # The app's output, read through the pod log API.
        lines = srv.cli_ndjson("logs", "flow-hello", "--since", "1h")
        assert any("Application startup complete" in line["message"] for line in lines)
        assert out["deployment_id"]

        # Delete: the revision's Deployment goes, and the router forgets the app.
        srv.cli("delete", "flow-hello", "--yes")
        wait_until(
            lambda: not app_deployments(kube, namespace, app), 90, interval=1, what="the Deployment to go"
        )
        wait_until(lambda: not table(), 30, what="the router to forget the app")
        assert get(edge, host, "/").status_code == 404
    except AssertionError as exc:
        said = ""
        if router_pod:  # what the router said is most of what there is to know on a cluster
            from kubernetes import client as k8s

            with contextlib.suppress(Exception):
                said = k8s.CoreV1Api(api_client).read_namespaced_pod_log(router_pod, namespace, tail_lines=40)
        if said:
            raise AssertionError(f"{exc}\n--- the router pod's log (last 40 lines):\n{said}") from exc
        raise
    finally:
        for forward in forwards:
            forward.close()
        if srv is not None:
            srv.stop()
        if router_name:  # a namespace's deletion does not cascade on the fake cluster: its pods first
            kube.delete("Deployment", namespace, router_name)
            wait_until(
                lambda: not pods(kube, namespace, f"app.kubernetes.io/instance={release}"),
                60,
                what="the router pods to go",
            )
        kube.delete("Namespace", None, namespace)
        kube.close()
        api_client.close()


def push_image(target: Target, image: str, repository: str, tag: str) -> str:
    """``repository:tag`` pushed; the reference the chart's ``image`` values name."""
    from tests import dockerenv

    auth = (
        {"username": target.registry_username, "password": target.registry_password}
        if target.registry_username
        else None
    )
    with dockerenv.connected() as docker:
        docker.images.get(image).tag(repository, tag)
        for line in docker.images.push(repository, tag, auth_config=auth, stream=True, decode=True):
            assert "error" not in line, line
    return f"{repository}:{tag}"


def router_objects(
    target: Target, release: str, namespace: str, image: str, token: str
) -> list[dict[str, Any]]:
    """The chart's router objects for ``release`` in ``namespace`` (the apps' namespace too), rendered by
    Helm's engine, plus the pull secret for the registry when it needs credentials."""
    from tests.test_kubernetes_chart import render  # Helm's engine, as the chart's own tests render it

    repository, tag = image.rsplit(":", 1)
    values: dict[str, Any] = {
        "image": {"repository": repository, "tag": tag},
        "router": {"replicas": 1},
        "apps": {"namespace": namespace, "createNamespace": False},
        "secrets": {"routerToken": token},
    }
    extra: list[dict[str, Any]] = []
    if target.registry_username:
        values["imagePullSecrets"] = [{"name": "fdp-flow-pull"}]
        config = {
            "auths": {
                target.registry: {
                    "username": target.registry_username,
                    "password": target.registry_password,
                    "auth": base64.b64encode(
                        f"{target.registry_username}:{target.registry_password}".encode()
                    ).decode(),
                }
            }
        }
        extra.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "fdp-flow-pull", "namespace": namespace},
                "type": "kubernetes.io/dockerconfigjson",
                "data": {".dockerconfigjson": base64.b64encode(json.dumps(config).encode()).decode()},
            }
        )
    docs, _ = render(values, name=release, namespace=namespace)
    fullname = next(d for d in docs if d["kind"] == "Secret")["metadata"]["name"]
    wanted = [
        d
        for d in docs
        if d["kind"] in PLURALS
        and (
            (d["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "router"
            or (d["kind"] == "Secret" and d["metadata"]["name"] == fullname)
        )
    ]
    kinds = sorted(d["kind"] for d in wanted)
    assert {"Deployment", "Role", "RoleBinding", "Secret", "ServiceAccount"} <= set(kinds), kinds
    for doc in wanted:
        doc["metadata"]["namespace"] = namespace
    return extra + sorted(wanted, key=lambda d: d["kind"] == "Deployment")  # the Deployment last


def set_env(deployment: dict[str, Any], name: str, value: str) -> None:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (var,) = [e for e in container["env"] if e["name"] == name]
    var["value"] = value


def apply(kube: Any, obj: dict[str, Any]) -> None:
    group_version = obj["apiVersion"]
    prefix = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
    meta = obj["metadata"]
    kube.request(
        "PATCH",
        f"{prefix}/namespaces/{meta['namespace']}/{PLURALS[obj['kind']]}/{meta['name']}",
        query={"fieldManager": "fdp-flow-test", "force": True},
        body=obj,
        content_type="application/apply-patch+yaml",
    )


def pods(kube: Any, namespace: str, selector: str) -> list[dict[str, Any]]:
    found, _ = kube.list("Pod", namespace, label_selector=selector)
    return [p for p in found if not p["metadata"].get("deletionTimestamp")]


def ready_pod(kube: Any, namespace: str, selector: str) -> str | None:
    for pod in pods(kube, namespace, selector):
        conditions = (pod.get("status") or {}).get("conditions") or []
        if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
            return str(pod["metadata"]["name"])
    return None


def app_pods(kube: Any, namespace: str, app_id: str) -> list[dict[str, Any]]:
    return pods(kube, namespace, f"fastapi-deploy.dev/app={app_id}")


def app_deployments(kube: Any, namespace: str, app_id: str) -> list[dict[str, Any]]:
    found, _ = kube.list("Deployment", namespace, label_selector=f"fastapi-deploy.dev/app={app_id}")
    return list(found)


def get(edge: PortForward, host: str, path: str) -> httpx.Response:
    return httpx.get(f"{edge.url}{path}", headers={"Host": host}, timeout=30)
