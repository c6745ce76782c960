"""The whole platform on the kubernetes backend, end to end, against the FAKE cluster of tests/kubefake
(a real HTTP API server; its kubelet runs pods as Docker containers of the pushed image).

A real server with ``--backend kubernetes`` builds the app into an image, pushes it to the test registry,
runs it as pods by digest and routes to their IPs; autoscaling knobs become replicas; a restarted server
adopts the pods instead of replacing them; two control planes on one PostgreSQL elect a leader through a
Lease, and when the leader dies the other takes over and serves the apps; a remote router
(``fastapi-deploy router --endpoint-slices``) follows the pods' EndpointSlices, so a pod going away gets
no request even while the control plane is frozen. Last, the real-cluster scenario of tests/clusterflow.py
(what tests/test_kubernetes_cluster.py runs when ``KUBECONFIG`` points at a cluster) runs here on the fake
one: the chart's routers in the cluster, the control plane outside it.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import clusterflow, dockerenv
from tests.conftest import Server, make_server, wait_until
from tests.dbs import postgres_database
from tests.kubefake import FakeCluster
from tests.test_e2e import copy_example, push
from tests.test_edge_router import TOKEN, Edge, routed

pytestmark = pytest.mark.e2e

PAUSE = "registry.k8s.io/pause:3.10"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCluster]:
    dockerenv.require()
    if not dockerenv.REGISTRY:
        pytest.fail("the kubernetes tier needs the test registry (scripts/test starts one)")
    stand_ins = {PAUSE: (dockerenv.BASE_IMAGE, ["sleep", "infinity"])}
    with FakeCluster(
        tmp_path_factory.mktemp("kubefake"),
        sandbox_image=dockerenv.BASE_IMAGE,
        stand_ins=stand_ins,
        restart_backoff=1.0,
        node_cpu="4",
    ) as c:
        yield c


def k8s_server(tmp: Path, cluster: FakeCluster, namespace: str, **extra: str) -> Server:
    """A server on the fake cluster; the apps' namespace exists, as the chart creates it."""
    from kubernetes import client as k8s

    tmp.mkdir(parents=True, exist_ok=True)
    api = core(cluster)
    if not any(n.metadata.name == namespace for n in api.list_namespace().items):
        api.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    return make_server(
        tmp,
        FASTAPI_DEPLOY_BACKEND="kubernetes",
        KUBECONFIG=str(cluster.kubeconfig),
        FASTAPI_DEPLOY_KUBERNETES_NAMESPACE=namespace,
        FASTAPI_DEPLOY_KUBERNETES_PLATFORM_ID=namespace,
        FASTAPI_DEPLOY_KUBERNETES_SPLIT_LOGS="1",
        FASTAPI_DEPLOY_BASE_IMAGE=dockerenv.BASE_IMAGE,
        FASTAPI_DEPLOY_REGISTRY=f"{dockerenv.REGISTRY}/k8s-e2e",
        FASTAPI_DEPLOY_REGISTRY_USERNAME=dockerenv.REGISTRY_USERNAME,
        FASTAPI_DEPLOY_REGISTRY_PASSWORD=dockerenv.REGISTRY_PASSWORD,
        FASTAPI_DEPLOY_VERIFY_TIMEOUT="90",
        **extra,
    )


def core(cluster: FakeCluster) -> Any:
    from kubernetes import client as k8s

    return k8s.CoreV1Api(cluster.client())


def pods(cluster: FakeCluster, namespace: str, app_id: str) -> list[dict[str, Any]]:
    found = core(cluster).list_namespaced_pod(namespace, label_selector=f"fastapi-deploy.dev/app={app_id}")
    return [p.to_dict() for p in found.items if not p.metadata.deletion_timestamp]


