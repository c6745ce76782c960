"""The OCI image artifact: a revision of an app as a container image, assembled layer by layer, no Dockerfile.

    base image (python:3.12-slim)      its layers, untouched
    ├── dependency layer               {site-packages}/...   keyed by (lock, Python X.Y, platform): reused
    ├── observability layer            /opt/fastapi-deploy/otel/  OpenTelemetry for tracing (optional;
    │                                  keyed by Python X.Y, platform, the app's own OpenTelemetry version)
    ├── runtime layer                  /opt/fastapi-deploy/{launcher,entry,instrument,looplag}.py,
    │                                  the ``app`` user (10001)
    └── app layer                      /app/...              the uploaded source: the only layer a
                                                             code-only change rebuilds

The dependencies are installed **on the build host** with ``uv pip install --target`` for the image's own
Python version and platform (``--python-version``/``--python-platform``, both read once from the base
image by running its ``python3``); the host reaches the package index, a container may not. Their
bytecode is then compiled by the image's interpreter in a throwaway container (``--invalidation-mode
unchecked-hash``: valid whatever the mtimes, so instances never compile on start). Each layer is written
by GNU tar with sorted names, fixed mtimes and owners, so equal inputs give byte-equal tarballs; the
dependency tarball is kept in ``cache_dir/layers/{key}.tar``, so its digest is reused byte for byte by
every revision with the same lock, and the engine already holds it: a code-only rebuild writes the small
app layer and the image config, nothing else.

The image is handed to the engine as a docker-archive (``manifest.json``, config, layer tarballs) that
leaves out every layer the engine already has, and is loaded (``docker load``). With a registry
configured it is then pushed and from then on named by digest.

The image runs the launcher as the non-root user ``app``: ``entry.py`` passes the launcher a duplicate of
stdout as its ready descriptor, so the ready line (``{"port": 8000, "pid": 1}``, written once the lifespan
startup finished) arrives in the container's log, where the docker backend waits for it. The image's
HEALTHCHECK asks the health path with the app's Host, as the router would. Labels record app, deployment,
source digest and lock hash. The app's env vars (secrets included) are never part of an image: the
backend passes them when it starts a container; build steps run with an allow-listed environment.

The engine (:class:`ImageEngine`) is what the image backend supplies (``runtime/backends/docker.py``):
this module never imports a container client.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import os
import re
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from runtime import instrument as _instrument_module
from runtime import launcher as _launcher_module
from runtime import looplag as _looplag_module
from runtime.builder import build_env, find_uv
from runtime.detect import Project
from runtime.errors import BuildError, BuildTimeout
from runtime.otel_layer import SDK, app_otel_version, ensure_layer
from runtime.registry import Registry

__all__ = [
    "APP_ROOT",
    "CONTAINER_PORT",
    "IMAGE_BUILDER_VERSION",
    "LABEL",
    "BaseImage",
    "BuildLimits",
    "BuiltImage",
    "ImageEngine",
    "ImageMeta",
    "build_image",
    "dependency_key",
    "probe_base",
    "prune_layers",
]

IMAGE_BUILDER_VERSION = "1"
"""Part of every dependency key: bump it when a change here makes existing layers wrong."""
CONTAINER_PORT = 8000
APP_ROOT = "/app"
RUNTIME_DIR = "/opt/fastapi-deploy"
APP_USER, APP_UID = "app", 10001
LABEL = "dev.fastapi-deploy"
"""Prefix of every label the platform puts on images and containers."""
DEPS_REPOSITORY = "fastapi-deploy-deps"
"""Base + dependency layer + runtime layer, tagged per (dependency key, runtime, base): keeps those
layers in the engine, and says whether they are there."""

Log = Callable[[str], None]

_EPOCH = 0  # every file's mtime in our layers: equal inputs, equal bytes
_TAIL = 25
_MANYLINUX_MAX = 40  # the newest manylinux_2_X uv (0.13) accepts; wheels need no newer
_EXPORT = ("export", "--frozen", "--no-hashes", "--no-emit-project", "--no-dev", "--no-editable", "--quiet")

_PROBE = """\
import json, platform, site, sys, sysconfig
sites = site.getsitepackages() if hasattr(site, "getsitepackages") else []
def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
print(json.dumps({
    "python": sys.executable, "version": platform.python_version(),
    "implementation": sys.implementation.name, "machine": platform.machine(),
    "libc": list(platform.libc_ver()), "site": sites[0] if sites else sysconfig.get_paths()["purelib"],
    "passwd": read("/etc/passwd"), "group": read("/etc/group"),
}))
"""

# The container's entrypoint: the launcher, told to write its ready line to a duplicate of stdout.
_ENTRY = '''\
"""fastapi-deploy container entrypoint: run the launcher with a duplicate of stdout as its ready fd, so
the ready line (written after the lifespan startup) reaches the container's log. The launcher replaces
this process (PID 1 stays the launcher: it gets the stop signal)."""
import os
import sys

fd = os.dup(1)
os.set_inheritable(fd, True)
launcher = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launcher.py")
os.execv(sys.executable, [sys.executable, launcher, "--ready-fd", str(fd), *sys.argv[1:]])
'''

# The HEALTHCHECK: the health path, with the app's Host, on the launcher's port (stdlib only).
_HEALTH = (
    "import os, sys, http.client as h\n"
    "c = h.HTTPConnection('127.0.0.1', int(os.environ.get('FASTAPI_DEPLOY_PORT', '8000')), timeout=3)\n"
    "c.request('GET', os.environ.get('FASTAPI_DEPLOY_HEALTH_PATH', '/'),"
    " headers={'Host': os.environ.get('FASTAPI_DEPLOY_HOSTNAME', 'localhost')})\n"
    "sys.exit(0 if c.getresponse().status < 500 else 1)\n"
)


class ImageEngine(Protocol):
    """What building needs from a container engine (the docker backend implements it)."""

    def image_info(self, ref: str) -> dict[str, Any] | None:
        """``docker image inspect``-shaped dict (``Id``, ``RootFS.Layers``, ``Config``, ``Architecture``,
        ``Os``, ``RepoDigests``), or ``None`` when the engine does not have ``ref``."""
        ...

    def ensure_image(self, ref: str, log: Log) -> None:
        """Make ``ref`` available (pull it when missing). Raises BuildError when it cannot."""
        ...

    def run_once(
        self,
        image: str,
        argv: list[str],
        *,
        mounts: dict[str, str] | None = None,
        limits: BuildLimits | None = None,
        timeout: float = 120.0,
    ) -> tuple[int, str]:
        """Run ``argv`` in a throwaway container as root, no network, ``mounts`` (host dir → container
        dir, read-write), within ``limits``; its exit status and output. Raises BuildTimeout."""
        ...

    def load_archive(self, archive: Path) -> None:
        """Load a docker-archive (``docker load``). Raises BuildError."""
        ...

    def push(self, ref: str, registry: Registry, log: Log) -> str:
        """Push the tagged ``ref``; the manifest digest (``sha256:...``). Raises BuildError."""
        ...

    def tag(self, image: str, ref: str) -> None: ...

    def remove(self, ref: str) -> None:
        """Drop the reference ``ref`` (the image goes with its last one, unless a container uses it)."""
        ...


@dataclass(frozen=True)
class BuildLimits:
    """What one build may take, so a heavy build cannot starve the instances that serve."""

    cpus: float | None = 1.0
    """Cores: install and compile steps are pinned to this many cores (rounded up) at low priority
    (``nice 10``); the compile container gets a CFS quota of exactly this."""
    memory_mb: int | None = 4096
    """MiB: the compile container's memory limit; the host-side install's address-space limit
    (``RLIMIT_AS``: virtual memory, so keep it generous: uv reserves more than it touches)."""
    timeout: float = 600.0
    """Seconds for the whole build; then ``building_image_failed_timeout``."""


@dataclass(frozen=True)
class BaseImage:
    """The base image, as its own ``python3`` describes it (probed once per image id, cached)."""

    ref: str
    id: str
    layers: tuple[str, ...]
    architecture: str
    os: str
    env: tuple[str, ...]
    python: str
    """The interpreter's path inside the image (``/usr/local/bin/python3``, ``/usr/bin/python3``)."""
    version: str
    """``3.12.7``."""
    implementation: str
    site_dir: str
    """Where the dependency layer goes: the interpreter's first site-packages directory."""
    platform: str
    """uv's ``--python-platform`` for the image (``x86_64-manylinux_2_36``)."""
    passwd: str
    group: str

    @property
    def minor(self) -> str:
        return ".".join(self.version.split(".")[:2])


