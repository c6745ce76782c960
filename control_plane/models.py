"""The database tables (SQLModel). Alembic migrations in ``migrations/`` create exactly these."""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime

from sqlalchemy import BigInteger
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


def short_slug() -> str:
    return secrets.token_hex(4)


class User(SQLModel, table=True):
    id: str = Field(default_factory=new_id, primary_key=True)
    email: str = Field(index=True, unique=True)
    name: str = ""
    is_admin: bool = False
    """A platform admin: every team, every app, the admin API."""
    created_at: datetime = Field(default_factory=utcnow)
    password_hash: str | None = None
    """argon2id (``control_plane/passwords.py``); None: the user signs in with tokens only."""
    disabled: bool = False
    """A disabled user's tokens and password are refused (401) until an admin enables them again."""
    last_login_at: datetime | None = None


class Team(SQLModel, table=True):
    id: str = Field(default_factory=new_id, primary_key=True)
    slug: str = Field(index=True, unique=True)
    name: str
    created_at: datetime = Field(default_factory=utcnow)


class Membership(SQLModel, table=True):
    team_id: str = Field(foreign_key="team.id", primary_key=True)
    user_id: str = Field(foreign_key="user.id", primary_key=True)
    role: str = "owner"  # owner | admin | member | viewer (control_plane/permissions.py)


class TeamQuota(SQLModel, table=True):
    """A team's limits. No row, or a null field, means the platform default (``PlatformSettings``)."""

    team_id: str = Field(foreign_key="team.id", primary_key=True)
    max_apps: int | None = None
    max_instances: int | None = None
    """Instances the team's apps may be scaled to, together (floors) and each (ceilings)."""
    max_cpu: float | None = None
    """CPU cores: instances x the platform's per-instance CPU."""
    max_memory_mb: int | None = None
    """MiB: instances x the platform's per-instance memory."""
    max_build_minutes: int | None = None
    """Build minutes per calendar month (UTC)."""
    max_storage_bytes: int | None = Field(default=None, sa_type=BigInteger)
    """Bytes of kept deployment archives (compressed)."""
    max_archive_bytes: int | None = Field(default=None, sa_type=BigInteger)
    """Largest single upload (compressed); never above the server's ``max_archive_bytes``."""
    updated_at: datetime = Field(default_factory=utcnow)


class AuditEntry(SQLModel, table=True):
    """One mutating API call: who, what, when, from where. Append-only: the database refuses UPDATE and
    DELETE on this table (triggers from migration 0003), and no API changes it."""

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, index=True)
    method: str
    path: str
    route: str = ""
    """The route template (``/api/v1/apps/{app_id}``): what was called, without the ids."""
    status_code: int
    actor_kind: str | None = None  # "user" | "deploy" | None (not authenticated)
    actor_user_id: str | None = Field(default=None, index=True)
    actor_email: str | None = None
    actor_token_id: str | None = None
    team_id: str | None = Field(default=None, index=True)
    app_id: str | None = Field(default=None, index=True)
    client_ip: str | None = None
    user_agent: str = ""
    duration_ms: float = 0.0


class ApiToken(SQLModel, table=True):
    """A bearer token, stored as its SHA-256 (tokens are 256-bit random: no KDF needed)."""

    id: str = Field(default_factory=new_id, primary_key=True)
    token_hash: str = Field(index=True, unique=True)
    kind: str = "user"  # "user" | "deploy"
    user_id: str | None = Field(default=None, foreign_key="user.id")
    app_id: str | None = Field(default=None, index=True)
    name: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None


class DeviceCode(SQLModel, table=True):
    """One device-flow login (RFC 8628 style) waiting for approval in the browser."""

    device_code_hash: str = Field(primary_key=True)
    user_code: str = Field(index=True, unique=True)
    client_id: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime
    approved_user_id: str | None = None
    denied: bool = False
    used: bool = False


