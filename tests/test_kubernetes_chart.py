"""The Helm chart, rendered by the real Helm engine (Helm's Go SDK, shipped in the ``helm-python-sdk``
wheel: the equivalent of ``helm template`` and ``helm lint`` with no helm binary), with default and
non-default values; every rendered manifest validated against the official Kubernetes OpenAPI schemas
of several minor versions."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate.utils")

CHART = Path(__file__).resolve().parent.parent / "charts" / "fastapi-deploy"
VERSIONS = ["1.29", "1.31", "1.33", "1.35", "1.37"]
FERNET = "A" * 43 + "="

CUSTOM: dict[str, Any] = {
    "image": {"repository": "registry.example.com/fastapi-deploy", "tag": "1.2.3"},
    "controlPlane": {"replicas": 3, "extraEnv": [{"name": "FASTAPI_DEPLOY_BUILD_CPUS", "value": "2"}]},
    "router": {"replicas": 3, "service": {"type": "LoadBalancer", "port": 80}},
    "apps": {
        "namespacePerTeam": True,
        "scaling": "hpa",
        "headroom": {"placeholders": 2},
        "ingressClassName": "nginx",
    },
    "domain": "apps.acme.dev",
    "ingress": {"className": "nginx", "tls": [{"secretName": "wildcard", "hosts": ["*.apps.acme.dev"]}]},
    "registry": {"url": "registry.acme.dev/fdp", "username": "robot", "password": "pw"},
    "build": {"dockerHost": "tcp://builder:2375"},
    "database": {"existingSecret": "", "url": "postgresql://fdp:pw@db.acme.dev/fdp"},
    "secrets": {"secretKey": FERNET, "adminToken": "fdp_admin", "routerToken": "r" * 40},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
}


def render(
    values: dict[str, Any], *, name: str = "fdp", namespace: str = "platform"
) -> tuple[list[dict[str, Any]], str]:
    """The chart's manifests for release ``name`` in ``namespace`` (what ``helm template`` prints), and
    its NOTES.txt."""
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values, name=name, namespace=namespace)
    docs = [
        doc
        for name, text in sorted(files.items())
        if name.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    return docs, files["fastapi-deploy/templates/NOTES.txt"]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("values", [{}, CUSTOM], ids=["defaults", "custom"])
@pytest.mark.parametrize("version", VERSIONS)
def test_every_rendered_manifest_is_valid(values: dict[str, Any], version: str) -> None:
    docs, _ = render(values)

    assert docs
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":  # a CRD (prometheus-operator): not in the core schemas
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert (
                set(doc["spec"]) == {"selector", "endpoints"}
                and doc["spec"]["endpoints"][0]["port"] == "http"
            )
            continue
        assert kubernetes_validate.validate(doc, version, strict=True) == version, doc["kind"]


def test_lint_finds_no_errors() -> None:
    result = helm.lint(str(CHART))

    assert result["errors"] == []
    assert not [m for m in result["messages"] if m["severity"] >= 2], result["messages"]


def test_the_values_schema_rejects_bad_values() -> None:
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(CUSTOM)
        for bad in (
            {"controlPlane": {"replicas": 0}},
            {"apps": {"scaling": "magic"}},
            {"database": {"existingSecret": "", "url": "mysql://x"}},
            {"secrets": {"secretKey": "short"}},
            {"secrets": {"routerToken": "short"}},
            {"router": {"replicas": -1}},
        ):
            with pytest.raises(helm.HelmError):
                chart.validate_schema(bad)


def test_defaults_run_two_control_plane_replicas_and_two_routers() -> None:
    docs, notes = render({})
    deployments = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    control = deployments["fdp-fastapi-deploy"]
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    container = control["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}

    assert set(deployments) == {"fdp-fastapi-deploy", "fdp-fastapi-deploy-router"}
    assert control["spec"]["replicas"] == 2
    assert deployments["fdp-fastapi-deploy-router"]["spec"]["replicas"] == 2
    assert services["fdp-fastapi-deploy-router"]["spec"]["selector"] == {
        "app.kubernetes.io/name": "fastapi-deploy",
        "app.kubernetes.io/instance": "fdp",
        "app.kubernetes.io/component": "router",
    }
    # The control plane checks the token the routers present (the same Secret key).
    assert env["FASTAPI_DEPLOY_ROUTER_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "fdp-fastapi-deploy",
        "key": "FASTAPI_DEPLOY_ROUTER_TOKEN",
    }
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "fastapi-deploy-database",
        "key": "DATABASE_URL",
    }
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    (config,) = by_kind(docs, "ConfigMap")
    assert config["data"]["FASTAPI_DEPLOY_BACKEND"] == "kubernetes"
    assert config["data"]["FASTAPI_DEPLOY_KUBERNETES_NAMESPACE"] == "platform-apps"
    assert config["data"]["FASTAPI_DEPLOY_LEADER_LEASE"] == "fdp-fastapi-deploy-leader"
    (secret,) = by_kind(docs, "Secret")
    assert len(secret["data"]["FASTAPI_DEPLOY_SECRET_KEY"]) > 40  # a generated Fernet key
    assert len(base64.b64decode(secret["data"]["FASTAPI_DEPLOY_ROUTER_TOKEN"])) == 43  # a generated token
    (ingress,) = by_kind(docs, "Ingress")
    assert [r["host"] for r in ingress["spec"]["rules"]] == ["api.apps.example.com", "*.apps.example.com"]
    assert not by_kind(docs, "ServiceMonitor") and not by_kind(docs, "ClusterRole")
    assert "no registry is configured" in notes


def test_custom_values_and_cluster_scoped_rbac() -> None:
    docs, notes = render(CUSTOM)
    deployments = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}

    assert deployments["fdp-fastapi-deploy"]["spec"]["replicas"] == 3
    assert deployments["fdp-fastapi-deploy-router"]["spec"]["replicas"] == 3
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    assert services["fdp-fastapi-deploy-router"]["spec"]["type"] == "LoadBalancer"
    assert services["fdp-fastapi-deploy"]["spec"]["selector"]["fastapi-deploy.dev/leader"] == "true"
    assert deployments["fdp-fastapi-deploy"]["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "registry.example.com/fastapi-deploy:1.2.3"
    )
    cluster_roles = {r["metadata"]["name"]: r for r in by_kind(docs, "ClusterRole")}
    assert set(cluster_roles) == {
        "fdp-fastapi-deploy-apps",
        "fdp-fastapi-deploy-headroom",
        "fdp-fastapi-deploy-router",  # a namespace per team: the routers read slices in all of them
    }
    assert any(
        "namespaces" in rule["resources"] for rule in cluster_roles["fdp-fastapi-deploy-apps"]["rules"]
    )
    assert not by_kind(docs, "Namespace")  # a namespace per team: the platform creates them
    (secret,) = by_kind(docs, "Secret")
    assert set(secret["data"]) == {
        "FASTAPI_DEPLOY_SECRET_KEY",
        "FASTAPI_DEPLOY_ADMIN_TOKEN",
        "DATABASE_URL",
        "FASTAPI_DEPLOY_ROUTER_TOKEN",
        "username",
        "password",
    }
    (monitor,) = by_kind(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert "no registry" not in notes


def test_every_rbac_rule_says_which_feature_needs_it() -> None:
    with helm.Chart.load(str(CHART)) as chart:
        text = chart.render(CUSTOM, name="fdp", namespace="platform")["fastapi-deploy/templates/rbac.yaml"]
    lines = text.splitlines()
    rules = [n for n, line in enumerate(lines) if line.startswith("- apiGroups:")]

    assert len(rules) >= 12
    for n in rules:
        assert lines[n - 1].startswith("# "), f"rule without a comment: {lines[n]}"
    for doc in yaml.safe_load_all(text):
        for rule in doc.get("rules") or []:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"]


def test_leader_election_may_touch_only_its_own_lease() -> None:
    docs, _ = render({})
    role = next(r for r in by_kind(docs, "Role") if r["metadata"]["namespace"] == "platform")
    lease_rules = [r for r in role["rules"] if r["apiGroups"] == ["coordination.k8s.io"]]

    assert sorted(lease_rules, key=len) == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["fdp-fastapi-deploy-leader"],
            "verbs": ["get", "update"],
        },
    ]


def test_the_routers_run_fed_by_the_leader_and_read_only_endpointslices() -> None:
    docs, _ = render({})
    (routers,) = [
        d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "fdp-fastapi-deploy-router"
    ]
    pod = routers["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}

    assert container["args"] == ["router"]
    assert env["FASTAPI_DEPLOY_CONTROL_PLANE_URL"] == "http://fdp-fastapi-deploy.platform.svc:80"
    assert env["FASTAPI_DEPLOY_ROUTER_TOKEN"] == {
        "secretKeyRef": {"name": "fdp-fastapi-deploy", "key": "FASTAPI_DEPLOY_ROUTER_TOKEN"}
    }
    assert env["FASTAPI_DEPLOY_ROUTER_ENDPOINTSLICES"] == "true"
    assert env["FASTAPI_DEPLOY_KUBERNETES_NAMESPACE"] == "platform-apps"
    assert env["FASTAPI_DEPLOY_KUBERNETES_PLATFORM_ID"] == "fdp-fastapi-deploy"  # the backend's label value
    (config,) = by_kind(docs, "ConfigMap")
    assert config["data"]["FASTAPI_DEPLOY_KUBERNETES_PLATFORM_ID"] == "fdp-fastapi-deploy"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8080, "health": 8081}
    # The apps' NetworkPolicy admits pods named fastapi-deploy: the routers are.
    assert routers["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "fastapi-deploy"
    # Their own service account, which may read EndpointSlices in the apps namespace and nothing else.
    assert pod["serviceAccountName"] == "fdp-fastapi-deploy-router"
    role = next(r for r in by_kind(docs, "Role") if r["metadata"]["name"] == "fdp-fastapi-deploy-router")
    assert role["metadata"]["namespace"] == "platform-apps"
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    binding = next(
        b for b in by_kind(docs, "RoleBinding") if b["metadata"]["name"] == "fdp-fastapi-deploy-router"
    )
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "fdp-fastapi-deploy-router", "namespace": "platform"}
    ]
    budgets = {b["metadata"]["name"]: b["spec"] for b in by_kind(docs, "PodDisruptionBudget")}
    assert budgets["fdp-fastapi-deploy-router"]["minAvailable"] == 1


def test_router_replicas_zero_routes_through_the_leader() -> None:
    docs, notes = render({"router": {"replicas": 0}})
    (control,) = by_kind(docs, "Deployment")
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    env = {e["name"] for e in control["spec"]["template"]["spec"]["containers"][0]["env"]}
    router = services["fdp-fastapi-deploy-router"]["spec"]

    assert router["selector"]["fastapi-deploy.dev/leader"] == "true"
    assert router["selector"]["app.kubernetes.io/component"] == "control-plane"
    assert router["ports"][0]["targetPort"] == "router"
    assert "FASTAPI_DEPLOY_ROUTER_TOKEN" not in env
    (secret,) = by_kind(docs, "Secret")
    assert "FASTAPI_DEPLOY_ROUTER_TOKEN" not in secret["data"]
    assert not [r for r in by_kind(docs, "Role") if r["metadata"]["name"].endswith("-router")]
    assert "the leader's router" in notes
