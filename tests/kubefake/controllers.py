"""The fake control loops: what kube-controller-manager and kube-scheduler do for the objects we use.

One thread, level-triggered: every time the store changes it reconciles everything (there are few
objects in a test). What each loop keeps from the real one:

- **Deployment**: a ReplicaSet per pod template (``pod-template-hash``), rolling updates within
  ``maxSurge``/``maxUnavailable`` (or Recreate), and the status the backend watches: ``observedGeneration``,
  ``replicas``, ``updatedReplicas``, ``readyReplicas``, ``availableReplicas``, ``unavailableReplicas``,
  conditions ``Available`` (MinimumReplicasAvailable/Unavailable) and ``Progressing``
  (NewReplicaSetCreated, ReplicaSetUpdated, NewReplicaSetAvailable, ProgressDeadlineExceeded);
- **ReplicaSet**: creates and deletes pods to match ``replicas``; which pods go on a scale-down follows
  the real ranking: unscheduled, then pending, then not ready, then lower
  ``controller.kubernetes.io/pod-deletion-cost``, then ready for less time, more restarts, newer;
- **EndpointSlice**: one slice per Service with a selector: ready/serving/terminating per pod;
- **garbage collector**: objects whose owners are all gone are deleted (background propagation);
- **HorizontalPodAutoscaler**: keeps the target within ``minReplicas``..``maxReplicas``, as the real one
  does before it looks at metrics (the fake has no metrics API: ``ScalingActive`` is False, saying so);
- **PodDisruptionBudget**: ``currentHealthy``, ``desiredHealthy``, ``disruptionsAllowed`` (evictions
  check it);
- **scheduler**: binds pods to the one node when their requests fit, preempting lower-priority pods
  (placeholders) when they do not.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import threading
import time
from datetime import UTC, datetime
from typing import Any

from tests.kubefake.resources import kind_of, parse_quantity, selector_matches
from tests.kubefake.store import ApiError, Store, now, parse_time

log = logging.getLogger("kubefake.controllers")

MANAGER = "kube-controller-manager"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"

DEPLOYMENT, REPLICASET, POD = kind_of("Deployment"), kind_of("ReplicaSet"), kind_of("Pod")
SERVICE, SLICE, HPA, PDB, NODE = (
    kind_of("Service"),
    kind_of("EndpointSlice"),
    kind_of("HorizontalPodAutoscaler"),
    kind_of("PodDisruptionBudget"),
    kind_of("Node"),
)


def controller_of(obj: dict[str, Any]) -> str | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref["uid"])
    return None


def owner_ref(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def is_ready(pod: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions", [])
    )


def ready_since(pod: dict[str, Any]) -> float:
    for c in (pod.get("status") or {}).get("conditions", []):
        if c.get("type") == "Ready" and c.get("status") == "True" and c.get("lastTransitionTime"):
            return parse_time(c["lastTransitionTime"]).timestamp()
    return 0.0


def _resolve(value: Any, total: int, round_up: bool) -> int:
    if isinstance(value, str) and value.endswith("%"):
        exact = total * int(value[:-1]) / 100
        return math.ceil(exact) if round_up else math.floor(exact)
    return int(value or 0)


def template_hash(template: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    number = int(digest[:16], 16)
    out = ""
    for _ in range(10):
        number, rest = divmod(number, len(alphabet))
        out += alphabet[rest]
    return out


def _ranking(pod: dict[str, Any]) -> tuple[Any, ...]:
    """Sorts the pods a scale-down deletes first to the front (controller.ActivePodsWithRanks)."""
    status = pod.get("status") or {}
    phase = {"Pending": 0, "Unknown": 1, "Running": 2}.get(status.get("phase", "Pending"), 0)
    ready = is_ready(pod)
    try:
        cost = int((pod["metadata"].get("annotations") or {}).get(DELETION_COST, "0"))
    except ValueError:
        cost = 0
    restarts = sum(int(c.get("restartCount", 0)) for c in status.get("containerStatuses") or [])
    created = parse_time(pod["metadata"]["creationTimestamp"]).timestamp()
    return (
        bool(pod["spec"].get("nodeName")),
        phase,
        ready,
        cost,
        -ready_since(pod) if ready else 0.0,
        -restarts,
        -created,
        pod["metadata"]["name"],
    )


def _conditions(old: list[dict[str, Any]], wanted: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Conditions with ``lastTransitionTime`` kept while the status stays the same."""
    previous = {c["type"]: c for c in old or []}
    out = []
    for cond in wanted:
        before = previous.get(cond["type"])
        cond = dict(cond)
        if before and before.get("status") == cond["status"]:
            cond["lastTransitionTime"] = before.get("lastTransitionTime", now())
            if before.get("reason") == cond.get("reason") and "lastUpdateTime" in cond:
                cond["lastUpdateTime"] = before.get("lastUpdateTime", cond["lastUpdateTime"])
        else:
            cond["lastTransitionTime"] = now()
        out.append(cond)
    return out


