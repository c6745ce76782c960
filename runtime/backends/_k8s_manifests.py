"""The Kubernetes objects of the ``kubernetes`` backend, as pure functions: (spec, config) → dict.

Nothing here talks to a cluster, so every manifest can be validated against the official OpenAPI
schemas (``tests/test_kubernetes_manifests.py``). Per app revision (one fastapi-deploy deployment):

    Secret      {rev}-env   the app's env vars (never in the Deployment, never in an image)
    Deployment  {rev}       image by digest, probes, resources, maxUnavailable 0, topology spread,
                            non-root; **no replicas field**: replicas belong to the scale subresource
    Service     {rev}       ClusterIP on the pods' ``http`` port
    PDB         {rev}       maxUnavailable 1 (node drains go one pod at a time)
    HPA         {rev}       only in the alternative mode (autoscaling/v2, behaviour policies)

Per app (``app_service``, ``app_ingress``): a stable Service whose selector names the serving revision
(one write switches it) and, in the alternative mode, an Ingress straight to it. Per platform: a
PriorityClass below zero and a placeholder Deployment of pause pods that keeps node headroom, a
NetworkPolicy that lets only the platform's pods reach the apps, and the registry pull secret.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.backends.base import PLATFORM_ENV, InstanceSpec
from runtime.images import APP_UID, CONTAINER_PORT
from runtime.registry import Registry

DOMAIN = "fastapi-deploy.dev"
"""Prefix of every label and annotation key the backend sets (``fastapi-deploy.dev/app``)."""
MANAGED_BY = "app.kubernetes.io/managed-by"
PLATFORM, APP, DEPLOYMENT, ROLE = (f"{DOMAIN}/{k}" for k in ("platform", "app", "deployment", "role"))
SPEC_ANNOTATION = f"{DOMAIN}/spec"
HOSTNAME_ANNOTATION = f"{DOMAIN}/hostname"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
CONTAINER = "app"
PULL_SECRET = "fdp-registry"
HEADROOM = "fdp-headroom"
NETWORK_POLICY = "fdp-apps"
_RESERVED_ENV = {"PATH", "HOME", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONPATH", "PYTHONHOME"}
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")

# The readiness check, run by the image's own interpreter: any answer below 500 with the app's Host is
# healthy (an httpGet probe would call a 404 on "/" a failure). The same check as the image HEALTHCHECK.
HEALTH_CHECK = (
    "import os, sys, http.client as h\n"
    "c = h.HTTPConnection('127.0.0.1', int(os.environ.get('FASTAPI_DEPLOY_PORT', '8000')), timeout=3)\n"
    "c.request('GET', os.environ.get('FASTAPI_DEPLOY_HEALTH_PATH', '/'),"
    " headers={'Host': os.environ.get('FASTAPI_DEPLOY_HOSTNAME', 'localhost')})\n"
    "sys.exit(0 if c.getresponse().status < 500 else 1)\n"
)


@dataclass(frozen=True)
class KubernetesConfig:
    """How the backend lays apps out on the cluster. Every field has a working default."""

    namespace: str = "fastapi-deploy-apps"
    """Namespace of every app's objects (unless the backend is given a ``namespace_for`` resolver)."""
    platform_id: str = "default"
    """Value of the ``fastapi-deploy.dev/platform`` label: two platforms on one cluster never touch each
    other's objects."""
    kubeconfig: str | None = None
    """Path of a kubeconfig; ``None``: the pod's service account in a cluster, else ``$KUBECONFIG`` /
    ``~/.kube/config``."""
    context: str | None = None
    """Context of the kubeconfig to use (``None``: its current context)."""
    registry: Registry | None = None
    """The registry images are pulled from: its credentials become the ``fdp-registry`` pull secret in
    each app namespace (``None``: anonymous pulls, or ``pull_secret``)."""
    pull_secret: str | None = None
    """An existing dockerconfigjson Secret (in each app namespace) to pull with instead."""
    service_account: str | None = None
    """Service account of app pods (``None``: the namespace's default); its token is never mounted."""
    termination_grace: int = 30
    """Seconds an app pod gets between SIGTERM and SIGKILL when Kubernetes stops it."""
    startup_timeout: int = 60
    """Seconds an app pod may take to answer its health path (the startup probe's budget); the
    Deployment's ``progressDeadlineSeconds`` is twice that."""
    readiness_period: int = 5
    """Seconds between readiness checks once started (each runs the image's interpreter: keep it above 1)."""
    read_only_root: bool = True
    """App containers get a read-only root filesystem and a writable ``/tmp`` (64 MiB)."""
    zone_key: str = "topology.kubernetes.io/zone"
    """Topology key pods of a revision spread over (then over nodes), best effort."""
    forwarded_allow_ips: str = "*"
    """Who may set ``X-Forwarded-*`` for the app (uvicorn ``forwarded_allow_ips``): the router's pods
    reach apps from any pod IP; the NetworkPolicy keeps everyone else out."""
    platform_namespace: str | None = None
    """The control plane's namespace: with it, a NetworkPolicy lets only the platform's pods (label
    ``app.kubernetes.io/name: fastapi-deploy``) reach app pods. ``None``: no NetworkPolicy."""
    split_log_streams: bool = False
    """Read stdout and stderr apart (pod log ``stream=`` parameter: Kubernetes 1.32+ with the
    ``PodLogsQuerySplitStreams`` feature gate). Off: one stream, every line called stdout."""
    verify_from_control_plane: bool = True
    """After the pod is Ready, also probe its health path from the control plane (the router's network
    path). Off where pod IPs are not reachable (a control plane outside the cluster)."""
    keep_on_close: bool = False
    """``close()`` leaves the apps running (the next leader adopts them): set it in the cluster, where a
    control-plane rollout must not stop every app."""
    headroom_priority: int = -10
    """Priority of the headroom placeholder pods: below every app (0), so the scheduler evicts them first."""
    placeholder_image: str = "registry.k8s.io/pause:3.10"
    """Image of the headroom placeholder pods."""
    ingress_class: str | None = None
    """``ingressClassName`` of per-app Ingresses (the alternative mode)."""


