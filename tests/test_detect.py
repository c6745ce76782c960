"""Project detection on small real project trees (static: nothing in them is ever imported)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.detect import DependencySpec, Project, detect_project
from runtime.errors import BuildError

APP = "from fastapi import FastAPI\n\napp = FastAPI()\n"
# Importing any of these trees would fail loudly: detection must not execute user code.
BOOM = "raise SystemExit('detection imported user code')\n"


def make(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root.resolve()


# name -> (files, expected entrypoint, expected import dir relative to the upload root)
ENTRYPOINTS: dict[str, tuple[dict[str, str], str, str]] = {
    "single main.py": ({"main.py": BOOM + APP}, "main:app", "."),
    "app package": ({"app/__init__.py": "", "app/main.py": APP}, "app.main:app", "."),
    "app dir without __init__": ({"app/main.py": APP}, "main:app", "app"),
    "api.py with api": ({"api.py": "import fastapi\napi = fastapi.FastAPI()\n"}, "api:api", "."),
    "annotated and aliased": (
        {"app.py": "from fastapi import FastAPI as F\nserver: F = F(title='x')\n"},
        "app:server",
        ".",
    ),
    "prefers app over others": (
        {"main.py": "from fastapi import FastAPI\nadmin = FastAPI()\napp = FastAPI()\napi = FastAPI()\n"},
        "main:app",
        ".",
    ),
    "prefers api over first instance": (
        {"main.py": "from fastapi import FastAPI\nadmin = FastAPI()\napi = FastAPI()\n"},
        "main:api",
        ".",
    ),
    "first instance when no app or api": (
        {"main.py": "from fastapi import FastAPI\nserver = FastAPI()\nother = FastAPI()\n"},
        "main:server",
        ".",
    ),
    "factory": (
        {"main.py": "from myproject import create_app\n\napp = create_app()\n"},
        "main:app",
        ".",
    ),
    "re-exported app": ({"main.py": "from app.server import app\n"}, "main:app", "."),
    "inside a module-level if": (
        {"main.py": "import os\nfrom fastapi import FastAPI\nif os.environ.get('X'):\n    app = FastAPI()\n"},
        "main:app",
        ".",
    ),
    "order: main.py before app/main.py": ({"main.py": APP, "app/main.py": APP}, "main:app", "."),
    "script main.py without app is skipped": (
        {"main.py": "print('hello')\n", "app/__init__.py": "", "app/main.py": APP},
        "app.main:app",
        ".",
    ),
    "syntax error is still chosen": ({"main.py": "app = FastAPI(\n", "app/main.py": APP}, "main:app", "."),
    "src/main.py": ({"src/main.py": APP}, "main:app", "src"),
    "src/app/main.py package": ({"src/app/__init__.py": "", "src/app/main.py": APP}, "app.main:app", "src"),
    "pyproject entrypoint": (
        {
            "pyproject.toml": '[tool.fastapi]\nentrypoint = "backend.server:application"\n',
            "main.py": APP,  # an explicit entrypoint wins over discovery
            "backend/__init__.py": "",
            "backend/server.py": BOOM,
        },
        "backend.server:application",
        ".",
    ),
    "pyproject entrypoint in src layout": (
        {
            "pyproject.toml": '[tool.fastapi]\nentrypoint = "myapp.main:app"\n',
            "src/myapp/__init__.py": "",
            "src/myapp/main.py": APP,
        },
        "myapp.main:app",
        "src",
    ),
}


@pytest.mark.parametrize("case", sorted(ENTRYPOINTS))
def test_entrypoint(tmp_path: Path, case: str) -> None:
    files, entrypoint, import_dir = ENTRYPOINTS[case]
    source = make(tmp_path, files)
    project = detect_project(source)
    assert project.entrypoint == entrypoint
    assert project.import_dir == (source / import_dir).resolve()
    assert project.root == source.resolve()


def test_no_app_found(tmp_path: Path) -> None:
    source = make(tmp_path, {"main.py": "print('no app here')\n", "README.md": "hi"})
    with pytest.raises(BuildError) as info:
        detect_project(source)
    error = info.value
    assert error.title == "No FastAPI app found"
    assert error.code == "building_image_failed"
    assert "main.py (no FastAPI app)" in error.message
    assert "app/main.py (missing)" in error.message
    assert "src/app/main.py" in error.message
    assert "app = FastAPI()" in error.hint and "[tool.fastapi]" in error.hint


@pytest.mark.parametrize(
    ("pyproject", "files", "expected"),
    [
        ('[tool.fastapi]\nentrypoint = "missing.mod:app"\n', {}, "Entrypoint module not found"),
        ('[tool.fastapi]\nentrypoint = "no-colon"\n', {}, "Invalid entrypoint"),
        ("[tool.fastapi]\nentrypoint = 3\n", {}, "Invalid entrypoint"),
        ("[tool.fastapi\n", {"main.py": APP}, "Invalid pyproject.toml"),
    ],
)
def test_bad_pyproject(tmp_path: Path, pyproject: str, files: dict[str, str], expected: str) -> None:
    source = make(tmp_path, {"pyproject.toml": pyproject, **files})
    with pytest.raises(BuildError) as info:
        detect_project(source)
    assert info.value.title == expected
    assert info.value.hint


def test_subdirectory(tmp_path: Path) -> None:
    source = make(
        tmp_path,
        {
            "main.py": BOOM,  # the root's main.py is not the app: the app lives in backend/
            "requirements.txt": "root-only\n",
            "backend/main.py": APP,
            "backend/requirements.txt": "six\n",
            "backend/.python-version": "3.12\n",
        },
    )
    project = detect_project(source, "backend")
    assert project == Project(
        root=source / "backend",
        entrypoint="main:app",
        import_dir=source / "backend",
        dependencies=DependencySpec("requirements.txt", (source / "backend" / "requirements.txt",)),
        python_version="3.12",
    )


def test_subdirectory_package_walks_up_to_the_upload_root_only(tmp_path: Path) -> None:
    source = make(tmp_path / "upload", {"__init__.py": "", "svc/__init__.py": "", "svc/main.py": APP})
    (tmp_path / "__init__.py").write_text("")  # above the upload: never part of the module path
    project = detect_project(source, "svc")
    assert project.entrypoint == "svc.main:app"
    assert project.import_dir == source


def test_subdirectory_falls_back_to_root_dependencies(tmp_path: Path) -> None:
    source = make(tmp_path, {"uv.lock": "", "pyproject.toml": "[project]\nname='x'\n", "web/main.py": APP})
    project = detect_project(source, "web/")
    assert project.dependencies == DependencySpec("uv.lock", (source / "uv.lock", source / "pyproject.toml"))


@pytest.mark.parametrize("directory", ["../elsewhere", "/etc", "missing", "main.py"])
def test_bad_directory(tmp_path: Path, directory: str) -> None:
    (tmp_path / "elsewhere").mkdir()
    source = make(tmp_path / "upload", {"main.py": APP})
    with pytest.raises(BuildError) as info:
        detect_project(source, directory)
    assert directory in info.value.message
    assert info.value.hint


PYPROJECT = '[project]\nname = "demo"\nversion = "0"\nrequires-python = ">=3.11"\ndependencies = ["six"]\n'


REQS = "six\n"
# name -> (files besides main.py, kind, spec files, python version)
DEPENDENCIES: dict[str, tuple[dict[str, str], str, list[str], str | None]] = {
    "uv.lock wins": (
        {"uv.lock": "", "pyproject.toml": PYPROJECT, "requirements.txt": REQS},
        "uv.lock",
        ["uv.lock", "pyproject.toml"],
        ">=3.11",
    ),
    # uv export cannot read a lock without its project.
    "uv.lock alone is ignored": ({"uv.lock": ""}, "default", [], None),
    "pylock.toml": (
        {"pylock.toml": "", "requirements.txt": REQS, "pyproject.toml": PYPROJECT},
        "pylock.toml",
        ["pylock.toml"],
        ">=3.11",
    ),
    "requirements.txt": (
        {"requirements.txt": REQS, "pyproject.toml": PYPROJECT},
        "requirements.txt",
        ["requirements.txt"],
        ">=3.11",
    ),
    "pyproject.toml": (
        {"pyproject.toml": PYPROJECT, ".python-version": "# pinned\n3.11.7\n"},
        "pyproject.toml",
        ["pyproject.toml"],
        "3.11.7",
    ),
    "pyproject.toml without [project]": (
        {"pyproject.toml": '[tool.fastapi]\nentrypoint = "main:app"\n'},
        "default",
        [],
        None,
    ),
    "nothing": ({}, "default", [], None),
}


@pytest.mark.parametrize("case", sorted(DEPENDENCIES))
def test_dependency_kinds(tmp_path: Path, case: str) -> None:
    files, kind, spec_files, python_version = DEPENDENCIES[case]
    source = make(tmp_path, {"main.py": APP, **files})
    project = detect_project(source)
    assert project.dependencies.kind == kind
    assert project.dependencies.files == tuple(source / f for f in spec_files)
    assert project.python_version == python_version


def test_health_path_from_pyproject(tmp_path: Path) -> None:
    root = make(
        tmp_path / "a",
        {"main.py": APP, "pyproject.toml": '[tool.fastapi-deploy]\nhealth_path = "/healthz?probe=1"\n'},
    )
    assert detect_project(root).health_path == "/healthz?probe=1"
    # Not configured: None, so the app's own setting (default "/") applies.
    assert detect_project(make(tmp_path / "b", {"main.py": APP})).health_path is None
    other_tool = make(tmp_path / "c", {"main.py": APP, "pyproject.toml": "[tool.fastapi-deploy]\nx = 1\n"})
    assert detect_project(other_tool).health_path is None
    # Read from the app directory's pyproject.toml, like the entrypoint.
    nested = make(
        tmp_path / "d",
        {"svc/main.py": APP, "svc/pyproject.toml": '[tool.fastapi-deploy]\nhealth_path = "/ready"\n'},
    )
    assert detect_project(nested, "svc").health_path == "/ready"


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ('"healthz"', "must start with '/'"),
        ('"/health check"', "without spaces"),
        ('"/ok\\r\\nX-Injected: 1"', "without spaces"),
        ('"/ok\\n"', "without spaces"),
        ('"/é"', "printable ASCII"),
        (f'"/{"a" * 200}"', "at most 200 characters"),
        ("200", "is not a string"),
    ],
)
def test_invalid_health_path(tmp_path: Path, value: str, words: str) -> None:
    root = make(
        tmp_path, {"main.py": APP, "pyproject.toml": f"[tool.fastapi-deploy]\nhealth_path = {value}\n"}
    )
    with pytest.raises(BuildError) as info:
        detect_project(root)
    assert info.value.title == "Invalid health path"
    assert words in info.value.message
    assert "[tool.fastapi-deploy]" in info.value.hint
