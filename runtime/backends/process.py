"""The ``process`` backend, the embedded default: each instance is a uvicorn process on loopback.

Every instance runs the launcher (``runtime/launcher.py``) with the interpreter of the app's built
environment, in its own session and process group (so stopping it stops whatever it spawned), with an
environment built from scratch: the app's variables and a few basics, never the control plane's own
(its database URL or admin token must not leak into user code). stdout and stderr are read line by line,
timestamped and levelled, and handed to the log sink.

On Linux an instance is started by *forking* a per-revision template (``launcher.py --template``) that has
imported the app once; that takes tens of milliseconds instead of a fresh interpreter's hundreds::

    start(spec) ──> template of spec.deployment_id ──ready?──> fork ──> ready fd ──> health ──> warm
                      (created lazily, or by prepare())  │ no (import error, unfit app,
                                                          │     FASTAPI_DEPLOY_FORK=0, not Linux)
                                                          └──> spawn a new launcher process ──> ...

A forked instance is an instance like any other: own process group (``stop`` is the same killpg), fresh
pipes for its output, its own ``FASTAPI_DEPLOY_INSTANCE_ID``, its own socket, event loop and random
state. The template is its parent: it reaps it and reports the exit code on the control channel. If
the template dies, its instances die with it (``PR_SET_PDEATHSIG``); the backend kills their process
groups and reports each of them as crashed with exit code -9. Module-level code of the app runs once per
revision, in the template (like ``gunicorn --preload``); an app whose import starts threads or opens
sockets is not forked. A template that failed before it was ready is not retried for that revision
(its instances are spawned) until :meth:`ProcessBackend.release`.

Instances are confined (``_confine.py``, docs/ISOLATION.md): a revision's processes run as its app's own
system user when the server is root and the user can reach the app's interpreter and the launcher
(else as the server's user, said once in the log), with the deployment's files given to that user's
group. Each instance and each template has a cgroup of its own with the spec's memory (no swap), CPU
and pids limits (rlimits where there are no cgroups); an instance killed at its memory limit is
reported with ``Instance.oom``. A template runs as the app's user in a cgroup with one instance's limits,
so a fork is bounded from its first instruction; the backend moves it into its own cgroup as soon as
the template reports its pid, and the template's limits cap the moment in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runtime import launcher as _launcher_module
from runtime.backends._confine import AppUser, Cgroup, Confinement, Limits
from runtime.backends.base import ExitCallback, Instance, InstanceSpec, InstanceState, LogRecord, LogSink
from runtime.errors import DeployError, VerifyError, not_ready
from runtime.health import Unhealthy, wait_healthy
from runtime.logparse import parse_level

log = logging.getLogger("fastapi_deploy.backend.process")

LAUNCHER = Path(_launcher_module.__file__).resolve()
_OUTPUT_TAIL = 200
_STREAM_LIMIT = 2**16  # what asyncio's subprocess pipes use
_PUMP_DRAIN = 2.0  # seconds to wait for the last output of an instance after its exit
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


def fork_supported() -> bool:
    """Whether this platform can start instances from templates (Linux: fork, SCM_RIGHTS, pidfds)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork") and hasattr(socket, "send_fds")


class _TemplateError(Exception):
    """A template cannot serve (this) fork: it failed, exited, or refused."""


@dataclass(eq=False)
class _Template:
    """A launcher in template mode for one revision, and the control channel to it."""

    id: str
    spec: InstanceSpec
    proc: asyncio.subprocess.Process
    control: socket.socket
    ready: asyncio.Future[None]
    user: AppUser | None = None
    """Who it (and so every fork of it) runs as; None: the server's user."""
    cgroup: Cgroup | None = None
    """Its own cgroup, with one instance's limits: a fork is in it until moved into its own."""
    started: bool = False
    """``ready`` arrived: its output goes to the log sink from then on (before, it is held back)."""
    closing: bool = False
    """We are stopping it: its exit is no crash."""
    gone: bool = False
    """The control channel is closed: no fork, no exit report any more."""
    pending: dict[str, asyncio.Future[tuple[int, asyncio.Future[int]]]] = field(default_factory=dict)
    """Fork requests waiting for their pid (and the future of its exit code), by instance id."""
    children: dict[int, asyncio.Future[int]] = field(default_factory=dict)
    """Exit codes of the forked instances still running, by pid."""
    early_output: deque[tuple[str, str]] = field(default_factory=lambda: deque(maxlen=_OUTPUT_TAIL))
    exited: asyncio.Event = field(default_factory=asyncio.Event)