# -- names and labels ------------------------------------------------------------------------------------


def _dns(value: str, limit: int) -> str:
    """A DNS-1123 label from ``value``: lowercase, ``-`` for anything else, at most ``limit`` chars
    (a hash keeps truncated names distinct)."""
    clean = re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-") or "x"
    if len(clean) <= limit:
        return clean
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    return f"{clean[: limit - 9].rstrip('-')}-{digest}"


def label_value(value: str) -> str:
    """A valid label value (63 chars, alphanumeric ends) standing for ``value``."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", value).strip("-._")
    if len(clean) <= 63 and clean == value:
        return clean
    return _dns(value, 63)


def revision_name(deployment_id: str) -> str:
    """``fdp-{deployment}``: the Deployment, Service, PDB and HPA of one revision (≤ 40 chars, so pod
    names — plus the ReplicaSet hash and a suffix — stay within 63)."""
    return "fdp-" + _dns(deployment_id, 36)


def app_service_name(app_id: str) -> str:
    return "fdp-app-" + _dns(app_id, 40)


def selector(platform_id: str, deployment_id: str) -> dict[str, str]:
    return {PLATFORM: label_value(platform_id), DEPLOYMENT: label_value(deployment_id)}


def labels(spec: InstanceSpec, platform_id: str, role: str = "app") -> dict[str, str]:
    return {
        MANAGED_BY: "fastapi-deploy",
        PLATFORM: label_value(platform_id),
        APP: label_value(spec.app_id),
        DEPLOYMENT: label_value(spec.deployment_id),
        ROLE: role,
    }


def owner(deployment: Mapping[str, Any]) -> list[dict[str, Any]]:
    """An ownerReference to a revision's Deployment: the garbage collector deletes what it owns with it."""
    meta = deployment["metadata"]
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": meta["name"],
            "uid": meta["uid"],
            "blockOwnerDeletion": True,
        }
    ]


def spec_record(spec: InstanceSpec) -> str:
    """What a restarted control plane needs to adopt the revision's pods (no env: it may hold secrets)."""
    record = {
        "app_id": spec.app_id,
        "deployment_id": spec.deployment_id,
        "hostname": spec.hostname,
        "python": str(spec.python),
        "entrypoint": spec.entrypoint,
        "app_dir": str(spec.app_dir),
        "workdir": str(spec.workdir) if spec.workdir else None,
        "health_path": spec.health_path,
        "image": spec.image,
        "memory_mb": spec.memory_mb,
        "cpus": spec.cpus,
    }
    return json.dumps(record, sort_keys=True)