@dataclass(frozen=True)
class ImageMeta:
    """Which revision an image is: recorded in its labels and environment."""

    app_id: str
    deployment_id: str
    hostname: str
    health_path: str = "/"
    app_name: str = ""


@dataclass(frozen=True)
class BuiltImage:
    image_id: str
    """``sha256:`` of the image config: what the engine calls the image."""
    tag: str
    """Local name: ``{repository}:{deployment_id}``."""
    reference: str
    """What to run: ``{registry repository}@sha256:...`` when pushed, else ``image_id``."""
    digest: str | None
    """The registry manifest digest, when pushed."""
    dependency_key: str
    dependency_layer: str
    """``sha256:`` diff id of the dependency layer."""
    dependencies_reused: bool
    """The dependency layer existed (nothing installed)."""
    app_layer: str
    layers: tuple[str, ...]
    size: int
    """Bytes of the image's layers, uncompressed (base included)."""
    python: str
    entrypoint: str
    app_dir: str
    workdir: str
    labels: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            name: (list(value) if isinstance(value, tuple) else value)
            for name, value in self.__dict__.items()
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BuiltImage:
        data = dict(data)
        data["layers"] = tuple(data["layers"])
        return cls(**data)


# -- the build ------------------------------------------------------------------------------------------


def build_image(
    project: Project,
    source: Path,
    meta: ImageMeta,
    *,
    engine: ImageEngine,
    cache_dir: Path,
    base_image: str,
    log: Log,
    limits: BuildLimits = BuildLimits(),
    registry: Registry | None = None,
    repository: str = "fastapi-deploy-apps",
    uv: str | None = None,
    observability: bool = True,
) -> BuiltImage:
    """Build (and, with ``registry``, push) the image of ``project``, extracted at ``source``.

    ``log`` receives what happens and why, then the output of the steps as they run. Local images are
    named ``{repository}/{app_id}:{deployment_id}``.

    Raises:
        BuildError: the base image is unusable, installing or loading failed, the push failed.
        BuildTimeout: the build took longer than ``limits.timeout``; its processes were killed.
    """
    started = time.monotonic()
    deadline = started + limits.timeout
    cache_dir.mkdir(parents=True, exist_ok=True)
    base = probe_base(engine, base_image, cache_dir, limits, log)
    log(f"Base image {base_image} ({base.id[7:19]}): Python {base.version} on {base.platform}")
    key = dependency_key(project, base)
    deps_tar, deps_id, built, otel_version = _dependency_layer(
        project, base, key, engine, cache_dir, limits, deadline, uv, log
    )
    otel: tuple[Path, str, str] | None = None
    if observability:
        otel = _observability_layer(base, otel_version, engine, cache_dir, limits, deadline, uv, log)
    runtime_tar = _runtime_layer(base)
    runtime_id = _sha256_bytes(runtime_tar)
    # base + dependencies (+ observability) + runtime, tagged: it keeps those layers in the engine, and
    # when the tag is there the archive carries the app layer alone (docker load's cost is the layers it
    # registers).
    otel_part = otel[1][7:19] if otel else "none"
    prefix_tag = f"{DEPS_REPOSITORY}:{key[:32]}-{runtime_id[7:23]}-{otel_part}-{base.id[7:19]}"
    prefix = (*base.layers, deps_id, *((otel[1],) if otel else ()), runtime_id)
    have_prefix = _layers_of(engine, prefix_tag) == prefix

    import_dir = project.import_dir.resolve().relative_to(source.resolve()).as_posix()
    workdir = project.root.resolve().relative_to(source.resolve()).as_posix()
    app_dir = _join(APP_ROOT, import_dir)
    work = _join(APP_ROOT, workdir)
    with tempfile.TemporaryDirectory(prefix=".image-", dir=cache_dir) as tmp:
        staging = Path(tmp)
        app_tar = staging / "app.tar"
        _tar_directory(source, app_tar, "app", limits, deadline, exclude=("__pycache__", ".venv", ".git"))
        app_id = _sha256_file(app_tar)
        layers = (*prefix, app_id)
        labels = {
            f"{LABEL}.app": meta.app_id,
            f"{LABEL}.deployment": meta.deployment_id,
            f"{LABEL}.source-digest": app_id,
            f"{LABEL}.lock-hash": key,
            f"{LABEL}.dependencies": project.dependencies.kind,
            f"{LABEL}.base-image": base_image,
            "org.opencontainers.image.title": meta.app_name or meta.app_id,
        }
        argv = [
            base.python,
            f"{RUNTIME_DIR}/entry.py",
            "--app",
            project.entrypoint,
            "--app-dir",
            app_dir,
            "--workdir",
            work,
            "--host",
            "0.0.0.0",
            "--port",
            str(CONTAINER_PORT),
        ]
        config = _image_config(base, layers, labels, argv, work, meta, base_image, otel[2] if otel else None)
        config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        image_id = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        tag = f"{repository}/{meta.app_id.lower()}:{meta.deployment_id.lower()}"

        images: list[tuple[str, bytes, tuple[str, ...]]] = []
        files: dict[str, Path | bytes] = {}
        if not have_prefix:
            images.append((prefix_tag, _prefix_config(base, prefix, key), prefix))
            files[_layer_path(deps_id)] = deps_tar
            if otel is not None:
                files[_layer_path(otel[1])] = otel[0]
            files[_layer_path(runtime_id)] = runtime_tar
        images.append((tag, config_bytes, layers))
        files[_layer_path(app_id)] = app_tar
        archive = staging / "image.tar"
        _write_archive(archive, images, files)
        log(
            "Dependency layer "
            + ("reused" if have_prefix else ("built" if built else "loaded from the cache"))
            + f" ({deps_id[7:19]}); app layer {app_id[7:19]} ({app_tar.stat().st_size / 1024:.0f} KiB)"
        )
        _check_time(deadline, limits)
        engine.load_archive(archive)
    info = engine.image_info(tag)
    if info is None or info.get("Id") != image_id:
        raise BuildError(
            f"The engine did not load the image as built (expected {image_id}, found "
            f"{info.get('Id') if info else 'nothing'}).",
            hint="Check the Docker engine's log; ask the platform operator.",
        )
    size = int(info.get("Size") or 0)
    reference, digest = image_id, None
    if registry is not None:
        remote = f"{registry.repository(meta.app_id)}:{meta.deployment_id.lower()}"
        engine.tag(image_id, remote)
        log(f"Pushing to {registry.repository(meta.app_id)}")
        _check_time(deadline, limits)
        digest = engine.push(remote, registry, log)
        reference = f"{registry.repository(meta.app_id)}@{digest}"
        log(f"Pushed {reference}")
    log(f"Image {image_id[7:19]} built in {time.monotonic() - started:.1f}s ({size / 2**20:.0f} MiB)")
    return BuiltImage(
        image_id=image_id,
        tag=tag,
        reference=reference,
        digest=digest,
        dependency_key=key,
        dependency_layer=deps_id,
        dependencies_reused=not built,
        app_layer=app_id,
        layers=layers,
        size=size,
        python=base.python,
        entrypoint=project.entrypoint,
        app_dir=app_dir,
        workdir=work,
        labels=labels,
    )


