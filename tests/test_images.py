"""The image builder: reproducible layers, content-addressed dependencies, build limits, no secrets.

The first part needs no engine (layers, keys, platforms, the build's environment and limits); the second
builds real images on the Docker engine that ``scripts/test`` starts, from the local base image.
"""

from __future__ import annotations

import io
import json
import os
import resource
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from runtime import images
from runtime.detect import detect_project
from runtime.errors import BuildError, BuildTimeout
from runtime.images import (
    APP_UID,
    LABEL,
    BaseImage,
    BuildLimits,
    BuiltImage,
    ImageMeta,
    build_image,
    dependency_key,
)
from runtime.registry import Registry
from tests import dockerenv

BASE = BaseImage(
    ref="python:3.12-slim",
    id="sha256:" + "b" * 64,
    layers=("sha256:" + "1" * 64,),
    architecture="amd64",
    os="linux",
    env=("PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"),
    python="/usr/local/bin/python3",
    version="3.12.7",
    implementation="cpython",
    site_dir="/usr/local/lib/python3.12/site-packages",
    platform="x86_64-manylinux_2_36",
    passwd="root:x:0:0:root:/root:/bin/bash\n",
    group="root:x:0:\n",
)


def project(tmp: Path, requirements: str = "fastapi\nuvicorn\n", main: str = "") -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "main.py").write_text(main or "from fastapi import FastAPI\n\napp = FastAPI()\n")
    (tmp / "requirements.txt").write_text(requirements)
    return tmp


