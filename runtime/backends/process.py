"""The ``process`` backend, the embedded default: each instance is a uvicorn process on loopback.

Every instance runs the launcher (``runtime/launcher.py``) with the interpreter of the app's built
environment, in its own session and process group (so stopping it stops whatever it spawned), with an
environment built from scratch: the app's variables and a few basics, never the control plane's own
(its database URL or admin token must not leak into user code). stdout and stderr are read line by line,
timestamped and levelled, and handed to the log sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
import uuid
from collections import deque
from datetime import UTC, datetime
from pathlib import Path

from runtime import launcher as _launcher_module
from runtime.backends.base import ExitCallback, Instance, InstanceSpec, InstanceState, LogRecord, LogSink
from runtime.errors import DeployError, VerifyError
from runtime.health import is_healthy, probe
from runtime.logparse import parse_level

log = logging.getLogger("fastapi_deploy.backend.process")

LAUNCHER = Path(_launcher_module.__file__).resolve()
_OUTPUT_TAIL = 200
_RESERVED_ENV = {"PATH", "HOME", "LANG", "PYTHONUNBUFFERED", "VIRTUAL_ENV"}


def _base_env(spec: InstanceSpec, instance_id: str) -> dict[str, str]:
    venv_bin = str(spec.python.parent)
    env = {
        "PATH": f"{venv_bin}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(spec.workdir or spec.app_dir),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PYTHONUNBUFFERED": "1",
        "VIRTUAL_ENV": str(spec.python.parent.parent),
        "FASTAPI_DEPLOY_APP_ID": spec.app_id,
        "FASTAPI_DEPLOY_DEPLOYMENT_ID": spec.deployment_id,
        "FASTAPI_DEPLOY_INSTANCE_ID": instance_id,
    }
    for key, value in spec.env.items():
        if key not in _RESERVED_ENV:
            env[key] = value
    return env


class ProcessBackend:
    """Instances as local processes. One per control plane; not thread-safe (one event loop)."""

    name = "process"

    def __init__(
        self,
        state_dir: Path,
        log_sink: LogSink,
        *,
        on_exit: ExitCallback | None = None,
        probe_interval: float = 0.05,
    ) -> None:
        self.state_dir = state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_sink = log_sink
        self.on_exit = on_exit
        self.probe_interval = probe_interval
        self._instances: dict[str, Instance] = {}
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._tails: dict[str, deque[str]] = {}
        self._stopping: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the protocol ---------------------------------------------------------------------------

    async def start(self, spec: InstanceSpec, *, timeout: float) -> Instance:
        instance = Instance(id=uuid.uuid4().hex[:12], spec=spec)
        deadline = time.monotonic() + timeout
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                str(spec.python),
                str(LAUNCHER),
                "--app",
                spec.entrypoint,
                "--app-dir",
                str(spec.app_dir),
                "--host",
                instance.host,
                "--port",
                "0",
                "--ready-fd",
                str(write_fd),
                "--workdir",
                str(spec.workdir or spec.app_dir),
                "--instance-id",
                instance.id,
                cwd=str(spec.workdir or spec.app_dir),
                env=_base_env(spec, instance.id),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # own session and process group: killpg stops it all
                pass_fds=(write_fd,),
            )
        except OSError as exc:
            os.close(read_fd)
            raise DeployError(
                f"Could not start the app's interpreter {spec.python}: {exc}",
                hint="The app's environment may have been removed; redeploy to rebuild it.",
            ) from exc
        finally:
            os.close(write_fd)
        instance.pid = proc.pid
        self._instances[instance.id] = instance
        self._procs[instance.id] = proc
        self._tails[instance.id] = deque(maxlen=_OUTPUT_TAIL)
        self._write_state(instance)
        assert proc.stdout is not None and proc.stderr is not None
        self._spawn(self._pump(instance, proc.stdout, "stdout"), f"logs-{instance.id}-out")
        self._spawn(self._pump(instance, proc.stderr, "stderr"), f"logs-{instance.id}-err")
        self._spawn(self._watch(instance, proc), f"watch-{instance.id}")
        self._platform_log(instance, f"Starting instance {instance.id} (pid {proc.pid})")

        try:
            ready = await self._wait_ready_fd(read_fd, instance, deadline)
            instance.port = int(ready["port"])
            self._write_state(instance)
            await self._wait_healthy(instance, deadline)
        except VerifyError:
            await self.stop(instance, timeout=5)
            raise
        instance.transition(InstanceState.WARM)
        self._platform_log(instance, f"Instance {instance.id} ready on port {instance.port}")
        return instance

    async def stop(self, instance: Instance, *, timeout: float = 10.0) -> None:
        proc = self._procs.get(instance.id)
        if proc is None or instance.exited.is_set():
            await self._reap(instance)
            return
        self._stopping.add(instance.id)
        if instance.state in (InstanceState.WARM, InstanceState.SERVING):
            instance.transition(InstanceState.DRAINING)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(instance.exited.wait(), timeout)
        except TimeoutError:
            self._platform_log(instance, f"Instance {instance.id} did not stop in {timeout:g}s; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await instance.exited.wait()
        await self._reap(instance)

    def instances(self) -> list[Instance]:
        return [i for i in self._instances.values() if i.alive]

    def output_tail(self, instance_id: str, lines: int = 50) -> list[str]:
        tail = self._tails.get(instance_id)
        return list(tail)[-lines:] if tail else []

    async def recover(self) -> None:
        """Kill instances a previous control plane left running (it crashed, or was killed)."""
        for path in self.state_dir.glob("*.json"):
            try:
                state = json.loads(path.read_text())
                pid, iid = int(state["pid"]), str(state["id"])
            except (OSError, ValueError, KeyError):
                path.unlink(missing_ok=True)
                continue
            if _is_our_instance(pid, iid):
                log.info("stopping instance %s (pid %d) left by a previous run", iid, pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGTERM)
                for _ in range(100):
                    if not _is_our_instance(pid, iid):
                        break
                    await asyncio.sleep(0.05)
                else:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
            path.unlink(missing_ok=True)

    async def close(self, *, timeout: float = 10.0) -> None:
        await asyncio.gather(*(self.stop(i, timeout=timeout) for i in list(self._instances.values())))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- internals ------------------------------------------------------------------------------

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _wait_ready_fd(self, read_fd: int, instance: Instance, deadline: float) -> dict[str, int]:
        # The launcher writes one line once the lifespan startup finished; EOF means it exited first.
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        buf = bytearray()

        def _readable() -> None:
            try:
                chunk = os.read(read_fd, 4096)
            except OSError:
                chunk = b""
            if chunk:
                buf.extend(chunk)
                if b"\n" not in buf:
                    return
            if not fut.done():
                fut.set_result(bytes(buf))

        loop.add_reader(read_fd, _readable)
        try:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                data = await asyncio.wait_for(asyncio.shield(fut), remaining)
            except TimeoutError:
                raise self._not_ready(instance, "did not finish its startup") from None
        finally:
            loop.remove_reader(read_fd)
            os.close(read_fd)
        if not data.strip():
            # Give the pipes a moment to deliver the traceback before we quote it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(instance.exited.wait(), 5)
            raise self._not_ready(instance, "exited during startup")
        parsed = json.loads(data.decode().strip().splitlines()[0])
        return {"port": int(parsed["port"]), "pid": int(parsed["pid"])}

    async def _wait_healthy(self, instance: Instance, deadline: float) -> None:
        spec = instance.spec
        last: int | None = None
        while True:
            if instance.exited.is_set():
                raise self._not_ready(instance, "exited during startup")
            last = await probe(instance.host, instance.port, spec.hostname, spec.health_path, timeout=2.0)
            if is_healthy(last):
                return
            if time.monotonic() >= deadline:
                what = "did not answer" if last is None else f"answered {last}"
                raise self._not_ready(instance, f"{what} on its health path {spec.health_path}")
            await asyncio.sleep(self.probe_interval)

    def _not_ready(self, instance: Instance, what: str) -> VerifyError:
        tail = self.output_tail(instance.id, 30)
        code = instance.exit_code
        message = f"The app {what}" + (f" (exit code {code})" if code is not None else "") + "."
        if tail:
            message += " Its last output:\n" + "\n".join(tail)
        return VerifyError(
            message,
            hint="Run it locally with `fastapi run` to reproduce; the full output is in the app's logs.",
        )

    async def _pump(self, instance: Instance, stream: asyncio.StreamReader, name: str) -> None:
        previous: str | None = None
        tail = self._tails[instance.id]
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line over the stream limit: take what is there
                raw = await stream.read(64 * 1024)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            level = parse_level(line, name, previous)
            previous = level
            tail.append(line)
            self._emit(instance, name, line, level)

    async def _watch(self, instance: Instance, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        instance.exit_code = code
        expected = instance.id in self._stopping
        if expected:
            instance.transition(InstanceState.STOPPED)
            self._platform_log(instance, f"Instance {instance.id} stopped (exit code {code})")
        else:
            instance.transition(InstanceState.CRASHED)
            self._platform_log(
                instance, f"Instance {instance.id} exited unexpectedly (exit code {code})", "error"
            )
        instance.exited.set()
        (self.state_dir / f"{instance.id}.json").unlink(missing_ok=True)
        if self.on_exit is not None and not expected:
            try:
                self.on_exit(instance)
            except Exception:  # the callback's bug must not kill the watcher
                log.exception("on_exit callback failed")

    async def _reap(self, instance: Instance) -> None:
        self._stopping.discard(instance.id)
        self._procs.pop(instance.id, None)
        self._instances.pop(instance.id, None)
        # Keep output tails of recent instances for error messages; bound their number.
        if len(self._tails) > 256:
            for key in list(self._tails)[: len(self._tails) - 256]:
                if key not in self._instances:
                    self._tails.pop(key, None)

    def _write_state(self, instance: Instance) -> None:
        path = self.state_dir / f"{instance.id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(instance.as_dict()))
        tmp.replace(path)

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


def _is_our_instance(pid: int, instance_id: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(LAUNCHER).encode() in cmdline and instance_id.encode() in cmdline