def test_push_scale_restart_and_adopt(cluster: FakeCluster, tmp_path: Path) -> None:
    namespace = f"e2e-{uuid.uuid4().hex[:6]}"
    srv = k8s_server(tmp_path / "one", cluster, namespace, FASTAPI_DEPLOY_KUBERNETES_KEEP_ON_CLOSE="1")
    srv.start(timeout=90)
    try:
        srv.cli("login", "--url", srv.url, "--token", srv.admin_token)
        out = push(srv, copy_example("hello", tmp_path), "kube-hello")
        r = srv.get("kube-hello", "/")
        assert r.status_code == 200 and r.json() == {"message": "Hello from fastapi-deploy"}
        the_app = srv.app_id("kube-hello")
        (pod,) = pods(cluster, namespace, the_app)
        image = pod["spec"]["containers"][0]["image"]
        assert "@sha256:" in image, image  # deployed by digest
        status = srv.cli_json("status", "kube-hello")
        (instance,) = [i for i in status["app"]["instances"] if i["state"] == "serving"]
        assert instance["host"] == pod["status"]["pod_ip"]
        # Two serving instances: two pods, both behind the router.
        srv.cli("scale", "kube-hello", "--min", "2", "--max", "3")
        wait_until(
            lambda: (
                len(
                    [
                        i
                        for i in srv.cli_json("status", "kube-hello")["app"]["instances"]
                        if i["state"] == "serving"
                    ]
                )
                == 2
            ),
            90,
            interval=0.5,
            what="a second serving instance",
        )
        assert len(pods(cluster, namespace, the_app)) == 2
        seen = {srv.get("kube-hello", "/").status_code for _ in range(10)}
        assert seen == {200}
        # The app's output comes through the pod log API into the app's logs.
        lines = srv.cli_ndjson("logs", "kube-hello", "--since", "1h")
        assert any("Application startup complete" in line["message"] for line in lines)
        # A restarted control plane adopts the pods: none is replaced.
        before = {p["metadata"]["name"] for p in pods(cluster, namespace, the_app)}
        srv.stop()
        assert {p["metadata"]["name"] for p in pods(cluster, namespace, the_app)} == before
        srv.start(timeout=90)
        wait_until(lambda: srv.get("kube-hello", "/").status_code == 200, 60, what="the adopted app")
        assert {p["metadata"]["name"] for p in pods(cluster, namespace, the_app)} == before
        assert out["deployment_id"]
        # Deleting the app deletes its revision's Deployment (and with it its pods).
        srv.cli("delete", "kube-hello", "--yes")
        from kubernetes import client as k8s

        apps = k8s.AppsV1Api(cluster.client())
        wait_until(
            lambda: (
                not any(
                    (d.metadata.labels or {}).get("fastapi-deploy.dev/app") == the_app
                    for d in apps.list_namespaced_deployment(namespace).items
                )
            ),
            60,
            interval=0.5,
            what="the Deployment to go",
        )
    finally:
        srv.stop()


def test_leader_fails_over_to_the_other_control_plane(cluster: FakeCluster, tmp_path: Path) -> None:
    with postgres_database() as url:
        failover(cluster, tmp_path, url)


def failover(cluster: FakeCluster, tmp_path: Path, url: str) -> None:
    namespace = f"ha-{uuid.uuid4().hex[:6]}"
    election = {
        "FASTAPI_DEPLOY_LEADER_ELECTION": "lease",
        "FASTAPI_DEPLOY_LEADER_LEASE": f"lease-{namespace}",
        "POD_NAMESPACE": "default",
        "FASTAPI_DEPLOY_LEADER_LEASE_DURATION": "4",
        "FASTAPI_DEPLOY_LEADER_RENEW_DEADLINE": "3",
        "FASTAPI_DEPLOY_LEADER_RETRY_PERIOD": "0.5",
        "FASTAPI_DEPLOY_KUBERNETES_KEEP_ON_CLOSE": "1",
        "DATABASE_URL": url,
    }
    token = "fdp_ha_admin_" + uuid.uuid4().hex[:8]
    first = k8s_server(tmp_path / "a", cluster, namespace, POD_NAME="cp-a", **election)
    second = k8s_server(tmp_path / "b", cluster, namespace, POD_NAME="cp-b", **election)
    for srv in (first, second):
        srv.admin_token = token
        srv.env["FASTAPI_DEPLOY_ADMIN_TOKEN"] = token
    first.start(timeout=90)
    try:
        wait_until(lambda: lease_holder(cluster, namespace) == "cp-a", 30, what="cp-a to lead")
        second.start(timeout=90)
        first.cli("login", "--url", first.url, "--token", token)
        push(first, copy_example("hello", tmp_path), "ha-hello")
        assert first.get("ha-hello", "/").status_code == 200
        # The follower serves the API (one database) but not the apps.
        with second.api() as api:
            assert any(a["slug"] == "ha-hello" for a in api.get("/apps/").json()["data"])
        assert second.get("ha-hello", "/").status_code == 404
        the_app = first.app_id("ha-hello")
        before = {p["metadata"]["name"] for p in pods(cluster, namespace, the_app)}
        # The leader dies without handing over: the follower takes over when the lease runs out.
        first.stop(sig=signal.SIGKILL)
        wait_until(lambda: lease_holder(cluster, namespace) == "cp-b", 30, interval=0.5, what="cp-b to lead")
        r = wait_until(lambda: second.get("ha-hello", "/").status_code == 200, 60, what="cp-b to serve")
        assert r
        assert {p["metadata"]["name"] for p in pods(cluster, namespace, the_app)} == before  # adopted
        # A deploy through the new leader works (the image record is in the database).
        second.cli("login", "--url", second.url, "--token", token)
        second.cli("rollback", "ha-hello", check=False)  # nothing to roll back to: a clean refusal
        assert second.cli_json("status", "ha-hello")["app"]["instances"]
    finally:
        first.stop(sig=signal.SIGKILL)
        second.stop()


