"""The deploy pipeline: archive → extract → detect → build environment → start → verify → switch.

One deployment per app runs at a time (a per-app lock); builds share a small semaphore so a burst of
pushes cannot starve the apps that are serving. Every failure is recorded with the four FastAPI Cloud
fields and leaves the previous revision serving: the router switches only after the new instances are
ready. Rollbacks and env redeploys skip extraction and build: they reuse an earlier deployment's
artifact (its source tree and its content-addressed environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import shutil
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from sqlmodel import col, select

from control_plane import insights
from control_plane.buildlogs import BuildLogs
from control_plane.config import Settings
from control_plane.db import Database
from control_plane.fleet import Fleet, Revision
from control_plane.instrumentation import Instrumentation
from control_plane.models import App, Deployment, EnvVar, utcnow
from control_plane.secrets import SecretBox
from control_plane.statuses import DEGRADED, TERMINAL, WENT_LIVE
from control_plane.statuses import DeploymentStatus as S
from runtime.archive import ExtractLimits, extract_archive
from runtime.autoscaler import ScalingSettings
from runtime.backends._confine import BuildConfinement, Limits
from runtime.backends.base import Instance, InstanceSpec, InstanceState, LogRecord, LogSink
from runtime.builder import build_environment, prune_environments
from runtime.detect import Project, detect_project
from runtime.errors import ExtractionError, RuntimeFailure
from runtime.images import BuildLimits, BuiltImage, ImageEngine, ImageMeta, build_image, prune_layers
from runtime.logparse import parse_level
from runtime.registry import Registry

log = logging.getLogger("fastapi_deploy.deployer")

RECONCILE_SECONDS = 2.0


def scaling_settings(app: App) -> ScalingSettings:
    return ScalingSettings(
        min_instances=app.min_instances,
        max_instances=app.max_instances,
        target_concurrency=app.target_concurrency,
        prewarm=app.prewarm,
        scale_to_zero_after=app.scale_to_zero_after,
        max_concurrency=app.max_concurrency,
    )


class Paths:
    """Where a deployment's files live in the data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir
        self.deployments = data_dir / "deployments"
        self.envs = data_dir / "envs"
        self.images = data_dir / "images"  # the image builder's cache: base probes, dependency layers
        self.instances = data_dir / "instances"
        self.logs = data_dir / "logs"

    def archive(self, deployment_id: str) -> Path:
        return self.deployments / deployment_id / "archive"

    def source(self, deployment_id: str) -> Path:
        return self.deployments / deployment_id / "src"

    def image(self, deployment_id: str) -> Path:
        """The built image's record (image backends), beside the source it was built from."""
        return self.deployments / deployment_id / "image.json"


