"""The resource types the fake serves, their defaults, and label/field selectors."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status: bool = False
    """Has a status subresource: writes to the main resource keep the stored status."""
    scale: bool = False
    generation: bool = True
    """Spec changes bump ``metadata.generation``."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


KINDS = [
    Kind("", "v1", "namespaces", "Namespace", False, status=True),
    Kind("", "v1", "nodes", "Node", False, status=True),
    Kind("", "v1", "pods", "Pod", True, status=True),
    Kind("", "v1", "services", "Service", True, status=True),
    Kind("", "v1", "secrets", "Secret", True, generation=False),
    Kind("", "v1", "configmaps", "ConfigMap", True, generation=False),
    Kind("", "v1", "serviceaccounts", "ServiceAccount", True, generation=False),
    Kind("", "v1", "events", "Event", True, generation=False),
    Kind("apps", "v1", "deployments", "Deployment", True, status=True, scale=True),
    Kind("apps", "v1", "replicasets", "ReplicaSet", True, status=True, scale=True),
    Kind("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True, generation=False),
    Kind("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True, status=True),
    Kind("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", True, status=True),
    Kind("coordination.k8s.io", "v1", "leases", "Lease", True, generation=False),
    Kind("scheduling.k8s.io", "v1", "priorityclasses", "PriorityClass", False, generation=False),
    Kind("networking.k8s.io", "v1", "ingresses", "Ingress", True, status=True),
    Kind("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True),
    Kind("rbac.authorization.k8s.io", "v1", "roles", "Role", True, generation=False),
    Kind("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True, generation=False),
    Kind("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False, generation=False),
    Kind(
        "rbac.authorization.k8s.io",
        "v1",
        "clusterrolebindings",
        "ClusterRoleBinding",
        False,
        generation=False,
    ),
]
BY_PATH = {(k.group, k.version, k.plural): k for k in KINDS}
BY_KIND = {k.kind: k for k in KINDS}


def kind_of(name: str) -> Kind:
    return BY_KIND[name]


# -- defaults (what the API server's defaulting sets, for the fields the platform and the fake read) -----


def _default_pod_spec(spec: dict[str, Any]) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("securityContext", {})
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        container.setdefault("imagePullPolicy", "IfNotPresent")
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        container.setdefault("resources", {})
        for port in container.get("ports", []):
            port.setdefault("protocol", "TCP")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in container:
                p = container[probe]
                p.setdefault("periodSeconds", 10)
                p.setdefault("timeoutSeconds", 1)
                p.setdefault("successThreshold", 1)
                p.setdefault("failureThreshold", 3)
                if "httpGet" in p:
                    p["httpGet"].setdefault("scheme", "HTTP")
                    p["httpGet"].setdefault("path", "/")


def default(kind: Kind, obj: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    spec = obj.setdefault("spec", {}) if kind.kind not in _NO_SPEC else None
    if kind.kind == "Deployment" and spec is not None:
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        strategy = spec.setdefault("strategy", {"type": "RollingUpdate"})
        if strategy.get("type", "RollingUpdate") == "RollingUpdate":
            strategy.setdefault("type", "RollingUpdate")
            rolling = strategy.setdefault("rollingUpdate", {})
            rolling.setdefault("maxSurge", "25%")
            rolling.setdefault("maxUnavailable", "25%")
        _default_pod_spec(spec.setdefault("template", {}).setdefault("spec", {}))
    elif kind.kind == "ReplicaSet" and spec is not None:
        spec.setdefault("replicas", 1)
        _default_pod_spec(spec.setdefault("template", {}).setdefault("spec", {}))
    elif kind.kind == "Pod" and spec is not None:
        _default_pod_spec(spec)
        spec.setdefault("priority", 0)
    elif kind.kind == "Service" and spec is not None:
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        spec.setdefault("internalTrafficPolicy", "Cluster")
        for port in spec.get("ports", []):
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
    elif kind.kind == "Secret":
        obj.setdefault("type", "Opaque")
    return obj


_NO_SPEC = {
    "Secret",
    "ConfigMap",
    "ServiceAccount",
    "Event",
    "EndpointSlice",
    "Lease",
    "PriorityClass",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
    "Namespace",
    "Node",
}


# -- selectors -------------------------------------------------------------------------------------------

_REQUIREMENT = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9_./-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9_.-]*)|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*$"
)


class SelectorError(ValueError):
    pass


def _split(selector: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return parts


def label_matcher(selector: str | None) -> Any:
    """A predicate over a labels dict for a label selector string (equality- and set-based)."""
    if not selector:
        return lambda labels: True
    checks = []
    for part in _split(selector):
        m = _REQUIREMENT.match(part)
        if not m:
            raise SelectorError(f"unable to parse requirement: {part!r}")
        key = m["key"]
        if m["neg"]:
            checks.append(lambda labels, key=key: key not in labels)
        elif m["op"] in ("=", "=="):
            checks.append(lambda labels, key=key, v=m["value"]: labels.get(key) == v)
        elif m["op"] == "!=":
            checks.append(lambda labels, key=key, v=m["value"]: labels.get(key) != v)
        elif m["setop"] == "in":
            values = {v.strip() for v in m["values"].split(",")}
            checks.append(lambda labels, key=key, vs=values: labels.get(key) in vs)
        elif m["setop"] == "notin":
            values = {v.strip() for v in m["values"].split(",")}
            checks.append(lambda labels, key=key, vs=values: labels.get(key) not in vs)
        else:
            checks.append(lambda labels, key=key: key in labels)
    return lambda labels: all(check(labels or {}) for check in checks)


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A ``LabelSelector`` object (matchLabels, matchExpressions); an empty one matches everything."""
    if selector is None:
        return False
    labels = labels or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], set(expr.get("values") or [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def field_matcher(selector: str | None) -> Any:
    """A predicate over an object for a field selector (``metadata.name=x,status.phase!=Running``)."""
    if not selector:
        return lambda obj: True
    checks = []
    for part in _split(selector):
        negate = "!=" in part
        path, _, value = part.partition("!=" if negate else "=")
        path, value = path.strip(), value.strip().lstrip("=")

        def check(obj: dict[str, Any], path: str = path, value: str = value, negate: bool = negate) -> bool:
            node: Any = obj
            for name in path.split("."):
                node = node.get(name) if isinstance(node, dict) else None
            actual = "" if node is None else str(node)
            return (actual != value) if negate else (actual == value)

        checks.append(check)
    return lambda obj: all(c(obj) for c in checks)


def parse_quantity(value: Any) -> float:
    """``500m`` → 0.5, ``512Mi`` → 536870912, ``1G`` → 1e9."""
    text = str(value).strip()
    suffixes = {
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "m": 1e-3,
    }
    for suffix in sorted(suffixes, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * suffixes[suffix]
    return float(text)
