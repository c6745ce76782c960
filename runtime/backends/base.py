"""The backend protocol: what the control plane needs from anything that runs instances.

Instances move through an explicit state machine; the same vocabulary is used by the API, the logs and
the dashboard::

    starting ──> warm ──> serving ──> draining ──> stopped
        │          │         │           │
        └──────────┴─────────┴───────────┴──> crashed  (the process died without being asked to)
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol


class InstanceState(enum.StrEnum):
    STARTING = "starting"
    WARM = "warm"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"
    CRASHED = "crashed"


_ALLOWED: dict[InstanceState, set[InstanceState]] = {
    InstanceState.STARTING: {InstanceState.WARM, InstanceState.STOPPED, InstanceState.CRASHED},
    InstanceState.WARM: {
        InstanceState.SERVING,
        InstanceState.DRAINING,
        InstanceState.STOPPED,
        InstanceState.CRASHED,
    },
    InstanceState.SERVING: {
        InstanceState.WARM,
        InstanceState.DRAINING,
        InstanceState.STOPPED,
        InstanceState.CRASHED,
    },
    InstanceState.DRAINING: {InstanceState.STOPPED, InstanceState.CRASHED},
    InstanceState.STOPPED: set(),
    InstanceState.CRASHED: set(),
}


class IllegalTransition(Exception):
    pass


PLATFORM_ENV = frozenset(
    {
        "FASTAPI_DEPLOY_APP_NAME",
        "FASTAPI_DEPLOY_OTLP_ENDPOINT",
        "FASTAPI_DEPLOY_TELEMETRY_TOKEN",
        "FASTAPI_DEPLOY_TRACE_SAMPLE",
        "FASTAPI_DEPLOY_TRACE_SLOW_MS",
        "FASTAPI_DEPLOY_OTEL_PATH",
        "FASTAPI_DEPLOY_OTEL_VERSION",
    }
)
"""``FASTAPI_DEPLOY_*`` variables of :attr:`InstanceSpec.env` that the control plane sets (tracing:
``runtime/instrument.py``) and every backend passes on; any other ``FASTAPI_DEPLOY_*`` name there is the
backend's own to set, and a backend may drop it."""


@dataclass(frozen=True)
class InstanceSpec:
    """What to run: one revision (deployment) of one app."""

    app_id: str
    deployment_id: str
    hostname: str
    """The app's Host name: the health probe sends it, as the router would."""
    python: Path
    """The interpreter of the app's built environment."""
    entrypoint: str
    """``module:attribute`` of the FastAPI object."""
    app_dir: Path
    """Import directory (first on sys.path)."""
    workdir: Path | None = None
    """Working directory: the project root (default: ``app_dir``)."""
    env: Mapping[str, str] = field(default_factory=dict)
    health_path: str = "/"
    image: str | None = None
    """The OCI image of the revision (``runtime/images.py``): image backends (``docker``) run it, and
    then ``python``, ``app_dir`` and ``workdir`` are paths *inside* it; ``process`` ignores it."""
    memory_mb: int | None = None
    """Memory limit of one instance in MiB (``None``: none). Enforced by every backend with a cgroup
    (``process`` where the host allows, else ``RLIMIT_DATA``; docs/ISOLATION.md): an instance that
    exceeds it is OOM-killed and reported with :attr:`Instance.oom`."""
    cpus: float | None = None
    """CPU limit of one instance in cores (``None``: none): a CFS quota (``process`` needs cgroups)."""


@dataclass(frozen=True)
class LogRecord:
    app_id: str
    deployment_id: str
    instance_id: str
    stream: str  # "stdout" | "stderr" | "platform"
    timestamp: datetime
    message: str
    level: str


LogSink = Callable[[LogRecord], None]
ExitCallback = Callable[["Instance"], None]