def spec_from_record(text: str) -> InstanceSpec:
    """Raises ValueError, KeyError or TypeError for a record this backend did not write."""
    record = json.loads(text)
    return InstanceSpec(
        app_id=str(record["app_id"]),
        deployment_id=str(record["deployment_id"]),
        hostname=str(record["hostname"]),
        python=Path(record["python"]),
        entrypoint=str(record["entrypoint"]),
        app_dir=Path(record["app_dir"]),
        workdir=Path(record["workdir"]) if record.get("workdir") else None,
        health_path=str(record.get("health_path") or "/"),
        image=record.get("image"),
        memory_mb=record.get("memory_mb"),
        cpus=record.get("cpus"),
    )


# -- one revision ----------------------------------------------------------------------------------------


def app_env(spec: InstanceSpec) -> dict[str, str]:
    """The app's variables, as the Secret holds them: reserved and invalid names left out, and of the
    ``FASTAPI_DEPLOY_*`` names only those the control plane sets for every backend (``PLATFORM_ENV``)."""
    return {
        k: v
        for k, v in spec.env.items()
        if k not in _RESERVED_ENV
        and (k in PLATFORM_ENV or not k.startswith("FASTAPI_DEPLOY_"))
        and _ENV_NAME.match(k)
    }


def env_secret(spec: InstanceSpec, namespace: str, config: KubernetesConfig) -> dict[str, Any]:
    data = {k: base64.b64encode(v.encode()).decode() for k, v in sorted(app_env(spec).items())}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": revision_name(spec.deployment_id) + "-env",
            "namespace": namespace,
            "labels": labels(spec, config.platform_id),
        },
        "type": "Opaque",
        "data": data,
    }


def resources(spec: InstanceSpec) -> dict[str, Any]:
    """Requests equal to limits (Guaranteed QoS: the instance size is what an instance gets, no more)."""
    limits: dict[str, str] = {}
    if spec.memory_mb:
        limits["memory"] = f"{int(spec.memory_mb)}Mi"
    if spec.cpus:
        limits["cpu"] = f"{max(1, round(spec.cpus * 1000))}m"
    return {"requests": dict(limits), "limits": dict(limits)} if limits else {}


def deployment(spec: InstanceSpec, namespace: str, config: KubernetesConfig) -> dict[str, Any]:
    """The revision's Deployment. Raises ValueError when ``spec.image`` is missing."""
    if not spec.image:
        raise ValueError("a Kubernetes revision needs an image")
    name = revision_name(spec.deployment_id)
    match = selector(config.platform_id, spec.deployment_id)
    probe = {"exec": {"command": [str(spec.python), "-I", "-c", HEALTH_CHECK]}, "timeoutSeconds": 3}
    env = [
        {"name": "FASTAPI_DEPLOY_INSTANCE_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "FASTAPI_DEPLOY_APP_ID", "value": spec.app_id},
        {"name": "FASTAPI_DEPLOY_DEPLOYMENT_ID", "value": spec.deployment_id},
        {"name": "FASTAPI_DEPLOY_HOSTNAME", "value": spec.hostname},
        {"name": "FASTAPI_DEPLOY_HEALTH_PATH", "value": spec.health_path},
        {"name": "FASTAPI_DEPLOY_PORT", "value": str(CONTAINER_PORT)},
        {"name": "FASTAPI_DEPLOY_FORWARDED_ALLOW_IPS", "value": config.forwarded_allow_ips},
    ]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "http", "containerPort": CONTAINER_PORT, "protocol": "TCP"}],
        "envFrom": [{"secretRef": {"name": name + "-env"}}],
        "env": env,
        "resources": resources(spec),
        "startupProbe": {**probe, "periodSeconds": 1, "failureThreshold": max(1, config.startup_timeout)},
        "readinessProbe": {**probe, "periodSeconds": config.readiness_period, "failureThreshold": 2},
        "livenessProbe": {
            "tcpSocket": {"port": "http"},
            "periodSeconds": 10,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": config.read_only_root,
            "runAsNonRoot": True,
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": config.termination_grace,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": APP_UID,
            "runAsGroup": APP_UID,
            "fsGroup": APP_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": key,
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": dict(match)},
            }
            for key in (config.zone_key, "kubernetes.io/hostname")
        ],
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
    }
    if config.service_account:
        pod_spec["serviceAccountName"] = config.service_account
    pull = config.pull_secret or (PULL_SECRET if config.registry and config.registry.username else None)
    if pull:
        pod_spec["imagePullSecrets"] = [{"name": pull}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels(spec, config.platform_id),
            "annotations": {SPEC_ANNOTATION: spec_record(spec), HOSTNAME_ANNOTATION: spec.hostname},
        },
        "spec": {
            "selector": {"matchLabels": match},
            "revisionHistoryLimit": 1,
            "progressDeadlineSeconds": 2 * max(1, config.startup_timeout),
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": labels(spec, config.platform_id)}, "spec": pod_spec},
        },
    }