def dependency_key(project: Project, base: BaseImage) -> str:
    """The content address of the dependency layer: the spec's kind and files' bytes, the image's Python
    (implementation, X.Y), platform and site directory, and :data:`IMAGE_BUILDER_VERSION`."""
    digest = hashlib.sha256()

    def add(label: str, value: bytes) -> None:
        digest.update(f"{label}\0{len(value)}\0".encode())
        digest.update(value)

    spec = project.dependencies
    add("image-builder", IMAGE_BUILDER_VERSION.encode())
    add("kind", spec.kind.encode())
    root = spec.files[0].parent if spec.files else None
    for path in spec.files:
        try:
            add(f"file:{os.path.relpath(path, root)}", path.read_bytes())
        except OSError as exc:
            raise BuildError(
                f"{path.name} could not be read: {exc.strerror}.", hint="Check the file and deploy again."
            ) from exc
    for label, value in (
        ("implementation", base.implementation),
        ("python", base.minor),
        ("platform", base.platform),
        ("site", base.site_dir),
    ):
        add(label, value.encode())
    return digest.hexdigest()


def probe_base(
    engine: ImageEngine, ref: str, cache_dir: Path, limits: BuildLimits | None = None, log: Log | None = None
) -> BaseImage:
    """Describe the base image ``ref`` (pulled when the engine lacks it): its layers and config from the
    engine, its Python by running ``python3`` in it once per image id (cached in ``cache_dir``)."""
    info = engine.image_info(ref)
    if info is None:
        engine.ensure_image(ref, log or (lambda line: None))
        info = engine.image_info(ref)
    if info is None:
        raise BuildError(
            f"The base image {ref} is not available.", hint="Ask the platform operator to pull or build it."
        )
    image_id = str(info["Id"])
    cached = cache_dir / f"base-{image_id.removeprefix('sha256:')}.json"
    try:
        facts = json.loads(cached.read_text())
    except (OSError, ValueError):
        code, out = engine.run_once(ref, ["python3", "-I", "-c", _PROBE], limits=limits, timeout=60)
        try:
            facts = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise BuildError(
                f"The base image {ref} has no usable python3 (exit status {code}): {out[-500:]}",
                hint="Configure a base image with Python 3 (FASTAPI_DEPLOY_BASE_IMAGE).",
            ) from None
        _atomic_write(cached, json.dumps(facts).encode())
    config = info.get("Config") or {}
    return BaseImage(
        ref=ref,
        id=image_id,
        layers=tuple(info["RootFS"]["Layers"]),
        architecture=str(info.get("Architecture") or "amd64"),
        os=str(info.get("Os") or "linux"),
        env=tuple(config.get("Env") or ()),
        python=str(facts["python"]),
        version=str(facts["version"]),
        implementation=str(facts["implementation"]),
        site_dir=str(facts["site"]),
        platform=_uv_platform(str(facts["machine"]), list(facts["libc"])),
        passwd=str(facts["passwd"]),
        group=str(facts["group"]),
    )