def members(tar_bytes: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return tar.getmembers()


# -- layers and keys ------------------------------------------------------------------------------------


def test_a_layer_is_byte_for_byte_reproducible(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "pkg").mkdir(parents=True)
    (tree / "pkg" / "b.py").write_text("b = 2\n")
    (tree / "pkg" / "a.py").write_text("a = 1\n")
    (tree / "pkg" / "a.py").chmod(0o666)  # group/other write goes
    first, second = tmp_path / "1.tar", tmp_path / "2.tar"
    images._tar_directory(tree, first, "usr/lib/site", BuildLimits(), time.monotonic() + 30)
    os.utime(tree / "pkg" / "a.py", (1_000_000, 1_000_000))  # a different mtime: the same bytes
    images._tar_directory(tree, second, "usr/lib/site", BuildLimits(), time.monotonic() + 30)

    assert first.read_bytes() == second.read_bytes()
    entries = members(first.read_bytes())
    assert [m.name for m in entries] == [
        "usr/lib/site",
        "usr/lib/site/pkg",
        "usr/lib/site/pkg/a.py",
        "usr/lib/site/pkg/b.py",
    ]
    for member in entries:
        assert (member.mtime, member.uid, member.gid) == (0, 0, 0)
        assert member.mode & 0o022 == 0
    assert images._sha256_file(first) == images._sha256_file(second)


def test_the_runtime_layer_adds_a_non_root_user_and_the_launcher() -> None:
    layer = images._runtime_layer(BASE)

    assert layer == images._runtime_layer(BASE)  # deterministic
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        passwd = tar.extractfile("etc/passwd").read().decode()  # type: ignore[union-attr]
        launcher = tar.extractfile("opt/fastapi-deploy/launcher.py").read()  # type: ignore[union-attr]
        home = tar.getmember("home/app")
    assert passwd.startswith(BASE.passwd)  # the base's users are kept
    assert f"app:x:{APP_UID}:{APP_UID}::/home/app:/usr/sbin/nologin" in passwd
    assert launcher == Path(images._launcher_module.__file__).read_bytes()
    assert home.uid == APP_UID


def test_the_dependency_key_is_the_lock_the_python_and_the_platform(tmp_path: Path) -> None:
    a = detect_project(project(tmp_path / "a"))
    b = detect_project(
        project(tmp_path / "b", main="from fastapi import FastAPI\napp = FastAPI(title='x')\n")
    )
    c = detect_project(project(tmp_path / "c", requirements="fastapi\nuvicorn\nhumanize\n"))

    key = dependency_key(a, BASE)
    assert dependency_key(b, BASE) == key  # code does not count
    assert dependency_key(c, BASE) != key  # dependencies do
    assert dependency_key(a, _with(BASE, version="3.12.9")) == key  # patch releases share wheels
    assert dependency_key(a, _with(BASE, version="3.13.0")) != key
    assert dependency_key(a, _with(BASE, platform="aarch64-manylinux_2_36")) != key


def _with(base: BaseImage, **changes: Any) -> BaseImage:
    return BaseImage(**{**base.__dict__, **changes})


@pytest.mark.parametrize(
    ("machine", "libc", "expected"),
    [
        ("x86_64", ["glibc", "2.36"], "x86_64-manylinux_2_36"),
        ("x86_64", ["glibc", "2.41"], "x86_64-manylinux_2_40"),  # newer than uv knows: the newest it does
        ("aarch64", ["glibc", "2.31"], "aarch64-manylinux_2_31"),
        ("x86_64", ["", ""], "x86_64-unknown-linux-musl"),
    ],
)
def test_the_platform_uv_installs_for(machine: str, libc: list[str], expected: str) -> None:
    assert images._uv_platform(machine, libc) == expected


def test_the_image_config_runs_the_launcher_as_the_app_user() -> None:
    labels = {f"{LABEL}.lock-hash": "k", f"{LABEL}.app": "a"}
    config = images._image_config(
        BASE, (*BASE.layers, "sha256:d", "sha256:r", "sha256:a"), labels, ["python3", "entry"], "/app",
        ImageMeta(app_id="a", deployment_id="d", hostname="a.example.com", health_path="/health"), BASE.ref,
    )  # fmt: skip

    inner = config["config"]
    assert inner["User"] == f"{APP_UID}:{APP_UID}"
    assert inner["Entrypoint"] == ["python3", "entry"]
    assert inner["Labels"] == labels
    assert "FASTAPI_DEPLOY_HOSTNAME=a.example.com" in inner["Env"]
    assert "FASTAPI_DEPLOY_HEALTH_PATH=/health" in inner["Env"]
    assert inner["Healthcheck"]["Test"][:2] == ["CMD", BASE.python]
    assert len(config["history"]) == len(config["rootfs"]["diff_ids"]) == 4


def test_a_built_image_record_round_trips() -> None:
    built = BuiltImage(
        image_id="sha256:i", tag="t", reference="r@sha256:d", digest="sha256:d", dependency_key="k",
        dependency_layer="sha256:l", dependencies_reused=True, app_layer="sha256:a", layers=("sha256:l",),
        size=1, python="/usr/bin/python3", entrypoint="main:app", app_dir="/app", workdir="/app",
        labels={"x": "y"},
    )  # fmt: skip
    assert BuiltImage.from_json(json.loads(json.dumps(built.as_json()))) == built


@pytest.mark.parametrize(
    ("url", "host", "namespace"),
    [
        ("127.0.0.1:5000", "127.0.0.1:5000", "fastapi-deploy"),
        ("https://registry.example.com/team/apps/", "registry.example.com", "team/apps"),
        ("http://localhost:5000/x", "localhost:5000", "x"),
    ],
)
def test_registry_urls(url: str, host: str, namespace: str) -> None:
    registry = Registry.parse(url, username="u", password="hunter2")
    assert (registry.host, registry.namespace) == (host, namespace)
    assert registry.repository("ABC123") == f"{host}/{namespace}/abc123"
    assert "hunter2" not in repr(registry)


@pytest.mark.parametrize("url", ["ftp://x", "host:port:bad", "h/UPPER", ""])
def test_bad_registry_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        Registry.parse(url)


# -- build steps: limits and environment ------------------------------------------------------------------


def test_build_steps_run_low_priority_on_limited_cores_and_memory(tmp_path: Path) -> None:
    out: list[str] = []
    probe = (
        "import json, os, resource as r; "
        "print(json.dumps([os.nice(0), len(os.sched_getaffinity(0)), r.getrlimit(r.RLIMIT_AS)[0]]))"
    )
    limits = BuildLimits(cpus=1, memory_mb=1024, timeout=30)

    code, _ = images._run(
        [sys.executable, "-c", probe],
        tmp_path,
        images._build_env(),
        out.append,
        limits,
        time.monotonic() + 30,
    )

    assert code == 0
    nice, cores, address_space = json.loads(out[-1])
    assert nice >= 10
    assert cores == 1
    assert address_space == 1024 * 2**20
    assert resource.getrlimit(resource.RLIMIT_AS)[0] != address_space  # only the step is limited


def test_a_build_step_past_the_deadline_is_killed(tmp_path: Path) -> None:
    started = time.monotonic()
    marker = tmp_path / "still-running"
    script = f"import time, pathlib; time.sleep(30); pathlib.Path({str(marker)!r}).touch()"

    with pytest.raises(BuildTimeout) as info:
        images._run(
            [sys.executable, "-c", script],
            tmp_path,
            images._build_env(),
            lambda _: None,
            BuildLimits(timeout=1),
            started + 1,
        )

    assert time.monotonic() - started < 10
    assert info.value.code == "building_image_failed_timeout"
    assert not marker.exists()


def test_build_steps_never_see_the_control_plane_s_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "FASTAPI_DEPLOY_ADMIN_TOKEN",
        "FASTAPI_DEPLOY_REGISTRY_PASSWORD",
        "DATABASE_URL",
        "AWS_SECRET_ACCESS_KEY",
    ):
        monkeypatch.setenv(name, "secret-value")
    monkeypatch.setenv("UV_INDEX_URL", "https://index.example/simple")

    env = images._build_env()

    assert "secret-value" not in env.values()
    assert env["UV_INDEX_URL"] == "https://index.example/simple"  # the operator's uv settings pass