@dataclass(eq=False)
class Instance:
    id: str
    spec: InstanceSpec
    state: InstanceState = InstanceState.STARTING
    host: str = "127.0.0.1"
    port: int = 0
    pid: int = 0
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    exit_code: int | None = None
    """Set once it exited: its status, or minus the signal number that killed it (``-9``)."""
    oom: bool = False
    """It was killed for exceeding :attr:`InstanceSpec.memory_mb` (backends that enforce it)."""
    exited: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def transition(self, new: InstanceState) -> None:
        if new == self.state:
            return
        if new not in _ALLOWED[self.state]:
            raise IllegalTransition(f"instance {self.id}: {self.state} -> {new}")
        self.state = new

    @property
    def alive(self) -> bool:
        return self.state not in (InstanceState.STOPPED, InstanceState.CRASHED)

    def exit_line(self, *, expected: bool) -> tuple[str, str]:
        """The platform log line (message, level) for its exit, the same on every backend."""
        code = self.exit_code
        if self.oom:
            limit = f" (limit {self.spec.memory_mb} MiB)" if self.spec.memory_mb else ""
            return f"Instance {self.id} was killed: out of memory{limit}, exit code {code}", "error"
        if expected:
            return f"Instance {self.id} stopped (exit code {code})", "info"
        return f"Instance {self.id} exited unexpectedly (exit code {code})", "error"

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "state": self.state.value,
            "deployment_id": self.spec.deployment_id,
            "host": self.host,
            "port": self.port,
            "pid": self.pid,
            "started_at": self.started_at.isoformat(),
            "exit_code": self.exit_code,
            "oom": self.oom,
        }


class Backend(Protocol):
    """Runs instances. Implementations: ``process`` (``process.py``), ``docker`` (``docker.py``), later
    ``kubernetes``. One conformance suite (``tests/test_backends_conformance.py``) runs against each.

    An image backend (``docker``) also has ``images``: the :class:`runtime.images.ImageEngine` the deploy
    pipeline builds revisions' images with; a backend without that attribute runs virtualenvs.
    """

    name: str
    on_exit: ExitCallback | None
    """Called (on the event loop) with an instance that exited without being asked to."""

    async def start(self, spec: InstanceSpec, *, timeout: float) -> Instance:
        """Start one instance and return it *ready*: lifespan startup done, health path answering
        (status < 500), state ``warm``. Raises :class:`runtime.errors.VerifyError` (with the
        instance's own output) when it exits or is not ready within ``timeout`` seconds; the
        instance is stopped by then."""
        ...

    async def stop(self, instance: Instance, *, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM, lifespan shutdown), forcefully after ``timeout`` seconds."""
        ...

    def instances(self) -> list[Instance]:
        """Every instance not yet stopped or crashed."""
        ...

    def output_tail(self, instance_id: str, lines: int = 50) -> list[str]:
        """The last lines an instance printed (kept after it exited)."""
        ...

    async def recover(self) -> list[Instance]:
        """After a control-plane restart: take over or clean up what a previous run left behind.

        Returns the instances it *adopted*: still running, healthy, now watched again (their output
        goes to the log sink, their exit to ``on_exit``) and listed by :meth:`instances`, in state
        ``warm`` with the spec rebuilt from what the backend recorded (the caller may put its own spec
        of the same revision in place: ``instance.spec = spec``). Everything else a previous run left
        is stopped. ``process`` adopts nothing (the pipes to its instances died with the old control
        plane): it stops them all and returns ``[]``; ``docker`` adopts the containers labelled as
        this platform's."""
        ...

    # Optional: revision-level preparation. A backend with nothing to prepare per revision implements
    # both as no-ops; callers may skip ``prepare`` (``start`` prepares lazily) but should ``release``.

    async def prepare(self, spec: InstanceSpec) -> None:
        """Get ready to start instances of ``spec``'s revision quickly (the process backend: start
        its template, which imports the app once and forks instances). Never raises for an app
        error: :meth:`start` reports those."""
        ...

    async def release(self, deployment_id: str) -> None:
        """The revision no longer serves (call after its instances drained): free what
        :meth:`prepare` or :meth:`start` kept for it. Instances of it still running may be stopped."""
        ...

    async def close(self, *, timeout: float = 10.0) -> None:
        """Stop every instance (a graceful control-plane stop leaves nothing to adopt)."""
        ...