def prune_layers(cache_dir: Path, keep: set[str]) -> list[str]:
    """Delete cached dependency tarballs whose key is not in ``keep``; the deleted keys."""
    removed = []
    for path in (cache_dir / "layers").glob("*.tar"):
        if path.stem not in keep:
            with _locked(cache_dir / "layers", path.stem, wait=False) as held:
                if held:
                    path.unlink(missing_ok=True)
                    path.with_suffix(".json").unlink(missing_ok=True)
                    removed.append(path.stem)
    return removed


# -- layers ----------------------------------------------------------------------------------------------


def _dependency_layer(
    project: Project,
    base: BaseImage,
    key: str,
    engine: ImageEngine,
    cache_dir: Path,
    limits: BuildLimits,
    deadline: float,
    uv: str | None,
    log: Log,
) -> tuple[Path, str, bool, str | None]:
    """The dependency tarball of ``key`` (built unless cached): path, diff id, whether it was built, and
    the OpenTelemetry API version in it (None: the app has none)."""
    layers = cache_dir / "layers"
    layers.mkdir(parents=True, exist_ok=True)
    tar, meta = layers / f"{key}.tar", layers / f"{key}.json"
    with _locked(layers, key, wait=True, deadline=deadline, limits=limits) as _:
        if tar.is_file() and meta.is_file():
            log(f"Dependencies unchanged (key {key[:12]}…), reusing their layer")
            recorded = json.loads(meta.read_text())
            otel = recorded.get("otel") if "otel" in recorded else _otel_in_tar(tar)
            return tar, str(recorded["diff_id"]), False, otel
        log(
            f"New dependencies (key {key[:12]}…): installing from {project.dependencies.kind} "
            f"for Python {base.minor} on {base.platform}"
        )
        with tempfile.TemporaryDirectory(prefix=f".{key[:12]}-", dir=layers) as tmp:
            target = Path(tmp) / "site"
            target.mkdir()
            _install(project, base, target, Path(tmp), limits, deadline, uv, log)
            _fix_scripts(target, base.python)
            otel = app_otel_version([target])
            _compile(engine, base, target, limits, deadline, log)
            staged = Path(tmp) / "layer.tar"
            _tar_directory(target, staged, base.site_dir.lstrip("/"), limits, deadline)
            diff_id = _sha256_file(staged)
            os.replace(staged, tar)
            record = {"diff_id": diff_id, "built_at": time.time(), "otel": otel}
            _atomic_write(meta, json.dumps(record).encode())
        return tar, diff_id, True, otel