# -- real builds ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Any:
    dockerenv.require()
    from runtime.backends.docker import DockerBackend

    return DockerBackend(tmp_path_factory.mktemp("images-state"), lambda record: None).images


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images-cache")


def build(engine: Any, cache: Path, src: Path, log: list[str] | None = None, **kw: Any) -> BuiltImage:
    return build_image(
        detect_project(src),
        src,
        ImageMeta(app_id="imgtest", deployment_id=os.urandom(6).hex(), hostname="imgtest.localhost"),
        engine=engine,
        cache_dir=cache,
        base_image=dockerenv.BASE_IMAGE,
        log=(log if log is not None else []).append,
        **kw,
    )


def test_the_base_image_is_probed_once(engine: Any, cache: Path) -> None:
    base = images.probe_base(engine, dockerenv.BASE_IMAGE, cache)

    assert base.python == "/usr/bin/python3"  # Debian's, in the test base image
    assert base.minor == "3.11"
    assert base.platform.startswith("x86_64-manylinux_2_") or base.platform.startswith("aarch64-")
    assert base.site_dir.startswith("/usr/local/lib/python3.11/")
    assert list(cache.glob("base-*.json"))  # cached by image id: the next build runs no container


def test_a_code_only_rebuild_writes_only_the_app_layer(engine: Any, cache: Path, tmp_path: Path) -> None:
    src = project(tmp_path / "app")
    first_log: list[str] = []
    first = build(engine, cache, src, first_log)
    (src / "main.py").write_text("from fastapi import FastAPI\n\napp = FastAPI(title='v2')\n")
    second_log: list[str] = []

    started = time.monotonic()
    second = build(engine, cache, src, second_log)
    rebuild = time.monotonic() - started

    assert second.layers[:-1] == first.layers[:-1]
    assert second.app_layer != first.app_layer
    assert second.dependencies_reused and second.dependency_layer == first.dependency_layer
    assert any("Dependency layer reused" in line for line in second_log)
    assert rebuild < 5, f"a code-only rebuild took {rebuild:.1f}s"
    # The same source gives the same app layer: its digest is the source digest.
    third = build(engine, cache, src)
    assert third.app_layer == second.app_layer == third.labels[f"{LABEL}.source-digest"]


def test_secrets_never_reach_an_image(
    engine: Any, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTAPI_DEPLOY_REGISTRY_PASSWORD", "registry-secret-4711")
    monkeypatch.setenv("FASTAPI_DEPLOY_ADMIN_TOKEN", "admin-secret-4711")
    log: list[str] = []
    built = build(engine, cache, project(tmp_path / "app"), log)

    with dockerenv.connected() as client:
        saved = b"".join(client.images.get(built.image_id).save(named=False))
    assert b"secret-4711" not in saved  # config, labels, history and every layer
    assert not any("secret-4711" in line for line in log)


def test_a_failing_install_ends_building_image_failed_with_uv_s_output(
    engine: Any, cache: Path, tmp_path: Path
) -> None:
    src = project(tmp_path / "app", requirements="fastapi\nno-such-package-fdp-4711==1.0\n")
    log: list[str] = []

    with pytest.raises(BuildError) as info:
        build(engine, cache, src, log)

    assert info.value.code == "building_image_failed"
    assert "no-such-package-fdp-4711" in info.value.message
    assert any("no-such-package-fdp-4711" in line for line in log)