def lease_holder(cluster: FakeCluster, namespace: str) -> str | None:
    from kubernetes import client as k8s

    try:
        lease = k8s.CoordinationV1Api(cluster.client()).read_namespaced_lease(f"lease-{namespace}", "default")
    except Exception:
        return None
    return lease.spec.holder_identity or None


def test_a_remote_router_follows_the_endpointslices(cluster: FakeCluster, tmp_path: Path) -> None:
    namespace = f"edge-{uuid.uuid4().hex[:6]}"
    srv = k8s_server(tmp_path / "cp", cluster, namespace, FASTAPI_DEPLOY_ROUTER_TOKEN=TOKEN)
    srv.start(timeout=90)
    edge = Edge(
        srv.url,
        tmp_path / "router.log",
        extra_env={
            "KUBECONFIG": str(cluster.kubeconfig),
            "FASTAPI_DEPLOY_KUBERNETES_PLATFORM_ID": namespace,
        },
    )
    try:
        srv.cli("login", "--url", srv.url, "--token", srv.admin_token)
        push(srv, copy_example("hello", tmp_path), "sliced")
        srv.cli("scale", "sliced", "--min", "2", "--max", "2", "--prewarm", "0")
        the_app = srv.app_id("sliced")
        wait_until(lambda: len(pods(cluster, namespace, the_app)) == 2, 90, what="two pods")
        edge.start("--endpoint-slices", "--namespace", namespace)
        edge.wait_ready()
        host = "sliced.localhost"

        def states() -> dict[str, str]:
            app = next((a for a in edge.routes()["apps"] if a["host"] == host), None)
            return {u["id"]: u["endpoint"] for u in app["upstreams"]} if app else {}

        # Both instances are in the table, and the slices call both pods ready.
        wait_until(
            lambda: len(states()) == 2 and set(states().values()) == {"ready"}, 60, what="two ready endpoints"
        )
        assert set(states()) == {p["metadata"]["name"] for p in pods(cluster, namespace, the_app)}
        assert sorted(routed(edge, host)) == sorted(states())
        assert {edge.get("sliced", "/").status_code for _ in range(6)} == {200}

        # The control plane is frozen (its table is stale) when a pod is deleted: the slices alone take
        # it out of the remote router's rotation, and no request reaches it.
        victim = sorted(states())[0]
        assert srv.proc is not None
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            core(cluster).delete_namespaced_pod(victim, namespace)
            wait_until(
                lambda: victim not in routed(edge, host), 30, interval=0.2, what="the pod out of rotation"
            )
            assert states()[victim] in ("terminating", "gone"), states()
            assert victim in states()  # still in the (stale) table: the slices, not the table, left it out
            codes = [edge.get("sliced", "/", timeout=10).status_code for _ in range(10)]
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        assert codes == [200] * 10
        # Thawed: the control plane replaces the pod and the table follows.
        wait_until(
            lambda: len(states()) == 2 and victim not in states() and set(states().values()) == {"ready"},
            90,
            interval=0.5,
            what="a replacement in the table, ready in the slices",
        )
        assert {edge.get("sliced", "/").status_code for _ in range(6)} == {200}
    finally:
        edge.stop()
        srv.stop()


def test_the_real_cluster_flow_runs_on_the_fake_cluster(
    cluster: FakeCluster, platform_image: str, tmp_path: Path
) -> None:
    target = clusterflow.Target(
        kubeconfig=cluster.kubeconfig,
        registry=dockerenv.REGISTRY,
        registry_username=dockerenv.REGISTRY_USERNAME,
        registry_password=dockerenv.REGISTRY_PASSWORD,
        host_address=cluster.kubelet.node_ip,  # the kubefake network's gateway: this machine
        base_image=dockerenv.BASE_IMAGE,
        timeout=90,
    )
    clusterflow.run(target, platform_image, tmp_path)
