"""The fake kubelet: every pod bound to the node really runs, as Docker containers on the local engine.

A pod is a *sandbox* container (``sleep infinity`` in ``sandbox_image``) that holds the network
namespace on the ``kubefake`` bridge network, so the pod IP is a real address the test process (and
the platform's router) can reach and it survives container restarts, plus one container per pod
container joined to it (``network_mode=container:…``). What the kubelet keeps from the real one:

- images: present on the engine, or pulled with the pod's ``imagePullSecrets`` (dockerconfigjson);
  ``ErrImagePull``/``ImagePullBackOff`` otherwise;
- env (values, ``fieldRef``, ``secretKeyRef``, ``configMapKeyRef``, ``envFrom``), ``command``/``args``,
  memory and CPU limits (cgroup limits: ``OOMKilled`` is reported), ``securityContext`` (user,
  ``runAsNonRoot`` checked against the image's user, dropped capabilities, ``no-new-privileges``,
  read-only root filesystem), ``emptyDir`` volumes (tmpfs);
- probes (``exec``, ``httpGet``, ``tcpSocket``) at their period with thresholds: startup gates
  readiness and liveness; readiness is probed at once when startup succeeds; liveness failures and
  exits restart the container (``restartCount``, ``lastState``, ``CrashLoopBackOff`` with an
  exponential back-off from ``restart_backoff``);
- graceful deletion: SIGTERM, SIGKILL at the end of the grace period (shortened when a later delete
  shortens it), the final status written, then the object removed; a pod removed at once (grace 0)
  is killed at once;
- the in-cluster API: ``KUBERNETES_SERVICE_HOST``/``_PORT`` name the API server's TLS listener on the
  network's gateway, and ``token``, ``ca.crt`` and ``namespace`` are mounted at
  ``/var/run/secrets/kubernetes.io/serviceaccount`` (unless ``automountServiceAccountToken: false``), so
  the official client's in-cluster configuration works in a pod (one token for every service account:
  RBAC is not enforced);
- logs per container, current or previous, per stream (``stream=Stdout|Stderr``: the split-streams
  feature), ``follow``, ``timestamps``, ``sinceTime``, ``tailLines``.

``stand_ins`` maps images that cannot be pulled here (``registry.k8s.io/pause``) to a local image and
command that behave the same.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.kubefake.resources import kind_of, parse_quantity
from tests.kubefake.store import ApiError, Store, now, parse_time

log = logging.getLogger("kubefake.kubelet")

POD, SECRET, CONFIGMAP, SERVICE = kind_of("Pod"), kind_of("Secret"), kind_of("ConfigMap"), kind_of("Service")
NETWORK = "kubefake"
LABEL = "dev.kubefake"
TICK = 0.05
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def _rfc3339(value: str | None) -> str:
    """Docker's ``2024-01-01T00:00:00.123456789Z`` as the API writes it (seconds)."""
    if not value or value.startswith("0001-"):
        return now()
    return value.split(".")[0].rstrip("Z") + "Z"


@dataclass
class _Probe:
    spec: dict[str, Any]
    next_at: float = 0.0
    successes: int = 0
    failures: int = 0


@dataclass
class _Container:
    spec: dict[str, Any]
    id: str | None = None
    previous_id: str | None = None
    started_at: str | None = None
    started_mono: float = 0.0
    restarts: int = 0
    crashes: int = 0
    state: dict[str, Any] = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    started: bool = False
    exited: threading.Event | None = None
    exit: tuple[int, bool, str] | None = None
    retry_at: float = 0.0
    image_id: str = ""
    probes: dict[str, _Probe] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.spec["name"])