def _otel_in_tar(tar: Path) -> str | None:
    """The opentelemetry-api version a dependency tarball holds (for layers cached before it was noted)."""
    try:
        with tarfile.open(tar) as archive:
            for name in archive.getnames():
                base = name.rstrip("/").rsplit("/", 1)[-1]
                if base.startswith("opentelemetry_api-") and base.endswith(".dist-info"):
                    return base[len("opentelemetry_api-") : -len(".dist-info")]
    except (OSError, tarfile.TarError):
        return None
    return None


OTEL_DIR = "/opt/fastapi-deploy/otel"


def _observability_layer(
    base: BaseImage,
    otel_version: str | None,
    engine: ImageEngine,
    cache_dir: Path,
    limits: BuildLimits,
    deadline: float,
    uv: str | None,
    log: Log,
) -> tuple[Path, str, str] | None:
    """OpenTelemetry for the image's Python (``runtime/otel_layer.py``), under :data:`OTEL_DIR`, compiled
    by the image's interpreter: (tarball, diff id, SDK version), cached like a dependency layer and shared
    by every app with the same Python and OpenTelemetry version. None (with a log line) if it cannot be
    built: the app is then deployed untraced, never failed for it."""
    sdk = otel_version or SDK
    layers = cache_dir / "otel-layers"
    layers.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(
        f"{base.minor}\0{base.platform}\0{sdk}\0{IMAGE_BUILDER_VERSION}".encode()
    ).hexdigest()
    tar, meta = layers / f"{key[:32]}.tar", layers / f"{key[:32]}.json"
    with _locked(layers, key[:32], wait=True, deadline=deadline, limits=limits) as _:
        if tar.is_file() and meta.is_file():
            return tar, str(json.loads(meta.read_text())["diff_id"]), sdk
        try:
            source = ensure_layer(
                cache_dir / "otel",
                find_uv(uv),
                python_version=base.minor,
                python_platform=base.platform,
                sdk=sdk,
                env=_build_env(),
                timeout=_left(deadline, limits),
            )
        except (BuildError, ValueError) as exc:
            log(f"No tracing for this image: the observability layer could not be built ({exc})")
            return None
        with tempfile.TemporaryDirectory(prefix=f".{key[:12]}-", dir=layers) as tmp:
            target = Path(tmp) / "otel"
            shutil.copytree(source, target, ignore=shutil.ignore_patterns(".fastapi-deploy-*", "__pycache__"))
            _compile_dir(engine, base, target, OTEL_DIR, limits, deadline, log)
            staged = Path(tmp) / "layer.tar"
            _tar_directory(target, staged, OTEL_DIR.lstrip("/"), limits, deadline)
            diff_id = _sha256_file(staged)
            os.replace(staged, tar)
            _atomic_write(meta, json.dumps({"diff_id": diff_id, "sdk": sdk}).encode())
        log(f"Observability layer built (OpenTelemetry {sdk}, {diff_id[7:19]})")
        return tar, diff_id, sdk


