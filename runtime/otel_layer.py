"""The observability layer: OpenTelemetry's SDK and instrumentations, installed once per Python.

Apps are traced without adding a dependency: ``runtime/instrument.py`` appends this layer to the
instance's ``sys.path`` (after the app's own packages, so the app's versions win). The layer is a plain
``uv pip install --target`` directory, content-addressed by the interpreter (or the target Python
version and platform, for images) and :func:`packages` (pinned to the app's own OpenTelemetry version
when its environment has one, which FastAPI's ``standard`` extra brings today). It is built in a
staging directory and renamed into place with a marker written last; concurrent builds of one key
serialise on a lock file.

No HTTP client is part of it (the exporter uses ``urllib``), so an app that does not use ``requests`` or
``httpx`` does not suddenly find them importable.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from runtime.errors import BuildError

LAYER_VERSION = "3"
SDK = "1.45.1"
"""The OpenTelemetry SDK of the layer when the app has none of its own."""
# The libraries whose calls become spans (the contrib instrumentations). The server span of each request
# is the platform's own (``runtime/instrument.py``): no ASGI instrumentation here.
INSTRUMENTATIONS = (
    "httpx",
    "requests",
    "sqlalchemy",
    "psycopg",
    "psycopg2",
    "asyncpg",
    "redis",
)
_USUAL = ("httpx", "requests", "sqlalchemy")
_CORE: tuple[str, ...] = ()  # the SDK alone: server spans, no library spans

_MARKER = ".fastapi-deploy-otel-layer.json"
_QUERY = (
    "import json,sys,sysconfig;"
    "print(json.dumps([sys.implementation.name,sys.version,sysconfig.get_platform()]))"
)


def contrib_version(sdk: str) -> str:
    """The opentelemetry-python-contrib release that goes with an SDK release: 1.X.Y -> 0.(X+21)bY
    (1.27.0 -> 0.48b0, 1.45.1 -> 0.66b1), the projects' own pairing. ``ValueError`` otherwise."""
    parts = sdk.split(".")
    if len(parts) < 3 or parts[0] != "1" or not all(p.isdigit() for p in parts[1:3]):
        raise ValueError(f"not an OpenTelemetry SDK version: {sdk!r}")
    return f"0.{int(parts[1]) + 21}b{int(parts[2])}"


def packages(sdk: str = SDK, instrumentations: Iterable[str] = INSTRUMENTATIONS) -> tuple[str, ...]:
    """What the layer installs for an SDK version: the API and SDK pinned to it (an app that has them
    keeps its own copies, the layer's are the same), the OTLP encoder, and the instrumentations of the
    contrib release that goes with it (any patch release of it: they are not all released together)."""
    minor = int(contrib_version(sdk).split(".")[1].split("b")[0])
    return (
        f"opentelemetry-api=={sdk}",
        f"opentelemetry-sdk=={sdk}",
        f"opentelemetry-exporter-otlp-proto-common=={sdk}",
        *(f"opentelemetry-instrumentation-{name}>=0.{minor}b0,<0.{minor + 1}b0" for name in instrumentations),
    )


def app_otel_version(site_packages: Iterable[Path]) -> str | None:
    """The opentelemetry-api version an app's environment ships, if any (read from its dist-info)."""
    for directory in site_packages:
        for info in sorted(directory.glob("opentelemetry_api-*.dist-info")):
            version = info.name[len("opentelemetry_api-") : -len(".dist-info")]
            try:
                contrib_version(version)
            except ValueError:
                continue
            return version
    return None


def _key(target: list[str], sdk: str) -> str:
    data = json.dumps({"v": LAYER_VERSION, "target": target, "sdk": sdk, "with": INSTRUMENTATIONS})
    return hashlib.sha256(data.encode()).hexdigest()[:32]


def interpreter_target(python: str, env: Mapping[str, str] | None = None) -> list[str]:
    """What the layer for ``python`` depends on: implementation, full version, platform."""
    try:
        out = subprocess.run(
            [python, "-c", _QUERY], capture_output=True, text=True, timeout=30, env=dict(env or os.environ)
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"The app interpreter {python} could not be run: {exc}") from exc
    if out.returncode != 0:
        raise BuildError(f"The app interpreter {python} failed: {out.stderr.strip()[-300:]}")
    return [str(v) for v in json.loads(out.stdout)]


def ensure_layer(
    layers_dir: Path,
    uv: str,
    *,
    python: str | None = None,
    python_version: str | None = None,
    python_platform: str | None = None,
    sdk: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 600.0,
) -> Path:
    """The layer's directory (built if missing) for an interpreter on this machine (``python``), or for
    another machine's (``python_version`` like ``"3.12"`` and ``python_platform`` like
    ``"x86_64-manylinux_2_28"``: an image's), matching the app's own OpenTelemetry ``sdk`` version when
    it has one. Raises :class:`BuildError` with uv's output, ``ValueError`` for a bad version."""
    sdk = sdk or SDK
    # All the instrumentations if they resolve together, else the usual ones, else the SDK alone.
    choices = [packages(sdk, names) for names in (INSTRUMENTATIONS, _USUAL, _CORE)]
    if python is not None:
        target = interpreter_target(python, env)
        where = ["--python", python]
    elif python_version and python_platform:
        target = ["cpython", python_version, python_platform]
        where = ["--python-version", python_version, "--python-platform", python_platform]
    else:
        raise ValueError("an interpreter, or a Python version and a platform")
    key = _key(target, sdk)
    final = layers_dir / key
    if (final / _MARKER).is_file():
        return final
    layers_dir.mkdir(parents=True, exist_ok=True)
    with open(layers_dir / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / _MARKER).is_file():
            return final  # another build finished it while we waited
        _build(final, key, uv, choices, where, target, env, timeout)
    return final


def _build(
    final: Path,
    key: str,
    uv: str,
    choices: list[tuple[str, ...]],
    where: list[str],
    target: list[str],
    env: Mapping[str, str] | None,
    timeout: float,
) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
    try:
        errors = []
        for attempt in choices:
            cmd = [uv, "pip", "install", "--no-config", "--quiet", "--prerelease", "if-necessary-or-explicit"]
            cmd += ["--target", str(staging), *where, *attempt]
            try:
                out = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=timeout, env=dict(env or os.environ)
                )
            except subprocess.TimeoutExpired as exc:
                raise BuildError(f"Installing the observability layer took over {timeout:g}s.") from exc
            if out.returncode == 0:
                (staging / _MARKER).write_text(json.dumps({"target": target, "packages": attempt}))
                staging.chmod(0o755)  # mkdtemp's 0700: confined instances (apps' own users) read it too
                shutil.rmtree(final, ignore_errors=True)
                os.replace(staging, final)
                return
            errors.append((out.stderr or out.stdout).strip()[-800:])
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        raise BuildError(
            "Installing the observability layer failed: " + errors[-1],
            hint="Check the server's access to the package index.",
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