class Deployer:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        fleet: Fleet,
        buildlogs: BuildLogs,
        secrets: SecretBox,
        instrumentation: Instrumentation | None = None,
        app_log: LogSink | None = None,
        on_alert: Callable[..., None] | None = None,
    ) -> None:
        self.settings = settings
        self.instrumentation = instrumentation
        self.app_log = app_log
        self.on_alert = on_alert
        self._app_of: dict[str, str] = {}  # deployment id -> app id, while it runs
        self._running: set[str] = set()
        self.leading = True
        """False while another control plane leads (``control_plane/leader.py``): deploys are its."""
        self.db = db
        self.fleet = fleet
        self.buildlogs = buildlogs
        self.secrets = secrets
        self.paths = Paths(settings.data_dir)
        self._app_locks: dict[str, asyncio.Lock] = {}
        self._build_slots = asyncio.Semaphore(1)
        self._tasks: set[asyncio.Task[None]] = set()

    # -- entry points ---------------------------------------------------------------------------

    def submit(self, deployment_id: str) -> None:
        """Queue a deployment (status ``ready_for_build``) to run in the background. A control plane
        that does not lead (several share the database) leaves it to the leader's reconciler."""
        if not self.leading or deployment_id in self._running:
            return
        self._running.add(deployment_id)
        task = asyncio.get_running_loop().create_task(
            self._run(deployment_id), name=f"deploy-{deployment_id}"
        )
        self._tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            self._running.discard(deployment_id)

        task.add_done_callback(done)

    async def reconcile(self) -> None:
        """The leader's loop, desired → actual, from the database: deployments queued by any control
        plane (or left queued by one that stopped) are run; scaling settings changed elsewhere reach
        the fleet; deleted apps stop serving. Owned by the platform; cancelled at shutdown."""
        while True:
            try:
                queued, settings, gone = await asyncio.to_thread(self._desired)
                for deployment_id in queued:
                    self.submit(deployment_id)
                for app_id, app_settings in settings.items():
                    revision = self.fleet.serving.get(app_id)
                    if revision is not None and revision.settings != app_settings:
                        self.fleet.update_settings(app_id, app_settings)
                for app_id in gone:
                    await self.fleet.remove(app_id)
            except Exception:
                log.exception("reconciling failed")
            await asyncio.sleep(RECONCILE_SECONDS)

    def _desired(self) -> tuple[list[str], dict[str, ScalingSettings], list[str]]:
        with self.db.session() as s:
            queued = s.exec(
                select(Deployment.id)
                .where(Deployment.status == S.READY_FOR_BUILD)
                .order_by(col(Deployment.created_at))
            ).all()
            serving = list(self.fleet.serving)
            apps = (
                {a.id: a for a in s.exec(select(App).where(col(App.id).in_(serving))).all()}
                if serving
                else {}
            )
        settings = {}
        for app_id, app in apps.items():
            try:
                settings[app_id] = scaling_settings(app)
            except ValueError:
                continue
        return [q for q in queued if q not in self._running], settings, [a for a in serving if a not in apps]

    async def restore(self) -> None:
        """At start-up: bring every app's current revision back, without rebuilding."""
        apps = await asyncio.to_thread(self._apps_to_restore)
        for app, dep in apps:
            try:
                await self._bring_up(app, dep, restoring=True)
                log.info("restored %s (deployment %s)", app.slug, dep.id)
            except Exception as exc:
                log.error("could not restore app %s: %s", app.slug, exc)
        # Instances the backend adopted (docker) that no current revision claimed: an old revision's.
        claimed = {i.id for revision in self.fleet.serving.values() for i in revision.instances}
        leftovers = [i for i in self.fleet.backend.instances() if i.id not in claimed]
        await asyncio.gather(*(self.fleet.backend.stop(i) for i in leftovers), return_exceptions=True)
        serving = {revision.deployment_id for revision in self.fleet.serving.values()}
        release = getattr(self.fleet.backend, "release", None)
        if release is not None:  # their revisions' resources too (kubernetes: the Deployment, its Service)
            for deployment_id in {i.spec.deployment_id for i in leftovers} - serving:
                with contextlib.suppress(Exception):
                    await release(deployment_id)
        # Deployments that were mid-flight when the control plane stopped will never finish; queued
        # ones (ready_for_build) are run by the reconciler.
        await asyncio.to_thread(self._fail_interrupted)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- health of the live revision ---------------------------------------------------------------

    def on_health(self, app_id: str, deployment_id: str, status: str | None, reason: str) -> None:
        """Fleet callback (on the event loop): the app's live deployment is ``degraded`` /
        ``degraded_oom`` (``status``), or healthy again (``None``: back to ``success``)."""
        task = asyncio.get_running_loop().create_task(
            self._record_health(app_id, deployment_id, status, reason), name=f"health-{deployment_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record_health(self, app_id: str, deployment_id: str, status: str | None, reason: str) -> None:
        changed = await asyncio.to_thread(self._write_health, app_id, deployment_id, status, reason)
        if not changed:
            return
        message = (
            f"Deployment {deployment_id[:8]} is {status}: {reason}"
            if status
            else f"Deployment {deployment_id[:8]} is healthy again ({reason})"
        )
        self.buildlogs.append(deployment_id, message)
        self.buildlogs.notify(deployment_id)
        self._app_line(app_id, deployment_id, "platform", message, "error" if status else "info")

    def _write_health(self, app_id: str, deployment_id: str, status: str | None, reason: str) -> bool:
        with self.db.session() as s:
            app = s.get(App, app_id)
            dep = s.get(Deployment, deployment_id)
            if app is None or dep is None or app.current_deployment_id != dep.id:
                return False  # no longer the live one: its history stays as it was
            if status is None:
                if dep.status not in DEGRADED:
                    return False
                dep.status = S.SUCCESS
                dep.error_code = dep.error_title = dep.error_message = dep.error_hint = None
            else:
                if dep.status not in WENT_LIVE or dep.status == status:
                    return False
                oom = status == S.DEGRADED_OOM
                dep.status = status
                dep.error_code = status
                dep.error_title = "Degraded (out of memory)" if oom else "Degraded"
                dep.error_message = f"The live deployment is {reason}."
                dep.error_hint = (
                    "The app is killed at its memory limit: make it need less memory, or ask the platform "
                    "operator for larger instances (instance_memory_mb)."
                    if oom
                    else "`fastapi-deploy logs APP` shows why its instances stop; roll back with "
                    "`fastapi-deploy rollback APP` or push a fix."
                )
            dep.updated_at = utcnow()
            s.add(dep)
            s.commit()
            return True

    # -- the pipeline ---------------------------------------------------------------------------

    async def _run(self, deployment_id: str) -> None:
        dep = await asyncio.to_thread(self._get, deployment_id)
        self._app_of[dep.id] = dep.app_id
        try:
            await self._run_locked(dep, deployment_id)
        finally:
            self._app_of.pop(dep.id, None)

    async def _run_locked(self, dep: Deployment, deployment_id: str) -> None:
        lock = self._app_locks.setdefault(dep.app_id, asyncio.Lock())
        async with lock:
            started = time.monotonic()
            try:
                if await asyncio.to_thread(self._superseded, dep):
                    self._log(dep.id, "A newer deployment of this app was queued; skipping this one.")
                    await self._set(dep.id, S.BUILD_SKIPPED_SUPERSEDED, finished=True)
                    return
                app = await asyncio.to_thread(self._get_app, dep.app_id)
                if dep.kind == "upload":
                    await self._build(app, dep)
                else:
                    await self._reuse(dep)
                dep = await asyncio.to_thread(self._get, deployment_id)
                await self._bring_up(app, dep, restoring=False)
                elapsed = time.monotonic() - started
                self._log(
                    dep.id,
                    f"Deployment {dep.slug} is live at {self.settings.app_url(app.slug)} ({elapsed:.1f}s)",
                )
                await self._set(dep.id, S.SUCCESS, finished=True)
                self._outcome(dep.app_id, S.SUCCESS.value, started)
                live = self.fleet.serving.get(dep.app_id)
                if live is not None and live.deployment_id == dep.id and live.health is not None:
                    # It started crash-looping between the switch and this line.
                    self.on_health(dep.app_id, dep.id, live.health, live.crash_reason or "degraded")
                async with self._build_slots:
                    await asyncio.to_thread(self._retain, app.id)
            except RuntimeFailure as exc:
                await self._fail(dep.id, exc.code, exc.title, exc.message, exc.hint)
                self._outcome(dep.app_id, _status_for(exc.code), started)
                if self.on_alert is not None:
                    self.on_alert(
                        dep.app_id,
                        "deploy_failed",
                        f"Deployment {dep.slug} failed: {exc.title}. {exc.message}",
                        key=dep.id,
                        deployment_id=dep.id,
                        error_code=exc.code,
                        hint=exc.hint,
                    )
            except asyncio.CancelledError:
                await asyncio.shield(
                    self._fail(
                        dep.id,
                        S.FAILED,
                        "Interrupted",
                        "The control plane stopped during this deployment.",
                        "Push again.",
                    )
                )
                raise
            except Exception as exc:
                self._outcome(dep.app_id, S.FAILED.value, started)
                log.exception("deployment %s failed", deployment_id)
                self._log(dep.id, "".join(traceback.format_exception(exc)))
                await self._fail(
                    dep.id,
                    S.FAILED,
                    "Internal error",
                    f"The platform failed: {exc}",
                    "This is a bug in fastapi-deploy; the log above has the details.",
                )

    def _build_confinement(self, app_id: str) -> BuildConfinement | None:
        """Builds run as the app's user, within the build limits (process backend; docs/ISOLATION.md)."""
        confinement = getattr(self.fleet.backend, "confinement", None)
        if confinement is None:
            return None
        limits = Limits(memory_mb=self.settings.build_memory_mb, cpus=self.settings.build_cpus)
        return BuildConfinement(confinement, app_id, limits)

    def _outcome(self, app_id: str, status: str, started: float) -> None:
        if self.instrumentation is not None:
            self.instrumentation.metrics.deploy_finished(app_id, status, time.monotonic() - started)

    async def _build(self, app: App, dep: Deployment) -> None:
        src = self.paths.source(dep.id)
        archive = self.paths.archive(dep.id)
        await self._set(dep.id, S.EXTRACTING)
        if not await asyncio.to_thread(archive.is_file):
            raise ExtractionError(
                "The uploaded archive is not on this control plane (the one that received it stopped "
                "before building it).",
                title="Upload lost",
                hint="Push again.",
            )
        self._log(dep.id, f"Extracting the upload ({dep.archive_size_bytes / 1024:.1f} KiB)")
        limits = ExtractLimits(max_archive_bytes=self.settings.max_archive_bytes)
        result = await asyncio.to_thread(extract_archive, archive, src, limits)
        self._log(dep.id, f"Extracted {result.files} files ({result.total_bytes / 1024:.1f} KiB)")
        archive.unlink(missing_ok=True)  # the extracted tree is the artifact; the archive is not kept

        await self._set(dep.id, S.BUILDING_IMAGE)
        project = await asyncio.to_thread(detect_project, src, app.directory)
        self._log(dep.id, f"Entrypoint: {project.entrypoint} (dependencies from {project.dependencies.kind})")
        if project.health_path is not None and project.health_path != app.health_path:
            # The pushed pyproject.toml wins over the API's setting: it travels with the code.
            app.health_path = project.health_path  # what _build_image and _bring_up read
            await asyncio.to_thread(self._set_health_path, app.id, project.health_path)
            self._log(dep.id, f"Health path: {project.health_path} (from pyproject.toml)")

        def log_line(line: str) -> None:
            self._log(dep.id, line)

        await asyncio.to_thread(
            insights.analyze_build,
            project.root,
            project.entrypoint,
            self.paths.deployments / dep.id / insights.INSIGHTS_FILE,
            fail_on_blocking=app.fail_on_blocking,
            log=log_line,
        )

        engine: ImageEngine | None = getattr(self.fleet.backend, "images", None)
        if engine is not None:
            await self._build_image(app, dep, project, src, engine, log_line)
            return
        async with self._build_slots:
            env = await asyncio.to_thread(
                build_environment,
                project,
                self.paths.envs,
                python=self.settings.app_python,
                log=log_line,
                timeout=self.settings.build_timeout,
                confine=self._build_confinement(app.id),
            )
            # Recorded while holding the build slot: retention (which prunes environments) runs under the
            # same slot, so it never sees a built environment that no deployment references yet.
            await asyncio.to_thread(
                self._record_artifact,
                dep.id,
                project.entrypoint,
                str(project.import_dir.resolve().relative_to(src.resolve())),
                str(project.root.resolve().relative_to(src.resolve())),
                env.key,
            )

    async def _build_image(
        self, app: App, dep: Deployment, project: Project, src: Path, engine: ImageEngine, log_line: Log
    ) -> None:
        """Image backends: the revision's OCI image (runtime/images.py), pushed when a registry is set."""
        settings = self.settings
        registry = None
        if settings.registry:
            registry = Registry.parse(
                settings.registry, username=settings.registry_username, password=settings.registry_password
            )
        meta = ImageMeta(
            app_id=app.id,
            deployment_id=dep.id,
            hostname=settings.app_hostname(app.slug),
            health_path=app.health_path,
            app_name=app.slug,
        )
        limits = BuildLimits(
            cpus=settings.build_cpus, memory_mb=settings.build_memory_mb, timeout=settings.build_timeout
        )
        async with self._build_slots:
            built = await asyncio.to_thread(
                build_image,
                project,
                src,
                meta,
                engine=engine,
                cache_dir=self.paths.images,
                base_image=settings.base_image,
                log=log_line,
                limits=limits,
                registry=registry,
                observability=settings.tracing,
            )
            # Recorded under the build slot, like environments: retention never sees it unreferenced.
            await asyncio.to_thread(self._record_image, dep.id, project, src, built)

    async def _reuse(self, dep: Deployment) -> None:
        if dep.kind == "redeploy":
            # An env change redeploys whatever serves *now*: a push that finished while this waited for
            # the app's lock must not be undone by redeploying the build that served at request time.
            await asyncio.to_thread(self._rebase_on_current, dep.id)
            dep = await asyncio.to_thread(self._get, dep.id)
        source = await asyncio.to_thread(self._get, dep.source_deployment_id or "")
        if source.artifact_pruned or not self.paths.source(source.id).is_dir():
            raise RuntimeFailure(
                f"The build of deployment {source.slug} is no longer kept.",
                title="Nothing to roll back to",
                hint="Push the code again; builds older than the retention are removed.",
                code=S.DEPLOYING_FAILED,
            )
        word = "Rolling back to the build of" if dep.kind == "rollback" else "Redeploying the build of"
        self._log(dep.id, f"{word} deployment {source.slug} (no rebuild)")

    async def _bring_up(self, app: App, dep: Deployment, *, restoring: bool) -> None:
        artifact_id = dep.source_deployment_id if dep.kind != "upload" else dep.id
        artifact = await asyncio.to_thread(self._get, artifact_id or dep.id)
        src = self.paths.source(artifact.id)
        env_dir = self.paths.envs / (dep.environment_key or "")
        image = await asyncio.to_thread(self._image_of, artifact.id)
        runs_images = getattr(self.fleet.backend, "images", None) is not None
        if runs_images:  # the image is the whole build: another control plane's data directory is fine
            built = image is not None
        else:
            built = bool(dep.environment_key) and (env_dir / "bin" / "python").exists() and src.is_dir()
        if not built:
            raise RuntimeFailure(
                "The build of this deployment is missing from the data directory.",
                title="Build missing",
                hint="Push the code again to rebuild it.",
                code=S.DEPLOYING_FAILED,
            )
        env_vars = await asyncio.to_thread(self._env_for, app.id)
        if self.instrumentation is not None:  # the platform's variables win over the app's own
            python = None if runs_images else str(env_dir / "bin" / "python")
            env_vars.update(
                await self.instrumentation.instance_env(
                    app.id, app.slug, python, None if runs_images else env_dir
                )
            )
        cpus, memory_mb = await asyncio.to_thread(self.instance_size)
        spec = InstanceSpec(
            app_id=app.id,
            deployment_id=dep.id,
            hostname=self.settings.app_hostname(app.slug),
            python=env_dir / "bin" / "python",
            entrypoint=dep.entrypoint or "",
            app_dir=(src / (dep.import_dir or ".")).resolve(),
            workdir=(src / (dep.workdir or dep.import_dir or ".")).resolve(),
            env=env_vars,
            health_path=app.health_path,
            memory_mb=memory_mb,
            cpus=cpus,
        )
        if runs_images and image is not None:  # paths inside the image: the same wherever it runs
            spec = dataclasses.replace(
                spec,
                python=Path(image.python),
                entrypoint=image.entrypoint,
                app_dir=Path(image.app_dir),
                workdir=Path(image.workdir),
                image=image.reference,
            )
        scaling = scaling_settings(app)
        count = self.fleet.initial_count(app.id, scaling)
        if not restoring:
            await self._set(dep.id, S.DEPLOYING)
            self._log(dep.id, f"Starting {count} instance{'s' if count > 1 else ''}")
            await self._set(dep.id, S.VERIFYING)
        adopted = self._adopted(spec) if restoring else []
        instances = adopted or await self.fleet.start_instances(spec, count)
        if not restoring:
            self._log(
                dep.id,
                f"Ready: lifespan finished and {app.health_path} answered on {len(instances)} instance(s)",
            )
        if self.instrumentation is not None:
            where = (instances[0].host, instances[0].port) if instances else None
            matcher = await self.instrumentation.learn_routes(
                app.id, app.slug, spec.hostname, where, self.paths.deployments / artifact.id / "openapi.json"
            )
            if not restoring:
                self._log(dep.id, f"Routes: {len(matcher.templates)} from the app's OpenAPI schema")
        if not restoring:
            try:
                await self._check_contract(app, dep, artifact.id)
            except RuntimeFailure:
                await asyncio.gather(*(self.fleet.backend.stop(i) for i in instances), return_exceptions=True)
                raise
        revision = Revision(
            app_id=app.id,
            deployment_id=dep.id,
            hostname=spec.hostname,
            spec=spec,
            settings=scaling,
            serving=instances,
        )
        await self.fleet.activate(revision)
        if not restoring:
            await asyncio.to_thread(self._set_current, app.id, dep.id)

    async def _check_contract(self, app: App, dep: Deployment, artifact_id: str) -> None:
        """The new revision's API against the serving one's (both OpenAPI documents kept with their
        builds); refuses the switch on breaking changes when the push asked for it."""
        serving = self.fleet.serving.get(app.id)
        if serving is None:
            return
        old_artifact = await asyncio.to_thread(self._artifact_of, serving.deployment_id)
        if old_artifact == artifact_id:
            return
        old = await asyncio.to_thread(
            insights.read, self.paths.deployments / old_artifact / insights.OPENAPI_FILE
        )
        new = await asyncio.to_thread(
            insights.read, self.paths.deployments / artifact_id / insights.OPENAPI_FILE
        )

        def log_line(line: str) -> None:
            self._log(dep.id, line)

        await asyncio.to_thread(
            insights.compare_contract,
            old,
            new,
            serving.deployment_id,
            self.paths.deployments / dep.id / insights.CONTRACT_FILE,
            fail_on_breaking=dep.fail_on_breaking,
            log=log_line,
        )

    def _image_of(self, deployment_id: str) -> BuiltImage | None:
        """The deployment's built image: the builder's record in the data directory, else the database's."""
        image = _read_image(self.paths.image(deployment_id))
        if image is not None:
            return image
        with self.db.session() as s:
            dep = s.get(Deployment, deployment_id)
            record = dep.image if dep is not None else None
        if not record:
            return None
        try:
            return BuiltImage.from_json(json.loads(record))
        except (ValueError, TypeError, KeyError):
            return None

    def _set_health_path(self, app_id: str, health_path: str) -> None:
        with self.db.session() as s:
            row = s.get(App, app_id)
            if row is not None:
                row.health_path = health_path
                row.updated_at = utcnow()
                s.add(row)
                s.commit()

    def _artifact_of(self, deployment_id: str) -> str:
        with self.db.session() as s:
            dep = s.get(Deployment, deployment_id)
            if dep is None:
                return deployment_id
            return dep.source_deployment_id if dep.kind != "upload" and dep.source_deployment_id else dep.id

    def _adopted(self, spec: InstanceSpec) -> list[Instance]:
        """Instances of ``spec``'s revision the backend adopted after a restart (docker): they serve on."""
        adopted = [
            i
            for i in self.fleet.backend.instances()
            if i.spec.deployment_id == spec.deployment_id and i.state == InstanceState.WARM
        ]
        for instance in adopted:
            instance.spec = spec  # ours has the env and the limits; the recorded one is for adoption only
        return adopted

    # -- database helpers (run in threads) -------------------------------------------------------

    def instance_size(self) -> tuple[float, int]:
        """The platform's instance size (admin settings): the limits of backends that enforce them."""
        from control_plane import platform_settings

        with self.db.session() as s:
            size = platform_settings.load(s)
            return size.instance_cpu, size.instance_memory_mb

    def _get(self, deployment_id: str) -> Deployment:
        with self.db.session() as s:
            dep = s.get(Deployment, deployment_id)
            if dep is None:
                raise RuntimeFailure(f"Deployment {deployment_id} not found.", code=S.FAILED)
            return dep

    def _get_app(self, app_id: str) -> App:
        with self.db.session() as s:
            app = s.get(App, app_id)
            if app is None:
                raise RuntimeFailure("The app was deleted.", code=S.FAILED, title="App deleted")
            return app

    def _superseded(self, dep: Deployment) -> bool:
        if dep.kind != "upload":
            return False
        with self.db.session() as s:
            newer = s.exec(
                select(Deployment).where(
                    Deployment.app_id == dep.app_id,
                    Deployment.kind == "upload",
                    Deployment.status == S.READY_FOR_BUILD,
                    col(Deployment.created_at) > dep.created_at,
                )
            ).first()
            return newer is not None

    async def _set(self, deployment_id: str, status: str, *, finished: bool = False) -> None:
        def update() -> None:
            with self.db.session() as s:
                dep = s.get(Deployment, deployment_id)
                if dep is None:
                    return
                dep.status = status
                dep.updated_at = utcnow()
                if finished:
                    dep.finished_at = dep.updated_at
                s.add(dep)
                s.commit()

        await asyncio.to_thread(update)
        self.buildlogs.notify(deployment_id)

    async def _fail(self, deployment_id: str, code: str, title: str, message: str, hint: str) -> None:
        self._log(deployment_id, f"{title}: {message}")
        if hint:
            self._log(deployment_id, f"Hint: {hint}")

        def update() -> None:
            with self.db.session() as s:
                dep = s.get(Deployment, deployment_id)
                if dep is None:
                    return
                dep.status = _status_for(code)
                dep.error_code, dep.error_title, dep.error_message, dep.error_hint = (
                    code,
                    title,
                    message,
                    hint,
                )
                dep.updated_at = dep.finished_at = utcnow()
                s.add(dep)
                s.commit()

        await asyncio.to_thread(update)
        self.buildlogs.notify(deployment_id)

    def _record_artifact(
        self, deployment_id: str, entrypoint: str, import_dir: str, workdir: str, env_key: str
    ) -> None:
        with self.db.session() as s:
            dep = s.get(Deployment, deployment_id)
            assert dep is not None
            dep.entrypoint, dep.import_dir, dep.workdir, dep.environment_key = (
                entrypoint,
                import_dir,
                workdir,
                env_key,
            )
            s.add(dep)
            s.commit()

    def _record_image(self, deployment_id: str, project: Project, src: Path, built: BuiltImage) -> None:
        record = json.dumps(built.as_json(), indent=2)
        self.paths.image(deployment_id).write_text(record + "\n")
        with self.db.session() as s:  # any control plane (a new leader) runs it from there
            dep = s.get(Deployment, deployment_id)
            if dep is not None:
                dep.image = record
                s.add(dep)
                s.commit()
        self._record_artifact(
            deployment_id,
            project.entrypoint,
            str(project.import_dir.resolve().relative_to(src.resolve())),
            str(project.root.resolve().relative_to(src.resolve())),
            built.dependency_key,
        )

    def _rebase_on_current(self, deployment_id: str) -> None:
        with self.db.session() as s:
            dep = s.get(Deployment, deployment_id)
            app = s.get(App, dep.app_id) if dep else None
            current = (
                s.get(Deployment, app.current_deployment_id) if app and app.current_deployment_id else None
            )
            if dep is None or current is None:
                return
            dep.source_deployment_id = (
                current.source_deployment_id if current.kind != "upload" else current.id
            )
            dep.entrypoint, dep.import_dir, dep.workdir = (
                current.entrypoint,
                current.import_dir,
                current.workdir,
            )
            dep.environment_key = current.environment_key
            s.add(dep)
            s.commit()

    def _set_current(self, app_id: str, deployment_id: str) -> None:
        with self.db.session() as s:
            app = s.get(App, app_id)
            if app is not None:
                app.current_deployment_id = deployment_id
                app.updated_at = utcnow()
                s.add(app)
                s.commit()

    def _env_for(self, app_id: str) -> dict[str, str]:
        with self.db.session() as s:
            rows = s.exec(select(EnvVar).where(EnvVar.app_id == app_id)).all()
            return {r.name: self.secrets.decrypt(r.value) for r in rows}

    def _apps_to_restore(self) -> list[tuple[App, Deployment]]:
        with self.db.session() as s:
            out = []
            for app in s.exec(select(App).where(col(App.current_deployment_id).is_not(None))).all():
                dep = s.get(Deployment, app.current_deployment_id)
                if dep is not None:
                    out.append((app, dep))
            return out

    def _fail_interrupted(self) -> None:
        with self.db.session() as s:
            rows = s.exec(
                select(Deployment).where(
                    col(Deployment.status).in_(
                        [
                            S.EXTRACTING,
                            S.BUILDING,
                            S.BUILDING_IMAGE,
                            S.DEPLOYING,
                            S.VERIFYING,
                        ]
                    )
                )
            ).all()
            for dep in rows:
                dep.status = S.FAILED
                dep.error_code, dep.error_title = S.FAILED, "Interrupted"
                dep.error_message = "The control plane restarted during this deployment."
                dep.error_hint = "Push again."
                dep.finished_at = utcnow()
                s.add(dep)
            s.commit()

    def _retain(self, app_id: str) -> None:
        """Keep the artifacts of the newest ``keep_deployments`` successful uploads (the rollback
        targets) and whatever serves now; remove the rest, then the environments nothing uses."""
        with self.db.session() as s:
            app = s.get(App, app_id)
            protected: set[str | None] = set()
            if app is not None and app.current_deployment_id:
                current = s.get(Deployment, app.current_deployment_id)
                protected = {app.current_deployment_id, current.source_deployment_id if current else None}
            uploads = s.exec(
                select(Deployment)
                .where(Deployment.app_id == app_id, Deployment.kind == "upload")
                .where(col(Deployment.artifact_pruned).is_(False))
                .order_by(col(Deployment.created_at).desc())
            ).all()
            kept = 0
            for dep in uploads:
                if dep.id in protected or dep.status not in TERMINAL:
                    continue
                if dep.status in WENT_LIVE and kept < self.settings.keep_deployments:
                    kept += 1
                    continue
                self._remove_image(dep.id)
                shutil.rmtree(self.paths.deployments / dep.id, ignore_errors=True)
                dep.artifact_pruned = True
                s.add(dep)
            s.commit()
            keys = s.exec(
                select(Deployment.environment_key).where(col(Deployment.artifact_pruned).is_(False))
            ).all()
        prune_environments(self.paths.envs, {k for k in keys if k})
        prune_layers(self.paths.images, {k for k in keys if k})

    def _remove_image(self, deployment_id: str) -> None:
        """Untag a pruned build's image on the engine (the registry keeps what was pushed)."""
        engine: ImageEngine | None = getattr(self.fleet.backend, "images", None)
        image = self._image_of(deployment_id)
        if engine is None or image is None:
            return
        refs = [image.tag]
        if image.digest:  # pushed: the registry tag, then the digest reference
            refs.append(f"{image.reference.split('@')[0]}:{image.tag.rsplit(':', 1)[1]}")
        for ref in [*refs, image.reference]:
            try:
                engine.remove(ref)
            except Exception as exc:  # in use by a container, or already gone: nothing to do
                log.debug("image %s of deployment %s kept: %s", ref, deployment_id, exc)

    def _log(self, deployment_id: str, message: str) -> None:
        self.buildlogs.append(deployment_id, message)
        app_id = self._app_of.get(deployment_id)
        if app_id is not None:
            # The build's lines are the app's too (stream "build"): one place to search, and they
            # outlive the deployment's own log.
            self._app_line(app_id, deployment_id, "build", message, parse_level(message, "build"))

    def _app_line(self, app_id: str, deployment_id: str, stream: str, message: str, level: str) -> None:
        """A line of the platform's in the app's logs (no instance wrote it)."""
        if self.app_log is not None:
            self.app_log(
                LogRecord(
                    app_id=app_id,
                    deployment_id=deployment_id,
                    instance_id="",
                    stream=stream,
                    timestamp=datetime.now(UTC),
                    message=message,
                    level=level,
                )
            )


Log = Callable[[str], None]


def _read_image(path: Path) -> BuiltImage | None:
    try:
        return BuiltImage.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _status_for(code: str) -> str:
    """The deployment status of a failure ``code``: itself when it is one (``verification_failed_oom``),
    else the status it refines (``verifying_failed_breaking_changes`` → ``verifying_failed``), else
    ``failed``."""
    if code in S._value2member_map_:
        return code
    for status in (S.VERIFYING_FAILED, S.BUILDING_IMAGE_FAILED, S.DEPLOYING_FAILED, S.EXTRACTING_FAILED):
        if code.startswith(f"{status.value}_"):
            return status.value
    return S.FAILED.value
