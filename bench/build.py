"""Image builds: fastapi-deploy's layer builder next to ``docker build`` of a multi-stage Dockerfile.

Run it with ``.venv/bin/python bench/build.py [--runs N] [--base-image REF] [--example NAME]``. Needs a
Docker engine and the base image on it (``scripts/test`` builds ``fastapi-deploy-test-base:bookworm``
from Debian packages; nothing can be pulled here). For the same app (``examples/with-deps`` by default)
it measures:

* **ours, cold**: ``runtime/images.build_image`` with an empty builder cache, so the dependency layer is
  installed (uv, on the host), compiled (in a container of the base image), packed and loaded. Twice:
  with uv's wheel cache warm, and with an empty ``UV_CACHE_DIR`` (every wheel downloaded).
* **Dockerfile, cold**: ``docker build --no-cache`` of ``DOCKERFILE`` below (pip downloads every wheel).
* **code-only rebuilds**, ``main.py`` changed, ``--runs`` of each (default 7), ours and the Dockerfile's
  interleaved so that both meet the same noise: median and min. Ours reuses the dependency layer; the
  Dockerfile's build reuses the engine's layer cache for everything up to ``COPY . /app`` (requirements
  are copied and installed first, as a careful Dockerfile does).
* two more Dockerfile rebuilds for context, one run each: with **BuildKit** (``DOCKER_BUILDKIT=1`` and a
  CLI that has it built in, Debian's docker.io 20.10; skipped if none), and the **cache-hostile** layout
  ``COPY . /src`` *before* ``pip install`` (every code change reinstalls the dependencies).
* the **image sizes**, and what each adds on top of the base image.

"Plain ``docker build``" is the engine's classic builder here (the Engine API's ``/build``; Docker 20.10's
default). Its builds run with ``--network host`` and the host's CA bundle copied into the build stage only:
pip inside a container needs both here (the package index is reached through a TLS-intercepting proxy).
Bounded: one build at a time, each with a timeout; everything it creates is tagged
``fastapi-deploy-bench`` and removed at exit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime.backends.docker import DockerBackend  # noqa: E402
from runtime.detect import detect_project  # noqa: E402
from runtime.images import BuiltImage, ImageMeta, build_image  # noqa: E402

TARGET_REBUILD_SECONDS = 5.0
TARGET_SPEEDUP = 5.0
REPOSITORY = "fastapi-deploy-bench"

DOCKERFILE = """\
FROM {base} AS build
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY requirements.txt /tmp/requirements.txt
RUN python3 -m venv /venv && /venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt

FROM {base}
COPY --from=build /venv /venv
COPY . /app
WORKDIR /app
USER 10001:10001
EXPOSE 8000
CMD ["/venv/bin/uvicorn", "main:app", "--host", "0.0.0.0", "--port", "8000"]
"""


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


class Ours:
    def __init__(self, engine: Any, base: str, src: Path, cache: Path) -> None:
        self.engine, self.base, self.src, self.cache = engine, base, src, cache
        self.count = 0

    def build(self) -> BuiltImage:
        self.count += 1
        return build_image(
            detect_project(self.src),
            self.src,
            ImageMeta(app_id="bench", deployment_id=f"run{self.count}", hostname="bench.localhost"),
            engine=self.engine,
            cache_dir=self.cache,
            base_image=self.base,
            log=lambda line: None,
            repository=REPOSITORY,
        )


HOSTILE = """\
FROM {base} AS build
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY . /src
RUN python3 -m venv /venv && /venv/bin/pip install --no-cache-dir -r /src/requirements.txt