def service(spec: InstanceSpec, namespace: str, config: KubernetesConfig) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": revision_name(spec.deployment_id),
            "namespace": namespace,
            "labels": labels(spec, config.platform_id),
            "annotations": {HOSTNAME_ANNOTATION: spec.hostname},
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector(config.platform_id, spec.deployment_id),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def disruption_budget(spec: InstanceSpec, namespace: str, config: KubernetesConfig) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": revision_name(spec.deployment_id),
            "namespace": namespace,
            "labels": labels(spec, config.platform_id),
        },
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector(config.platform_id, spec.deployment_id)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def autoscaler(
    spec: InstanceSpec,
    namespace: str,
    config: KubernetesConfig,
    *,
    min_replicas: int,
    max_replicas: int,
    cpu_utilization: int = 70,
) -> dict[str, Any]:
    """The alternative mode's HPA (autoscaling/v2). Up fast (double, or +4 pods, every 15 s, no
    stabilization); down slowly (half every minute after 5 minutes of lower demand), like the
    platform's own policy. ``min_replicas`` is where the control plane puts its pre-warm floor."""
    low = max(1, min_replicas)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {
            "name": revision_name(spec.deployment_id),
            "namespace": namespace,
            "labels": labels(spec, config.platform_id),
        },
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": revision_name(spec.deployment_id),
            },
            "minReplicas": low,
            "maxReplicas": max(low, max_replicas),
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": cpu_utilization},
                    },
                }
            ],
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "selectPolicy": "Max",
                    "policies": [
                        {"type": "Percent", "value": 100, "periodSeconds": 15},
                        {"type": "Pods", "value": 4, "periodSeconds": 15},
                    ],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": 300,
                    "selectPolicy": "Max",
                    "policies": [{"type": "Percent", "value": 50, "periodSeconds": 60}],
                },
            },
        },
    }


def revision_objects(spec: InstanceSpec, namespace: str, config: KubernetesConfig) -> list[dict[str, Any]]:
    """Everything one revision needs, in the order to apply it (the Secret before the pods that read it)."""
    return [
        env_secret(spec, namespace, config),
        deployment(spec, namespace, config),
        service(spec, namespace, config),
        disruption_budget(spec, namespace, config),
    ]


# -- per app ---------------------------------------------------------------------------------------------


def app_service(spec: InstanceSpec, namespace: str, config: KubernetesConfig) -> dict[str, Any]:
    """The app's stable Service: its selector names the serving revision, so switching is one write."""
    meta_labels = {k: v for k, v in labels(spec, config.platform_id, role="route").items() if k != DEPLOYMENT}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": app_service_name(spec.app_id),
            "namespace": namespace,
            "labels": meta_labels,
            "annotations": {HOSTNAME_ANNOTATION: spec.hostname, f"{DOMAIN}/serving": spec.deployment_id},
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector(config.platform_id, spec.deployment_id),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def app_ingress(spec: InstanceSpec, namespace: str, config: KubernetesConfig) -> dict[str, Any]:
    """The alternative mode's per-app Ingress, straight to the app Service (no platform router)."""
    ingress: dict[str, Any] = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            "name": app_service_name(spec.app_id),
            "namespace": namespace,
            "labels": {
                k: v for k, v in labels(spec, config.platform_id, role="route").items() if k != DEPLOYMENT
            },
        },
        "spec": {
            "rules": [
                {
                    "host": spec.hostname,
                    "http": {
                        "paths": [
                            {
                                "path": "/",
                                "pathType": "Prefix",
                                "backend": {
                                    "service": {
                                        "name": app_service_name(spec.app_id),
                                        "port": {"name": "http"},
                                    }
                                },
                            }
                        ]
                    },
                }
            ]
        },
    }
    if config.ingress_class:
        ingress["spec"]["ingressClassName"] = config.ingress_class
    return ingress