class App(SQLModel, table=True):
    id: str = Field(default_factory=new_id, primary_key=True)
    team_id: str = Field(foreign_key="team.id", index=True)
    slug: str = Field(index=True, unique=True)
    name: str
    directory: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    current_deployment_id: str | None = None
    health_path: str = "/"
    # Autoscaling knobs (runtime/autoscaler.py documents their semantics).
    min_instances: int = 1
    max_instances: int = 10
    target_concurrency: float = 10.0
    prewarm: int = 0
    scale_to_zero_after: float = 300.0
    fail_on_blocking: bool = False
    """Refuse a build whose async code calls blocking APIs (``control_plane/insights.py``)."""
    max_concurrency: int = 0
    """Requests in flight per instance before the router queues the rest (0: no limit)."""


class Deployment(SQLModel, table=True):
    id: str = Field(default_factory=new_id, primary_key=True)
    app_id: str = Field(foreign_key="app.id", index=True)
    slug: str = Field(default_factory=short_slug)
    status: str = "waiting_upload"
    kind: str = "upload"  # "upload" | "rollback" | "redeploy"
    source_deployment_id: str | None = None
    created_at: datetime = Field(default_factory=utcnow, index=True)
    updated_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    archive_size_bytes: int = 0
    upload_token_hash: str | None = None
    upload_expires_at: datetime | None = None
    error_code: str | None = None
    error_title: str | None = None
    error_message: str | None = None
    error_hint: str | None = None
    entrypoint: str | None = None
    import_dir: str | None = None
    workdir: str | None = None
    environment_key: str | None = None
    artifact_pruned: bool = False
    fail_on_breaking: bool = False
    """Refuse to switch traffic to this revision if its API breaks the serving one's (``push
    --fail-on-breaking``)."""
    image: str | None = None
    """The built image (image backends), as ``runtime.images.BuiltImage.as_json()``: what any control
    plane needs to run the revision (the copy in the data directory is the builder's)."""