class Kubelet:
    """Runs the pods bound to ``node`` until :meth:`stop`."""

    def __init__(
        self,
        store: Store,
        node: str,
        *,
        sandbox_image: str,
        stand_ins: dict[str, tuple[str, list[str]]] | None = None,
        restart_backoff: float = 10.0,
    ) -> None:
        import docker

        self.store = store
        self.node = node
        self.sandbox_image = sandbox_image
        self.stand_ins = stand_ins or {}
        self.restart_backoff = restart_backoff
        self.api_endpoint: tuple[str, int] = ("10.96.0.1", 443)
        """Where pods reach the API server (``KUBERNETES_SERVICE_HOST``/``_PORT``)."""
        self.service_accounts: Any = None
        """``namespace -> directory`` of the files mounted at SERVICE_ACCOUNT_DIR (None: nothing mounted)."""
        self.docker = docker.APIClient(version="auto", timeout=120)
        self.workers: dict[str, _PodWorker] = {}
        self._streams: set[Any] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kubefake-kubelet", daemon=True)
        self.node_ip = ""

    def start(self) -> None:
        if not self.docker.networks(names=[NETWORK]):
            self.docker.create_network(NETWORK, driver="bridge", labels={LABEL: "network"})
        config = (self.docker.inspect_network(NETWORK).get("IPAM") or {}).get("Config") or [{}]
        self.node_ip = str(config[0].get("Gateway") or "127.0.0.1")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for worker in list(self.workers.values()):
            worker.halt()
        for worker in list(self.workers.values()):
            worker.join(15)
        for chunks in list(self._streams):  # followers still reading: their sockets go now
            _close_stream(chunks)
        for summary in self.docker.containers(all=True, filters={"label": f"{LABEL}.node={self.node}"}):
            try:
                self.docker.remove_container(summary["Id"], force=True)
            except Exception:
                pass
        self.docker.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            pods = self.store.list(POD, None, None, f"spec.nodeName={self.node}")[0]
            for pod in pods:
                uid = pod["metadata"]["uid"]
                if uid not in self.workers:
                    worker = _PodWorker(self, pod)
                    self.workers[uid] = worker
                    worker.start()
            for uid, worker in list(self.workers.items()):
                if not worker.is_alive():
                    del self.workers[uid]
            with self.store.changed:
                self.store.changed.wait(0.1)

    def container_of(self, pod_uid: str, container: str | None = None) -> str | None:
        """The Docker id of a pod's current container (tests use it to kill an instance from outside)."""
        worker = self.workers.get(pod_uid)
        if worker is None:
            return None
        c = next((c for c in worker.containers if container in (None, c.name)), None)
        return c.id if c else None

    def logs(
        self,
        pod: dict[str, Any],
        *,
        container: str | None,
        follow: bool,
        timestamps: bool,
        previous: bool,
        since_seconds: int | None,
        since_time: str | None,
        tail_lines: int | None,
        stream: str | None,
    ) -> Iterator[bytes]:
        worker = self.workers.get(pod["metadata"]["uid"])
        name = pod["metadata"]["name"]
        names = [c["name"] for c in pod["spec"]["containers"]]
        wanted = container or names[0]
        if container is None and len(names) > 1:
            raise ApiError(
                400,
                "BadRequest",
                f"a container name must be specified for pod {name}, choose one of: {names}",
            )
        c = next((c for c in worker.containers if c.name == wanted), None) if worker else None
        cid = (c.previous_id if previous else c.id) if c else None
        if cid is None:
            if previous:
                raise ApiError(
                    400, "BadRequest", f'previous terminated container "{wanted}" in pod "{name}" not found'
                )
            raise ApiError(
                400,
                "BadRequest",
                f'container "{wanted}" in pod "{name}" is waiting to start: ContainerCreating',
            )
        since: Any = None
        if since_time:
            since = parse_time(since_time)
        elif since_seconds:
            since = int(time.time() - since_seconds)
        out = stream in (None, "All", "Stdout")
        err = stream in (None, "All", "Stderr")
        try:
            chunks = self.docker.logs(
                cid,
                stdout=out,
                stderr=err,
                stream=True,
                follow=follow,
                timestamps=timestamps,
                since=since,
                tail=tail_lines if tail_lines is not None else "all",
            )
        except Exception as exc:
            raise ApiError(400, "BadRequest", f"unable to retrieve container logs for {cid}: {exc}") from exc

        self._streams.add(chunks)

        def safe() -> Iterator[bytes]:
            try:
                yield from chunks
            except Exception:
                return
            finally:
                self._streams.discard(chunks)
                _close_stream(chunks)  # the engine's log stream (a socket), even when the client went away

        return safe()