def _install(
    project: Project,
    base: BaseImage,
    target: Path,
    scratch: Path,
    limits: BuildLimits,
    deadline: float,
    uv: str | None,
    log: Log,
) -> None:
    uv_bin = find_uv(uv)
    spec = project.dependencies
    spec_dir = spec.files[0].parent if spec.files else project.root
    install = [
        uv_bin,
        "pip",
        "install",
        "--no-config",
        "--target",
        str(target),
        "--python",
        sys.executable,
        "--python-version",
        base.minor,
        "--python-platform",
        base.platform,
        "--link-mode",
        "copy",
        "--no-installer-metadata",
    ]
    hint = f"The dependencies must install for Python {base.minor} on {base.platform} (wheels for Linux)."
    if spec.kind == "uv.lock":
        exported = scratch / "uv-lock-requirements.txt"
        _step(
            [uv_bin, *_EXPORT, "-o", str(exported)],
            spec_dir,
            limits,
            deadline,
            log,
            "Reading uv.lock",
            "Run `uv lock` so uv.lock matches pyproject.toml, include both files, and deploy again.",
        )
        args = ["-r", str(exported)]
    elif spec.kind == "default":
        log("No uv.lock, pylock.toml, requirements.txt or pyproject.toml dependencies: fastapi[standard]")
        args = ["fastapi[standard]"]
    else:
        args = ["-r", str(spec.files[0])]
    _step(
        [*install, *args], spec_dir, limits, deadline, log, f"Installing dependencies from {spec.kind}", hint
    )
    if not (target / "uvicorn").is_dir():
        log("uvicorn is not among the dependencies; installing it to serve the app")
        _step([*install, "uvicorn"], scratch, limits, deadline, log, "Installing uvicorn", hint)


def _fix_scripts(target: Path, python: str) -> None:
    # Console scripts name the build host's interpreter; inside the image it is ``python``.
    for script in (target / "bin").glob("*") if (target / "bin").is_dir() else ():
        try:
            data = script.read_bytes()
        except OSError:
            continue
        if data.startswith(b"#!") and b"python" in data.split(b"\n", 1)[0]:
            script.write_bytes(f"#!{python}".encode() + data[data.index(b"\n") :] if b"\n" in data else data)


def _compile(
    engine: ImageEngine, base: BaseImage, target: Path, limits: BuildLimits, deadline: float, log: Log
) -> None:
    """Bytecode by the image's own interpreter, at the path it will have: no compile at instance start."""
    _compile_dir(engine, base, target, base.site_dir, limits, deadline, log)


def _compile_dir(
    engine: ImageEngine,
    base: BaseImage,
    target: Path,
    where: str,
    limits: BuildLimits,
    deadline: float,
    log: Log,
) -> None:
    argv = [
        "python3",
        "-I",
        "-m",
        "compileall",
        "-q",
        "-j",
        "0",
        "--invalidation-mode",
        "unchecked-hash",
        where,
    ]
    code, out = engine.run_once(
        base.ref, argv, mounts={str(target): where}, limits=limits, timeout=_left(deadline, limits)
    )
    if code != 0:
        # Not fatal: instances then compile in memory at each start (slower), the app still runs.
        log(f"Compiling the dependencies' bytecode failed (status {code}); continuing without it")
        for line in out.splitlines()[-_TAIL:]:
            log(line)


