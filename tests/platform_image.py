"""The platform's own image (``Dockerfile``), built for tests: the ``platform_image`` fixture
(tests/conftest.py, once per session) for tests/test_platform_image.py and the whole flow on a cluster.

Built from the repository on the test base image (Debian's python3.11: no registry is reachable here),
offline: the project and its dependencies are wheels made on the host (``pip wheel``, from its cache) and
installed from the build context.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests import dockerenv
from tests.conftest import copy_checkout

EXTRAS = "postgres,docker,kubernetes"


def context(dest: Path) -> Path:
    """The build context: the repository's tracked files, plus a wheelhouse of everything to install."""
    copy_checkout(dest)
    # The test venv is uv's (no pip in it): a seeded one of the same Python makes the wheels.
    tools = dest.parent / "wheel-tools"
    uv = str(Path(sys.executable).parent / "uv")
    subprocess.run([uv, "venv", "--quiet", "--seed", "--python", sys.executable, str(tools)], check=True)
    subprocess.run(
        [
            str(tools / "bin" / "python"),
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--disable-pip-version-check",
            "--wheel-dir",
            str(dest / "wheelhouse"),
            f"{dest}[{EXTRAS}]",
        ],
        check=True,
        timeout=600,
    )
    return dest


@contextlib.contextmanager
def built(workdir: Path) -> Iterator[str]:
    """The image's tag in the test engine, removed afterwards."""
    tag = f"fastapi-deploy-image-test:{uuid.uuid4().hex[:8]}"
    ctx = context(workdir)
    build = subprocess.run(
        [
            "docker",
            "build",
            "--quiet",
            "--tag",
            tag,
            "--build-arg",
            f"BASE={dockerenv.BASE_IMAGE}",
            "--build-arg",
            f"PACKAGE=fastapi-deploy[{EXTRAS}]",
            "--build-arg",
            "PIP_ARGS=--no-index --find-links /src/wheelhouse",
            str(ctx),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    try:
        yield tag
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=120)