# -- per namespace and per platform ----------------------------------------------------------------------


def namespace(name: str, config: KubernetesConfig) -> dict[str, Any]:
    """An app namespace, with the restricted Pod Security Standard enforced (app pods satisfy it)."""
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "labels": {
                MANAGED_BY: "fastapi-deploy",
                PLATFORM: label_value(config.platform_id),
                "pod-security.kubernetes.io/enforce": "restricted",
            },
        },
    }


def pull_secret(registry: Registry, namespace: str, config: KubernetesConfig) -> dict[str, Any]:
    auth = base64.b64encode(f"{registry.username}:{registry.password}".encode()).decode()
    docker_config = {
        "auths": {registry.host: {"username": registry.username, "password": registry.password, "auth": auth}}
    }
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": PULL_SECRET,
            "namespace": namespace,
            "labels": {MANAGED_BY: "fastapi-deploy", PLATFORM: label_value(config.platform_id)},
        },
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64.b64encode(json.dumps(docker_config).encode()).decode()},
    }


def network_policy(namespace: str, config: KubernetesConfig) -> dict[str, Any]:
    """Only the platform's pods (router, control plane) reach app pods, and only on their port."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": NETWORK_POLICY,
            "namespace": namespace,
            "labels": {MANAGED_BY: "fastapi-deploy", PLATFORM: label_value(config.platform_id)},
        },
        "spec": {
            "podSelector": {"matchLabels": {MANAGED_BY: "fastapi-deploy", ROLE: "app"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {
                                    "kubernetes.io/metadata.name": config.platform_namespace or namespace
                                }
                            },
                            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "fastapi-deploy"}},
                        }
                    ],
                    "ports": [{"port": CONTAINER_PORT, "protocol": "TCP"}],
                }
            ],
        },
    }


def headroom_class(config: KubernetesConfig) -> dict[str, Any]:
    """The PriorityClass of placeholder pods: below zero, never preempting anything itself."""
    return {
        "apiVersion": "scheduling.k8s.io/v1",
        "kind": "PriorityClass",
        "metadata": {
            "name": f"{HEADROOM}-{_dns(config.platform_id, 40)}",
            "labels": {MANAGED_BY: "fastapi-deploy"},
        },
        "value": config.headroom_priority,
        "globalDefault": False,
        "preemptionPolicy": "Never",
        "description": "fastapi-deploy placeholder pods: node headroom that any app pod may take.",
    }


def headroom(
    replicas: int, namespace: str, config: KubernetesConfig, *, cpus: float | None, memory_mb: int | None
) -> dict[str, Any]:
    """Placeholder pods the size of one instance: they hold node capacity until an app pod preempts
    them, so a surge schedules at once while the cluster autoscaler adds nodes for the evicted ones."""
    size = InstanceSpec(
        app_id="headroom",
        deployment_id="headroom",
        hostname="",
        python=Path("/"),
        entrypoint="",
        app_dir=Path("/"),
        memory_mb=memory_mb,
        cpus=cpus,
    )
    match = {PLATFORM: label_value(config.platform_id), ROLE: "headroom"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": HEADROOM,
            "namespace": namespace,
            "labels": {MANAGED_BY: "fastapi-deploy", **match},
        },
        "spec": {
            "replicas": max(0, replicas),
            "selector": {"matchLabels": match},
            "template": {
                "metadata": {"labels": {MANAGED_BY: "fastapi-deploy", **match}},
                "spec": {
                    "priorityClassName": headroom_class(config)["metadata"]["name"],
                    "terminationGracePeriodSeconds": 0,
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 65535,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "pause",
                            "image": config.placeholder_image,
                            "resources": resources(size),
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                                "readOnlyRootFilesystem": True,
                            },
                        }
                    ],
                },
            },
        },
    }


def progress_deadline(config: KubernetesConfig) -> int:
    return 2 * max(1, math.ceil(config.startup_timeout))