def _runtime_layer(base: BaseImage) -> bytes:
    """The launcher, its entrypoint, and the ``app`` user: a few KiB, built in memory, deterministic."""
    passwd = base.passwd if base.passwd.endswith("\n") or not base.passwd else base.passwd + "\n"
    group = base.group if base.group.endswith("\n") or not base.group else base.group + "\n"
    if not re.search(rf"^{APP_USER}:", passwd, re.M):
        passwd += f"{APP_USER}:x:{APP_UID}:{APP_UID}::/home/{APP_USER}:/usr/sbin/nologin\n"
    if not re.search(rf"^{APP_USER}:", group, re.M):
        group += f"{APP_USER}:x:{APP_UID}:\n"
    launcher = Path(_launcher_module.__file__).read_bytes()
    entries: list[tuple[str, bytes | None, int, int]] = [  # name, content (None: a directory), mode, uid
        ("etc/group", group.encode(), 0o644, 0),
        ("etc/passwd", passwd.encode(), 0o644, 0),
        (f"home/{APP_USER}", None, 0o755, APP_UID),
        ("opt/fastapi-deploy", None, 0o755, 0),
        ("opt/fastapi-deploy/entry.py", _ENTRY.encode(), 0o644, 0),
        ("opt/fastapi-deploy/launcher.py", launcher, 0o644, 0),
        ("opt/fastapi-deploy/instrument.py", Path(_instrument_module.__file__).read_bytes(), 0o644, 0),
        ("opt/fastapi-deploy/looplag.py", Path(_looplag_module.__file__).read_bytes(), 0o644, 0),
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, content, mode, uid in entries:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode, info.uid, info.gid = _EPOCH, mode, uid, uid
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _tar_directory(
    directory: Path,
    out: Path,
    prefix: str,
    limits: BuildLimits,
    deadline: float,
    exclude: tuple[str, ...] = (),
) -> None:
    """A reproducible tarball of ``directory`` under ``prefix``: sorted, mtime 0, root-owned, no
    group/other write, hard links copied (GNU tar: C speed, and off the control plane's GIL)."""
    cmd = [
        "tar",
        "--create",
        "--file",
        str(out),
        "--directory",
        str(directory),
        "--sort=name",
        "--format=gnu",
        f"--mtime=@{_EPOCH}",
        "--owner=0",
        "--group=0",
        "--numeric-owner",
        "--mode=go-w,a+rX",
        "--hard-dereference",
        "--no-acls",
        "--no-xattrs",
        "--no-selinux",
        f"--transform=flags=r;s,^\\.,{prefix},",
        *(f"--exclude={pattern}" for pattern in exclude),
        ".",
    ]
    code, tail = _run(cmd, directory, _build_env(), lambda _line: None, limits, deadline)
    if code != 0:
        raise BuildError(
            f"Packing the layer failed (tar exited with status {code}):\n" + "\n".join(tail),
            hint="Ask the platform operator (GNU tar is needed on the build host).",
        )


def _image_config(
    base: BaseImage,
    layers: tuple[str, ...],
    labels: dict[str, str],
    argv: list[str],
    workdir: str,
    meta: ImageMeta,
    base_ref: str,
    otel_sdk: str | None = None,
) -> dict[str, Any]:
    env = [
        e for e in base.env if not e.startswith(("HOME=", "PYTHONDONTWRITEBYTECODE=", "PYTHONUNBUFFERED="))
    ]
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env += [
        f"HOME=/home/{APP_USER}",
        "PYTHONUNBUFFERED=1",
        "PYTHONDONTWRITEBYTECODE=1",
        f"FASTAPI_DEPLOY_APP_ID={meta.app_id}",
        f"FASTAPI_DEPLOY_DEPLOYMENT_ID={meta.deployment_id}",
        f"FASTAPI_DEPLOY_HOSTNAME={meta.hostname}",
        f"FASTAPI_DEPLOY_HEALTH_PATH={meta.health_path}",
        f"FASTAPI_DEPLOY_PORT={CONTAINER_PORT}",
    ]
    if otel_sdk is not None:  # tracing happens only when the platform also sets the OTLP endpoint
        env += [f"FASTAPI_DEPLOY_OTEL_PATH={OTEL_DIR}", f"FASTAPI_DEPLOY_OTEL_VERSION={otel_sdk}"]
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    n_base = len(base.layers)
    history = [{"created": created, "created_by": f"{base_ref} (layer {i + 1})"} for i in range(n_base)]
    history += [
        {
            "created": created,
            "created_by": "fastapi-deploy: dependencies",
            "comment": labels[f"{LABEL}.lock-hash"],
        },
        *(
            [{"created": created, "created_by": f"fastapi-deploy: OpenTelemetry {otel_sdk}"}]
            if otel_sdk is not None
            else []
        ),
        {"created": created, "created_by": "fastapi-deploy: launcher and the app user"},
        {"created": created, "created_by": "fastapi-deploy: app source"},
    ]
    second = 1_000_000_000
    return {
        "architecture": base.architecture,
        "os": base.os,
        "created": created,
        "config": {
            "User": f"{APP_UID}:{APP_UID}",
            "Env": env,
            "Entrypoint": argv,
            "WorkingDir": workdir,
            "ExposedPorts": {f"{CONTAINER_PORT}/tcp": {}},
            "Labels": labels,
            "StopSignal": "SIGTERM",
            "Healthcheck": {
                "Test": ["CMD", base.python, "-I", "-c", _HEALTH],
                "Interval": 10 * second,
                "Timeout": 4 * second,
                "StartPeriod": 60 * second,
                "Retries": 3,
            },
        },
        "rootfs": {"type": "layers", "diff_ids": list(layers)},
        "history": history,
    }


def _prefix_config(base: BaseImage, chain: tuple[str, ...], key: str) -> bytes:
    config = {
        "architecture": base.architecture,
        "os": base.os,
        "created": "1970-01-01T00:00:00Z",
        "config": {"Env": list(base.env), "Labels": {f"{LABEL}.lock-hash": key}},
        "rootfs": {"type": "layers", "diff_ids": list(chain)},
        "history": [{"created_by": f"layer {i + 1}"} for i in range(len(chain))],
    }
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def _write_archive(
    out: Path, images: list[tuple[str, bytes, tuple[str, ...]]], files: dict[str, Path | bytes]
) -> None:
    """A docker-archive (``docker save`` format). Layers the engine already has are named in the manifest
    but left out: ``docker load`` only reads a layer whose chain it does not have."""
    manifest = []
    configs: dict[str, bytes] = {}
    for tag, config, layers in images:
        name = hashlib.sha256(config).hexdigest() + ".json"
        configs[name] = config
        manifest.append({"Config": name, "RepoTags": [tag], "Layers": [_layer_path(d) for d in layers]})
    with tarfile.open(out, mode="w", format=tarfile.GNU_FORMAT) as tar:

        def add(name: str, content: Path | bytes) -> None:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = _EPOCH, 0o644
            if isinstance(content, Path):
                info.size = content.stat().st_size
                with content.open("rb") as f:
                    tar.addfile(info, f)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))

        add("manifest.json", json.dumps(manifest).encode())
        for name, config in configs.items():
            add(name, config)
        for name, content in files.items():
            add(name, content)