class BuildLogLine(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    deployment_id: str = Field(index=True)
    message: str
    created_at: datetime = Field(default_factory=utcnow)


class EnvVar(SQLModel, table=True):
    app_id: str = Field(foreign_key="app.id", primary_key=True)
    name: str = Field(primary_key=True)
    value: str
    is_secret: bool = False
    updated_at: datetime = Field(default_factory=utcnow)


class Setting(SQLModel, table=True):
    """Platform-wide key/value state (e.g. whether the admin was bootstrapped)."""

    key: str = Field(primary_key=True)
    value: str


class Event(SQLModel, table=True):
    """Something the platform did or saw, per app: instance states, scale decisions and their reasons."""

    id: int | None = Field(default=None, primary_key=True)
    app_id: str = Field(index=True)
    at: datetime = Field(default_factory=utcnow, index=True)
    kind: str  # "instance" | "scale" | "deploy"
    message: str
    data: str = "{}"  # JSON


class TrafficSlot(SQLModel, table=True):
    """An app's traffic by time of week (15-minute slots): an exponentially weighted peak concurrency,
    the input of the predictive warm floor."""

    app_id: str = Field(primary_key=True)
    slot: int = Field(primary_key=True)  # 0..671: (weekday * 96) + quarter-hour of the day, UTC
    peak: float = 0.0
    weeks: int = 0
    updated_at: datetime = Field(default_factory=utcnow)


class MetricPoint(SQLModel, table=True):
    """One app (``route == ""``) or one of its routes over one window: the rollups behind the metrics
    API (``control_plane/rollups.py``). ``resolution`` is the window in seconds (10 or 60)."""

    app_id: str = Field(primary_key=True)
    resolution: int = Field(primary_key=True)
    ts: int = Field(primary_key=True, sa_type=BigInteger)
    """The window's start, epoch seconds."""
    route: str = Field(primary_key=True, default="")
    """``"GET /items/{item_id}"``; empty for the whole app."""
    requests: int = 0
    errors: int = 0
    """5xx answers and responses cut off."""
    client_errors: int = 0
    duration_sum: float = 0.0
    hist: str = ""
    """The latency histogram over ``control_plane.metrics.BOUNDS``, sparse: ``index:count,...``."""
    bytes_in: int = Field(default=0, sa_type=BigInteger)
    bytes_out: int = Field(default=0, sa_type=BigInteger)
    queued: int = 0
    queue_wait_sum: float = 0.0
    cold_starts: int = 0
    concurrency_max: float = 0.0
    concurrency_avg: float = 0.0
    serving: int = 0
    warm: int = 0


class Span(SQLModel, table=True):
    """One kept span (OTLP from the instances, or the router's edge span), attributed to an app."""

    id: int | None = Field(default=None, primary_key=True)
    trace_id: str = Field(index=True)
    span_id: str
    parent_span_id: str = ""
    app_id: str = Field(index=True)
    deployment_id: str = ""
    instance_id: str = ""
    service: str = ""
    name: str
    kind: int = 0
    """OTLP SpanKind: 1 internal, 2 server, 3 client, 4 producer, 5 consumer."""
    start_ns: int = Field(sa_type=BigInteger, index=True)
    end_ns: int = Field(sa_type=BigInteger)
    status_code: int = 0
    """OTLP: 0 unset, 1 ok, 2 error."""
    status_message: str = ""
    attributes: str = "{}"
    """JSON object."""
    events: str = "[]"
    """JSON list of ``{"name", "time_ns", "attributes"}``."""


class TraceSummary(SQLModel, table=True):
    """A trace as one app saw it (its entry span: the router's edge span, else its server span): what
    the trace list shows and filters on."""

    trace_id: str = Field(primary_key=True)
    app_id: str = Field(primary_key=True)
    started_at: datetime = Field(index=True)
    duration_ms: float = 0.0
    name: str = ""
    route: str = ""
    method: str = ""
    http_status: int = 0
    error: bool = False
    span_count: int = 0


class Slo(SQLModel, table=True):
    """A service level objective of an app (``control_plane/slo.py`` does the math)."""

    id: str = Field(default_factory=new_id, primary_key=True)
    app_id: str = Field(foreign_key="app.id", index=True)
    name: str
    kind: str  # "availability" | "latency"
    target: float
    """The fraction of requests that must be good (0.999)."""
    threshold_ms: float | None = None
    """Latency SLOs: a request is good when answered within this many milliseconds."""
    window_s: float = 30 * 86400.0
    state: str = "{}"
    """The alert's state between evaluations (``AlertState.as_dict()``), JSON."""
    created_at: datetime = Field(default_factory=utcnow)


class Webhook(SQLModel, table=True):
    """Where an app's alerts are sent: a generic JSON endpoint or a Slack incoming webhook."""

    id: str = Field(default_factory=new_id, primary_key=True)
    app_id: str = Field(foreign_key="app.id", index=True)
    url: str
    kind: str = "json"  # "json" | "slack"
    secret: str = Field(default_factory=lambda: secrets.token_hex(16))
    """JSON webhooks carry ``X-FastAPI-Deploy-Signature: sha256=<HMAC of the body under it>``."""
    created_at: datetime = Field(default_factory=utcnow)


class Alert(SQLModel, table=True):
    """One alert of an app, from firing to resolved: an SLO burning its budget, a crash loop, an
    instance killed at its memory limit, a failed deploy."""

    id: str = Field(default_factory=new_id, primary_key=True)
    app_id: str = Field(index=True)
    kind: str  # "slo" | "crash_loop" | "oom" | "deploy_failed"
    key: str = Field(index=True)
    """What makes two firings the same incident (the SLO's id, ``crash_loop``, a deployment id)."""
    severity: str = "page"  # "page" | "ticket" | "info"
    status: str = "firing"  # "firing" | "resolved"
    message: str
    data: str = "{}"
    """JSON: the notification's details (burn rates, the instance, the deployment)."""
    started_at: datetime = Field(default_factory=utcnow, index=True)
    resolved_at: datetime | None = None
    deliveries: str = "[]"
    """JSON list of ``{"webhook", "status", "at", "error"}``: what each send answered."""