class _PodWorker(threading.Thread):
    """One pod's life on the node: sandbox, containers, probes, status, termination."""

    def __init__(self, kubelet: Kubelet, pod: dict[str, Any]) -> None:
        super().__init__(name=f"kubefake-pod-{pod['metadata']['name']}", daemon=True)
        self.kubelet = kubelet
        self.docker = kubelet.docker
        self.uid = pod["metadata"]["uid"]
        self.namespace = pod["metadata"]["namespace"]
        self.pod_name = pod["metadata"]["name"]
        self.containers = [_Container(spec=c) for c in pod["spec"]["containers"]]
        self.sandbox: str | None = None
        self.ip = ""
        self.halted = threading.Event()
        self.kill_deadline: float | None = None
        self.grace_seen: int | None = None
        self._published: Any = None
        self.start_time = now()

    def halt(self) -> None:
        self.halted.set()

    # -- the loop -----------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod worker %s failed", self.pod_name)
            self._kill_all(force=True)

    def _run(self) -> None:
        while True:
            pod = self.kubelet.store.find(POD, self.namespace, self.pod_name)
            if pod is None or pod["metadata"]["uid"] != self.uid or self.halted.is_set():
                self._kill_all(force=True)  # removed at once (grace 0), or the kubelet stops
                return
            if pod["metadata"].get("deletionTimestamp"):
                self._terminate(pod)
                return
            if self.sandbox is None:
                self._start_sandbox(pod)
            for container in self.containers:
                self._step(pod, container)
            self._publish(pod)
            time.sleep(TICK)

    def _start_sandbox(self, pod: dict[str, Any]) -> None:
        created = self.docker.create_container(
            self.kubelet.sandbox_image,
            entrypoint=["sleep"],
            command=["infinity"],
            name=f"kubefake-{self.uid[:8]}-sandbox",
            hostname=pod["metadata"]["name"][:63],  # a pod's hostname is its name; its containers share it
            labels=self._labels("sandbox"),
            host_config=self.docker.create_host_config(network_mode=NETWORK, cap_drop=["ALL"]),
            networking_config=None,
        )
        self.sandbox = str(created["Id"])
        self.docker.start(self.sandbox)
        info = self.docker.inspect_container(self.sandbox)
        self.ip = str(info["NetworkSettings"]["Networks"][NETWORK]["IPAddress"])

    def _labels(self, container: str) -> dict[str, str]:
        return {
            f"{LABEL}.node": self.kubelet.node,
            f"{LABEL}.pod-uid": self.uid,
            f"{LABEL}.pod": self.pod_name,
            f"{LABEL}.namespace": self.namespace,
            f"{LABEL}.container": container,
        }

    # -- containers ---------------------------------------------------------------------------------------

    def _step(self, pod: dict[str, Any], c: _Container) -> None:
        clock = time.monotonic()
        if c.id is None or (c.exited is not None and c.exited.is_set() and c.exit is not None):
            if c.id is not None and c.exit is not None:
                self._record_exit(c)
            if clock >= c.retry_at:
                self._start_container(pod, c)
            return
        self._probe(pod, c, clock)

    def _record_exit(self, c: _Container) -> None:
        assert c.exit is not None
        code, oom, finished = c.exit
        reason = "OOMKilled" if oom else ("Completed" if code == 0 else "Error")
        c.last_state = {
            "terminated": {
                "exitCode": code,
                "reason": reason,
                "startedAt": c.started_at or now(),
                "finishedAt": finished,
                "containerID": f"docker://{c.id}",
            }
        }
        self._remove(c.previous_id)
        c.previous_id, c.id, c.exit, c.exited = c.id, None, None, None
        c.ready = c.started = False
        ran = time.monotonic() - c.started_mono
        c.crashes = 0 if ran > 600 else c.crashes + 1
        delay = 0.0 if c.crashes <= 1 else min(300.0, self.kubelet.restart_backoff * 2 ** (c.crashes - 2))
        c.retry_at = time.monotonic() + delay
        if delay:
            c.state = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {delay:g}s restarting failed container={c.name} "
                    f"pod={self.pod_name}_{self.namespace}({self.uid})",
                }
            }

    def _waiting(self, c: _Container, reason: str, message: str, retry: float) -> None:
        c.state = {"waiting": {"reason": reason, "message": message}}
        c.retry_at = time.monotonic() + retry

    def _start_container(self, pod: dict[str, Any], c: _Container) -> None:
        spec = c.spec
        image, command = spec["image"], spec.get("command")
        if image in self.kubelet.stand_ins:
            image, command = self.kubelet.stand_ins[image]
        try:
            info = self._ensure_image(pod, image)
        except _PullError as exc:
            reason = (
                "ImagePullBackOff"
                if c.state.get("waiting", {}).get("reason") == "ErrImagePull"
                else "ErrImagePull"
            )
            self._waiting(c, reason, str(exc), self.kubelet.restart_backoff)
            return
        try:
            env = self._env(pod, spec)
            user = self._user(pod, spec, info)
        except _ConfigError as exc:
            self._waiting(c, "CreateContainerConfigError", str(exc), 1.0)
            return
        security = {**(pod["spec"].get("securityContext") or {}), **(spec.get("securityContext") or {})}
        limits = (spec.get("resources") or {}).get("limits") or {}
        memory = int(parse_quantity(limits["memory"])) if "memory" in limits else None
        tmpfs = {}
        empty_dirs = {v["name"] for v in pod["spec"].get("volumes") or [] if "emptyDir" in v}
        for mount in spec.get("volumeMounts") or []:
            if mount["name"] not in empty_dirs:
                self._waiting(
                    c,
                    "CreateContainerConfigError",
                    f"kubefake: volume {mount['name']} is not an emptyDir",
                    5.0,
                )
                return
            tmpfs[mount["mountPath"]] = "rw,exec,mode=1777"
        binds = None
        if self.kubelet.service_accounts is not None and pod["spec"].get(
            "automountServiceAccountToken", True
        ):
            binds = [f"{self.kubelet.service_accounts(self.namespace)}:{SERVICE_ACCOUNT_DIR}:ro"]
        host_config = self.docker.create_host_config(
            network_mode=f"container:{self.sandbox}",
            mem_limit=memory,
            memswap_limit=memory,
            nano_cpus=int(parse_quantity(limits["cpu"]) * 1e9) if "cpu" in limits else None,
            cap_drop=(security.get("capabilities") or {}).get("drop"),
            cap_add=(security.get("capabilities") or {}).get("add"),
            security_opt=["no-new-privileges"] if security.get("allowPrivilegeEscalation") is False else None,
            read_only=bool(security.get("readOnlyRootFilesystem")),
            tmpfs=tmpfs or None,
            binds=binds,
        )
        created = self.docker.create_container(
            image,
            entrypoint=command,
            command=spec.get("args"),
            environment=env,
            user=user,
            working_dir=spec.get("workingDir"),
            labels=self._labels(c.name),
            host_config=host_config,
            name=f"kubefake-{self.uid[:8]}-{c.name}-{c.restarts + (1 if c.previous_id else 0)}",
        )
        cid = str(created["Id"])
        self.docker.start(cid)
        if c.previous_id is not None:
            c.restarts += 1
        c.id, c.exited, c.exit = cid, threading.Event(), None
        c.started_at, c.started_mono = now(), time.monotonic()
        c.state = {"running": {"startedAt": c.started_at}}
        c.image_id = "docker-pullable://" + ((info.get("RepoDigests") or [info["Id"]])[0])
        c.probes = {
            kind: _Probe(spec[kind], next_at=time.monotonic() + int(spec[kind].get("initialDelaySeconds", 0)))
            for kind in ("startupProbe", "readinessProbe", "livenessProbe")
            if kind in spec
        }
        c.started = "startupProbe" not in spec
        c.ready = c.started and "readinessProbe" not in spec
        threading.Thread(
            target=self._wait, args=(c, cid, c.exited), name=f"kubefake-wait-{cid[:8]}", daemon=True
        ).start()

    def _wait(self, c: _Container, cid: str, exited: threading.Event) -> None:
        try:
            code = int(self.docker.wait(cid)["StatusCode"])
            state = self.docker.inspect_container(cid)["State"]
            result = (code, bool(state.get("OOMKilled")), _rfc3339(state.get("FinishedAt")))
        except Exception:
            result = (137, False, now())
        if c.id == cid:
            c.exit = result
        exited.set()

    def _ensure_image(self, pod: dict[str, Any], image: str) -> dict[str, Any]:
        import docker.errors

        try:
            return dict(self.docker.inspect_image(image))
        except docker.errors.ImageNotFound:
            pass
        host = (
            image.split("/")[0]
            if "/" in image and ("." in image.split("/")[0] or ":" in image.split("/")[0])
            else "docker.io"
        )
        auth = None
        for ref in pod["spec"].get("imagePullSecrets") or []:
            secret = self.kubelet.store.find(SECRET, self.namespace, ref["name"])
            if secret is None:
                continue
            config = json.loads(base64.b64decode((secret.get("data") or {}).get(".dockerconfigjson", "e30=")))
            entry = (config.get("auths") or {}).get(host)
            if entry:
                user, password = entry.get("username"), entry.get("password")
                if not user and entry.get("auth"):
                    user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                auth = {"username": user, "password": password, "serveraddress": host}
        repository, sep, digest = image.partition("@")
        try:
            if sep:
                self.docker.pull(repository, tag=digest, auth_config=auth)
            else:
                name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "latest")
                self.docker.pull(name, tag=tag, auth_config=auth)
            return dict(self.docker.inspect_image(image))
        except docker.errors.DockerException as exc:
            raise _PullError(f'failed to pull and unpack image "{image}": {exc}') from exc

    def _env(self, pod: dict[str, Any], spec: dict[str, Any]) -> dict[str, str]:
        store = self.kubelet.store
        env: dict[str, str] = {
            "KUBERNETES_SERVICE_HOST": self.kubelet.api_endpoint[0],
            "KUBERNETES_SERVICE_PORT": str(self.kubelet.api_endpoint[1]),
            "HOSTNAME": self.pod_name,
        }
        if pod["spec"].get("enableServiceLinks", True):
            for svc in store.list(SERVICE, self.namespace)[0]:
                prefix = svc["metadata"]["name"].upper().replace("-", "_")
                ports = svc["spec"].get("ports") or []
                if svc["spec"].get("clusterIP") and ports:
                    env[f"{prefix}_SERVICE_HOST"] = svc["spec"]["clusterIP"]
                    env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])

        def secret_data(name: str, optional: bool) -> dict[str, str]:
            secret = store.find(SECRET, self.namespace, name)
            if secret is None:
                if optional:
                    return {}
                raise _ConfigError(f'secret "{name}" not found')
            data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
            data.update(secret.get("stringData") or {})
            return data

        def config_data(name: str, optional: bool) -> dict[str, str]:
            cm = store.find(CONFIGMAP, self.namespace, name)
            if cm is None:
                if optional:
                    return {}
                raise _ConfigError(f'configmap "{name}" not found')
            return dict(cm.get("data") or {})

        for source in spec.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                ref = source["secretRef"]
                data = secret_data(ref["name"], bool(ref.get("optional")))
            else:
                ref = source["configMapRef"]
                data = config_data(ref["name"], bool(ref.get("optional")))
            env.update({prefix + k: v for k, v in data.items()})
        for var in spec.get("env") or []:
            if "value" in var:
                env[var["name"]] = str(var["value"])
                continue
            source = var.get("valueFrom") or {}
            if "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                values = {
                    "metadata.name": self.pod_name,
                    "metadata.namespace": self.namespace,
                    "metadata.uid": self.uid,
                    "status.podIP": self.ip,
                    "spec.nodeName": self.kubelet.node,
                    "status.hostIP": self.kubelet.node_ip,
                    "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
                }
                if path not in values:
                    raise _ConfigError(f"kubefake: unsupported fieldPath {path}")
                env[var["name"]] = values[path]
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                data = secret_data(ref["name"], bool(ref.get("optional")))
                if ref["key"] not in data and not ref.get("optional"):
                    raise _ConfigError(
                        f"couldn't find key {ref['key']} in Secret {self.namespace}/{ref['name']}"
                    )
                if ref["key"] in data:
                    env[var["name"]] = data[ref["key"]]
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                data = config_data(ref["name"], bool(ref.get("optional")))
                if ref["key"] in data:
                    env[var["name"]] = data[ref["key"]]
            elif "resourceFieldRef" in source:
                resource = source["resourceFieldRef"]["resource"]
                section, _, name = resource.partition(".")
                value = ((spec.get("resources") or {}).get(section) or {}).get(name, "0")
                env[var["name"]] = str(int(parse_quantity(value)))
        return env

    def _user(self, pod: dict[str, Any], spec: dict[str, Any], info: dict[str, Any]) -> str | None:
        security = {**(pod["spec"].get("securityContext") or {}), **(spec.get("securityContext") or {})}
        image_user = str((info.get("Config") or {}).get("User") or "")
        uid = security.get("runAsUser")
        gid = security.get("runAsGroup")
        if security.get("runAsNonRoot"):
            effective = uid if uid is not None else (image_user.split(":")[0] or "0")
            if not str(effective).isdigit():
                raise _ConfigError(
                    f"container has runAsNonRoot and image has non-numeric user ({effective}), "
                    "cannot verify user is non-root"
                )
            if int(effective) == 0:
                raise _ConfigError("container has runAsNonRoot and image will run as root")
        if uid is None:
            return None
        return f"{uid}:{gid}" if gid is not None else str(uid)

    # -- probes -------------------------------------------------------------------------------------------

    def _probe(self, pod: dict[str, Any], c: _Container, clock: float) -> None:
        startup, readiness, liveness = (
            c.probes.get(k) for k in ("startupProbe", "readinessProbe", "livenessProbe")
        )
        if not c.started and startup is not None:
            if clock >= startup.next_at:
                if self._run_probe(pod, c, startup, clock):
                    c.started = True
                    if readiness is not None:
                        readiness.next_at = (
                            clock  # kubelet: readiness is probed at once when startup succeeds
                        )
                elif startup.failures >= int(startup.spec.get("failureThreshold", 3)):
                    self._kill(c, f"Startup probe failed after {startup.failures} attempts")
            return
        if readiness is not None and clock >= readiness.next_at:
            ok = self._run_probe(pod, c, readiness, clock)
            if ok and readiness.successes >= int(readiness.spec.get("successThreshold", 1)):
                c.ready = True
            elif not ok and readiness.failures >= int(readiness.spec.get("failureThreshold", 3)):
                c.ready = False
        if liveness is not None and clock >= liveness.next_at:
            if not self._run_probe(pod, c, liveness, clock) and liveness.failures >= int(
                liveness.spec.get("failureThreshold", 3)
            ):
                self._kill(c, "Liveness probe failed")

    def _run_probe(self, pod: dict[str, Any], c: _Container, probe: _Probe, clock: float) -> bool:
        probe.next_at = clock + int(probe.spec.get("periodSeconds", 10))
        ok = self._check(c, probe.spec)
        if ok:
            probe.successes, probe.failures = probe.successes + 1, 0
        else:
            probe.successes, probe.failures = 0, probe.failures + 1
        return ok

    def _check(self, c: _Container, spec: dict[str, Any]) -> bool:
        timeout = float(spec.get("timeoutSeconds", 1))
        if "exec" in spec:
            result: list[int] = []

            def run() -> None:
                try:
                    exec_id = self.docker.exec_create(c.id, spec["exec"]["command"])["Id"]
                    self.docker.exec_start(exec_id)
                    result.append(int(self.docker.exec_inspect(exec_id)["ExitCode"] or 0))
                except Exception:
                    result.append(1)

            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            worker.join(timeout + 1)
            return bool(result) and result[0] == 0
        if "httpGet" in spec:
            get = spec["httpGet"]
            port = self._port(c, get["port"])
            headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
            try:
                conn = http.client.HTTPConnection(self.ip, port, timeout=timeout)
                conn.request("GET", get.get("path", "/"), headers=headers)
                status = conn.getresponse().status
                conn.close()
                return 200 <= status < 400
            except OSError:
                return False
        if "tcpSocket" in spec:
            try:
                with socket.create_connection(
                    (self.ip, self._port(c, spec["tcpSocket"]["port"])), timeout=timeout
                ):
                    return True
            except OSError:
                return False
        return False

    def _port(self, c: _Container, port: Any) -> int:
        if isinstance(port, int):
            return port
        return int(next(p["containerPort"] for p in c.spec.get("ports") or [] if p.get("name") == port))

    def _kill(self, c: _Container, why: str) -> None:
        log.info("pod %s container %s: %s; restarting it", self.pod_name, c.name, why)
        try:
            self.docker.kill(c.id, signal="SIGKILL")
        except Exception:
            pass

    # -- status -------------------------------------------------------------------------------------------

    def _publish(self, pod: dict[str, Any], *, final: bool = False) -> None:
        statuses = []
        for c in self.containers:
            state = c.state
            if c.id is not None and c.exited is not None and c.exited.is_set() and c.exit is not None:
                code, oom, finished = c.exit
                state = {
                    "terminated": {
                        "exitCode": code,
                        "reason": "OOMKilled" if oom else ("Completed" if code == 0 else "Error"),
                        "startedAt": c.started_at,
                        "finishedAt": finished,
                        "containerID": f"docker://{c.id}",
                    }
                }
            entry = {
                "name": c.name,
                "image": c.spec["image"],
                "imageID": c.image_id,
                "ready": c.ready and not final,
                "started": c.started and "running" in state,
                "restartCount": c.restarts,
                "state": state,
                "lastState": c.last_state,
            }
            if c.id or c.previous_id:
                entry["containerID"] = f"docker://{c.id or c.previous_id}"
            statuses.append(entry)
        all_ready = all(s["ready"] for s in statuses)
        running = any("running" in s["state"] for s in statuses) or any(
            c.restarts or c.previous_id for c in self.containers
        )
        if final:
            codes = [s["state"].get("terminated", {}).get("exitCode", 1) for s in statuses]
            phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
        else:
            phase = "Running" if running else "Pending"
        old = pod.get("status") or {}
        previous = {cond["type"]: cond for cond in old.get("conditions") or []}

        def cond(kind: str, ok: bool) -> dict[str, Any]:
            before = previous.get(kind)
            value = "True" if ok else "False"
            stamp = (
                before["lastTransitionTime"]
                if before and before.get("status") == value and before.get("lastTransitionTime")
                else now()
            )
            out = {"type": kind, "status": value, "lastTransitionTime": stamp}
            if not ok and kind in ("Ready", "ContainersReady"):
                out["reason"] = "ContainersNotReady"
                out["message"] = (
                    "containers with unready status: ["
                    + " ".join(s["name"] for s in statuses if not s["ready"])
                    + "]"
                )
            return out

        conditions = [
            cond("PodReadyToStartContainers", self.sandbox is not None and not final),
            cond("Initialized", True),
            cond("Ready", all_ready and not final),
            cond("ContainersReady", all_ready and not final),
            previous.get("PodScheduled")
            or {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()},
        ]
        status = {
            "phase": phase,
            "conditions": conditions,
            "hostIP": self.kubelet.node_ip,
            "hostIPs": [{"ip": self.kubelet.node_ip}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}] if self.ip else [],
            "startTime": self.start_time,
            "containerStatuses": statuses,
            "qosClass": _qos(pod),
        }
        if not self.ip:
            status.pop("podIP")
        if status == self._published:
            return
        try:
            self.kubelet.store.update(
                POD,
                self.namespace,
                self.pod_name,
                {"status": status},
                manager="kubelet",
                subresource="status",
            )
            self._published = status
        except ApiError:
            pass  # gone meanwhile

    # -- termination --------------------------------------------------------------------------------------

    def _terminate(self, pod: dict[str, Any]) -> None:
        for c in self.containers:
            c.ready = False
        self._publish(pod)
        for c in self.containers:
            if c.id is not None and not (c.exited and c.exited.is_set()):
                try:
                    self.docker.kill(c.id, signal="SIGTERM")
                except Exception:
                    pass
        killed = False
        while True:
            current = self.kubelet.store.find(POD, self.namespace, self.pod_name)
            if current is None or current["metadata"]["uid"] != self.uid:
                self._kill_all(force=True)
                return
            grace = int(current["metadata"].get("deletionGracePeriodSeconds") or 0)
            if self.grace_seen is None or grace < self.grace_seen:
                deadline = time.monotonic() + grace
                self.kill_deadline = (
                    deadline if self.kill_deadline is None else min(self.kill_deadline, deadline)
                )
                self.grace_seen = grace
            running = [
                c for c in self.containers if c.id is not None and not (c.exited and c.exited.is_set())
            ]
            if not running:
                break
            if not killed and self.kill_deadline is not None and time.monotonic() >= self.kill_deadline:
                killed = True
                for c in running:
                    try:
                        self.docker.kill(c.id, signal="SIGKILL")
                    except Exception:
                        pass
            time.sleep(TICK)
        for c in self.containers:
            if c.exited is not None:
                c.exited.wait(5)
        self._publish(current, final=True)
        self._cleanup()
        try:
            self.kubelet.store.delete(
                POD, self.namespace, self.pod_name, grace=0, preconditions={"uid": self.uid}
            )
        except ApiError:
            pass

    def _kill_all(self, *, force: bool) -> None:
        for c in self.containers:
            if c.id is not None:
                try:
                    self.docker.kill(c.id, signal="SIGKILL")
                except Exception:
                    pass
        self._cleanup()

    def _cleanup(self) -> None:
        for c in self.containers:
            self._remove(c.id)
            self._remove(c.previous_id)
        self._remove(self.sandbox)
        self.sandbox = None

    def _remove(self, cid: str | None) -> None:
        if cid is None:
            return
        try:
            self.docker.remove_container(cid, force=True)
        except Exception:
            pass


def _close_stream(chunks: Any) -> None:
    """Close a docker-py log stream for good: the socket, and the response's file object that keeps
    the socket's descriptor open after ``socket.close()``."""
    for close in (getattr(chunks, "close", None), getattr(getattr(chunks, "_response", None), "close", None)):
        if close is not None:
            try:
                close()
            except Exception:
                pass


class _PullError(Exception):
    pass


class _ConfigError(Exception):
    pass


def _qos(pod: dict[str, Any]) -> str:
    resources = [c.get("resources") or {} for c in pod["spec"]["containers"]]
    if not any(r.get("limits") or r.get("requests") for r in resources):
        return "BestEffort"
    guaranteed = all(
        (r.get("limits") or {}).get(k)
        and (r.get("requests") or r.get("limits") or {}).get(k) == (r.get("limits") or {}).get(k)
        for r in resources
        for k in ("cpu", "memory")
    )
    return "Guaranteed" if guaranteed else "Burstable"
