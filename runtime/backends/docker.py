"""The ``docker`` backend: each instance is a container of the revision's OCI image (``runtime/images.py``).

    start(spec) ──> create + start container ──> ready line in its log ──> health ──> warm
                    (CPU and memory limits, the app's    (the launcher writes it after the
                     env vars, labels, 127.0.0.1::8000)    lifespan startup: entry.py hands it stdout)

An instance is a container named ``fdp-{instance id}`` on the ``fastapi-deploy`` bridge network (no
traffic between containers), its port 8000 published on ``127.0.0.1:{random}``, which the router uses.
It runs as the image's non-root user with no capabilities and ``no-new-privileges``, with a cgroup
memory limit (no swap) and a CPU quota from the spec. The app's env vars are passed at create time and
are never part of an image.

One thread per container follows its log stream (the Engine API's multiplexed stdout/stderr frames),
turns it into levelled :class:`LogRecord` s on the event loop, waits for the ready line, and at the end of
the stream reads the exit: status, and ``OOMKilled`` — an instance killed at its memory limit is
reported with ``Instance.oom``, an error log line saying so, and a ``verification_failed_oom`` failure when
it happens during startup. Exited containers are removed once their exit is recorded.

Containers carry labels (platform id, app, deployment, instance, what the spec said), so :meth:`recover`
after a control-plane crash *adopts* the healthy ones: they keep serving, their logs are followed again
from now on, their exit is watched. The platform id is derived from the data directory, so two
platforms on one engine never touch each other's containers.

The ``docker`` package is imported here only, lazily (optional extra ``docker``). This backend is also
the :class:`runtime.images.ImageEngine` the deploy pipeline builds images with (:attr:`DockerBackend.images`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runtime.backends.base import (
    PLATFORM_ENV,
    ExitCallback,
    Instance,
    InstanceSpec,
    InstanceState,
    LogRecord,
    LogSink,
)
from runtime.errors import BuildError, BuildTimeout, DeployError, VerifyError, not_ready
from runtime.health import Unhealthy, is_healthy, probe, wait_healthy
from runtime.images import CONTAINER_PORT, LABEL, BuildLimits, Log
from runtime.logparse import parse_level
from runtime.registry import Registry

log = logging.getLogger("fastapi_deploy.backend.docker")

NETWORK = "fastapi-deploy"
_OUTPUT_TAIL = 200
_RESERVED_ENV = {"PATH", "HOME", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONPATH", "PYTHONHOME"}
_PORT = f"{CONTAINER_PORT}/tcp"
_HINT = "Is the Docker engine running and reachable (DOCKER_HOST)? Ask the platform operator."


class DockerBackend:
    """Instances as containers. One per control plane; not thread-safe (one event loop; its own
    threads only hand results to the loop).

    ``platform_id``: the label value that marks this platform's containers (default: derived from
    ``state_dir``). ``registry``: credentials for pulling images that are not on the engine (after an
    engine prune, or on another host). ``network``: the bridge network instances join (created with
    inter-container traffic disabled); ``None`` for the engine's default bridge.
    """

    name = "docker"

    def __init__(
        self,
        state_dir: Path,
        log_sink: LogSink,
        *,
        on_exit: ExitCallback | None = None,
        probe_interval: float = 0.05,
        platform_id: str | None = None,
        registry: Registry | None = None,
        network: str | None = NETWORK,
        docker_host: str | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_sink = log_sink
        self.on_exit = on_exit
        self.probe_interval = probe_interval
        self.platform_id = platform_id or hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]
        self.registry = registry
        self.network = network
        self.docker_host = docker_host
        self.images = DockerImages(self)
        self._api: Any = None
        self._api_lock = threading.Lock()
        self._network_ready = False
        self._gateway: str | None = None
        self._instances: dict[str, Instance] = {}
        self._containers: dict[str, str] = {}  # instance id -> container id
        self._tails: dict[str, deque[str]] = {}
        self._ready: dict[str, asyncio.Future[None]] = {}
        self._stopping: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._threads: dict[str, threading.Thread] = {}
        self._levels: dict[str, dict[str, str | None]] = {}  # instance id -> stream -> last line's level

    # -- the protocol ---------------------------------------------------------------------------

    async def start(self, spec: InstanceSpec, *, timeout: float) -> Instance:
        if not spec.image:
            raise DeployError(
                "This deployment has no image; the docker backend runs images.",
                hint="Push the code again: the platform builds an image for it.",
            )
        instance = Instance(id=uuid.uuid4().hex[:12], spec=spec)
        deadline = time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        await self.prepare(spec)
        try:
            container_id = await asyncio.to_thread(self._create, instance)
        except Exception as exc:
            raise self._engine_error(f"Could not start a container of {spec.image}", exc) from exc
        self._register(instance, container_id)
        ready: asyncio.Future[None] = loop.create_future()
        self._ready[instance.id] = ready
        self._follow(instance, container_id, since=0)
        self._platform_log(instance, f"Starting instance {instance.id} (container {container_id[:12]})")
        try:
            await asyncio.to_thread(self._inspect_running, instance, container_id)
            await self._wait_ready(instance, ready, deadline)
            await self._wait_healthy(instance, deadline)
        except BaseException as exc:  # never leave a container behind that nobody watches
            await asyncio.shield(self.stop(instance, timeout=5))
            if isinstance(exc, VerifyError) or not isinstance(exc, Exception):
                raise
            raise self._engine_error(f"Could not start a container of {spec.image}", exc) from exc
        finally:
            self._ready.pop(instance.id, None)
        instance.transition(InstanceState.WARM)
        self._platform_log(instance, f"Instance {instance.id} ready on port {instance.port}")
        return instance

    async def stop(self, instance: Instance, *, timeout: float = 10.0) -> None:
        container_id = self._containers.get(instance.id)
        if container_id is None or instance.exited.is_set():
            self._forget(instance)
            return
        self._stopping.add(instance.id)
        if instance.state in (InstanceState.WARM, InstanceState.SERVING):
            instance.transition(InstanceState.DRAINING)
        await asyncio.to_thread(self._kill, container_id, "SIGTERM")
        try:
            await asyncio.wait_for(instance.exited.wait(), timeout)
        except TimeoutError:
            self._platform_log(instance, f"Instance {instance.id} did not stop in {timeout:g}s; killing it")
            await asyncio.to_thread(self._kill, container_id, "SIGKILL")
            try:
                await asyncio.wait_for(instance.exited.wait(), 30)
            except TimeoutError:  # the engine lost it: say so, and let it go
                self._exited(instance, None, False)
        self._forget(instance)

    def instances(self) -> list[Instance]:
        return [i for i in self._instances.values() if i.alive]

    def output_tail(self, instance_id: str, lines: int = 50) -> list[str]:
        tail = self._tails.get(instance_id)
        return list(tail)[-lines:] if tail else []

    async def recover(self) -> list[Instance]:
        """Adopt this platform's running, healthy containers; remove the rest (exited, unhealthy)."""
        try:
            found = await asyncio.to_thread(
                self._call, "containers", all=True, filters={"label": f"{LABEL}.platform={self.platform_id}"}
            )
        except Exception as exc:
            raise self._engine_error("Could not list the platform's containers", exc) from exc
        adopted = []
        for summary in found:
            try:
                instance = await self._adopt(summary)
            except Exception:  # one odd container must not keep the platform from starting
                log.exception("could not adopt or remove container %s", str(summary.get("Id"))[:12])
                continue
            if instance is not None:
                adopted.append(instance)
        return adopted

    async def prepare(self, spec: InstanceSpec) -> None:
        """Make sure the engine has the revision's image (pulled by digest when it has not). Raises
        DeployError when it cannot."""
        if not spec.image:
            return
        try:
            await asyncio.to_thread(self.images.ensure_image, spec.image, log.info)
        except BuildError as exc:
            raise DeployError(exc.message, hint=exc.hint) from exc

    async def release(self, deployment_id: str) -> None:
        """Nothing is kept per revision: its instances are its containers."""

    async def close(self, *, timeout: float = 10.0) -> None:
        await asyncio.gather(*(self.stop(i, timeout=timeout) for i in list(self._instances.values())))
        if self._tasks:  # removals of exited containers: let them finish
            await asyncio.wait(list(self._tasks), timeout=timeout)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        threads = list(self._threads.values())
        if threads:
            await asyncio.to_thread(_join, threads, 5.0)
        if self._api is not None:
            with contextlib.suppress(Exception):
                self._api.close()

    # -- containers (these run in worker threads) -------------------------------------------------

    def api(self) -> Any:
        """The Engine API client (``docker.APIClient``), created on first use. No read timeout: log
        streams are long-lived."""
        with self._api_lock:
            if self._api is None:
                import docker

                kwargs: dict[str, Any] = {"timeout": None, "max_pool_size": 64}
                if self.docker_host:
                    self._api = docker.APIClient(base_url=self.docker_host, version="auto", **kwargs)
                else:
                    self._api = docker.from_env(**kwargs).api
            return self._api

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.api(), method)(*args, **kwargs)

    def _create(self, instance: Instance) -> str:
        spec = instance.spec
        api = self.api()
        self._ensure_network()
        env = {
            k: v
            for k, v in spec.env.items()
            if k not in _RESERVED_ENV and (not k.startswith("FASTAPI_DEPLOY_") or k in PLATFORM_ENV)
        }
        env.update(
            FASTAPI_DEPLOY_APP_ID=spec.app_id,
            FASTAPI_DEPLOY_DEPLOYMENT_ID=spec.deployment_id,
            FASTAPI_DEPLOY_INSTANCE_ID=instance.id,
            FASTAPI_DEPLOY_HOSTNAME=spec.hostname,
            FASTAPI_DEPLOY_HEALTH_PATH=spec.health_path,
        )
        if self._gateway:
            env["FASTAPI_DEPLOY_FORWARDED_ALLOW_IPS"] = self._gateway
        labels = {
            f"{LABEL}.platform": self.platform_id,
            f"{LABEL}.app": spec.app_id,
            f"{LABEL}.deployment": spec.deployment_id,
            f"{LABEL}.instance": instance.id,
            f"{LABEL}.spec": json.dumps(_spec_record(spec), sort_keys=True),
        }
        memory = spec.memory_mb * 2**20 if spec.memory_mb else None
        from docker.types import LogConfig

        host_config = api.create_host_config(
            port_bindings={CONTAINER_PORT: ("127.0.0.1",)},
            mem_limit=memory,
            memswap_limit=memory,  # no swap: over the limit means the OOM killer, visibly
            nano_cpus=int(spec.cpus * 1e9) if spec.cpus else None,
            pids_limit=1024,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            network_mode=self.network or "bridge",
            log_config=LogConfig(type="json-file", config={"max-size": "10m", "max-file": "3"}),
        )
        container = api.create_container(
            spec.image,
            name=f"fdp-{instance.id}",
            environment=env,
            labels=labels,
            ports=[CONTAINER_PORT],
            host_config=host_config,
            detach=True,
        )
        container_id = str(container["Id"])
        try:
            api.start(container_id)
        except Exception:
            with contextlib.suppress(Exception):
                api.remove_container(container_id, force=True)
            raise
        return container_id

    def _inspect_running(self, instance: Instance, container_id: str) -> None:
        attrs = self._call("inspect_container", container_id)
        instance.pid = int(attrs["State"].get("Pid") or 0)
        bindings = (attrs["NetworkSettings"].get("Ports") or {}).get(_PORT) or []
        if bindings:
            instance.port = int(bindings[0]["HostPort"])

    def gateway(self) -> str | None:
        """The instances' network's gateway: the host's address as the containers see it (blocking;
        creates the network on first use). None on the engine's default bridge."""
        self._ensure_network()
        return self._gateway

    def _ensure_network(self) -> None:
        if self._network_ready or not self.network:
            return
        api = self.api()
        if not api.networks(names=[self.network]):
            import docker.errors

            try:
                api.create_network(
                    self.network,
                    driver="bridge",
                    options={"com.docker.network.bridge.enable_icc": "false"},
                    labels={f"{LABEL}.network": "instances"},
                )
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # created meanwhile by another start
                    raise
        config = (api.inspect_network(self.network).get("IPAM") or {}).get("Config") or [{}]
        # The router reaches a container through the network's gateway: its forwarded headers count.
        self._gateway = str(config[0].get("Gateway") or "") or None
        self._network_ready = True

    def _kill(self, container_id: str, sig: str) -> None:
        import docker.errors

        try:
            self.api().kill(container_id, signal=sig)
        except docker.errors.APIError:
            pass  # not running any more (or gone): its stream ends and reports the exit

    def _remove(self, container_id: str) -> None:
        import docker.errors

        try:
            self.api().remove_container(container_id, force=True)
        except docker.errors.APIError:
            pass

    # -- adoption -------------------------------------------------------------------------------

    async def _adopt(self, summary: dict[str, Any]) -> Instance | None:
        container_id = str(summary["Id"])
        labels = summary.get("Labels") or {}
        name = labels.get(f"{LABEL}.instance", container_id[:12])
        try:
            spec = _spec_from_record(json.loads(labels[f"{LABEL}.spec"]))
        except (KeyError, ValueError, TypeError):
            spec = None
        if summary.get("State") != "running" or spec is None:
            log.info(
                "removing container %s (%s) left by a previous run", container_id[:12], summary.get("Status")
            )
            await asyncio.to_thread(self._remove, container_id)
            return None
        instance = Instance(id=name, spec=spec)
        await asyncio.to_thread(self._inspect_running, instance, container_id)
        status = await probe(instance.host, instance.port, spec.hostname, spec.health_path, timeout=5.0)
        if not is_healthy(status):
            log.info("removing unhealthy container %s left by a previous run", container_id[:12])
            await asyncio.to_thread(self._kill, container_id, "SIGKILL")
            await asyncio.to_thread(self._remove, container_id)
            return None
        self._register(instance, container_id)
        self._follow(instance, container_id, since=int(time.time()))
        instance.transition(InstanceState.WARM)
        self._platform_log(
            instance,
            f"Adopted instance {instance.id} (container {container_id[:12]}) on port {instance.port}",
        )
        return instance

    # -- log streams ----------------------------------------------------------------------------

    def _follow(self, instance: Instance, container_id: str, *, since: int) -> None:
        loop = asyncio.get_running_loop()
        thread = threading.Thread(
            target=self._stream,
            args=(instance, container_id, since, loop),
            name=f"docker-logs-{instance.id}",
            daemon=True,
        )
        self._threads[instance.id] = thread
        thread.start()

    def _stream(
        self, instance: Instance, container_id: str, since: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        """In a thread: the container's output until it stops, then its exit."""
        ready_seen = since > 0  # an adopted instance is past its ready line
        pending = {1: b"", 2: b""}

        def post(callback: Any, *args: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
                loop.call_soon_threadsafe(callback, *args)

        try:
            api = self.api()
            url = f"{api.base_url}/v{api.api_version}/containers/{container_id}/logs"
            params = {"follow": 1, "stdout": 1, "stderr": 1, "since": since}
            with api.get(url, params=params, stream=True) as response:
                response.raise_for_status()
                raw = response.raw
                while True:
                    header = _read_exact(raw, 8)
                    if len(header) < 8:
                        break
                    stream_id, length = struct.unpack(">BxxxL", header)
                    data = _read_exact(raw, length)
                    if stream_id not in pending:
                        continue
                    *lines, pending[stream_id] = (pending[stream_id] + data).split(b"\n")
                    batch = []
                    for raw_line in lines:
                        line = raw_line.decode("utf-8", "replace").rstrip("\r")
                        if not ready_seen and stream_id == 1 and _is_ready_line(line):
                            ready_seen = True
                            post(self._on_ready, instance)
                            continue
                        batch.append(("stdout" if stream_id == 1 else "stderr", line))
                    if batch:
                        post(self._on_lines, instance, batch)
        except Exception as exc:
            log.debug("log stream of %s ended: %r", instance.id, exc)
        rest = [
            ("stdout" if k == 1 else "stderr", v.decode("utf-8", "replace")) for k, v in pending.items() if v
        ]
        if rest:
            post(self._on_lines, instance, rest)
        code, oom = self._exit_status(container_id)
        post(self._exited, instance, code, oom)

    def _exit_status(self, container_id: str) -> tuple[int | None, bool]:
        try:
            code = int(self._call("wait", container_id)["StatusCode"])
            state = self._call("inspect_container", container_id)["State"]
            return code, bool(state.get("OOMKilled"))
        except Exception:
            return None, False  # removed under us (``docker rm -f``): killed

    def _on_ready(self, instance: Instance) -> None:
        ready = self._ready.get(instance.id)
        if ready is not None and not ready.done():
            ready.set_result(None)

    def _on_lines(self, instance: Instance, lines: list[tuple[str, str]]) -> None:
        tail = self._tails.setdefault(instance.id, deque(maxlen=_OUTPUT_TAIL))
        previous = self._levels.setdefault(instance.id, {})
        for stream, line in lines:
            level = parse_level(line, stream, previous.get(stream))
            previous[stream] = level
            tail.append(line)
            self._emit(instance, stream, line, level)

    def _exited(self, instance: Instance, code: int | None, oom: bool) -> None:
        if instance.exited.is_set():
            return
        instance.exit_code = code = _exit_code(code)
        instance.oom = oom
        expected = instance.id in self._stopping
        self._platform_log(instance, *instance.exit_line(expected=expected))
        instance.transition(InstanceState.STOPPED if expected else InstanceState.CRASHED)
        instance.exited.set()
        self._levels.pop(instance.id, None)
        self._threads.pop(instance.id, None)
        ready = self._ready.get(instance.id)
        if ready is not None and not ready.done():
            ready.set_exception(_Exited())
            ready.exception()  # retrieved here: start() may have stopped waiting for it
        container_id = self._containers.get(instance.id)
        if container_id is not None:
            self._spawn(asyncio.to_thread(self._remove, container_id), f"remove-{instance.id}")
        if self.on_exit is not None and not expected:
            try:
                self.on_exit(instance)
            except Exception:  # the callback's bug must not break the backend
                log.exception("on_exit callback failed")

    # -- readiness --------------------------------------------------------------------------------

    async def _wait_ready(self, instance: Instance, ready: asyncio.Future[None], deadline: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(ready), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise self._not_ready(instance, "did not finish its startup") from None
        except _Exited:
            raise self._not_ready(instance, "exited during startup") from None

    async def _wait_healthy(self, instance: Instance, deadline: float) -> None:
        spec = instance.spec
        try:
            await wait_healthy(
                instance.host,
                instance.port,
                spec.hostname,
                spec.health_path,
                deadline=deadline,
                exited=instance.exited,
                interval=self.probe_interval,
            )
        except Unhealthy as exc:
            raise self._not_ready(instance, str(exc)) from None

    def _not_ready(self, instance: Instance, what: str) -> VerifyError:
        return not_ready(
            what,
            exit_code=instance.exit_code,
            tail=self.output_tail(instance.id, 30),
            oom=instance.oom,
            memory_mb=instance.spec.memory_mb,
        )

    # -- internals ------------------------------------------------------------------------------

    def _register(self, instance: Instance, container_id: str) -> None:
        self._instances[instance.id] = instance
        self._containers[instance.id] = container_id
        self._tails.setdefault(instance.id, deque(maxlen=_OUTPUT_TAIL))

    def _forget(self, instance: Instance) -> None:
        self._stopping.discard(instance.id)
        self._instances.pop(instance.id, None)
        self._containers.pop(instance.id, None)
        if len(self._tails) > 256:
            for key in list(self._tails)[: len(self._tails) - 256]:
                if key not in self._instances:
                    self._tails.pop(key, None)

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _engine_error(self, what: str, exc: Exception) -> DeployError:
        return DeployError(f"{what}: {exc}", hint=_HINT)

    def _emit(self, instance: Instance, stream: str, message: str, level: str) -> None:
        spec = instance.spec
        try:
            self.log_sink(
                LogRecord(
                    app_id=spec.app_id,
                    deployment_id=spec.deployment_id,
                    instance_id=instance.id,
                    stream=stream,
                    timestamp=datetime.now(UTC),
                    message=message,
                    level=level,
                )
            )
        except Exception:
            log.exception("log sink failed")

    def _platform_log(self, instance: Instance, message: str, level: str = "info") -> None:
        log.info("%s", message)
        self._emit(instance, "platform", message, level)


class DockerImages:
    """The :class:`runtime.images.ImageEngine` on the same Docker engine as the instances."""

    def __init__(self, backend: DockerBackend) -> None:
        self._backend = backend

    def image_info(self, ref: str) -> dict[str, Any] | None:
        import docker.errors

        try:
            return dict(self._backend.api().inspect_image(ref))
        except docker.errors.ImageNotFound:
            return None
        except docker.errors.DockerException as exc:
            raise BuildError(f"The Docker engine failed: {exc}", hint=_HINT) from exc

    def ensure_image(self, ref: str, log: Log) -> None:
        if self.image_info(ref) is not None:
            return
        import docker.errors

        registry = self._backend.registry
        auth = registry.auth_config() if registry and ref.startswith(registry.host + "/") else None
        log(f"Pulling {ref}")
        try:
            for event in self._backend.api().pull(ref, stream=True, decode=True, auth_config=auth):
                if "error" in event:
                    raise BuildError(
                        f"Pulling {ref} failed: {event['error']}",
                        hint="Check the image name and the registry settings; ask the platform operator.",
                    )
        except docker.errors.DockerException as exc:
            raise BuildError(
                f"{ref} is not on the Docker engine and could not be pulled: {exc}",
                hint="Pull or build it on the engine (docker pull / docker import), or configure another "
                "image; ask the platform operator.",
            ) from exc

    def run_once(
        self,
        image: str,
        argv: list[str],
        *,
        mounts: dict[str, str] | None = None,
        limits: BuildLimits | None = None,
        timeout: float = 120.0,
    ) -> tuple[int, str]:
        import docker.errors

        api = self._backend.api()
        memory = limits.memory_mb * 2**20 if limits and limits.memory_mb else None
        host_config = api.create_host_config(
            binds={src: {"bind": dst, "mode": "rw"} for src, dst in (mounts or {}).items()},
            mem_limit=memory,
            memswap_limit=memory,
            nano_cpus=int(limits.cpus * 1e9) if limits and limits.cpus else None,
            network_mode="none",
        )
        container = api.create_container(
            image,
            entrypoint=argv[:1],
            command=argv[1:],
            user="0:0",
            labels={f"{LABEL}.role": "build"},
            host_config=host_config,
        )
        container_id = container["Id"]
        try:
            api.start(container_id)
            try:
                code = int(api.wait(container_id, timeout=max(1, math.ceil(timeout)))["StatusCode"])
            except Exception as exc:  # requests' ReadTimeout: the step ran past the build's time
                with contextlib.suppress(docker.errors.APIError):
                    api.kill(container_id)
                raise BuildTimeout(
                    f"A build step in {image} did not finish in {timeout:.0f} s.",
                    hint="Ask the platform operator for a longer build timeout.",
                ) from exc
            output = api.logs(container_id, stdout=True, stderr=True).decode("utf-8", "replace")
            return code, output
        finally:
            with contextlib.suppress(docker.errors.APIError):
                api.remove_container(container_id, force=True)

    def load_archive(self, archive: Path) -> None:
        import docker.errors

        try:
            with archive.open("rb") as f:
                result = self._backend.api().load_image(f)
                events = [result] if isinstance(result, dict) else list(result or [])
        except docker.errors.DockerException as exc:
            raise BuildError(f"Loading the image into the Docker engine failed: {exc}", hint=_HINT) from exc
        for event in events:
            if isinstance(event, dict) and event.get("error"):
                raise BuildError(f"Loading the image failed: {event['error']}", hint=_HINT)

    def tag(self, image: str, ref: str) -> None:
        repository, _, tag = ref.rpartition(":")
        self._backend.api().tag(image, repository, tag, force=True)

    def remove(self, ref: str) -> None:
        import docker.errors

        try:
            self._backend.api().remove_image(ref)
        except docker.errors.ImageNotFound:
            pass

    def push(self, ref: str, registry: Registry, log: Log) -> str:
        import docker.errors

        repository, _, tag = ref.rpartition(":")
        digest = ""
        try:
            for event in self._backend.api().push(
                repository, tag, stream=True, decode=True, auth_config=registry.auth_config()
            ):
                if event.get("error"):
                    raise BuildError(
                        f"Pushing to {registry.host} failed: {event['error']}",
                        hint="Check the registry URL and credentials (FASTAPI_DEPLOY_REGISTRY_*); ask the "
                        "platform operator.",
                    )
                status = str(event.get("status") or "")
                if status in ("Pushed", "Layer already exists", "Mounted from"):
                    log(f"  {event.get('id', '')}: {status}")
                aux = event.get("aux") or {}
                if aux.get("Digest"):
                    digest = str(aux["Digest"])
        except docker.errors.DockerException as exc:
            raise BuildError(f"Pushing to {registry.host} failed: {exc}", hint=_HINT) from exc
        if not digest:
            raise BuildError(f"Pushing to {registry.host} reported no digest.", hint=_HINT)
        return digest


class _Exited(Exception):
    """The container exited before its ready line."""


def _is_ready_line(line: str) -> bool:
    if not line.startswith('{"port"'):
        return False
    try:
        parsed = json.loads(line)
    except ValueError:
        return False
    return isinstance(parsed, dict) and set(parsed) == {"port", "pid"} and parsed["port"] == CONTAINER_PORT


def _read_exact(raw: Any, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = raw.read(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _exit_code(code: int | None) -> int:
    """The container's status, with "killed by signal N" (``128 + N``) as ``-N``, as ``process`` says it;
    ``None`` (the container vanished) as ``-9``."""
    if code is None:
        return -9
    if 128 < code < 128 + 65:
        return -(code - 128)
    return code


def _spec_record(spec: InstanceSpec) -> dict[str, Any]:
    """What a restarted control plane needs to adopt the container (no env: it may hold secrets)."""
    return {
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


def _spec_from_record(record: dict[str, Any]) -> InstanceSpec:
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


def _join(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
