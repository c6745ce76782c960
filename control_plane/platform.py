"""The platform: every long-lived part of the control plane, built from Settings, started and stopped
in order. The FastAPI app holds one in ``app.state.platform``; API handlers reach the parts through it.

    start:  database (migrations) → bootstrap admin → log store, events, rollups, traces → router
            → backend recovery → restore serving apps → autoscaler → ready
    stop:   stop accepting deploys → router stops (drains) → instances stop → rollups and spans
            written → database closes

Every request the router finishes feeds the live metrics (``metrics.py``) and the trace pipeline
(``traces.py``: the edge span); instances send their spans to ``POST /v1/traces``, authenticated with
their app's telemetry token (an HMAC of the app id under the platform's telemetry key).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets as pysecrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import select

from control_plane.alerting import Alerts
from control_plane.buildlogs import BuildLogs
from control_plane.config import Settings
from control_plane.db import Database
from control_plane.deployer import Deployer, Paths
from control_plane.events import EventLog
from control_plane.fleet import Fleet
from control_plane.forecast import Forecaster
from control_plane.instrumentation import Instrumentation
from control_plane.logstore import LogStore
from control_plane.metrics import Metrics
from control_plane.models import ApiToken, Membership, Setting, Team, User
from control_plane.otlp import Forwarder, SpanData
from control_plane.receiver import SideListener
from control_plane.rollups import Rollups
from control_plane.routers import RouterHub
from control_plane.secrets import SecretBox
from control_plane.security import hash_token, new_token
from control_plane.traces import Traces
from runtime.backends.base import Backend
from runtime.backends.process import ProcessBackend
from runtime.router import RequestInfo, Router

log = logging.getLogger("fastapi_deploy")


@dataclass
class Bootstrap:
    """What the first start created; the admin token is only known (and printed) then."""

    admin_email: str
    admin_token: str | None


class Platform:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.paths = Paths(settings.data_dir)
        for d in (settings.data_dir, self.paths.deployments, self.paths.envs, self.paths.instances):
            d.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.sqlalchemy_url)
        self.secrets = SecretBox.from_config(settings.data_dir, settings.extra.get("secret_keys", ""))
        self.logstore = LogStore(
            self.paths.logs, settings.log_retention_bytes, settings.log_retention_days * 86400.0
        )
        self.buildlogs = BuildLogs(self.db)
        self.router = RouterHub(Router())
        """The embedded router and the remote ones (``fastapi-deploy router``), as one."""
        self.backend: Backend = self._make_backend()
        self.events = EventLog(self.db)
        self.forecaster = Forecaster(self.db)
        self.metrics = Metrics()
        self.rollups = Rollups(
            self.db,
            self.metrics,
            fine_retention=settings.metrics_fine_retention,
            coarse_retention=settings.metrics_coarse_retention,
        )
        forwarder = None
        if settings.otlp_forward_url:
            headers = dict(
                pair.split("=", 1) for pair in settings.otlp_forward_headers.split(",") if "=" in pair
            )
            forwarder = Forwarder(
                settings.otlp_forward_url, {k.strip(): v.strip() for k, v in headers.items()}
            )
        self.traces = Traces(
            self.db,
            sample_ratio=settings.trace_sample,
            slow_ms=settings.trace_slow_ms,
            retention_seconds=settings.trace_retention,
            forwarder=forwarder,
        )
        self.router.on_request_done = self._request_done
        self.alerts = Alerts(
            self.db, self.rollups, app_url=settings.app_url, interval=settings.alert_interval
        )
        self.fleet = Fleet(
            self.backend,
            self.router,
            verify_timeout=settings.verify_timeout,
            drain_timeout=settings.drain_timeout,
            events=self.events,
            forecaster=self.forecaster,
            metrics=self.metrics,
            external_scaling=settings.backend == "kubernetes" and settings.kubernetes_scaling == "hpa",
            crash_window=settings.crash_window,
        )
        self.backend.on_exit = self.fleet.on_exit
        self.fleet.on_alert = self.alerts.raise_alert
        self._telemetry_key = b""
        self.instrumentation = Instrumentation(
            settings, self.metrics, self.telemetry_token, layers_dir=self.paths.root / "otel"
        )
        self.deployer = Deployer(
            settings,
            self.db,
            self.fleet,
            self.buildlogs,
            self.secrets,
            instrumentation=self.instrumentation,
            app_log=self.logstore.append,
            on_alert=self.alerts.raise_alert,
        )
        self.fleet.on_health = self.deployer.on_health
        self.bootstrap: Bootstrap | None = None
        self.ready = asyncio.Event()
        self.leading = asyncio.Event()
        """Set once this control plane runs the apps and restored them (remote routers' snapshots)."""
        self._autoscaler: asyncio.Task[None] | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._reconciler: asyncio.Task[None] | None = None
        self._election: asyncio.Task[None] | None = None
        self._elector: Any = None
        self._namespaces: dict[str, str] = {}
        self._stopping = False
        self._side_receiver: SideListener | None = None

    def _make_backend(self) -> Backend:
        settings = self.settings
        registry = None
        if settings.registry:
            from runtime.registry import Registry

            registry = Registry.parse(
                settings.registry, username=settings.registry_username, password=settings.registry_password
            )
        if settings.backend == "process":
            from runtime.backends._confine import Confinement, IsolationSettings

            isolation = IsolationSettings(
                mode=settings.isolation,
                uid_min=settings.isolation_uid_min,
                uid_max=settings.isolation_uid_max,
                cgroup_root=Path(settings.cgroup_root) if settings.cgroup_root else None,
            )
            confinement = Confinement(isolation, data_dir=settings.data_dir)
            return ProcessBackend(self.paths.instances, self.logstore.append, confinement=confinement)
        if settings.backend not in ("docker", "kubernetes"):
            raise ValueError(f"unknown backend {settings.backend!r} (available: process, docker, kubernetes)")
        from runtime.backends.docker import DockerBackend  # the docker extra: imported only when chosen

        if settings.backend == "docker":
            return DockerBackend(
                self.paths.instances,
                self.logstore.append,
                registry=registry,
                docker_host=settings.docker_host or None,
            )
        from runtime.backends._k8s_manifests import KubernetesConfig  # the kubernetes extra
        from runtime.backends.kubernetes import KubernetesBackend

        # Images are built on a Docker engine (its containers are only the builds' own), run by the cluster.
        builder = DockerBackend(
            self.paths.images / "engine",
            lambda record: None,
            registry=registry,
            network=None,
            docker_host=settings.docker_host or None,
        )
        config = KubernetesConfig(
            namespace=settings.kubernetes_namespace,
            platform_id=settings.kubernetes_platform_id,
            kubeconfig=settings.kubeconfig or None,
            registry=registry,
            platform_namespace=settings.kubernetes_platform_namespace or None,
            keep_on_close=settings.kubernetes_keep_on_close,
            split_log_streams=settings.kubernetes_split_logs,
            verify_from_control_plane=settings.kubernetes_probe_pods,
            startup_timeout=int(settings.verify_timeout),
            ingress_class=settings.kubernetes_ingress_class or None,
        )
        namespace_for = self._team_namespace if settings.kubernetes_namespace_per_team else None
        return KubernetesBackend(
            self.logstore.append, images=builder.images, config=config, namespace_for=namespace_for
        )

    def _team_namespace(self, app_id: str) -> str:
        """``fdp-{team slug}``: the namespace of an app's objects when each team has its own (cached)."""
        cached = self._namespaces.get(app_id)
        if cached is not None:
            return cached
        from control_plane.models import App

        with self.db.session() as s:
            app = s.get(App, app_id)
            team = s.get(Team, app.team_id) if app is not None else None
        namespace = f"fdp-{team.slug}" if team is not None else self.settings.kubernetes_namespace
        self._namespaces[app_id] = namespace
        return namespace

    async def start(self) -> None:
        await asyncio.to_thread(self.db.migrate)
        confinement = getattr(self.backend, "confinement", None)
        if confinement is not None:  # the database and the secret key closed to the apps' users
            await asyncio.to_thread(confinement.secure_data_dir)
        self.bootstrap = await asyncio.to_thread(self._bootstrap)
        self._telemetry_key = await asyncio.to_thread(self._load_telemetry_key)
        self.buildlogs.bind(asyncio.get_running_loop())
        await asyncio.to_thread(self.forecaster.load)
        self.events.start()
        self.rollups.start()
        self.traces.start()
        if self.traces.forwarder is not None:
            self.traces.forwarder.start()
        self.instrumentation.warm_up()
        await self.router.start(self.settings.router_host, self.settings.router_port)
        await self._start_image_receiver()
        loop = asyncio.get_running_loop()
        self._maintenance = loop.create_task(self._maintain(), name="maintenance")
        if self.settings.leader_election == "lease":
            # Several control planes, one database: the API serves everywhere, the Lease's holder runs
            # the apps (fleet, autoscaler, deploys); the others wait to take over.
            self.deployer.leading = False
            self._elector = self._make_elector()
            self._election = loop.create_task(self._elector.run(), name="leader-election")
        else:
            await self._lead()
        self.ready.set()

    async def _lead(self) -> None:
        """Become the one that runs the apps: adopt or restart what serves, then drive it."""
        self.deployer.leading = True
        await self.backend.recover()
        await self.deployer.restore()
        loop = asyncio.get_running_loop()
        self._autoscaler = loop.create_task(self.fleet.run(), name="autoscaler")
        self._reconciler = loop.create_task(self.deployer.reconcile(), name="reconciler")
        self.alerts.start()
        self.leading.set()
        headroom = self.settings.kubernetes_headroom
        set_headroom = getattr(self.backend, "set_headroom", None)
        if headroom and set_headroom is not None:
            cpus, memory_mb = await asyncio.to_thread(self.deployer.instance_size)
            try:
                await set_headroom(headroom, cpus=cpus, memory_mb=memory_mb)
            except Exception as exc:
                log.warning("node headroom placeholders not applied: %s", exc)
        log.info("this control plane runs the apps")

    def _make_elector(self) -> Any:
        import socket

        from control_plane.leader import LeaderElector, Timing
        from runtime.backends._k8s_client import Kube

        settings = self.settings
        identity = settings.pod_name or socket.gethostname()
        return LeaderElector(
            Kube(settings.kubeconfig or None),
            namespace=settings.pod_namespace or settings.kubernetes_namespace,
            name=settings.leader_lease,
            identity=identity,
            pod=settings.pod_name or None,
            on_started=self._lead,
            on_stopped=self._lost_leadership,
            timing=Timing(
                lease_duration=settings.leader_lease_duration,
                renew_deadline=settings.leader_renew_deadline,
                retry_period=settings.leader_retry_period,
            ),
        )

    async def _lost_leadership(self) -> None:
        """Another control plane leads now: leave the apps as they are (it adopts them) and stop, as
        controllers do; the orchestrator restarts this one as a follower."""
        self.deployer.leading = False
        self.leading.clear()
        if self._stopping:
            return  # a graceful stop hands the lease over; stop() does the rest
        log.warning("lost the leadership: leaving the apps to the new leader and stopping")
        for task in (self._autoscaler, self._reconciler):
            if task is not None:
                task.cancel()
        detach = getattr(self.backend, "detach", None)
        if detach is not None:
            detach()
        import os
        import signal

        os.kill(os.getpid(), signal.SIGTERM)

    async def stop(self) -> None:
        self._stopping = True
        self.ready.clear()
        for task in (self._election, self._reconciler, self._autoscaler, self._maintenance):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.deployer.close()
        await self.alerts.stop()
        await self.router.stop(timeout=5.0)
        await self.fleet.close()
        await self.events.stop()
        await self.rollups.stop()
        if self._side_receiver is not None:
            await self._side_receiver.stop()
        await self.traces.stop()
        if self.traces.forwarder is not None:
            await self.traces.forwarder.stop()
        self.logstore.close()
        self.db.dispose()

    async def _maintain(self) -> None:
        """Now and then: log segments past their age (on the loop: the store's files are the loop's)."""
        while True:
            try:
                dropped = self.logstore.expire()
                if dropped:
                    log.info(
                        "dropped %d log segments older than %g days",
                        dropped,
                        self.settings.log_retention_days,
                    )
            except Exception:
                log.exception("log retention failed")
            await asyncio.sleep(600)

    # -- telemetry ----------------------------------------------------------------------------------

    async def _start_image_receiver(self) -> None:
        """Containers reach the host at their network's gateway, not on loopback: the OTLP receiver also
        listens there (on the API's port) when the API itself does not listen on every interface."""
        if not self.settings.tracing:
            return
        if self.settings.instance_otlp_url:  # the operator says where instances reach us
            self.instrumentation.image_receiver = self.settings.instance_otlp_url
            return
        gateway = getattr(self.backend, "gateway", None)
        if gateway is None:
            if self.settings.public_url:  # pods in a cluster reach the API where its clients do
                self.instrumentation.image_receiver = f"{self.settings.api_url}/v1/traces"
            return
        try:
            host = await asyncio.to_thread(gateway)
        except Exception as exc:
            log.warning("no tracing for containers: their network's gateway is unknown (%s)", exc)
            return
        if not host:
            return
        port = self.settings.port
        if self.settings.host not in ("0.0.0.0", "::", ""):
            listener = SideListener(self, host, port)
            try:
                await listener.start()
            except OSError as exc:
                log.warning("no tracing for containers: cannot listen on %s:%d (%s)", host, port, exc)
                return
            self._side_receiver = listener
        self.instrumentation.image_receiver = f"http://{host}:{port}/v1/traces"

    def loop_blocked(self, app_id: str, span: SpanData) -> None:
        """An instance's event loop was blocked (a span from ``runtime/instrument.py``): an app event,
        with where and how long, linked to the trace of the request it stalled."""
        attrs = span.attributes
        where = attrs.get("fastapi_deploy.block.user_frame") or "code outside the app (a library)"
        duration = float(attrs.get("fastapi_deploy.block.duration_ms", span.duration_ms))
        stack = str(attrs.get("code.stacktrace", "")).splitlines()
        self.events.emit(
            app_id,
            "insight",
            f"Event loop blocked for {duration:.0f} ms at {where}",
            level="warning",
            duration_ms=round(duration, 1),
            user_frame=attrs.get("fastapi_deploy.block.user_frame"),
            trace_id=span.trace_id,
            instance=span.resource.get("fastapi_deploy.instance_id"),
            stack=stack[-15:],
        )

    def _request_done(self, app_id: str, info: RequestInfo, now: float) -> None:
        """The router's hook, once per request: the live metrics, then the edge span."""
        route = self.metrics.request_done(app_id, info, now)
        self.traces.edge(app_id, info, now, route)

    def telemetry_token(self, app_id: str) -> str:
        """What an instance of ``app_id`` authenticates its spans with (``POST /v1/traces``)."""
        digest = hmac.new(self._telemetry_key, app_id.encode(), hashlib.sha256).hexdigest()[:40]
        return f"{app_id}.{digest}"

    def telemetry_app(self, token: str) -> str | None:
        """The app a telemetry token belongs to, or None."""
        app_id, _, _digest = token.partition(".")
        if not app_id or not self._telemetry_key:
            return None
        return app_id if hmac.compare_digest(token, self.telemetry_token(app_id)) else None

    def _load_telemetry_key(self) -> bytes:
        from sqlalchemy.exc import IntegrityError

        for _ in range(2):  # two control planes starting at once: one insert wins, both read it
            with self.db.session() as s:
                row = s.get(Setting, "telemetry_key")
                if row is not None:
                    return bytes.fromhex(row.value)
                s.add(Setting(key="telemetry_key", value=pysecrets.token_hex(32)))
                try:
                    s.commit()
                except IntegrityError:
                    continue
        with self.db.session() as s:
            row = s.get(Setting, "telemetry_key")
            assert row is not None
            return bytes.fromhex(row.value)

    def _bootstrap(self) -> Bootstrap:
        """On the first start: the admin user (a password too when configured), their team, their API token.

        Later starts change nothing, except that a platform left without any enabled admin gets the
        configured admin back (enabled, admin again, with a new token printed once): the way back in.
        """
        from control_plane.passwords import hash_password

        with self.db.session() as s:
            done = s.get(Setting, "bootstrapped")
            admin = s.exec(
                select(User).where(User.is_admin == True, User.disabled == False)  # noqa: E712
            ).first()
            if done is not None and admin is not None:
                return Bootstrap(admin_email=admin.email, admin_token=None)
            email = self.settings.admin_email.strip().lower()
            admin = s.exec(select(User).where(User.email == email)).first() or User(email=email, name="Admin")
            admin.is_admin, admin.disabled = True, False
            if self.settings.admin_password and admin.password_hash is None:
                admin.password_hash = hash_password(self.settings.admin_password)
            s.add(admin)
            team = s.exec(select(Team).where(Team.slug == "default")).first()
            if team is None:
                team = Team(slug="default", name="Default")
                s.add(team)
            s.flush()
            if s.get(Membership, (team.id, admin.id)) is None:
                s.add(Membership(team_id=team.id, user_id=admin.id, role="owner"))
            raw = self.settings.admin_token or new_token()
            if s.exec(select(ApiToken).where(ApiToken.token_hash == hash_token(raw))).first() is None:
                s.add(
                    ApiToken(
                        token_hash=hash_token(raw), kind="user", user_id=admin.id, name="admin (bootstrap)"
                    )
                )
            if done is None:
                s.add(Setting(key="bootstrapped", value="1"))
            if s.get(Setting, "instance_id") is None:
                s.add(Setting(key="instance_id", value=pysecrets.token_hex(8)))
            s.commit()
            return Bootstrap(admin_email=admin.email, admin_token=raw)
