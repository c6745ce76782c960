"""Every manifest the kubernetes backend produces, validated against the official Kubernetes OpenAPI
schemas of several minor versions (``kubernetes-validate``, strict: unknown fields are errors), and the
properties the backend relies on."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from runtime.backends import _k8s_manifests as m
from runtime.backends.base import InstanceSpec
from runtime.registry import Registry

kubernetes_validate = pytest.importorskip("kubernetes_validate.utils")

# The oldest the chart supports (kubeVersion >=1.27 allows 1.27; schemas of these are shipped offline),
# a middle one, and the newest kubernetes-validate ships.
VERSIONS = ["1.29", "1.31", "1.33", "1.35", "1.37"]
DIGEST = "registry.example.com/apps/a1@sha256:" + "ab" * 32


def spec(**changes: Any) -> InstanceSpec:
    base: dict[str, Any] = {
        "app_id": "0f3c2a9e8b7d4c1a9e8b7d4c1a9e8b7d",
        "deployment_id": "9a8b7c6d5e4f40312233445566778899",
        "hostname": "hello.apps.example.com",
        "python": Path("/usr/local/bin/python3"),
        "entrypoint": "main:app",
        "app_dir": Path("/app"),
        "workdir": Path("/app"),
        "env": {"GREETING": "hi", "API_KEY": "s3cret", "PATH": "/evil", "FASTAPI_DEPLOY_APP_ID": "spoof"},
        "health_path": "/healthz",
        "image": DIGEST,
        "memory_mb": 512,
        "cpus": 0.5,
    }
    base.update(changes)
    return InstanceSpec(**base)


CONFIG = m.KubernetesConfig(
    platform_id="prod",
    registry=Registry.parse("registry.example.com/apps", username="robot", password="pw"),
    platform_namespace="fastapi-deploy",
    ingress_class="nginx",
)
OWNER = {"metadata": {"name": "fdp-x", "uid": "3f2a5b8c-0000-4000-8000-000000000001"}}


def every_manifest() -> list[dict[str, Any]]:
    s = spec()
    out = m.revision_objects(s, "apps", CONFIG)
    out[2]["metadata"]["ownerReferences"] = m.owner(OWNER)
    out += [
        m.autoscaler(s, "apps", CONFIG, min_replicas=2, max_replicas=10),
        m.app_service(s, "apps", CONFIG),
        m.app_ingress(s, "apps", CONFIG),
        m.namespace("team-a", CONFIG),
        m.pull_secret(CONFIG.registry, "apps", CONFIG),  # type: ignore[arg-type]
        m.network_policy("apps", CONFIG),
        m.headroom_class(CONFIG),
        m.headroom(3, "apps", CONFIG, cpus=0.5, memory_mb=512),
        m.deployment(spec(memory_mb=None, cpus=None, env={}), "apps", m.KubernetesConfig()),
    ]
    return out


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("index", range(len(every_manifest())))
def test_every_manifest_is_valid_against_the_openapi_schemas(version: str, index: int) -> None:
    manifest = every_manifest()[index]

    validated = kubernetes_validate.validate(manifest, version, strict=True)

    assert validated == version


def test_validation_catches_a_wrong_field() -> None:
    broken = m.deployment(spec(), "apps", CONFIG)
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.33", strict=True)


def test_the_deployment_runs_the_image_by_digest_safely_and_leaves_replicas_to_the_scaler() -> None:
    d = m.deployment(spec(), "apps", CONFIG)
    pod = d["spec"]["template"]["spec"]
    (container,) = pod["containers"]

    assert "replicas" not in d["spec"]  # owned by the scale subresource, never by the applied manifest
    assert container["image"] == DIGEST
    assert d["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert container["resources"] == {
        "requests": {"memory": "512Mi", "cpu": "500m"},
        "limits": {"memory": "512Mi", "cpu": "500m"},
    }
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["automountServiceAccountToken"] is False
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    }
    assert pod["imagePullSecrets"] == [{"name": m.PULL_SECRET}]
    for probe in ("startupProbe", "readinessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:3] == ["/usr/local/bin/python3", "-I", "-c"] and "status < 500" in command[3]
    env = {e["name"]: e for e in container["env"]}
    assert env["FASTAPI_DEPLOY_INSTANCE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["FASTAPI_DEPLOY_HEALTH_PATH"]["value"] == "/healthz"
    assert container["envFrom"] == [{"secretRef": {"name": d["metadata"]["name"] + "-env"}}]
    assert "s3cret" not in json.dumps(d)  # env values live in the Secret only


def test_the_env_secret_holds_only_the_apps_own_variables() -> None:
    secret = m.env_secret(spec(), "apps", CONFIG)

    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}

    assert decoded == {"GREETING": "hi", "API_KEY": "s3cret"}


def test_names_and_labels_stay_within_kubernetes_limits() -> None:
    long = spec(deployment_id="Dep_" + "x" * 80, app_id="A" * 70)
    d = m.deployment(long, "apps", CONFIG)
    name = d["metadata"]["name"]

    assert len(name) <= 40 and name == name.lower()
    assert len(name) + 1 + 10 + 1 + 5 <= 63  # pod names: {rs}-{hash}-{suffix}
    assert m.revision_name("Dep_" + "x" * 80) != m.revision_name("Dep_" + "x" * 81)
    for value in d["metadata"]["labels"].values():
        assert len(value) <= 63
    kubernetes_validate.validate(d, "1.33", strict=True)


def test_the_spec_record_round_trips_without_env() -> None:
    s = spec()
    record = m.spec_record(s)

    back = m.spec_from_record(record)

    assert "s3cret" not in record
    assert back == InstanceSpec(**{**s.__dict__, "env": {}})


def test_the_hpa_floor_and_behaviour() -> None:
    hpa = m.autoscaler(spec(), "apps", CONFIG, min_replicas=0, max_replicas=5)

    assert hpa["spec"]["minReplicas"] == 1  # autoscaling/v2 needs at least 1
    assert hpa["spec"]["scaleTargetRef"]["name"] == m.revision_name(spec().deployment_id)
    assert hpa["spec"]["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300


def test_headroom_is_below_every_app_and_never_preempts() -> None:
    cls = m.headroom_class(CONFIG)
    placeholders = m.headroom(2, "apps", CONFIG, cpus=1.0, memory_mb=256)
    pod = placeholders["spec"]["template"]["spec"]

    assert cls["value"] < 0 and cls["preemptionPolicy"] == "Never" and cls["globalDefault"] is False
    assert pod["priorityClassName"] == cls["metadata"]["name"]
    assert pod["containers"][0]["resources"]["requests"] == {"memory": "256Mi", "cpu": "1000m"}
    assert placeholders["spec"]["replicas"] == 2
