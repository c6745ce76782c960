"""The FAKE API server's semantics (tests/kubefake), pinned through the official client: what the
kubernetes backend relies on must behave as the real API server does. No Docker: pods are scheduled
but never run (``run_pods=False``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("kubernetes")

from runtime.backends._k8s_client import Conflict, Gone, Kube, KubeError, NotFound, path
from tests.kubefake import FakeCluster
from tests.kubefake.resources import kind_of

NS = "default"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCluster]:
    with FakeCluster(tmp_path_factory.mktemp("kubefake"), run_pods=False) as c:
        yield c


@pytest.fixture
def kube(cluster: FakeCluster) -> Iterator[Kube]:
    k = Kube(str(cluster.kubeconfig))
    yield k
    k.close()


def deployment(name: str, **spec: Any) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "c", "image": "img:1"}]},
            },
            **spec,
        },
    }


def apply(kube: Kube, obj: dict[str, Any], manager: str, *, force: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = kube.request(
        "PATCH",
        path(obj["kind"], NS, obj["metadata"]["name"]),
        query={"fieldManager": manager, "force": force, "fieldValidation": "Strict"},
        body=obj,
        content_type="application/apply-patch+yaml",
    )
    return result


def managers(obj: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(e["manager"], e["operation"]): e["fieldsV1"] for e in obj["metadata"]["managedFields"]}


def eventually(check: Any, what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- server-side apply -----------------------------------------------------------------------------------


def test_apply_records_ownership_per_field_manager(kube: Kube) -> None:
    first = apply(kube, deployment("ssa-own", replicas=2), "alice")
    labels = {"metadata": {"name": "ssa-own", "namespace": NS, "labels": {"team": "a"}}}
    second = apply(kube, {"apiVersion": "apps/v1", "kind": "Deployment", **labels}, "bob")

    owned = managers(second)
    assert owned[("alice", "Apply")]["f:spec"]["f:replicas"] == {}
    assert owned[("bob", "Apply")] == {"f:metadata": {"f:labels": {"f:team": {}}}}
    assert second["metadata"]["labels"] == {"app": "ssa-own", "team": "a"}
    assert int(second["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])


def test_apply_conflicts_on_a_field_another_manager_owns_unless_forced(kube: Kube) -> None:
    apply(kube, deployment("ssa-conflict", replicas=2), "alice")

    with pytest.raises(Conflict) as info:
        apply(kube, deployment("ssa-conflict", replicas=5), "bob")
    assert 'conflict with "alice"' in info.value.message and ".spec.replicas" in info.value.message

    same = apply(kube, deployment("ssa-conflict", replicas=2), "bob")  # same value: shared, no conflict
    assert ("bob", "Apply") in managers(same)
    forced = apply(kube, deployment("ssa-conflict", replicas=5), "bob", force=True)
    assert forced["spec"]["replicas"] == 5
    assert "f:replicas" not in managers(forced)[("alice", "Apply")].get("f:spec", {})


def test_a_field_a_manager_stops_applying_is_removed_unless_shared(kube: Kube) -> None:
    with_label = deployment("ssa-drop")
    with_label["metadata"]["labels"]["tier"] = "web"
    apply(kube, with_label, "alice")

    dropped = apply(kube, deployment("ssa-drop"), "alice")

    assert "tier" not in dropped["metadata"]["labels"]
    assert dropped["metadata"]["labels"]["app"] == "ssa-drop"


def test_updates_take_ownership_of_what_they_change(kube: Kube) -> None:
    apply(kube, deployment("ssa-scale", replicas=1), "alice")
    scale = {
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {"name": "ssa-scale"},
        "spec": {"replicas": 3},
    }
    kube.request(
        "PUT", path("Deployment", NS, "ssa-scale", "scale"), query={"fieldManager": "scaler"}, body=scale
    )

    obj = kube.get("Deployment", NS, "ssa-scale")
    assert obj is not None
    entries = {
        (e["manager"], e["operation"], e.get("subresource")): e["fieldsV1"]
        for e in obj["metadata"]["managedFields"]
    }
    assert entries[("scaler", "Update", "scale")] == {"f:spec": {"f:replicas": {}}}
    assert "f:replicas" not in entries[("alice", "Apply", None)]["f:spec"]
    with pytest.raises(Conflict):  # the applier now conflicts with the scaler over replicas
        apply(kube, deployment("ssa-scale", replicas=1), "alice")


def test_apply_rejects_unknown_fields_with_strict_validation(kube: Kube) -> None:
    broken = deployment("ssa-strict")
    broken["spec"]["replicaz"] = 2

    with pytest.raises(KubeError) as info:
        apply(kube, broken, "alice")

    assert info.value.status == 422 and "replicaz" in info.value.message


# -- resourceVersion -------------------------------------------------------------------------------------


def test_an_update_with_a_stale_resource_version_conflicts(kube: Kube) -> None:
    created = kube.create(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "rv", "namespace": NS}, "data": {}}
    )
    fresh = dict(created, data={"a": "YQ=="})
    kube.request("PUT", path("Secret", NS, "rv"), body=fresh)

    with pytest.raises(Conflict) as info:
        kube.request("PUT", path("Secret", NS, "rv"), body=dict(created, data={"b": "Yg=="}))

    assert "the object has been modified" in info.value.message
    with pytest.raises(Conflict):
        kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "rv", "namespace": NS}})
    with pytest.raises(NotFound):
        kube.request("GET", path("Secret", NS, "nope"))


def test_scale_uses_optimistic_concurrency(kube: Kube) -> None:
    apply(kube, deployment("rv-scale"), "alice")
    url = path("Deployment", NS, "rv-scale", "scale")
    stale = kube.request("GET", url)
    kube.merge_patch("Deployment", NS, "rv-scale", {"metadata": {"labels": {"touched": "yes"}}})

    with pytest.raises(Conflict):  # written since it was read
        kube.request("PUT", url, body={**stale, "spec": {"replicas": 7}})

    unconditional = {**stale, "metadata": {"name": "rv-scale"}, "spec": {"replicas": 2}}
    kube.request("PUT", url, body=unconditional)
    assert kube.scale(NS, "rv-scale", by=3) == 5
    threads = [threading.Thread(target=kube.scale, args=(NS, "rv-scale"), kwargs={"by": 1}) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert kube.request("GET", url)["spec"]["replicas"] == 13  # none lost to a race


# -- watches ---------------------------------------------------------------------------------------------


def test_a_watch_resumes_from_a_resource_version_and_filters_by_label(kube: Kube) -> None:
    def configmap(name: str, team: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": NS, "labels": {"team": team}},
        }

    _, start = kube.list("ConfigMap", NS)
    cm_path = "/api/v1/namespaces/default/configmaps"
    kube.request("POST", cm_path, body=configmap("w1", "a"))
    kube.request("POST", cm_path, body=configmap("w2", "b"))
    kube.request(
        "PATCH",
        f"{cm_path}/w1",
        body={"metadata": {"labels": {"team": "b"}}},
        content_type="application/merge-patch+json",
    )

    events = []
    for event in kube.watch("ConfigMap", NS, label_selector="team=a", resource_version=start, timeout=2):
        if event["type"] == "BOOKMARK":  # carries only where to resume from
            assert int(event["object"]["metadata"]["resourceVersion"]) >= int(start)
            continue
        events.append((event["type"], event["object"]["metadata"]["name"]))

    # w2 never matched; w1 left the selection: the watch says DELETED, as the API server does.
    assert events == [("ADDED", "w1"), ("DELETED", "w1")]


def test_a_watch_from_a_compacted_resource_version_is_gone(cluster: FakeCluster, kube: Kube) -> None:
    _, old = kube.list("ConfigMap", NS)
    kube.request("POST", "/api/v1/namespaces/default/configmaps", body={"metadata": {"name": "compacted"}})
    cluster.store.compact()

    with pytest.raises(Gone):
        list(kube.watch("ConfigMap", NS, label_selector=None, resource_version=old, timeout=1))


# -- controllers -----------------------------------------------------------------------------------------


def test_the_replicaset_deletes_the_lowest_deletion_cost_first(cluster: FakeCluster, kube: Kube) -> None:
    apply(kube, deployment("cost"), "alice")
    kube.scale(NS, "cost", to=3)
    pods = eventually(
        lambda: (
            len(kube.list("Pod", NS, label_selector="app=cost")[0]) == 3
            and kube.list("Pod", NS, label_selector="app=cost")[0]
        ),
        "3 pods",
    )
    victim = pods[1]["metadata"]["name"]
    for pod in pods:  # all Ready: then the deletion cost decides
        status = {
            "phase": "Running",
            "podIP": "10.0.0.1",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2024-01-01T00:00:00Z"}],
        }
        cluster.store.update(
            kind_of("Pod"),
            NS,
            pod["metadata"]["name"],
            {"status": status},
            manager="kubelet",
            subresource="status",
        )
    kube.merge_patch(
        "Pod",
        NS,
        victim,
        {"metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": "-100"}}},
    )

    kube.scale(NS, "cost", by=-1)

    def terminating() -> list[str]:
        return [
            p["metadata"]["name"]
            for p in kube.list("Pod", NS, label_selector="app=cost")[0]
            if p["metadata"].get("deletionTimestamp")
        ]

    assert eventually(terminating, "a pod terminating") == [victim]


def test_deployment_status_follows_its_replica_set(cluster: FakeCluster, kube: Kube) -> None:
    apply(kube, deployment("status", replicas=2, progressDeadlineSeconds=1), "alice")

    def status() -> dict[str, Any]:
        obj = kube.get("Deployment", NS, "status") or {}
        return dict(obj.get("status") or {})

    eventually(lambda: status().get("replicas") == 2, "2 replicas")
    conditions = eventually(
        lambda: (
            {c["type"]: c for c in status().get("conditions", [])}.get("Progressing", {}).get("reason")
            == "ProgressDeadlineExceeded"
            and status()["conditions"]
        ),
        "the deadline",
    )
    by_type = {c["type"]: c for c in conditions}
    assert by_type["Available"]["status"] == "False"  # nothing runs the pods here: never available
    assert status()["observedGeneration"] == 1 and status()["updatedReplicas"] == 2


def test_deleting_an_owner_deletes_what_it_owns(kube: Kube) -> None:
    owner = apply(kube, deployment("gc"), "alice")
    ref = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gc", "uid": owner["metadata"]["uid"]}
    kube.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "gc-env", "namespace": NS, "ownerReferences": [ref]},
        }
    )

    kube.delete("Deployment", NS, "gc")

    eventually(lambda: kube.get("Secret", NS, "gc-env") is None, "the dependent deleted")


def test_an_hpa_keeps_its_target_within_bounds(kube: Kube) -> None:
    apply(kube, deployment("hpa", replicas=1), "alice")
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "hpa", "namespace": NS},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "hpa"},
            "minReplicas": 3,
            "maxReplicas": 5,
        },
    }
    apply(kube, hpa, "alice")

    eventually(lambda: (kube.get("Deployment", NS, "hpa") or {})["spec"]["replicas"] == 3, "the floor")
    kube.merge_patch("HorizontalPodAutoscaler", NS, "hpa", {"spec": {"minReplicas": 4}})
    eventually(lambda: (kube.get("Deployment", NS, "hpa") or {})["spec"]["replicas"] == 4, "the raised floor")


def test_the_official_typed_client_works_against_the_fake(cluster: FakeCluster) -> None:
    from kubernetes import client

    api = cluster.client()
    try:
        names = [n.metadata.name for n in client.CoreV1Api(api).list_namespace().items]
        version = client.VersionApi(api).get_code()
    finally:
        api.close()

    assert {"default", "kube-system"} <= set(names)
    assert version.git_version.endswith("-kubefake")