def _strip_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _strip_times(v)
            for k, v in value.items()
            if k not in ("lastTransitionTime", "lastUpdateTime", "lastScaleTime")
        }
    if isinstance(value, list):
        return [_strip_times(v) for v in value]
    return value


class Controllers:
    """Runs the loops in a thread until :meth:`stop`."""

    def __init__(self, store: Store, admit: Any, *, node: str) -> None:
        self.store = store
        self.admit = admit
        self.node = node
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kubefake-controllers", daemon=True)
        self._progress: dict[str, tuple[tuple[int, ...], float]] = {}
        self._slice_names: dict[str, str] = {}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self.store.changed:
            self.store.changed.notify_all()
        self._thread.join(5)

    def _run(self) -> None:
        seen = -1
        while not self._stop.is_set():
            with self.store.changed:
                if self.store.rv == seen:
                    self.store.changed.wait(0.2)
                seen = self.store.rv
            try:
                self.reconcile()
            except ApiError as exc:  # a conflict with a concurrent writer: the next round retries
                log.debug("reconcile: %s", exc.message)
            except Exception:
                log.exception("reconcile failed")

    def reconcile(self) -> None:
        self._garbage_collect()
        self._hpas()
        self._deployments()
        self._replicasets()
        self._schedule()
        self._endpoint_slices()
        self._budgets()

    # -- helpers ------------------------------------------------------------------------------------------

    def _set_status(
        self, kind: Any, obj: dict[str, Any], status: dict[str, Any], manager: str = MANAGER
    ) -> None:
        if _strip_times(obj.get("status") or {}) == _strip_times(status):
            return
        meta = obj["metadata"]
        self.store.update(
            kind,
            meta.get("namespace"),
            meta["name"],
            {"status": status},
            manager=manager,
            subresource="status",
        )

    def _pods(self, namespace: str) -> list[dict[str, Any]]:
        return self.store.list(POD, namespace)[0]

    # -- garbage collector --------------------------------------------------------------------------------

    def _garbage_collect(self) -> None:
        with self.store.lock:
            objects = [(key[0], copy.deepcopy(obj)) for key, obj in self.store._objects.items()]
        for kind_name, obj in objects:
            refs = obj["metadata"].get("ownerReferences") or []
            if refs and not any(self.store.exists_uid(r["uid"]) for r in refs):
                if obj["metadata"].get("deletionTimestamp"):
                    continue
                meta = obj["metadata"]
                self.store.delete(kind_of(kind_name), meta.get("namespace"), meta["name"])

    # -- deployments --------------------------------------------------------------------------------------

    def _deployments(self) -> None:
        for deployment in self.store.list(DEPLOYMENT)[0]:
            self._deployment(deployment)

    def _deployment(self, d: dict[str, Any]) -> None:
        meta, spec = d["metadata"], d["spec"]
        ns, uid = meta["namespace"], meta["uid"]
        desired = int(spec.get("replicas", 1))
        template = copy.deepcopy(spec["template"])
        pth = template_hash(template)
        owned = [rs for rs in self.store.list(REPLICASET, ns)[0] if controller_of(rs) == uid]
        new = next((rs for rs in owned if rs["metadata"]["labels"].get("pod-template-hash") == pth), None)
        created = False
        if new is None:
            revision = 1 + max(
                [
                    int((rs["metadata"].get("annotations") or {}).get("deployment.kubernetes.io/revision", 0))
                    for rs in owned
                ]
                or [0]
            )
            template.setdefault("metadata", {}).setdefault("labels", {})["pod-template-hash"] = pth
            selector = copy.deepcopy(spec["selector"])
            selector.setdefault("matchLabels", {})["pod-template-hash"] = pth
            body = {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "metadata": {
                    "name": f"{meta['name']}-{pth}",
                    "namespace": ns,
                    "labels": template["metadata"]["labels"],
                    "annotations": {"deployment.kubernetes.io/revision": str(revision)},
                    "ownerReferences": [owner_ref(d)],
                },
                "spec": {
                    "replicas": 0,
                    "minReadySeconds": spec.get("minReadySeconds", 0),
                    "selector": selector,
                    "template": template,
                },
            }
            new = self.store.create(REPLICASET, ns, body, manager=MANAGER)
            created = True
        olds = [rs for rs in owned if rs["metadata"]["uid"] != new["metadata"]["uid"]]
        targets = {rs["metadata"]["name"]: int(rs["spec"].get("replicas", 0)) for rs in [new, *olds]}
        strategy = spec.get("strategy") or {}
        active_olds = [
            rs
            for rs in olds
            if targets[rs["metadata"]["name"]] > 0 or (rs.get("status") or {}).get("replicas", 0)
        ]
        if strategy.get("type") == "Recreate":
            if any(targets[rs["metadata"]["name"]] for rs in olds):
                for rs in olds:
                    targets[rs["metadata"]["name"]] = 0
            elif not any((rs.get("status") or {}).get("replicas", 0) for rs in olds):
                targets[new["metadata"]["name"]] = desired
        elif not active_olds:
            targets[new["metadata"]["name"]] = desired
        else:
            rolling = strategy.get("rollingUpdate") or {}
            surge = _resolve(rolling.get("maxSurge", "25%"), desired, True)
            unavailable = _resolve(rolling.get("maxUnavailable", "25%"), desired, False)
            if surge == 0 and unavailable == 0:
                unavailable = 1
            name = new["metadata"]["name"]
            total = sum(targets.values())
            if targets[name] < desired and total < desired + surge:
                targets[name] = min(desired, targets[name] + desired + surge - total)
            elif targets[name] > desired:
                targets[name] = desired
            available = sum(int((rs.get("status") or {}).get("availableReplicas", 0)) for rs in [new, *olds])
            budget = max(0, available - (desired - unavailable))
            for rs in sorted(olds, key=lambda r: r["metadata"]["creationTimestamp"]):
                key = rs["metadata"]["name"]
                unhealthy = max(0, targets[key] - int((rs.get("status") or {}).get("availableReplicas", 0)))
                down = min(targets[key], unhealthy + budget)
                budget -= max(0, down - unhealthy)
                targets[key] -= down
        for rs in [new, *olds]:
            key = rs["metadata"]["name"]
            if int(rs["spec"].get("replicas", 0)) != targets[key]:
                self.store.scale(REPLICASET, ns, key, targets[key], manager=MANAGER, rv=None)
        self._deployment_status(d, new, olds, desired, created)

    def _deployment_status(
        self, d: dict[str, Any], new: dict[str, Any], olds: list[dict[str, Any]], desired: int, created: bool
    ) -> None:
        new = self.store.find(REPLICASET, new["metadata"]["namespace"], new["metadata"]["name"]) or new
        every = [new, *olds]

        def total(field: str, of: list[dict[str, Any]] = every) -> int:
            return sum(int((rs.get("status") or {}).get(field, 0)) for rs in of)

        rolling = (d["spec"].get("strategy") or {}).get("rollingUpdate") or {}
        max_unavailable = _resolve(rolling.get("maxUnavailable", "25%"), desired, False)
        status = {
            "observedGeneration": d["metadata"].get("generation", 1),
            "replicas": total("replicas"),
            "updatedReplicas": int((new.get("status") or {}).get("replicas", 0)),
            "readyReplicas": total("readyReplicas"),
            "availableReplicas": total("availableReplicas"),
        }
        unavailable = max(0, desired - status["availableReplicas"])
        if unavailable:
            status["unavailableReplicas"] = unavailable
        snapshot = (
            status["replicas"],
            status["updatedReplicas"],
            status["readyReplicas"],
            status["availableReplicas"],
            desired,
        )
        uid = d["metadata"]["uid"]
        previous = self._progress.get(uid)
        clock = time.monotonic()
        if created or previous is None or previous[0] != snapshot:
            self._progress[uid] = (snapshot, clock)
        last_progress = self._progress[uid][1]
        rs_name = new["metadata"]["name"]
        complete = (
            status["updatedReplicas"] == desired
            and status["replicas"] == desired
            and status["availableReplicas"] == desired
            and not any((rs.get("status") or {}).get("replicas", 0) for rs in olds)
        )
        deadline = int(d["spec"].get("progressDeadlineSeconds", 600))
        stamp = now()
        if complete:
            progressing = {
                "type": "Progressing",
                "status": "True",
                "reason": "NewReplicaSetAvailable",
                "message": f'ReplicaSet "{rs_name}" has successfully progressed.',
            }
        elif clock - last_progress > deadline:
            progressing = {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": f'ReplicaSet "{rs_name}" has timed out progressing.',
            }
        elif created:
            progressing = {
                "type": "Progressing",
                "status": "True",
                "reason": "NewReplicaSetCreated",
                "message": f'Created new replica set "{rs_name}"',
            }
        else:
            progressing = {
                "type": "Progressing",
                "status": "True",
                "reason": "ReplicaSetUpdated",
                "message": f'ReplicaSet "{rs_name}" is progressing.',
            }
        progressing["lastUpdateTime"] = stamp
        if status["availableReplicas"] >= desired - max_unavailable:
            available = {
                "type": "Available",
                "status": "True",
                "reason": "MinimumReplicasAvailable",
                "message": "Deployment has minimum availability.",
            }
        else:
            available = {
                "type": "Available",
                "status": "False",
                "reason": "MinimumReplicasUnavailable",
                "message": "Deployment does not have minimum availability.",
            }
        available["lastUpdateTime"] = stamp
        status["conditions"] = _conditions(
            (d.get("status") or {}).get("conditions", []), [available, progressing]
        )
        self._set_status(DEPLOYMENT, d, status)

    # -- replica sets -------------------------------------------------------------------------------------

    def _replicasets(self) -> None:
        for rs in self.store.list(REPLICASET)[0]:
            self._replicaset(rs)

    def _replicaset(self, rs: dict[str, Any]) -> None:
        meta, spec = rs["metadata"], rs["spec"]
        ns, uid = meta["namespace"], meta["uid"]
        pods = [p for p in self._pods(ns) if controller_of(p) == uid]
        selector = spec.get("selector")
        for pod in pods:  # a pod relabelled out of the selector is released (orphaned)
            if not selector_matches(selector, pod["metadata"].get("labels") or {}):
                refs = [r for r in pod["metadata"]["ownerReferences"] if r.get("uid") != uid]
                self.store.patch(
                    POD,
                    ns,
                    pod["metadata"]["name"],
                    {"metadata": {"ownerReferences": refs or None}},
                    "merge",
                    manager=MANAGER,
                )
        pods = [p for p in pods if selector_matches(selector, p["metadata"].get("labels") or {})]
        active = [
            p
            for p in pods
            if not p["metadata"].get("deletionTimestamp")
            and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        ]
        diff = int(spec.get("replicas", 0)) - len(active)
        template = spec.get("template") or {}
        for _ in range(max(0, diff)):
            body = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "generateName": f"{meta['name']}-",
                    "namespace": ns,
                    "labels": copy.deepcopy((template.get("metadata") or {}).get("labels") or {}),
                    "annotations": copy.deepcopy((template.get("metadata") or {}).get("annotations") or {}),
                    "ownerReferences": [owner_ref(rs)],
                },
                "spec": copy.deepcopy(template.get("spec") or {}),
            }
            if not body["metadata"]["annotations"]:
                del body["metadata"]["annotations"]
            active.append(self.store.create(POD, ns, body, manager=MANAGER, admit=self.admit))
        if diff < 0:
            for victim in sorted(active, key=_ranking)[:-diff]:
                self.store.delete(POD, ns, victim["metadata"]["name"])
                active.remove(victim)
        min_ready = int(spec.get("minReadySeconds", 0))
        wall = datetime.now(UTC).timestamp()
        ready = [p for p in active if is_ready(p)]
        status = {
            "observedGeneration": meta.get("generation", 1),
            "replicas": len(active),
            "fullyLabeledReplicas": len(active),
            "readyReplicas": len(ready),
            "availableReplicas": len([p for p in ready if wall - ready_since(p) >= min_ready]),
        }
        self._set_status(REPLICASET, rs, status)

    # -- scheduler ----------------------------------------------------------------------------------------

    def _schedule(self) -> None:
        node = self.store.find(NODE, None, self.node)
        if node is None:
            return
        pods = self.store.list(POD)[0]
        allocatable = node["status"]["allocatable"]
        capacity = (parse_quantity(allocatable["cpu"]), parse_quantity(allocatable["memory"]))
        bound = [
            p
            for p in pods
            if p["spec"].get("nodeName") == self.node
            and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        ]
        for pod in sorted(
            (p for p in pods if not p["spec"].get("nodeName") and not p["metadata"].get("deletionTimestamp")),
            key=lambda p: (-int(p["spec"].get("priority", 0)), p["metadata"]["creationTimestamp"]),
        ):
            need = _requests(pod)
            used = [sum(_requests(p)[i] for p in bound) for i in (0, 1)]
            fits = all(used[i] + need[i] <= capacity[i] for i in (0, 1))
            meta = pod["metadata"]
            if fits:
                self.store.patch(
                    POD,
                    meta["namespace"],
                    meta["name"],
                    {"spec": {"nodeName": self.node}},
                    "merge",
                    manager="kube-scheduler",
                )
                scheduled = {"type": "PodScheduled", "status": "True"}
                status = dict(pod.get("status") or {})
                status.update(
                    phase="Pending", conditions=_conditions(status.get("conditions", []), [scheduled])
                )
                status.pop("nominatedNodeName", None)
                fresh = self.store.get(POD, meta["namespace"], meta["name"])
                self._set_status(POD, fresh, status, manager="kube-scheduler")
                bound.append(fresh)
                continue
            priority = int(pod["spec"].get("priority", 0))
            victims, freed = [], [0.0, 0.0]
            for other in sorted(
                (p for p in bound if int(p["spec"].get("priority", 0)) < priority),
                key=lambda p: int(p["spec"].get("priority", 0)),
            ):
                if all(used[i] - freed[i] + need[i] <= capacity[i] for i in (0, 1)):
                    break
                victims.append(other)
                freed = [freed[i] + _requests(other)[i] for i in (0, 1)]
            can_preempt = all(used[i] - freed[i] + need[i] <= capacity[i] for i in (0, 1))
            status = dict(pod.get("status") or {})
            if can_preempt and victims:
                for victim in victims:
                    if not victim["metadata"].get("deletionTimestamp"):
                        self.store.delete(POD, victim["metadata"]["namespace"], victim["metadata"]["name"])
                status["nominatedNodeName"] = self.node
                message = f"0/1 nodes are available: preempting {len(victims)} lower-priority pod(s)."
            else:
                short = "cpu" if used[0] + need[0] > capacity[0] else "memory"
                message = f"0/1 nodes are available: 1 Insufficient {short}."
            cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
            status.update(phase="Pending", conditions=_conditions(status.get("conditions", []), [cond]))
            self._set_status(POD, pod, status, manager="kube-scheduler")

    # -- endpoint slices ----------------------------------------------------------------------------------

    def _endpoint_slices(self) -> None:
        for svc in self.store.list(SERVICE)[0]:
            selector = svc["spec"].get("selector")
            if not selector:
                continue
            meta = svc["metadata"]
            ns = meta["namespace"]
            pods = [
                p
                for p in self._pods(ns)
                if (p.get("status") or {}).get("podIP")
                and all((p["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())
            ]
            publish = bool(svc["spec"].get("publishNotReadyAddresses"))
            endpoints = []
            for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
                terminating = bool(pod["metadata"].get("deletionTimestamp"))
                ready = is_ready(pod) or publish
                endpoints.append(
                    {
                        "addresses": [pod["status"]["podIP"]],
                        "conditions": {
                            "ready": ready and not terminating,
                            "serving": ready,
                            "terminating": terminating,
                        },
                        "nodeName": pod["spec"].get("nodeName"),
                        "targetRef": {
                            "kind": "Pod",
                            "namespace": ns,
                            "name": pod["metadata"]["name"],
                            "uid": pod["metadata"]["uid"],
                        },
                    }
                )
            ports = []
            for port in svc["spec"].get("ports") or []:
                target = port.get("targetPort", port["port"])
                if isinstance(target, str):
                    target = next(
                        (
                            cp["containerPort"]
                            for p in pods
                            for c in p["spec"]["containers"]
                            for cp in c.get("ports") or []
                            if cp.get("name") == target
                        ),
                        None,
                    )
                if target is not None:
                    entry = {"port": int(target), "protocol": port.get("protocol", "TCP")}
                    if port.get("name"):
                        entry["name"] = port["name"]
                    ports.append(entry)
            name = self._slice_names.setdefault(
                meta["uid"], f"{meta['name']}-{template_hash({'uid': meta['uid']})[:5]}"
            )
            labels = {
                **(meta.get("labels") or {}),
                "kubernetes.io/service-name": meta["name"],
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            }
            body = {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": name,
                    "namespace": ns,
                    "labels": labels,
                    "ownerReferences": [owner_ref(svc)],
                },
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": ports,
            }
            existing = self.store.find(SLICE, ns, name)
            if existing is None:
                self.store.create(SLICE, ns, body, manager="endpointslice-controller")
            elif (existing.get("endpoints"), existing.get("ports"), existing["metadata"].get("labels")) != (
                endpoints,
                ports,
                labels,
            ):
                body["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
                self.store.update(SLICE, ns, name, body, manager="endpointslice-controller")

    # -- autoscalers --------------------------------------------------------------------------------------

    def _hpas(self) -> None:
        for hpa in self.store.list(HPA)[0]:
            spec, meta = hpa["spec"], hpa["metadata"]
            ref = spec["scaleTargetRef"]
            target = self.store.find(kind_of(ref["kind"]), meta["namespace"], ref["name"])
            if target is None:
                continue
            current = int(target["spec"].get("replicas", 1))
            low, high = int(spec.get("minReplicas", 1)), int(spec["maxReplicas"])
            limited = None
            if current == 0 and low != 0:
                desired = 0
                active = {
                    "type": "ScalingActive",
                    "status": "False",
                    "reason": "ScalingDisabled",
                    "message": "scaling is disabled since the replica count of the target is zero",
                }
            else:
                desired = min(high, max(low, current))
                if desired != current:
                    limited = "TooFewReplicas" if desired > current else "TooManyReplicas"
                active = {
                    "type": "ScalingActive",
                    "status": "False",
                    "reason": "FailedGetResourceMetric",
                    "message": "the fake API server serves no metrics API",
                }
            status: dict[str, Any] = dict(hpa.get("status") or {})
            if desired != current:
                self.store.scale(
                    kind_of(ref["kind"]), meta["namespace"], ref["name"], desired, manager=MANAGER, rv=None
                )
                status["lastScaleTime"] = now()
            status.update(currentReplicas=current, desiredReplicas=desired)
            conditions = [
                {
                    "type": "AbleToScale",
                    "status": "True",
                    "reason": "SucceededRescale" if limited else "ReadyForNewScale",
                    "message": "the HPA controller was able to update the target scale",
                },
                active,
                {
                    "type": "ScalingLimited",
                    "status": "True" if limited else "False",
                    "reason": limited or "DesiredWithinRange",
                    "message": "the desired replica count is outside the range"
                    if limited
                    else "the desired count is within the acceptable range",
                },
            ]
            status["conditions"] = _conditions(status.get("conditions", []), conditions)
            self._set_status(HPA, hpa, status)

    def _budgets(self) -> None:
        for pdb in self.store.list(PDB)[0]:
            spec, meta = pdb["spec"], pdb["metadata"]
            pods = [
                p
                for p in self._pods(meta["namespace"])
                if not p["metadata"].get("deletionTimestamp")
                and selector_matches(spec.get("selector"), p["metadata"].get("labels") or {})
            ]
            expected, healthy = len(pods), len([p for p in pods if is_ready(p)])
            if "minAvailable" in spec:
                desired = _resolve(spec["minAvailable"], expected, True)
            else:
                desired = max(0, expected - _resolve(spec.get("maxUnavailable", 0), expected, True))
            allowed = max(0, healthy - desired)
            cond = {
                "type": "DisruptionAllowed",
                "status": "True" if allowed else "False",
                "reason": "SufficientPods" if allowed else "InsufficientPods",
                "message": "",
                "observedGeneration": meta.get("generation", 1),
            }
            status = {
                "observedGeneration": meta.get("generation", 1),
                "expectedPods": expected,
                "currentHealthy": healthy,
                "desiredHealthy": desired,
                "disruptionsAllowed": allowed,
                "conditions": _conditions((pdb.get("status") or {}).get("conditions", []), [cond]),
            }
            self._set_status(PDB, pdb, status)


def _requests(pod: dict[str, Any]) -> tuple[float, float]:
    """CPU cores and memory bytes the pod requests (limits stand in for missing requests, as defaults do)."""
    cpu = memory = 0.0
    for container in pod["spec"].get("containers", []):
        resources = container.get("resources") or {}
        requests = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
        cpu += parse_quantity(requests.get("cpu", 0))
        memory += parse_quantity(requests.get("memory", 0))
    return cpu, memory