def _layer_path(diff_id: str) -> str:
    return f"{diff_id.removeprefix('sha256:')}/layer.tar"


def _layers_of(engine: ImageEngine, ref: str) -> tuple[str, ...] | None:
    info = engine.image_info(ref)
    return tuple(info["RootFS"]["Layers"]) if info else None


# -- processes under limits -----------------------------------------------------------------------------


def _step(
    cmd: list[str], cwd: Path, limits: BuildLimits, deadline: float, log: Log, what: str, hint: str
) -> None:
    code, tail = _run(cmd, cwd, _build_env(), log, limits, deadline)
    if code != 0:
        output = "\n".join(tail) or "(no output)"
        raise BuildError(f"{what} failed (uv exited with status {code}):\n{output}", hint=hint)


def _run(
    cmd: list[str], cwd: Path, env: dict[str, str], log: Log, limits: BuildLimits, deadline: float
) -> tuple[int, list[str]]:
    """Run ``cmd`` within ``limits`` (low priority, pinned cores, address-space cap), stdout and stderr
    merged and passed to ``log`` line by line; its status and last lines. Killed (with its process
    group) at ``deadline``: BuildTimeout."""
    tail: deque[str] = deque(maxlen=_TAIL)
    cores = _cores(limits.cpus)
    memory = limits.memory_mb

    def confine() -> None:  # in the child, before exec
        os.nice(10)
        if cores:
            os.sched_setaffinity(0, cores)
        if memory:
            resource.setrlimit(resource.RLIMIT_AS, (memory * 2**20, memory * 2**20))

    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=confine,  # nice, affinity, rlimit: nothing that takes a lock
    )
    assert proc.stdout is not None
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            pending = b""
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _timeout(limits)
                if not selector.select(left):
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                for raw in lines:
                    line = raw.decode("utf-8", "replace").rstrip("\r")
                    tail.append(line)
                    log(line)
            if pending:
                tail.append(pending.decode("utf-8", "replace"))
                log(tail[-1])
        try:
            code = proc.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            raise _timeout(limits) from None
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        proc.stdout.close()
    return code, list(tail)


def _cores(cpus: float | None) -> set[int] | None:
    if not cpus or not hasattr(os, "sched_getaffinity"):
        return None
    available = sorted(os.sched_getaffinity(0))
    wanted = max(1, math.ceil(cpus))
    return set(available[-wanted:]) if wanted < len(available) else None


def _build_env() -> dict[str, str]:
    # The builder's allow-list (runtime/builder.py): the control plane's own secrets (admin token,
    # database URL, registry password, secret keys) must not reach a build step, which may run a
    # package's setup.py. uv installs for another interpreter here: it must never download one.
    env = build_env(None)
    env["UV_PYTHON_DOWNLOADS"] = "never"
    return env


def _left(deadline: float, limits: BuildLimits) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timeout(limits)
    return left


def _check_time(deadline: float, limits: BuildLimits) -> None:
    _left(deadline, limits)


def _timeout(limits: BuildLimits) -> BuildTimeout:
    return BuildTimeout(
        f"Building the image took longer than {limits.timeout:.0f} s; the build was stopped.",
        hint="Trim the dependencies, or ask the platform operator for a longer build timeout.",
    )


# -- small helpers ----------------------------------------------------------------------------------------


def _uv_platform(machine: str, libc: list[str]) -> str:
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    name, version = [*libc, "", ""][:2]
    if name == "glibc" and version:
        major, _, minor = version.partition(".")
        return f"{arch}-manylinux_{major}_{min(int(minor or 0), _MANYLINUX_MAX)}"
    return f"{arch}-unknown-linux-musl" if not name else f"{arch}-unknown-linux-gnu"


def _join(root: str, relative: str) -> str:
    return root if relative in ("", ".") else f"{root}/{relative}"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@contextmanager
def _locked(
    directory: Path,
    key: str,
    *,
    wait: bool,
    deadline: float | None = None,
    limits: BuildLimits | None = None,
) -> Iterator[bool]:
    """An exclusive ``flock`` on ``directory/.{key}.lock`` (between processes and threads): one build of
    a key at a time; the second waits (until ``deadline``) and then finds the first one's layer."""
    fd = os.open(directory / f".{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    yield False
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    raise _timeout(limits or BuildLimits()) from None
                time.sleep(0.1)
        yield True
    finally:
        os.close(fd)