FROM {base}
COPY --from=build /venv /venv
COPY --from=build /src /app
WORKDIR /app
USER 10001:10001
CMD ["/venv/bin/uvicorn", "main:app", "--host", "0.0.0.0", "--port", "8000"]
"""


class Conventional:
    def __init__(self, api: Any, base: str, src: Path, dockerfile: str = DOCKERFILE) -> None:
        self.api, self.src = api, src
        (src / "Dockerfile").write_text(dockerfile.format(base=base))
        (src / ".dockerignore").write_text("Dockerfile\n.dockerignore\n__pycache__\n")
        shutil.copy(
            os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"), src / "ca-certificates.crt"
        )

    def build(self, *, cache: bool) -> str:
        image_id = ""
        for event in self.api.build(
            path=str(self.src),
            tag=f"{REPOSITORY}/{self.src.name}:latest",
            nocache=not cache,
            rm=True,
            forcerm=True,
            network_mode="host",
            decode=True,
            timeout=900,
        ):
            if "error" in event:
                raise RuntimeError(f"docker build failed: {event['error']}")
            aux = event.get("aux") or {}
            if aux.get("ID"):
                image_id = str(aux["ID"])
            if "Successfully built" in str(event.get("stream", "")):
                image_id = image_id or str(event["stream"]).split()[-1]
        return image_id

    def buildkit(self) -> float | None:
        """Seconds of a cached BuildKit build with a CLI that has BuildKit built in; None without one."""
        for cli in ("/usr/bin/docker", shutil.which("docker") or ""):
            if not cli:
                continue
            env = {**os.environ, "DOCKER_BUILDKIT": "1"}
            cmd = [
                cli,
                "build",
                "-q",
                "--network",
                "host",
                "-t",
                f"{REPOSITORY}/buildkit:latest",
                str(self.src),
            ]
            if subprocess.run(cmd, env=env, capture_output=True, timeout=900).returncode != 0:
                continue
            change(self.src, 1000)
            run = partial(subprocess.run, cmd, env=env, capture_output=True, timeout=900)
            seconds, result = timed(run)
            return seconds if result.returncode == 0 else None
        return None


def change(src: Path, n: int) -> None:
    main = src / "main.py"
    text = main.read_text().split("\n# bench ")[0]
    main.write_text(f"{text}\n# bench change {n}\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7, help="code-only rebuilds of each (default 7)")
    parser.add_argument(
        "--base-image",
        default=os.environ.get("FASTAPI_DEPLOY_TEST_BASE_IMAGE", "fastapi-deploy-test-base:bookworm"),
    )
    parser.add_argument("--example", default="with-deps")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fdp-bench-build-"))
    backend = DockerBackend(work / "state", lambda record: None)
    engine, api = backend.images, backend.api()
    base_size = int(api.inspect_image(args.base_image)["Size"])
    ignore = shutil.ignore_patterns("__pycache__", ".fastapicloud")
    ours_src, theirs_src = work / "ours", work / "dockerfile"
    shutil.copytree(ROOT / "examples" / args.example, ours_src, ignore=ignore)
    shutil.copytree(ROOT / "examples" / args.example, theirs_src, ignore=ignore)
    rows: list[tuple[str, str, str]] = []
    try:
        print(
            f"app: examples/{args.example}; base image: {args.base_image} ({base_size / 2**20:.0f} MiB)",
            flush=True,
        )

        # -- ours --------------------------------------------------------------------------------------
        cold_warm, built = timed(Ours(engine, args.base_image, ours_src, work / "cache-1").build)
        print(f"ours, cold (uv cache warm): {cold_warm:.2f}s", flush=True)
        empty_uv = work / "uv-cache"
        os.environ["UV_CACHE_DIR"] = str(empty_uv)
        try:
            cold_empty, _ = timed(Ours(engine, args.base_image, ours_src, work / "cache-2").build)
        finally:
            del os.environ["UV_CACHE_DIR"]
        print(f"ours, cold (empty uv cache): {cold_empty:.2f}s", flush=True)
        theirs = Conventional(api, args.base_image, theirs_src)
        theirs_cold, image_id = timed(lambda: theirs.build(cache=False))
        print(f"Dockerfile, cold (--no-cache): {theirs_cold:.2f}s", flush=True)
        ours = Ours(engine, args.base_image, ours_src, work / "cache-1")
        ours.count = 100
        ours.build()  # both caches complete: what follows are code-only rebuilds
        theirs.build(cache=True)
        rebuilds, conventional = [], []
        for n in range(args.runs):
            change(ours_src, n)
            seconds, rebuilt = timed(ours.build)
            assert rebuilt.dependencies_reused and rebuilt.dependency_layer == built.dependency_layer
            rebuilds.append(seconds)
            change(theirs_src, n)
            seconds, image_id = timed(lambda: theirs.build(cache=True))
            conventional.append(seconds)
        ours_rebuild, theirs_rebuild = statistics.median(rebuilds), statistics.median(conventional)
        print(
            f"code-only rebuilds: ours {ours_rebuild:.2f}s, Dockerfile {theirs_rebuild:.2f}s (medians)",
            flush=True,
        )
        ours_size = int(api.inspect_image(rebuilt.image_id)["Size"])
        theirs_size = int(api.inspect_image(image_id)["Size"])
        buildkit = theirs.buildkit()
        hostile_src = work / "hostile"
        shutil.copytree(ROOT / "examples" / args.example, hostile_src, ignore=ignore)
        hostile = Conventional(api, args.base_image, hostile_src, HOSTILE)
        hostile.build(cache=True)
        change(hostile_src, 1)
        hostile_rebuild, _ = timed(lambda: hostile.build(cache=True))

        speedup = theirs_rebuild / ours_rebuild
        rows = [
            ("cold build, uv/pip cache warm", f"{cold_warm:.2f} s", "-"),
            ("cold build, nothing cached", f"{cold_empty:.2f} s", f"{theirs_cold:.2f} s"),
            (
                f"code-only rebuild (median of {args.runs})",
                f"{ours_rebuild:.2f} s",
                f"{theirs_rebuild:.2f} s",
            ),
            ("code-only rebuild (min)", f"{min(rebuilds):.2f} s", f"{min(conventional):.2f} s"),
            ("code-only rebuild, BuildKit", "-", f"{buildkit:.2f} s" if buildkit is not None else "n/a"),
            ("code-only rebuild, COPY . before pip", "-", f"{hostile_rebuild:.2f} s"),
            ("image size", f"{ours_size / 2**20:.1f} MiB", f"{theirs_size / 2**20:.1f} MiB"),
            (
                "added over the base image",
                f"{(ours_size - base_size) / 2**20:.1f} MiB",
                f"{(theirs_size - base_size) / 2**20:.1f} MiB",
            ),
        ]
        width = max(len(r[0]) for r in rows)
        print()
        print(f"{'':<{width}}  {'fastapi-deploy':>15}  {'Dockerfile':>12}")
        for label, a, b in rows:
            print(f"{label:<{width}}  {a:>15}  {b:>12}")
        print()
        ok_time = ours_rebuild <= TARGET_REBUILD_SECONDS
        ok_ratio = speedup >= TARGET_SPEEDUP
        print(
            f"code-only rebuild: {ours_rebuild:.2f} s (target ≤ {TARGET_REBUILD_SECONDS:.0f} s: "
            f"{'met' if ok_time else 'MISSED'}); {speedup:.1f}x faster than plain docker build of the "
            f"Dockerfile (target ≥ {TARGET_SPEEDUP:.0f}x: {'met' if ok_ratio else 'MISSED'})"
        )
        others = [f"{hostile_rebuild / ours_rebuild:.0f}x the COPY-before-pip layout's"]
        if buildkit is not None:
            others.insert(0, f"{buildkit / ours_rebuild:.1f}x BuildKit's")
        print(
            f"  and {', '.join(others)}; "
            f"cold: {theirs_cold / cold_empty:.1f}x faster than docker build --no-cache"
        )
    finally:
        names = (f"{REPOSITORY}/*", f"{REPOSITORY}/*/*")
        for image in {i for name in names for i in api.images(name=name, quiet=True)}:
            try:
                api.remove_image(image, force=True)
            except Exception:
                pass
        api.prune_images(filters={"dangling": True})
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