class ProcessBackend:
    """Instances as local processes. One per control plane; not thread-safe (one event loop).

    ``fork``: start instances from per-revision templates (default: on unless ``FASTAPI_DEPLOY_FORK=0``;
    always off where :func:`fork_supported` is false). ``confinement``: users, cgroups and rlimits of the
    instances (default: what this host allows, ``Confinement()``); ``Confinement(IsolationSettings(
    mode="off"))`` runs them as the server's user without limits.
    """

    name = "process"

    def __init__(
        self,
        state_dir: Path,
        log_sink: LogSink,
        *,
        on_exit: ExitCallback | None = None,
        probe_interval: float = 0.05,
        fork: bool | None = None,
        confinement: Confinement | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_sink = log_sink
        self.on_exit = on_exit
        self.probe_interval = probe_interval
        if fork is None:
            fork = os.environ.get("FASTAPI_DEPLOY_FORK", "1").strip().lower() not in ("0", "false", "no")
        self.fork = fork and fork_supported()
        self._instances: dict[str, Instance] = {}
        self._pids: dict[str, int] = {}  # instance id -> pid, which is also its process group id
        self._tails: dict[str, deque[str]] = {}
        self._stopping: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._templates: dict[str, _Template] = {}  # by deployment id: the one forks go to
        self._live_templates: set[_Template] = set()  # every template process not yet reaped
        self._template_locks: dict[str, asyncio.Lock] = {}
        self._no_template: dict[str, str] = {}  # deployment id -> why its instances are spawned
        self._forked_from: dict[str, _Template] = {}  # instance id -> its template
        self._pipes: dict[str, list[asyncio.BaseTransport]] = {}  # output pipes of forked instances
        self.confinement = confinement if confinement is not None else Confinement()
        self._users: dict[str, asyncio.Future[AppUser | None]] = {}  # deployment id -> its processes' user
        self._cgroups: dict[str, Cgroup] = {}  # instance id -> its cgroup
        self._disposals: set[asyncio.Task[None]] = set()  # cgroups being emptied and removed

    # -- the protocol ---------------------------------------------------------------------------

    async def start(self, spec: InstanceSpec, *, timeout: float) -> Instance:
        instance = Instance(id=uuid.uuid4().hex[:12], spec=spec)
        deadline = time.monotonic() + timeout
        user = await self._user_for(spec)
        self._new_cgroup(spec, instance.id)
        try:
            read_fd: int | None = None
            template = await self._template_for(spec, deadline)
            if template is not None:
                read_fd = await self._fork(instance, template, deadline)
            if read_fd is None:
                read_fd = await self._spawn_process(instance, user)
        except BaseException:
            if instance.id not in self._instances:  # never ran: nothing will report its exit
                self._dispose(self._cgroups.pop(instance.id, None), instance.id)
            raise

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

    async def prepare(self, spec: InstanceSpec, *, timeout: float = 60.0) -> None:
        """Create the revision's template now rather than at its first start. Never fails: when no
        template can serve, :meth:`start` spawns (and reports the app's errors)."""
        with contextlib.suppress(DeployError):  # isolation required but impossible: start() says so
            await self._template_for(spec, time.monotonic() + timeout)

    async def release(self, deployment_id: str, *, timeout: float = 10.0) -> None:
        """Stop the revision's template; instances forked from it that still run are stopped first
        (gracefully, forcefully after ``timeout`` seconds). Spawned instances are not touched."""
        self._no_template.pop(deployment_id, None)
        self._users.pop(deployment_id, None)
        template = self._templates.get(deployment_id)
        if template is None:
            return
        forked = [i for iid, i in self._instances.items() if self._forked_from.get(iid) is template]
        await asyncio.gather(*(self.stop(i, timeout=timeout) for i in forked))
        await self._stop_template(template, timeout=timeout)
        lock = self._template_locks.get(deployment_id)
        if lock is not None and not lock.locked():
            del self._template_locks[deployment_id]

    async def stop(self, instance: Instance, *, timeout: float = 10.0) -> None:
        pid = self._pids.get(instance.id)
        if pid is None or instance.exited.is_set():
            await self._reap(instance)
            return
        self._stopping.add(instance.id)
        if instance.state in (InstanceState.WARM, InstanceState.SERVING):
            instance.transition(InstanceState.DRAINING)
        _signal_group(pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(instance.exited.wait(), timeout)
        except TimeoutError:
            self._platform_log(instance, f"Instance {instance.id} did not stop in {timeout:g}s; killing it")
            _signal_group(pid, signal.SIGKILL)
            await instance.exited.wait()
        await self._reap(instance)

    def instances(self) -> list[Instance]:
        return [i for i in self._instances.values() if i.alive]

    def template_pids(self) -> dict[str, int]:
        """The pid of each revision's template that can fork, by deployment id."""
        return {key: t.proc.pid for key, t in self._templates.items() if t.started and not t.gone}

    def output_tail(self, instance_id: str, lines: int = 50) -> list[str]:
        tail = self._tails.get(instance_id)
        return list(tail)[-lines:] if tail else []

    async def recover(self) -> list[Instance]:
        """Kill instances and templates a previous control plane left running (it crashed, or was
        killed). Instances first, gracefully: killing a template first would SIGKILL its instances.
        Adopts nothing (their pipes died with the old control plane): returns ``[]``."""
        instances: list[tuple[int, tuple[str, ...]]] = []
        templates: list[tuple[int, tuple[str, ...]]] = []
        cgroups: list[list[str]] = []
        for path in self.state_dir.glob("*.json"):
            try:
                state = json.loads(path.read_text())
                pid, iid = int(state["pid"]), str(state["id"])
                names = (iid, str(state.get("template") or ""))
                cgroups.append([str(p) for p in state.get("cgroup") or []])
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
                continue
            (templates if state.get("kind") == "template" else instances).append((pid, names))
        await _terminate(instances)
        await _terminate(templates)
        # What they left in their cgroups (daemons of theirs included) goes with the cgroups; so do the
        # long-empty cgroups of control planes that never restarted on their data directory.
        await asyncio.gather(
            *(asyncio.to_thread(self.confinement.forget, paths) for paths in cgroups if paths)
        )
        await asyncio.to_thread(self.confinement.sweep)
        for path in self.state_dir.glob("*.json"):
            path.unlink(missing_ok=True)
        return []

    async def close(self, *, timeout: float = 10.0) -> None:
        await asyncio.gather(*(self.stop(i, timeout=timeout) for i in list(self._instances.values())))
        await asyncio.gather(*(self._stop_template(t, timeout=timeout) for t in list(self._live_templates)))
        for cgroup_owner in list(self._cgroups):  # started but never ran
            self._dispose(self._cgroups.pop(cgroup_owner), cgroup_owner)
        await asyncio.gather(*self._disposals, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for transports in self._pipes.values():
            for transport in transports:
                transport.close()
        self._pipes.clear()

    # -- spawned instances ------------------------------------------------------------------------

    async def _spawn_process(self, instance: Instance, user: AppUser | None) -> int:
        """Start a new launcher process for ``instance`` (as ``user``, in its cgroup); the read end of its
        ready pipe."""
        spec = instance.spec
        preexec = self.confinement.preexec(user, self._cgroups.get(instance.id), self._limits(spec))
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
                preexec_fn=preexec,  # cgroup, limits, the app's user: before the interpreter starts
            )
        except (OSError, subprocess.SubprocessError) as exc:
            os.close(read_fd)
            raise DeployError(
                f"Could not start the app's interpreter {spec.python}: {exc}",
                hint="The app's environment may have been removed; redeploy to rebuild it.",
            ) from exc
        finally:
            os.close(write_fd)
        self._register(instance, proc.pid)
        assert proc.stdout is not None and proc.stderr is not None
        self._spawn(self._pump(instance, proc.stdout, "stdout"), f"logs-{instance.id}-out")
        self._spawn(self._pump(instance, proc.stderr, "stderr"), f"logs-{instance.id}-err")
        self._spawn(self._watch(instance, proc), f"watch-{instance.id}")
        self._platform_log(instance, f"Starting instance {instance.id} (pid {proc.pid}{_as(user)})")
        return read_fd

    async def _watch(self, instance: Instance, proc: asyncio.subprocess.Process) -> None:
        self._exited(instance, await proc.wait())

    # -- forked instances -----------------------------------------------------------------------

    async def _fork(self, instance: Instance, template: _Template, deadline: float) -> int | None:
        """Fork ``instance`` from ``template``: the read end of its ready pipe, or ``None`` when the
        template could not fork (the caller spawns instead)."""
        loop = asyncio.get_running_loop()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ready_r, ready_w = os.pipe()
        waiter: asyncio.Future[tuple[int, asyncio.Future[int]]] = loop.create_future()
        template.pending[instance.id] = waiter
        try:
            if template.gone:
                raise _TemplateError("the template exited")
            request = json.dumps({"op": "fork", "id": instance.id}).encode()
            socket.send_fds(template.control, [request], [out_w, err_w, ready_w])
            for fd in (out_w, err_w, ready_w):
                os.close(fd)
            out_w = err_w = ready_w = -1
            pid, exit_code = await asyncio.wait_for(waiter, max(0.0, deadline - time.monotonic()))
        except (OSError, TimeoutError, _TemplateError) as exc:
            log.warning(
                "template %s could not fork instance %s (%s); spawning it", template.id, instance.id, exc
            )
            for fd in (out_r, err_r, ready_r, out_w, err_w, ready_w):
                if fd >= 0:
                    os.close(fd)
            return None
        finally:
            template.pending.pop(instance.id, None)
        self._forked_from[instance.id] = template
        self._register(instance, pid)
        pumps = []
        for fd, stream in ((out_r, "stdout"), (err_r, "stderr")):
            reader = await self._read_pipe(instance.id, fd)
            pumps.append(
                self._spawn(self._pump(instance, reader, stream), f"logs-{instance.id}-{stream[3:]}")
            )
        self._spawn(self._watch_forked(instance, exit_code, pumps), f"watch-{instance.id}")
        self._platform_log(
            instance,
            f"Starting instance {instance.id} (pid {pid}, forked from template {template.id}"
            f"{_as(template.user)})",
        )
        return ready_r

    async def _read_pipe(self, instance_id: str, fd: int) -> asyncio.StreamReader:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_STREAM_LIMIT)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
        )
        self._pipes.setdefault(instance_id, []).append(transport)
        return reader

    async def _watch_forked(
        self, instance: Instance, exit_code: asyncio.Future[int], pumps: list[asyncio.Task[None]]
    ) -> None:
        code = await exit_code
        # The template reaps before we may have read the last lines; quote them in errors, keep order.
        await asyncio.wait(pumps, timeout=_PUMP_DRAIN)
        self._exited(instance, code)

    # -- templates ------------------------------------------------------------------------------

    async def _template_for(self, spec: InstanceSpec, deadline: float) -> _Template | None:
        """The ready template of ``spec``'s revision, launched if there is none; ``None`` to spawn."""
        key = spec.deployment_id
        if not self.fork or key in self._no_template:
            return None
        async with self._template_locks.setdefault(key, asyncio.Lock()):
            template = self._templates.get(key)
            if template is None:
                template = await self._launch_template(spec, await self._user_for(spec))
        if template is None or template.spec != spec:
            return None
        try:
            await asyncio.wait_for(asyncio.shield(template.ready), max(0.0, deadline - time.monotonic()))
        except (TimeoutError, _TemplateError):
            return None  # a slow import keeps going: later starts fork from it
        return template

    async def _launch_template(self, spec: InstanceSpec, user: AppUser | None) -> _Template | None:
        template_id = uuid.uuid4().hex[:12]
        # One instance's limits, but no OOM group: a fork over them before it is moved must not take
        # the template (and so every instance of the revision) down with it.
        cgroup = self.confinement.cgroup(spec.app_id, template_id, self._limits(spec), oom_group=False)
        preexec = self.confinement.preexec(user, cgroup, self._limits(spec))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = await asyncio.create_subprocess_exec(
                str(spec.python),
                str(LAUNCHER),
                "--template",
                "--app",
                spec.entrypoint,
                "--app-dir",
                str(spec.app_dir),
                "--workdir",
                str(spec.workdir or spec.app_dir),
                "--control-fd",
                str(theirs.fileno()),
                "--instance-id",
                template_id,
                cwd=str(spec.workdir or spec.app_dir),
                env=_base_env(spec, template_id),  # forks set FASTAPI_DEPLOY_INSTANCE_ID to their own
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                pass_fds=(theirs.fileno(),),
                preexec_fn=preexec,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            ours.close()
            self._dispose(cgroup, template_id)
            log.warning("could not start a template for %s (%s); spawning", spec.deployment_id, exc)
            return None
        finally:
            theirs.close()
        ours.setblocking(False)
        loop = asyncio.get_running_loop()
        template = _Template(
            id=template_id,
            spec=spec,
            proc=proc,
            control=ours,
            ready=loop.create_future(),
            user=user,
            cgroup=cgroup,
        )
        template.ready.add_done_callback(lambda fut: self._template_ready(template, fut))
        self._templates[spec.deployment_id] = template
        self._live_templates.add(template)
        self._write_template_state(template)
        loop.add_reader(ours.fileno(), self._on_control, template)
        assert proc.stdout is not None and proc.stderr is not None
        self._spawn(self._pump_template(template, proc.stdout, "stdout"), f"logs-{template_id}-out")
        self._spawn(self._pump_template(template, proc.stderr, "stderr"), f"logs-{template_id}-err")
        self._spawn(self._watch_template(template), f"watch-template-{template_id}")
        return template

    def _template_ready(self, template: _Template, fut: asyncio.Future[None]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()  # retrieved here, so a failure nobody waited for is not "never retrieved"
        spec = template.spec
        if exc is None:
            template.started = True
            for stream, line in template.early_output:
                self._emit_record(spec, template.id, stream, line, parse_level(line, stream))
            template.early_output.clear()
            self._template_log(template, f"Template {template.id} of deployment {spec.deployment_id} ready")
        elif not template.closing:
            # Deterministic (an import error, an unfit app): spawn this revision's instances from now on;
            # a spawned instance shows the app's own error.
            self._no_template[spec.deployment_id] = str(exc)
            log.warning("no template for deployment %s: %s", spec.deployment_id, exc)
            for _stream, line in template.early_output:
                log.debug("template %s: %s", template.id, line)

    def _on_control(self, template: _Template) -> None:
        while not template.gone:
            try:
                data = template.control.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._template_gone(template)
                return
            try:
                message = json.loads(data)
                self._on_message(template, message)
            except (ValueError, KeyError, TypeError):
                log.warning("template %s sent a bad message: %r", template.id, data[:200])

    def _on_message(self, template: _Template, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "ready":
            if not template.ready.done():
                template.ready.set_result(None)
        elif op == "unfit":
            reason = f"the app cannot be forked: {message['reason']}"
            if not template.ready.done():
                template.ready.set_exception(_TemplateError(reason))
            self._template_log(
                template, f"Template {template.id}: {reason}; instances start as new processes"
            )
        elif op == "forked":
            pid = int(message["pid"])
            if not _child_of(pid, template.proc.pid):
                # The template runs the app's code, as the app's user: a pid it names is trusted only if
                # it is its own child, else we would move into a cgroup (or kill) whatever it pleased.
                log.warning("template %s named pid %d, not a child of its own; ignored", template.id, pid)
                waiter = template.pending.get(str(message["id"]))
                if waiter is not None and not waiter.done():
                    waiter.set_exception(_TemplateError(f"reported pid {pid} is not its child"))
                return
            cgroup = self._cgroups.get(str(message["id"]))
            if cgroup is not None:  # at once: until then it is bounded by the template's cgroup
                try:
                    cgroup.add(pid)
                except OSError as exc:
                    log.warning("could not move instance %s into its cgroup: %s", message["id"], exc)
            exit_code: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            template.children[pid] = exit_code
            waiter = template.pending.get(str(message["id"]))
            if waiter is None or waiter.done():
                _signal_group(pid, signal.SIGKILL)  # its start() gave up waiting: nobody owns it
            else:
                waiter.set_result((pid, exit_code))
        elif op == "fork_failed":
            waiter = template.pending.get(str(message["id"]))
            if waiter is not None and not waiter.done():
                waiter.set_exception(_TemplateError(str(message.get("error", "fork failed"))))
        elif op == "exit":
            reported = template.children.pop(int(message["pid"]), None)
            if reported is not None and not reported.done():
                reported.set_result(int(message["exit_code"]))

    def _template_gone(self, template: _Template) -> None:
        """The control channel closed (the template exited) or we close it: nothing more will come."""
        if template.gone:
            return
        template.gone = True
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(template.control.fileno())
        template.control.close()
        if self._templates.get(template.spec.deployment_id) is template:
            del self._templates[template.spec.deployment_id]
        error = _TemplateError(
            f"template {template.id} exited" + ("" if template.started else " before it was ready")
        )
        if not template.ready.done():
            template.ready.set_exception(error)
        for waiter in template.pending.values():
            if not waiter.done():
                waiter.set_exception(error)
        orphans = {pid: fut for pid, fut in template.children.items() if not fut.done()}
        template.children.clear()
        if orphans:
            # They got SIGKILL from the kernel (PR_SET_PDEATHSIG); what they spawned did not.
            for pid in orphans:
                _signal_group(pid, signal.SIGKILL)
            self._spawn(_bury(orphans), f"bury-{template.id}")

    async def _watch_template(self, template: _Template) -> None:
        code = await template.proc.wait()
        self._template_gone(template)
        self._dispose(template.cgroup, template.id)
        template.exited.set()
        self._live_templates.discard(template)
        (self.state_dir / f"{template.id}.json").unlink(missing_ok=True)
        if template.started and not template.closing:
            self._template_log(
                template,
                f"Template {template.id} exited unexpectedly (exit code {code}); its instances are lost",
                "error",
            )

    async def _stop_template(self, template: _Template, *, timeout: float) -> None:
        template.closing = True
        self._template_gone(template)  # our end closes: the template stops what is left and exits
        try:
            await asyncio.wait_for(template.exited.wait(), timeout)
        except TimeoutError:
            _signal_group(template.proc.pid, signal.SIGKILL)
            await template.exited.wait()

    async def _pump_template(self, template: _Template, stream: asyncio.StreamReader, name: str) -> None:
        # Import-time output: to the sink once the template works; a failing template's output is
        # held back, since the spawned instance that follows prints the same error.
        while True:
            try:
                raw = await stream.readline()
            except ValueError:
                raw = await stream.read(64 * 1024)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if template.started:
                self._emit_record(template.spec, template.id, name, line, parse_level(line, name))
            else:
                template.early_output.append((name, line))

    def _write_template_state(self, template: _Template) -> None:
        state: dict[str, object] = {"id": template.id, "pid": template.proc.pid, "kind": "template"}
        if template.cgroup is not None:
            state["cgroup"] = [str(p) for p in template.cgroup.paths]
        _write_json(self.state_dir / f"{template.id}.json", state)

    def _template_log(self, template: _Template, message: str, level: str = "info") -> None:
        log.info("%s", message)
        self._emit_record(template.spec, template.id, "platform", message, level)

    # -- confinement ----------------------------------------------------------------------------

    async def _user_for(self, spec: InstanceSpec) -> AppUser | None:
        """Who the revision's processes run as: prepared once per revision (checks, the app's user, its
        files given to it) in a thread. DeployError when isolation is required and impossible."""
        if not self.confinement.enabled:
            return None
        pending = self._users.get(spec.deployment_id)
        if pending is None:
            workdir = spec.workdir or spec.app_dir
            pending = asyncio.ensure_future(
                asyncio.to_thread(
                    self.confinement.prepare,
                    spec.app_id,
                    run=[spec.python],
                    read=[LAUNCHER],
                    tree=[spec.app_dir, workdir],
                    writable=workdir,
                )
            )
            pending.add_done_callback(lambda fut: fut.cancelled() or fut.exception())  # retrieved
            self._users[spec.deployment_id] = pending
        try:
            return await asyncio.shield(pending)
        except Exception:
            if pending.done() and self._users.get(spec.deployment_id) is pending:
                del self._users[spec.deployment_id]  # the next start tries again
            raise

    def _limits(self, spec: InstanceSpec) -> Limits:
        return Limits(memory_mb=spec.memory_mb, cpus=spec.cpus, pids=self.confinement.settings.pids_max)

    def _new_cgroup(self, spec: InstanceSpec, instance_id: str) -> None:
        cgroup = self.confinement.cgroup(spec.app_id, instance_id, self._limits(spec))
        if cgroup is not None:
            self._cgroups[instance_id] = cgroup

    def _dispose(self, cgroup: Cgroup | None, owner: str) -> None:
        """Empty and remove ``cgroup`` in the background (``close`` waits for it)."""
        if cgroup is None:
            return

        async def dispose() -> None:
            await asyncio.to_thread(cgroup.dispose)

        task = asyncio.get_running_loop().create_task(dispose(), name=f"cgroup-{owner}")
        self._disposals.add(task)
        task.add_done_callback(self._disposals.discard)

    # -- internals ------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _register(self, instance: Instance, pid: int) -> None:
        instance.pid = pid
        self._instances[instance.id] = instance
        self._pids[instance.id] = pid
        self._tails[instance.id] = deque(maxlen=_OUTPUT_TAIL)
        self._write_state(instance)

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

    def _exited(self, instance: Instance, code: int) -> None:
        instance.exit_code = code
        expected = instance.id in self._stopping
        cgroup = self._cgroups.pop(instance.id, None)
        if cgroup is not None:
            instance.oom = cgroup.oom_kills() > 0
            self._dispose(cgroup, instance.id)  # and whatever it left running there
        self._platform_log(instance, *instance.exit_line(expected=expected))
        instance.transition(InstanceState.STOPPED if expected else InstanceState.CRASHED)
        instance.exited.set()
        (self.state_dir / f"{instance.id}.json").unlink(missing_ok=True)
        if self.on_exit is not None and not expected:
            try:
                self.on_exit(instance)
            except Exception:  # the callback's bug must not kill the watcher
                log.exception("on_exit callback failed")

    async def _reap(self, instance: Instance) -> None:
        self._stopping.discard(instance.id)
        self._pids.pop(instance.id, None)
        self._instances.pop(instance.id, None)
        self._forked_from.pop(instance.id, None)
        for transport in self._pipes.pop(instance.id, []):
            transport.close()
        # Keep output tails of recent instances for error messages; bound their number.
        if len(self._tails) > 256:
            for key in list(self._tails)[: len(self._tails) - 256]:
                if key not in self._instances:
                    self._tails.pop(key, None)

    def _write_state(self, instance: Instance) -> None:
        state = instance.as_dict()
        template = self._forked_from.get(instance.id)
        if template is not None:
            state["template"] = template.id  # a fork's command line names its template, not itself
        cgroup = self._cgroups.get(instance.id)
        if cgroup is not None:
            state["cgroup"] = [str(p) for p in cgroup.paths]  # recover() removes it
        _write_json(self.state_dir / f"{instance.id}.json", state)

    def _emit(self, instance: Instance, stream: str, message: str, level: str) -> None:
        self._emit_record(instance.spec, instance.id, stream, message, level)

    def _emit_record(
        self, spec: InstanceSpec, instance_id: str, stream: str, message: str, level: str
    ) -> None:
        try:
            self.log_sink(
                LogRecord(
                    app_id=spec.app_id,
                    deployment_id=spec.deployment_id,
                    instance_id=instance_id,
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


def _as(user: AppUser | None) -> str:
    return "" if user is None else f", as {user.name}"


def _write_json(path: Path, state: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


def _signal_group(pid: int, sig: int) -> None:
    """Signal a process group (an instance and whatever it spawned); the process alone if it has none."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _child_of(pid: int, parent: int) -> bool:
    """``pid`` exists (a zombie counts) and ``parent`` is its parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return int(stat.rsplit(")", 1)[1].split()[1]) == parent


def _running(pid: int) -> bool:
    """Running: a zombie waiting for its reaper does not count."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def _bury(orphans: dict[int, asyncio.Future[int]]) -> None:
    """Report instances that lost their template once they are gone: killed, exit code -9."""
    await asyncio.gather(*(_gone(pid, timeout=5.0) for pid in orphans))
    for fut in orphans.values():
        if not fut.done():
            fut.set_result(-signal.SIGKILL)


async def _gone(pid: int, *, timeout: float) -> None:
    """Wait until ``pid`` (not our child: we cannot reap it) has exited, at most ``timeout`` seconds."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:  # no pidfds (an old kernel): poll
        for _ in range(int(timeout / 0.02)):
            if not _running(pid):
                return
            await asyncio.sleep(0.02)
        return
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    loop.add_reader(pidfd, exited.set)  # a pidfd turns readable when the process exits
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(exited.wait(), timeout)
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


def _is_ours(pid: int, names: tuple[str, ...]) -> bool:
    """``pid`` runs our launcher for one of ``names`` (an instance id; a fork's template id)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(LAUNCHER).encode() in cmdline and any(n.encode() in cmdline for n in names if n)


async def _terminate(processes: list[tuple[int, tuple[str, ...]]], grace: float = 5.0) -> None:
    """SIGTERM the process groups of those still ours, SIGKILL what is left after ``grace`` seconds."""
    alive = [(pid, names) for pid, names in processes if _is_ours(pid, names)]
    for pid, names in alive:
        log.info("stopping %s (pid %d) left by a previous run", names[0], pid)
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        alive = [(pid, names) for pid, names in alive if _is_ours(pid, names)]
    for pid, _names in alive:
        _signal_group(pid, signal.SIGKILL)
