"""The control plane's configuration: one object, resolved once at the edge and passed down."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class Settings:
    """Everything the control plane needs to run. Build it with :meth:`from_env` (the CLI does)."""

    data_dir: Path = Path("data")
    """Where the database (SQLite default), archives, builds, environments and logs live."""
    host: str = "127.0.0.1"
    """Interface of the API and dashboard."""
    port: int = 8000
    router_host: str = "127.0.0.1"
    """Interface of the edge router that serves the apps."""
    router_port: int = 8080
    domain: str = "localhost"
    """Apps are served at ``http://{slug}.{domain}:{router_port}/``; ``*.localhost`` resolves to loopback."""
    public_url: str = ""
    """The API's external base URL (default ``http://{host}:{port}``); used in URLs handed to clients."""
    apps_public_url: str = ""
    """Template of an app's URL, ``{slug}`` replaced (default ``http://{slug}.{domain}:{router_port}/``)."""
    database_url: str = ""
    """SQLAlchemy URL; empty means SQLite (WAL) at ``data_dir/fastapi-deploy.db``."""
    admin_token: str = ""
    """If set on first start, becomes the admin's API token; otherwise one is generated and printed once."""
    admin_email: str = "admin@localhost"
    """The first platform admin's email (first start only)."""
    admin_password: str = ""
    """If set on first start, the first admin can also log in with email + password."""
    backend: str = "process"
    """Where instances run: ``process`` (virtualenvs, local processes) or ``docker`` (images, containers)."""
    app_python: str = sys.executable
    """Interpreter the apps' environments are built for (process backend)."""
    base_image: str = "python:3.12-slim"
    """Docker backend: the image every app image is built on (pulled if the engine lacks it). Its own
    ``python3`` is probed once: dependencies are installed for its version and platform."""
    registry: str = ""
    """Docker backend: ``host[:port][/namespace]`` of an OCI registry to push every image to (deployed by
    digest from then on); empty: images stay on the engine."""
    registry_username: str = ""
    registry_password: str = field(default="", repr=False)
    build_cpus: float = 1.0
    """Cores one image build may use (pinned, low priority), so builds cannot starve serving apps."""
    build_memory_mb: int = 4096
    """MiB one image build may use (the compile container's limit; the install's address space)."""
    build_timeout: float = 600.0
    """Seconds a dependency install may take before ``building_image_failed_timeout``."""
    verify_timeout: float = 60.0
    """Seconds a new revision has to finish its lifespan startup and answer its health path."""
    drain_timeout: float = 30.0
    """Seconds an old revision may keep finishing in-flight requests after the switch."""
    crash_window: float = 60.0
    """A second crash within this many seconds is a crash loop (start hold-off, alert, the deployment
    ``degraded``); the deployment is healthy again after serving this long without a crash."""
    max_archive_bytes: int = 100 * 1024 * 1024
    """Largest upload accepted (compressed); larger gets 413 / ``extracting_failed_archive_too_large``."""
    keep_deployments: int = 10
    """Successful deployments per app whose artifacts are kept for rollback."""
    log_retention_bytes: int = 20 * 1024 * 1024
    """Per-app log storage before the oldest segment is dropped."""
    upload_token_ttl: float = 3600.0
    """Seconds a storage upload URL stays valid."""
    secret_keys: str = ""
    """Fernet keys for secrets at rest, comma-separated: the first encrypts, all decrypt (rotation: put the
    new key first, run ``fastapi-deploy admin secrets rotate``, then drop the old one). Empty means
    ``data_dir/secret.key``, created on first start."""
    login_token_ttl: float = 30 * 86400.0
    """Seconds a user token from ``POST /auth/login`` stays valid."""
    device_token_ttl: float = 90 * 86400.0
    """Seconds a user token from the device flow stays valid (the official CLI stores ``expires_in``)."""
    rate_limit_login: tuple[int, float] = (10, 6.0)
    """Login attempts per client IP: a burst of N, then one per S seconds (also per email: half the burst)."""
    rate_limit_device: tuple[int, float] = (30, 1.0)
    """Device-flow calls per client IP: a burst of N, then one per S seconds. The official CLI polls the
    token endpoint every ``interval`` (2 s) for up to 5 minutes; that must never be limited."""
    rate_limit_tokens: tuple[int, float] = (20, 3.0)
    """Token creations per caller: a burst of N, then one per S seconds."""
    tracing: bool = True
    """Instrument instances with OpenTelemetry (``runtime/instrument.py``); off: edge spans only."""
    trace_sample: float = 0.1
    """Share of traces kept when nothing is wrong with them (errors and slow ones are always kept)."""
    trace_slow_ms: float = 500.0
    """A request at least this slow has its trace kept."""
    trace_retention: float = 3 * 86400.0
    """Seconds spans are kept."""
    otlp_forward_url: str = ""
    """Also send every kept span to this OTLP/HTTP traces endpoint (e.g. ``http://collector:4318/v1/traces``)."""
    otlp_forward_headers: str = field(default="", repr=False)
    """Headers for it, ``name=value,name=value`` (e.g. an API key)."""
    metrics_fine_retention: float = 3600.0
    """Seconds the 10-second metric rollups are kept."""
    metrics_coarse_retention: float = 7 * 86400.0
    """Seconds the 1-minute metric rollups are kept."""
    metrics_token: str = field(default="", repr=False)
    """If set, ``/metrics`` needs ``Authorization: Bearer <it>``; else it is open, like most exporters."""
    router_token: str = field(default="", repr=False)
    """The secret remote routers (``fastapi-deploy router``) connect with; empty: none may connect."""
    log_retention_days: float = 14.0
    """Log lines older than this are dropped (in whole segments), whatever the size retention allows."""
    isolation: str = "auto"
    """Process backend: ``auto`` (each app its own user, cgroup limits, where the host allows; the rest
    said once in the log), ``require`` (fail what cannot be confined), ``off``. docs/ISOLATION.md."""
    isolation_uid_min: int = 200_000
    isolation_uid_max: int = 299_999
    """The uid (and gid) range of the apps' users."""
    cgroup_root: str = ""
    """cgroup v2: a delegated subtree to confine in (default ``<cgroup2 mount>/fastapi-deploy``)."""
    alert_interval: float = 30.0
    """Seconds between evaluations of the SLOs' burn rates."""
    instance_otlp_url: str = ""
    """Where instances send spans and metrics (``.../v1/traces``); empty: the API on loopback (process),
    the instances' network's gateway (docker), ``public_url`` (kubernetes)."""
    # -- kubernetes (docs/KUBERNETES.md) ------------------------------------------------------------------
    kubeconfig: str = ""
    """A kubeconfig file; empty: the pod's service account inside a cluster, else ``~/.kube/config``."""
    kubernetes_namespace: str = "fastapi-deploy-apps"
    """The namespace of every app's objects (unless one per team)."""
    kubernetes_namespace_per_team: bool = False
    """One namespace per team, ``fdp-{team slug}``, created on first use."""
    kubernetes_platform_id: str = "default"
    """Label value marking this platform's objects: two platforms on one cluster never touch each other's."""
    kubernetes_platform_namespace: str = ""
    """The control plane's namespace: with it, a NetworkPolicy lets only the platform's pods reach apps."""
    kubernetes_keep_on_close: bool = False
    """A stopping control plane leaves the apps running (the next one adopts them): set it in a cluster."""
    kubernetes_scaling: str = "router"
    """``router``: the platform's router and autoscaler drive each revision's replicas; ``hpa``: an
    autoscaling/v2 HPA does, behind a per-app Service and Ingress, its floor raised for pre-warm."""
    kubernetes_headroom: int = 0
    """Placeholder pods of one instance's size keeping node headroom for surges (0: none)."""
    kubernetes_ingress_class: str = ""
    """``ingressClassName`` of the per-app Ingresses (``hpa`` scaling)."""
    kubernetes_split_logs: bool = False
    """Read pods' stdout and stderr apart (clusters with the ``PodLogsQuerySplitStreams`` gate)."""
    kubernetes_probe_pods: bool = True
    """The control plane asks a new pod's health path itself before it serves; off for a control plane
    outside the cluster, which cannot reach pod IPs (the pods' readiness probes decide alone)."""
    docker_host: str = ""
    """The Docker engine image builds use (``DOCKER_HOST``; kubernetes backend: a builder reachable from
    the control plane), empty: the local socket."""
    leader_election: str = ""
    """``lease``: several control planes share the database; the holder of a Kubernetes Lease runs the
    deploys, the fleet and the autoscaler, the others serve the API. Empty: this one does it all."""
    leader_lease: str = "fastapi-deploy-leader"
    leader_lease_duration: float = 15.0
    leader_renew_deadline: float = 10.0
    leader_retry_period: float = 2.0
    pod_name: str = ""
    """This control plane's pod (``POD_NAME``, from the downward API): its identity in the election."""
    pod_namespace: str = ""
    """Its namespace (``POD_NAMESPACE``): where the Lease lives."""
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The platform reads its keys from ``extra["secret_keys"]`` (where embedders used to pass them).
        if self.secret_keys and not self.extra.get("secret_keys"):
            self.extra["secret_keys"] = self.secret_keys

    @property
    def api_url(self) -> str:
        base = self.public_url or f"http://{self.host}:{self.port}"
        return base.rstrip("/")

    def app_url(self, slug: str) -> str:
        if self.apps_public_url:
            return self.apps_public_url.replace("{slug}", slug)
        port = "" if self.router_port == 80 else f":{self.router_port}"
        return f"http://{slug}.{self.domain}{port}/"

    def app_hostname(self, slug: str) -> str:
        return f"{slug}.{self.domain}".lower()

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            url = self.database_url
            # Accept the common libpq spelling; we use psycopg 3.
            if url.startswith("postgres://"):
                url = "postgresql://" + url[len("postgres://") :]
            if url.startswith("postgresql://"):
                url = "postgresql+psycopg://" + url[len("postgresql://") :]
            return url
        return f"sqlite:///{(self.data_dir / 'fastapi-deploy.db').resolve()}"

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Settings from ``FASTAPI_DEPLOY_*`` variables (and ``DATABASE_URL``), then ``overrides``.

        Overrides whose value is None are ignored, so CLI options can be passed through as they are.
        """
        values: dict[str, object] = {
            "data_dir": Path(_env("FASTAPI_DEPLOY_DATA_DIR", "data")),
            "host": _env("FASTAPI_DEPLOY_HOST", "127.0.0.1"),
            "port": int(_env("FASTAPI_DEPLOY_PORT", "8000")),
            "router_host": _env("FASTAPI_DEPLOY_ROUTER_HOST", "127.0.0.1"),
            "router_port": int(_env("FASTAPI_DEPLOY_ROUTER_PORT", "8080")),
            "domain": _env("FASTAPI_DEPLOY_DOMAIN", "localhost"),
            "public_url": _env("FASTAPI_DEPLOY_PUBLIC_URL", ""),
            "apps_public_url": _env("FASTAPI_DEPLOY_APPS_URL", ""),
            "database_url": _env("DATABASE_URL", ""),
            "admin_token": _env("FASTAPI_DEPLOY_ADMIN_TOKEN", ""),
            "admin_email": _env("FASTAPI_DEPLOY_ADMIN_EMAIL", "admin@localhost"),
            "admin_password": _env("FASTAPI_DEPLOY_ADMIN_PASSWORD", ""),
            "backend": _env("FASTAPI_DEPLOY_BACKEND", "process"),
            "app_python": _env("FASTAPI_DEPLOY_APP_PYTHON", sys.executable),
            "base_image": _env("FASTAPI_DEPLOY_BASE_IMAGE", "python:3.12-slim"),
            "registry": _env("FASTAPI_DEPLOY_REGISTRY", ""),
            "registry_username": _env("FASTAPI_DEPLOY_REGISTRY_USERNAME", ""),
            "registry_password": _env("FASTAPI_DEPLOY_REGISTRY_PASSWORD", ""),
            "secret_keys": _env("FASTAPI_DEPLOY_SECRET_KEY", ""),
            "otlp_forward_url": _env("FASTAPI_DEPLOY_OTLP_FORWARD_URL", ""),
            "otlp_forward_headers": _env("FASTAPI_DEPLOY_OTLP_FORWARD_HEADERS", ""),
            "metrics_token": _env("FASTAPI_DEPLOY_METRICS_TOKEN", ""),
            "router_token": _env("FASTAPI_DEPLOY_ROUTER_TOKEN", ""),
            "tracing": _flag("FASTAPI_DEPLOY_TRACING", True),
            "instance_otlp_url": _env("FASTAPI_DEPLOY_INSTANCE_OTLP_URL", ""),
            "isolation": _env("FASTAPI_DEPLOY_ISOLATION", "auto"),
            "cgroup_root": _env("FASTAPI_DEPLOY_CGROUP_ROOT", ""),
            "kubeconfig": _env("KUBECONFIG", ""),
            "kubernetes_namespace": _env("FASTAPI_DEPLOY_KUBERNETES_NAMESPACE", "fastapi-deploy-apps"),
            "kubernetes_namespace_per_team": _flag("FASTAPI_DEPLOY_KUBERNETES_NAMESPACE_PER_TEAM", False),
            "kubernetes_platform_id": _env("FASTAPI_DEPLOY_KUBERNETES_PLATFORM_ID", "default"),
            "kubernetes_platform_namespace": _env("FASTAPI_DEPLOY_KUBERNETES_PLATFORM_NAMESPACE", ""),
            "kubernetes_keep_on_close": _flag("FASTAPI_DEPLOY_KUBERNETES_KEEP_ON_CLOSE", False),
            "kubernetes_scaling": _env("FASTAPI_DEPLOY_KUBERNETES_SCALING", "router"),
            "kubernetes_ingress_class": _env("FASTAPI_DEPLOY_KUBERNETES_INGRESS_CLASS", ""),
            "kubernetes_split_logs": _flag("FASTAPI_DEPLOY_KUBERNETES_SPLIT_LOGS", False),
            "kubernetes_probe_pods": _flag("FASTAPI_DEPLOY_KUBERNETES_PROBE_PODS", True),
            "docker_host": _env("DOCKER_HOST", ""),
            "leader_election": _env("FASTAPI_DEPLOY_LEADER_ELECTION", ""),
            "leader_lease": _env("FASTAPI_DEPLOY_LEADER_LEASE", "fastapi-deploy-leader"),
            "pod_name": _env("POD_NAME", ""),
            "pod_namespace": _env("POD_NAMESPACE", ""),
        }
        numeric = {
            "build_timeout": ("FASTAPI_DEPLOY_BUILD_TIMEOUT", float),
            "build_cpus": ("FASTAPI_DEPLOY_BUILD_CPUS", float),
            "build_memory_mb": ("FASTAPI_DEPLOY_BUILD_MEMORY_MB", int),
            "verify_timeout": ("FASTAPI_DEPLOY_VERIFY_TIMEOUT", float),
            "drain_timeout": ("FASTAPI_DEPLOY_DRAIN_TIMEOUT", float),
            "crash_window": ("FASTAPI_DEPLOY_CRASH_WINDOW", float),
            "max_archive_bytes": ("FASTAPI_DEPLOY_MAX_ARCHIVE_BYTES", int),
            "keep_deployments": ("FASTAPI_DEPLOY_KEEP_DEPLOYMENTS", int),
            "log_retention_bytes": ("FASTAPI_DEPLOY_LOG_RETENTION_BYTES", int),
            "login_token_ttl": ("FASTAPI_DEPLOY_LOGIN_TOKEN_TTL", float),
            "device_token_ttl": ("FASTAPI_DEPLOY_DEVICE_TOKEN_TTL", float),
            "trace_sample": ("FASTAPI_DEPLOY_TRACE_SAMPLE", float),
            "trace_slow_ms": ("FASTAPI_DEPLOY_TRACE_SLOW_MS", float),
            "trace_retention": ("FASTAPI_DEPLOY_TRACE_RETENTION", float),
            "metrics_fine_retention": ("FASTAPI_DEPLOY_METRICS_FINE_RETENTION", float),
            "metrics_coarse_retention": ("FASTAPI_DEPLOY_METRICS_COARSE_RETENTION", float),
            "log_retention_days": ("FASTAPI_DEPLOY_LOG_RETENTION_DAYS", float),
            "alert_interval": ("FASTAPI_DEPLOY_ALERT_INTERVAL", float),
            "isolation_uid_min": ("FASTAPI_DEPLOY_ISOLATION_UID_MIN", int),
            "isolation_uid_max": ("FASTAPI_DEPLOY_ISOLATION_UID_MAX", int),
            "kubernetes_headroom": ("FASTAPI_DEPLOY_KUBERNETES_HEADROOM", int),
            "leader_lease_duration": ("FASTAPI_DEPLOY_LEADER_LEASE_DURATION", float),
            "leader_renew_deadline": ("FASTAPI_DEPLOY_LEADER_RENEW_DEADLINE", float),
            "leader_retry_period": ("FASTAPI_DEPLOY_LEADER_RETRY_PERIOD", float),
        }
        for name, (var, conv) in numeric.items():
            if var in os.environ:
                values[name] = conv(os.environ[var])
        known = {f.name for f in fields(cls)}
        for key, value in overrides.items():
            if key not in known:
                raise TypeError(f"unknown setting {key!r}")
            if value is not None:
                values[key] = Path(value) if key == "data_dir" else value  # type: ignore[arg-type]
        for name, var in (
            ("rate_limit_login", "FASTAPI_DEPLOY_RATE_LIMIT_LOGIN"),
            ("rate_limit_device", "FASTAPI_DEPLOY_RATE_LIMIT_DEVICE"),
            ("rate_limit_tokens", "FASTAPI_DEPLOY_RATE_LIMIT_TOKENS"),
        ):
            if var in os.environ:  # "BURST/SECONDS", e.g. "10/6"
                burst, _, per = os.environ[var].partition("/")
                values[name] = (int(burst), float(per or 1))
        settings = cls(**values)  # type: ignore[arg-type]
        return settings
