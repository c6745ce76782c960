"""The ``kubernetes`` backend: each instance is a pod of the revision's Deployment, run by the cluster.

    start(spec) ──> apply the revision (Secret, Deployment, Service, PDB: server-side apply)
                ──> scale subresource +1 ──> a new pod: Ready (startup/readiness probes on the health
                    path) and its ready line in the log ──> probe from here ──> warm, host = pod IP
    stop(i)     ──> that pod gets the lowest pod-deletion-cost, scale -1: the ReplicaSet deletes exactly
                    it (or, while other pods of the revision are still starting, the pod is deleted and
                    the count lowered) ──> SIGTERM, grace ──> gone: stopped (its exit code)

Replicas are the backend's *count* of instances: ``spec.replicas`` = instances alive + starts in flight,
always changed through the scale subresource with optimistic concurrency, never in the applied manifest
(so a re-apply never resets it, and the apply's field manager never owns it). Pods are fungible while
they start: a start claims any Ready pod of its revision that nobody claimed; an instance is one pod
from its claim to its end.

A pod watch (list, then watch from the list's resourceVersion, bookmarks, a new list on 410) feeds a
cache and the instances: a container that exits or restarts unasked, or a pod deleted by someone else,
is an instance that crashed (exit code, ``OOMKilled``), reported to ``on_exit``; its pod is deleted and
its slot released. Each pod's log is followed through the pod log API (stdout and stderr apart where
the cluster splits them) into the log sink, in the same ``LogRecord`` shape as ``docker``.

After a control-plane restart :meth:`recover` adopts the Ready pods of every revision labelled as this
platform's, sets each Deployment's replicas to what it adopted, and deletes revisions with nothing to
adopt (with their Service, PDB, Secret, HPA: owned by the Deployment). Alternatives, per revision or
per platform: an HPA owns replicas (:meth:`autoscale`, :meth:`set_floor`); placeholder pods keep node
headroom (:meth:`set_headroom`); the app Service and an Ingress route straight to the pods
(:meth:`publish`). See docs/KUBERNETES.md. The ``kubernetes`` package is imported in ``_k8s_client``
only, lazily (optional extra ``kubernetes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from runtime.backends import _k8s_manifests as m
from runtime.backends._k8s_client import Conflict, Kube, KubeError
from runtime.backends._k8s_logs import LogFollower, is_ready_line
from runtime.backends._k8s_pods import (
    container_status,
    exit_of,
    failure_of,
    is_ready,
    is_terminating,
    pod_key,
)
from runtime.backends.base import ExitCallback, Instance, InstanceSpec, InstanceState, LogRecord, LogSink
from runtime.errors import DeployError, VerifyError, not_ready
from runtime.health import Unhealthy, probe, wait_healthy
from runtime.images import CONTAINER_PORT, ImageEngine
from runtime.logparse import parse_level

__all__ = ["KubernetesBackend", "KubernetesConfig"]

KubernetesConfig = m.KubernetesConfig
log = logging.getLogger("fastapi_deploy.backend.kubernetes")

_OUTPUT_TAIL = 200
_LOWEST_COST = str(-(2**31))
_HINT = (
    "Is the Kubernetes API reachable with the platform's credentials (KUBECONFIG)? Ask the platform operator."
)
PodKey = tuple[str, str]


@dataclass(eq=False)
class _Revision:
    spec: InstanceSpec
    namespace: str
    name: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    starting: int = 0
    prepared: bool = False
    autoscaled: bool = False
    """An HPA owns its replicas: start/stop refuse."""


@dataclass(eq=False)
class _Claim:
    key: PodKey
    uid: str
    restarts: int
    container_id: str


class KubernetesBackend:
    """Instances as pods. One per control plane; not thread-safe (one event loop; its threads only
    hand results to the loop).

    ``images``: the :class:`runtime.images.ImageEngine` builds run on (a Docker engine the control
    plane reaches; pushes go to ``config.registry``): the deploy pipeline builds an image per revision
    because this attribute is set. ``namespace_for``: app id → namespace (a namespace per team);
    ``None``: ``config.namespace`` for all.
    """

    name = "kubernetes"

    def __init__(
        self,
        log_sink: LogSink,
        *,
        images: ImageEngine | None,
        config: m.KubernetesConfig = m.KubernetesConfig(),
        on_exit: ExitCallback | None = None,
        namespace_for: Callable[[str], str] | None = None,
        probe_interval: float = 0.05,
    ) -> None:
        self.log_sink = log_sink
        self.images = images
        self.config = config
        self.on_exit = on_exit
        self.namespace_for = namespace_for
        self.probe_interval = probe_interval
        self.kube = Kube(config.kubeconfig, config.context)
        self._selector = f"{m.PLATFORM}={m.label_value(config.platform_id)},{m.ROLE}=app"
        self._instances: dict[str, Instance] = {}
        self._claims: dict[str, _Claim] = {}
        self._claimed: set[PodKey] = set()
        self._condemned: set[PodKey] = set()
        self._stopping: set[str] = set()
        self._revisions: dict[str, _Revision] = {}
        self._waiters: dict[str, deque[asyncio.Future[PodKey]]] = {}
        self._pods: dict[PodKey, dict[str, Any]] = {}
        self._ready_lines: set[PodKey] = set()
        self._tails: dict[str, deque[str]] = {}
        self._levels: dict[tuple[str, str], str | None] = {}
        self._namespaces: set[str] = set()
        self._watchers: dict[str, threading.Thread] = {}
        self._followers: dict[tuple[PodKey, str], LogFollower] = {}
        self._responses: set[Any] = set()
        self._closing = threading.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the protocol -------------------------------------------------------------------------------------

    async def start(self, spec: InstanceSpec, *, timeout: float) -> Instance:
        if not spec.image or "@sha256:" not in spec.image:
            raise DeployError(
                "On Kubernetes a revision runs its image by digest from a registry, and this one has none"
                + (f" ({spec.image})" if spec.image else "")
                + ".",
                hint="Configure the registry the cluster pulls from (FASTAPI_DEPLOY_REGISTRY), then push "
                "again.",
            )
        deadline = time.monotonic() + timeout
        rev = await self._prepare(spec)
        if rev.autoscaled:
            raise DeployError(
                f"Revision {spec.deployment_id} is scaled by its HorizontalPodAutoscaler.",
                hint="Raise its floor with set_floor(), or stop autoscaling it first.",
            )
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[PodKey] = loop.create_future()
        self._waiters.setdefault(spec.deployment_id, deque()).append(waiter)
        try:
            async with rev.lock:
                rev.starting += 1
            try:
                await self._call(self.kube.scale, rev.namespace, rev.name, by=1)
                self._offer(spec.deployment_id)
                key = await asyncio.wait_for(asyncio.shield(waiter), max(0.0, deadline - time.monotonic()))
            finally:
                rev.starting -= 1
        except BaseException as exc:
            self._drop_waiter(spec.deployment_id, waiter)
            failed = waiter.exception() if waiter.done() and not waiter.cancelled() else None
            if waiter.done() and not waiter.cancelled() and failed is None:
                self._claimed.discard(waiter.result())  # claimed as we gave up: let another start have it
            await asyncio.shield(self._undo_start(rev, failed))
            if isinstance(exc, TimeoutError):
                raise await self._not_ready(rev, None) from None
            if isinstance(exc, _StartFailed):
                raise await self._not_ready(rev, exc) from None
            raise
        instance = self._instance(spec, key)
        self._platform_log(instance, f"Starting instance {instance.id} (pod {key[0]}/{key[1]})")
        if self.config.verify_from_control_plane:
            try:
                await wait_healthy(
                    instance.host,
                    instance.port,
                    spec.hostname,
                    spec.health_path,
                    deadline=max(deadline, time.monotonic() + 5),
                    exited=instance.exited,
                    interval=self.probe_interval,
                )
            except Unhealthy as exc:
                await asyncio.shield(self.stop(instance, timeout=5))
                raise self._verify_error(instance.id, str(exc), None, False) from None
        instance.transition(InstanceState.WARM)
        self._platform_log(instance, f"Instance {instance.id} ready on port {instance.port}")
        return instance

    async def stop(self, instance: Instance, *, timeout: float = 10.0) -> None:
        claim = self._claims.get(instance.id)
        if claim is None or instance.exited.is_set():
            self._forget(instance)
            return
        self._stopping.add(instance.id)
        if instance.state in (InstanceState.WARM, InstanceState.SERVING):
            instance.transition(InstanceState.DRAINING)
        rev = self._revisions.get(instance.spec.deployment_id)
        namespace, pod = claim.key
        try:
            if rev is None or rev.autoscaled:
                await self._call(self.kube.delete, "Pod", namespace, pod, uid=claim.uid)
            else:
                async with rev.lock:
                    await self._scale_down(rev, claim)
            try:
                await asyncio.wait_for(instance.exited.wait(), timeout)
            except TimeoutError:
                self._platform_log(
                    instance, f"Instance {instance.id} did not stop in {timeout:g}s; killing it"
                )
                # A shorter grace period: the kubelet kills it now and reports the exit (137).
                await self._call(self.kube.delete, "Pod", namespace, pod, grace=1, uid=claim.uid)
                try:
                    await asyncio.wait_for(instance.exited.wait(), 30)
                except TimeoutError:  # the cluster lost it: say so, and let it go
                    self._exited(instance, None, False)
        except DeployError:
            if not instance.exited.is_set():
                self._exited(instance, None, False)
        self._forget(instance)

    def instances(self) -> list[Instance]:
        return [i for i in self._instances.values() if i.alive]

    def output_tail(self, instance_id: str, lines: int = 50) -> list[str]:
        tail = self._tails.get(instance_id)
        return list(tail)[-lines:] if tail else []

    async def recover(self) -> list[Instance]:
        """Adopt the Ready pods of this platform's revisions; delete revisions with nothing to adopt
        and objects that belong to no revision."""
        self._loop = asyncio.get_running_loop()
        namespaces = await self._known_namespaces()
        adopted: list[Instance] = []
        for namespace in sorted(namespaces):
            deployments, _ = await self._call(
                self.kube.list, "Deployment", namespace, label_selector=self._selector
            )
            pods, _ = await self._call(self.kube.list, "Pod", namespace, label_selector=self._selector)
            for pod in pods:
                self._pods[pod_key(pod)] = pod
            names = set()
            for deployment in deployments:
                names.add(deployment["metadata"]["name"])
                try:
                    adopted += await self._adopt_revision(namespace, deployment, pods)
                except Exception:  # one odd revision must not keep the platform from starting
                    log.exception("could not adopt revision %s", deployment["metadata"]["name"])
            await self._collect_orphans(namespace, names)
            self._ensure_watch(namespace)
        return adopted

    async def prepare(self, spec: InstanceSpec) -> None:
        """Apply the revision's objects now rather than at its first start. Raises DeployError when the
        API refuses them (never for an app error)."""
        await self._prepare(spec)

    async def release(self, deployment_id: str) -> None:
        """Delete the revision's objects (its pods go with its Deployment; any still running are
        stopped gracefully by Kubernetes and reported stopped)."""
        rev = self._revisions.pop(deployment_id, None)
        for instance in self.instances():
            if instance.spec.deployment_id == deployment_id:
                self._stopping.add(instance.id)
        if rev is None:
            return
        for kind in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
            await self._call(self.kube.delete, kind, rev.namespace, rev.name)
        await self._call(self.kube.delete, "Secret", rev.namespace, rev.name + "-env")

    async def close(self, *, timeout: float = 10.0) -> None:
        if not self.config.keep_on_close and not self._closing.is_set():
            await asyncio.gather(
                *(self.stop(i, timeout=timeout) for i in list(self._instances.values())),
                return_exceptions=True,
            )
        if self._tasks:  # slots of crashed instances being released: let them finish
            await asyncio.wait(list(self._tasks), timeout=timeout)
        self.detach()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        threads = [*self._watchers.values(), *(f.thread for f in self._followers.values())]
        await asyncio.to_thread(_join, threads, 5.0)
        await asyncio.to_thread(self.kube.close)

    def detach(self) -> None:
        """Stop watching and following, and leave every pod as it is: what a control plane that lost
        its leadership (or crashed) leaves behind; the next one's :meth:`recover` adopts them."""
        self._closing.set()
        for response in list(self._responses):
            with contextlib.suppress(Exception):
                response.shutdown() if hasattr(response, "shutdown") else response.close()

    # -- the alternative modes ----------------------------------------------------------------------------

    async def autoscale(
        self, spec: InstanceSpec, *, min_replicas: int, max_replicas: int, cpu_utilization: int = 70
    ) -> None:
        """Hand the revision's replicas to an autoscaling/v2 HPA (the alternative mode): from now on
        :meth:`start`/:meth:`stop` refuse for it, so the platform and the HPA never fight over one count."""
        rev = await self._prepare(spec)
        rev.autoscaled = True
        hpa = m.autoscaler(
            spec,
            rev.namespace,
            self.config,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            cpu_utilization=cpu_utilization,
        )
        deployment = await self._call(self.kube.get, "Deployment", rev.namespace, rev.name)
        if deployment is not None:
            hpa["metadata"]["ownerReferences"] = m.owner(deployment)
        await self._call(self.kube.apply, hpa)
        # An HPA leaves a target at 0 replicas alone (scaling disabled): hand it over at its floor.
        current = int(((deployment or {}).get("spec") or {}).get("replicas") or 0)
        if current == 0:
            await self._call(self.kube.scale, rev.namespace, rev.name, to=hpa["spec"]["minReplicas"])

    async def set_floor(self, deployment_id: str, min_replicas: int) -> None:
        """The pre-warm floor in the HPA mode: raise (or lower) ``minReplicas``; the HPA scales up to it."""
        rev = self._revisions.get(deployment_id)
        if rev is None or not rev.autoscaled:
            raise DeployError(f"Revision {deployment_id} is not autoscaled by an HPA here.")
        current = await self._call(self.kube.get, "HorizontalPodAutoscaler", rev.namespace, rev.name)
        high = int(((current or {}).get("spec") or {}).get("maxReplicas", min_replicas))
        patch = {"spec": {"minReplicas": max(1, min_replicas), "maxReplicas": max(high, min_replicas)}}
        await self._call(self.kube.merge_patch, "HorizontalPodAutoscaler", rev.namespace, rev.name, patch)

    async def set_headroom(
        self, replicas: int, *, cpus: float | None, memory_mb: int | None, namespace: str | None = None
    ) -> None:
        """Keep ``replicas`` placeholder pods of one instance's size (a PriorityClass below zero): app
        pods preempt them, so a surge schedules at once; 0 removes the headroom."""
        target = namespace or self.config.namespace
        await self._ensure_namespace(target)
        await self._call(self.kube.apply, m.headroom_class(self.config))
        await self._call(
            self.kube.apply, m.headroom(replicas, target, self.config, cpus=cpus, memory_mb=memory_mb)
        )

    async def publish(self, spec: InstanceSpec, *, ingress: bool = False) -> None:
        """Point the app's stable Service (and, with ``ingress``, its Ingress) at ``spec``'s revision:
        one write switches every client of the Service (the HPA mode's atomic switch)."""
        rev = await self._prepare(spec)
        await self._call(self.kube.apply, m.app_service(spec, rev.namespace, self.config))
        if ingress:
            await self._call(self.kube.apply, m.app_ingress(spec, rev.namespace, self.config))

    async def rollout(self, deployment_id: str) -> dict[str, Any]:
        """The revision's rollout as Kubernetes reports it: ``observed`` (the status is for the latest
        generation), ``ready``/``available``/``replicas`` counts, and the ``Progressing``/``Available``
        conditions (``reason``, ``message``): ``ProgressDeadlineExceeded`` is a failed rollout."""
        rev = self._revisions.get(deployment_id)
        namespace = rev.namespace if rev else self.config.namespace
        found = await self._call(self.kube.get, "Deployment", namespace, m.revision_name(deployment_id))
        if found is None:
            return {"exists": False}
        status = found.get("status") or {}
        conditions = {c["type"]: c for c in status.get("conditions") or []}
        return {
            "exists": True,
            "observed": status.get("observedGeneration") == found["metadata"].get("generation"),
            "replicas": int(found["spec"].get("replicas") or 0),
            "ready": int(status.get("readyReplicas") or 0),
            "available": int(status.get("availableReplicas") or 0),
            "progressing": conditions.get("Progressing", {}),
            "availability": conditions.get("Available", {}),
        }

    # -- revisions ----------------------------------------------------------------------------------------

    def _namespace(self, app_id: str) -> str:
        return self.namespace_for(app_id) if self.namespace_for else self.config.namespace

    async def _prepare(self, spec: InstanceSpec) -> _Revision:
        self._loop = asyncio.get_running_loop()
        rev = self._revisions.get(spec.deployment_id)
        if rev is None:
            rev = _Revision(
                spec=spec, namespace=self._namespace(spec.app_id), name=m.revision_name(spec.deployment_id)
            )
            self._revisions[spec.deployment_id] = rev
        if rev.prepared:
            return rev
        async with rev.lock:
            if not rev.prepared:
                await self._ensure_namespace(rev.namespace)
                self._ensure_watch(rev.namespace)
                await self._apply_revision(spec, rev)
                rev.prepared = True
        return rev

    async def _apply_revision(self, spec: InstanceSpec, rev: _Revision) -> None:
        secret, deployment, service, budget = m.revision_objects(spec, rev.namespace, self.config)
        await self._call(self.kube.apply, secret)
        existing = await self._call(self.kube.get, "Deployment", rev.namespace, rev.name)
        if existing is None:
            # Created at 0 replicas by an Update (so the apply below never owns spec.replicas: a
            # re-apply cannot reset it, and the scale subresource owns it alone).
            with contextlib.suppress(Conflict):
                await self._call(
                    self.kube.create, {**deployment, "spec": {**deployment["spec"], "replicas": 0}}
                )
        applied = await self._call(self.kube.apply, deployment)
        for obj in (service, budget, secret):
            obj["metadata"]["ownerReferences"] = m.owner(applied)
            await self._call(self.kube.apply, obj)

    async def _ensure_namespace(self, namespace: str) -> None:
        if namespace in self._namespaces:
            return
        if self.namespace_for is not None:
            await self._call(self.kube.apply, m.namespace(namespace, self.config))
        if self.config.registry is not None and self.config.registry.username and not self.config.pull_secret:
            await self._call(self.kube.apply, m.pull_secret(self.config.registry, namespace, self.config))
        if self.config.platform_namespace:
            await self._call(self.kube.apply, m.network_policy(namespace, self.config))
        self._namespaces.add(namespace)

    async def _known_namespaces(self) -> set[str]:
        if self.namespace_for is None:
            return {self.config.namespace}
        found, _ = await self._call(
            self.kube.list,
            "Namespace",
            None,
            label_selector=f"{m.PLATFORM}={m.label_value(self.config.platform_id)}",
        )
        return {n["metadata"]["name"] for n in found} | {self.config.namespace}

    async def _adopt_revision(
        self, namespace: str, deployment: dict[str, Any], pods: list[dict[str, Any]]
    ) -> list[Instance]:
        name = deployment["metadata"]["name"]
        try:
            spec = m.spec_from_record(deployment["metadata"]["annotations"][m.SPEC_ANNOTATION])
        except (KeyError, ValueError, TypeError):
            spec = None
        mine = [
            p
            for p in pods
            if p["metadata"].get("labels", {}).get(m.DEPLOYMENT)
            == deployment["metadata"]["labels"].get(m.DEPLOYMENT)
        ]
        healthy = [p for p in mine if is_ready(p) and not is_terminating(p)]
        if spec is None or not healthy:
            log.info("deleting revision %s/%s left by a previous run (nothing to adopt)", namespace, name)
            await self._call(self.kube.delete, "Deployment", namespace, name)
            return []
        rev = _Revision(spec=spec, namespace=namespace, name=name, prepared=True)
        hpa = await self._call(self.kube.get, "HorizontalPodAutoscaler", namespace, name)
        rev.autoscaled = hpa is not None
        self._revisions[spec.deployment_id] = rev
        if rev.autoscaled:
            return []
        adopted = []
        for pod in healthy:
            key = pod_key(pod)
            ip = (pod.get("status") or {}).get("podIP", "")
            if (
                self.config.verify_from_control_plane
                and (await probe(ip, CONTAINER_PORT, spec.hostname, spec.health_path, timeout=5.0) or 500)
                >= 500
            ):
                log.info("deleting unhealthy pod %s/%s left by a previous run", *key)
                self._condemned.add(key)
                await self._call(self.kube.delete, "Pod", namespace, key[1])
                continue
            instance = self._instance(spec, key)
            self._follow(key, pod, since=_now_rfc3339())
            instance.transition(InstanceState.WARM)
            self._platform_log(
                instance, f"Adopted instance {instance.id} (pod {namespace}/{key[1]}) on port {instance.port}"
            )
            adopted.append(instance)
        await self._call(self.kube.scale, namespace, name, to=len(adopted))
        return adopted

    async def _collect_orphans(self, namespace: str, revisions: set[str]) -> None:
        for kind in ("Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "Secret"):
            found, _ = await self._call(self.kube.list, kind, namespace, label_selector=self._selector)
            for obj in found:
                name = obj["metadata"]["name"]
                if name.removesuffix("-env") not in revisions:
                    await self._call(self.kube.delete, kind, namespace, name)

    # -- scaling ------------------------------------------------------------------------------------------

    async def _scale_down(self, rev: _Revision, claim: _Claim) -> None:
        """Remove exactly ``claim``'s pod and one replica (under the revision's lock)."""
        namespace, pod = claim.key
        starting = rev.starting > 0 or any(
            p
            for k, p in self._pods.items()
            if k[0] == namespace
            and k not in self._claimed
            and not is_terminating(p)
            and not is_ready(p)
            and p["metadata"].get("labels", {}).get(m.DEPLOYMENT) == m.label_value(rev.spec.deployment_id)
        )
        if not starting:
            # Every other pod is Ready: the ReplicaSet deletes the lowest deletion cost first: this one.
            try:
                await self._call(
                    self.kube.merge_patch,
                    "Pod",
                    namespace,
                    pod,
                    {"metadata": {"annotations": {m.DELETION_COST: _LOWEST_COST}}},
                )
            except DeployError:
                return
            await self._call(self.kube.scale, namespace, rev.name, by=-1)
            if await self._terminating(claim.key, 5.0):
                return
        # Pods still starting would be deleted first: delete this one, then lower the count (the
        # replacement the ReplicaSet may create meanwhile is the newest pending pod, and goes).
        await self._call(self.kube.delete, "Pod", namespace, pod, uid=claim.uid)
        if starting:
            await self._call(self.kube.scale, namespace, rev.name, by=-1)

    async def _terminating(self, key: PodKey, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pod = self._pods.get(key)
            if pod is None or is_terminating(pod):
                return True
            await asyncio.sleep(0.05)
        return False

    async def _undo_start(self, rev: _Revision, failure: BaseException | None) -> None:
        """A start gave up: its replica goes (and its pod, when we know which one failed)."""
        async with rev.lock:
            if isinstance(failure, _StartFailed):
                self._condemned.add(failure.key)
                with contextlib.suppress(DeployError):
                    await self._call(self.kube.delete, "Pod", failure.key[0], failure.key[1], grace=0)
            with contextlib.suppress(DeployError):
                await self._call(self.kube.scale, rev.namespace, rev.name, by=-1)

    # -- pods ---------------------------------------------------------------------------------------------

    def _instance(self, spec: InstanceSpec, key: PodKey) -> Instance:
        pod = self._pods[key]
        status = container_status(pod) or {}
        instance = Instance(
            id=key[1], spec=spec, host=str((pod.get("status") or {}).get("podIP", "")), port=CONTAINER_PORT
        )
        self._instances[instance.id] = instance
        self._claimed.add(key)
        self._claims[instance.id] = _Claim(
            key,
            pod["metadata"]["uid"],
            int(status.get("restartCount", 0)),
            str(status.get("containerID", "")),
        )
        self._tails.setdefault(instance.id, deque(maxlen=_OUTPUT_TAIL))
        return instance

    def container_id(self, instance_id: str) -> str:
        """The runtime's id of the container the instance runs in (``docker://…``), as the kubelet said."""
        claim = self._claims.get(instance_id)
        return claim.container_id if claim else ""

    def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        if self._closing.is_set():
            return
        key = pod_key(pod)
        if kind == "DELETED":
            self._pods.pop(key, None)
        else:
            self._pods[key] = pod
        name = key[1]
        instance = self._instances.get(name)
        claim = self._claims.get(name)
        if instance is not None and claim is not None and claim.uid == pod["metadata"]["uid"]:
            self._instance_event(instance, claim, kind, pod)
        if kind != "DELETED":
            self._follow(key, pod, since=None)
        deployment = self._deployment_of(pod)
        if deployment is not None:
            self._offer(deployment)
        if kind == "DELETED":
            self._claimed.discard(key)
            self._condemned.discard(key)
            self._ready_lines.discard(key)

    def _resync(self, namespace: str, pods: list[dict[str, Any]]) -> None:
        """After a (re)list: what vanished while nobody watched is deleted."""
        present = {pod_key(p) for p in pods}
        for key, pod in list(self._pods.items()):
            if key[0] == namespace and key not in present:
                self._on_pod("DELETED", pod)
        for pod in pods:
            self._on_pod("MODIFIED", pod)

    def _deployment_of(self, pod: dict[str, Any]) -> str | None:
        label = (pod["metadata"].get("labels") or {}).get(m.DEPLOYMENT)
        return next((d for d in self._revisions if m.label_value(d) == label), None)

    def _instance_event(self, instance: Instance, claim: _Claim, kind: str, pod: dict[str, Any]) -> None:
        if instance.exited.is_set():
            return
        status = container_status(pod) or {}
        if kind == "DELETED":
            code, oom = exit_of(status, claim.restarts)
            self._spawn(self._finish(instance, claim, code, oom), f"exit-{instance.id}")
            return
        if instance.id in self._stopping or claim.key in self._condemned:
            return
        restarted = int(status.get("restartCount", 0)) > claim.restarts
        if restarted or "terminated" in (status.get("state") or {}):
            code, oom = exit_of(status, claim.restarts)
            self._condemned.add(claim.key)
            self._spawn(self._finish(instance, claim, code, oom), f"exit-{instance.id}")
            self._spawn(self._release_slot(instance, claim, delete=True), f"release-{instance.id}")
        elif is_terminating(pod) and claim.key not in self._condemned:
            # Deleted by someone else (an eviction, an operator): it ends when the pod is gone.
            self._condemned.add(claim.key)
            self._spawn(self._release_slot(instance, claim, delete=False), f"release-{instance.id}")

    async def _finish(self, instance: Instance, claim: _Claim, code: int | None, oom: bool) -> None:
        """The instance's container is gone: read the rest of its output, then report the exit."""
        followers = [
            f for k, f in self._followers.items() if k[0] == claim.key and k[1].startswith(claim.container_id)
        ]
        await asyncio.to_thread(_join, [f.thread for f in followers], 3.0)
        self._exited(instance, code, oom)

    async def _release_slot(self, instance: Instance, claim: _Claim, *, delete: bool) -> None:
        """An instance ended unasked: its pod goes (a container restarted in it is not the same
        instance) and so does its replica. ``delete``: the pod is still there (its container crashed);
        otherwise someone else deleted it, and the ReplicaSet's replacement (the newest pending pod)
        goes with the replica."""
        rev = self._revisions.get(instance.spec.deployment_id)
        with contextlib.suppress(DeployError):
            if rev is None or rev.autoscaled:
                if delete:
                    await self._call(self.kube.delete, "Pod", claim.key[0], claim.key[1], uid=claim.uid)
                return
            async with rev.lock:
                if delete:
                    await self._scale_down(rev, claim)
                else:
                    await self._call(self.kube.scale, rev.namespace, rev.name, by=-1)

    def _offer(self, deployment_id: str) -> None:
        """Hand Ready pods nobody claimed to waiting starts; fail a start when a pod of its revision
        fails during startup."""
        waiters = self._waiters.get(deployment_id)
        if not waiters:
            return
        label = m.label_value(deployment_id)
        candidates = sorted(
            (
                p
                for k, p in self._pods.items()
                if k not in self._claimed
                and k not in self._condemned
                and (p["metadata"].get("labels") or {}).get(m.DEPLOYMENT) == label
                and not is_terminating(p)
            ),
            key=lambda p: p["metadata"].get("creationTimestamp", ""),
        )
        for pod in candidates:
            key = pod_key(pod)
            waiter = next((w for w in waiters if not w.done()), None)
            if waiter is None:
                return
            failure = failure_of(pod)
            if failure is not None:
                self._condemned.add(key)
                waiter.set_exception(_StartFailed(key, *failure))
            elif is_ready(pod) and key in self._ready_lines and (pod.get("status") or {}).get("podIP"):
                self._claimed.add(key)
                waiter.set_result(key)

    def _drop_waiter(self, deployment_id: str, waiter: asyncio.Future[PodKey]) -> None:
        waiters = self._waiters.get(deployment_id)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
        if waiter.done() and not waiter.cancelled():
            waiter.exception()  # retrieved: nobody else will

    # -- exits and errors ---------------------------------------------------------------------------------

    def _exited(self, instance: Instance, code: int | None, oom: bool) -> None:
        if instance.exited.is_set():
            return
        instance.exit_code = code = _exit_code(code)
        instance.oom = oom
        expected = instance.id in self._stopping
        self._platform_log(instance, *instance.exit_line(expected=expected))
        instance.transition(InstanceState.STOPPED if expected else InstanceState.CRASHED)
        instance.exited.set()
        if self.on_exit is not None and not expected:
            try:
                self.on_exit(instance)
            except Exception:  # the callback's bug must not break the backend
                log.exception("on_exit callback failed")

    def _forget(self, instance: Instance) -> None:
        self._stopping.discard(instance.id)
        self._instances.pop(instance.id, None)
        claim = self._claims.pop(instance.id, None)
        if claim is not None:
            self._claimed.discard(claim.key)
        if len(self._tails) > 256:
            for key in list(self._tails)[: len(self._tails) - 256]:
                if key not in self._instances:
                    self._tails.pop(key, None)

    async def _not_ready(self, rev: _Revision, failure: _StartFailed | None) -> VerifyError:
        """Why a start failed, in the app's own words (its last output)."""
        if failure is not None:
            name = failure.key[1]
            if not self._tails.get(name):
                await self._fetch_output(failure.key)
            return self._verify_error(name, failure.what, failure.code, failure.oom)
        label = m.label_value(rev.spec.deployment_id)
        pending = sorted(
            (
                p
                for k, p in self._pods.items()
                if k not in self._claimed and (p["metadata"].get("labels") or {}).get(m.DEPLOYMENT) == label
            ),
            key=lambda p: p["metadata"].get("creationTimestamp", ""),
        )
        if not pending:
            return self._verify_error("", "was not scheduled: no pod of it was created", None, False)
        pod = pending[-1]
        ip = (pod.get("status") or {}).get("podIP")
        status = (
            await probe(ip, CONTAINER_PORT, rev.spec.hostname, rev.spec.health_path, timeout=2.0)
            if ip
            else None
        )
        if status is not None:
            what = f"answered {status} on its health path {rev.spec.health_path}"
        elif ip:
            what = f"did not answer on its health path {rev.spec.health_path}"
        else:
            conditions = {c["type"]: c for c in (pod.get("status") or {}).get("conditions") or []}
            message = conditions.get("PodScheduled", {}).get("message") or "it did not start"
            what = f"did not start: {message}"
        return self._verify_error(pod["metadata"]["name"], what, None, False)

    def _verify_error(self, instance_id: str, what: str, code: int | None, oom: bool) -> VerifyError:
        spec = next((r.spec for r in self._revisions.values() if instance_id.startswith(r.name)), None)
        return not_ready(
            what,
            exit_code=None if code is None else _exit_code(code),
            tail=self.output_tail(instance_id, 30),
            oom=oom,
            memory_mb=spec.memory_mb if spec else None,
        )

    async def _fetch_output(self, key: PodKey) -> None:
        """The failed container's output, when its log stream ended before we read it."""

        def read() -> list[str]:
            for previous in (True, False):
                with contextlib.suppress(KubeError):
                    return list(self.kube.logs(key[0], key[1], follow=False, previous=previous, tail=30))
            return []

        tail = self._tails.setdefault(key[1], deque(maxlen=_OUTPUT_TAIL))
        for line in await asyncio.to_thread(read):
            _, _, text = line.partition(" ")
            if not is_ready_line(text) and text not in tail:
                tail.append(text)

    # -- watches and logs (threads hand over to the loop) -------------------------------------------------

    def _ensure_watch(self, namespace: str) -> None:
        if namespace in self._watchers or self._closing.is_set():
            return
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        ready = threading.Event()
        thread = threading.Thread(
            target=self._watch, args=(namespace, loop, ready), name=f"k8s-watch-{namespace}", daemon=True
        )
        self._watchers[namespace] = thread
        thread.start()

    def _watch(self, namespace: str, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        """In a thread: list, then watch from the list's resourceVersion; list again on 410."""
        version = ""
        failures = 0
        while not self._closing.is_set():
            try:
                if not version:
                    pods, version = self.kube.list("Pod", namespace, label_selector=self._selector)
                    self._post(loop, self._resync, namespace, pods)
                for event in self.kube.watch(
                    "Pod",
                    namespace,
                    label_selector=self._selector,
                    resource_version=version,
                    timeout=120,
                    on_response=self._responses.add,
                ):
                    obj = event.get("object") or {}
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                    if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                        self._post(loop, self._on_pod, event["type"], obj)
                failures = 0
            except KubeError as exc:
                if exc.status == 410:
                    version = ""
                    continue
                failures += 1
                if not self._closing.is_set():
                    log.warning("pod watch of %s failed (%s); retrying", namespace, exc.message)
                self._closing.wait(min(5.0, 0.2 * 2**failures))
            except Exception as exc:
                failures += 1
                if not self._closing.is_set():
                    log.debug("pod watch of %s ended: %r", namespace, exc)
                self._closing.wait(min(5.0, 0.2 * 2**failures))

    def _follow(self, key: PodKey, pod: dict[str, Any], *, since: str | None) -> None:
        status = container_status(pod) or {}
        container = str(status.get("containerID") or "")
        if not container or "running" not in (status.get("state") or {}) or self._closing.is_set():
            return
        loop = self._loop or asyncio.get_running_loop()
        streams = ("Stdout", "Stderr") if self.config.split_log_streams else (None,)
        for stream in streams:
            follower_key = (key, f"{container}/{stream}")
            if follower_key in self._followers:
                continue
            follower = LogFollower(
                self.kube,
                key,
                stream,
                since=since,
                closing=self._closing,
                on_lines=functools.partial(self._post, loop, self._on_lines, key, stream),
                on_response=self._responses.add,
            )
            self._followers[follower_key] = follower
            follower.start()
        for done in [
            k for k, f in self._followers.items() if not f.thread.is_alive() and k[0] not in self._pods
        ]:
            self._followers.pop(done, None)

    def _on_lines(self, key: PodKey, stream: str | None, lines: list[tuple[datetime, str]]) -> None:
        if self._closing.is_set():
            return
        name = key[1]
        deployment = self._deployment_of(self._pods.get(key) or {"metadata": {"labels": {}}})
        rev = self._revisions.get(deployment) if deployment else None
        instance = self._instances.get(name)
        spec = instance.spec if instance else rev.spec if rev else None
        if spec is None:
            return
        kind = "stderr" if stream == "Stderr" else "stdout"
        tail = self._tails.setdefault(name, deque(maxlen=_OUTPUT_TAIL))
        for stamp, line in lines:
            if kind == "stdout" and key not in self._ready_lines and is_ready_line(line):
                self._ready_lines.add(key)
                if deployment:
                    self._offer(deployment)
                continue
            level = parse_level(line, kind, self._levels.get((name, kind)))
            self._levels[(name, kind)] = level
            tail.append(line)
            self._emit(spec, name, kind, line, level, stamp)

    def _post(self, loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
            loop.call_soon_threadsafe(callback, *args)

    # -- internals ----------------------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except KubeError as exc:
            raise DeployError(f"The Kubernetes API refused a request: {exc}", hint=_HINT) from exc

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _emit(
        self,
        spec: InstanceSpec,
        instance_id: str,
        stream: str,
        message: str,
        level: str,
        stamp: datetime | None = None,
    ) -> None:
        try:
            self.log_sink(
                LogRecord(
                    app_id=spec.app_id,
                    deployment_id=spec.deployment_id,
                    instance_id=instance_id,
                    stream=stream,
                    timestamp=stamp or datetime.now(UTC),
                    message=message,
                    level=level,
                )
            )
        except Exception:
            log.exception("log sink failed")

    def _platform_log(self, instance: Instance, message: str, level: str = "info") -> None:
        log.info("%s", message)
        self._emit(instance.spec, instance.id, "platform", message, level)


class _StartFailed(Exception):
    """A pod of the revision failed during startup (exited, image not pullable, bad config)."""

    def __init__(self, key: PodKey, what: str, code: int | None, oom: bool) -> None:
        super().__init__(what)
        self.key, self.what, self.code, self.oom = key, what, code, oom


def _exit_code(code: int | None) -> int:
    """The container's status with "killed by signal N" (``128 + N``) as ``-N``, as ``process`` says it;
    ``None`` (no status: the pod vanished) as ``-9``."""
    if code is None:
        return -9
    if 128 < code < 128 + 65:
        return -(code - 128)
    return code


def _now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _join(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
