"""Project detection: where the FastAPI app is and what defines its environment.

Follows FastAPI CLI (``fastapi run`` with no arguments, ``fastapi_cli/discover.py``): an explicit
``[tool.fastapi] entrypoint`` in pyproject.toml wins; otherwise the first candidate file that exists,
in FastAPI CLI's order, plus three ``src/`` layouts. The module path comes from walking up the
directories that have an ``__init__.py``, exactly as FastAPI CLI does, but never above the upload root.

Detection is static: user code is parsed with ``ast``, never imported or executed. FastAPI CLI picks
the app by importing the module; here the same preference (``app``, then ``api``, then the first
FastAPI instance) is applied to the module's top-level assignments.

Two decisions where static analysis cannot know what an import would:

* a candidate file that does not parse is **chosen** (with the name ``app``): FastAPI CLI would pick it
  too, and the user learns more from their own ``SyntaxError`` traceback at verification than from
  "No FastAPI app found";
* a candidate that parses but shows no app at all is skipped and the next one is tried (FastAPI CLI
  would stop with an error there), so a stray ``main.py`` script does not hide ``app/main.py``.
"""

from __future__ import annotations

import ast
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from runtime.errors import BuildError

__all__ = [
    "CANDIDATE_FILES",
    "HEALTH_PATH_PATTERN",
    "MAX_HEALTH_PATH",
    "DependencyKind",
    "DependencySpec",
    "Project",
    "check_health_path",
    "detect_project",
]

DependencyKind = Literal["uv.lock", "pylock.toml", "requirements.txt", "pyproject.toml", "default"]

# FastAPI CLI's get_default_path() order, then src/ layouts.
CANDIDATE_FILES = (
    "main.py",
    "app.py",
    "api.py",
    "app/main.py",
    "app/app.py",
    "app/api.py",
    "src/main.py",
    "src/app.py",
    "src/app/main.py",
)

# `-r base.txt`, `-c constraints.txt`, `--requirement=base.txt`: files a requirements file pulls in.
_INCLUDE = re.compile(r"^\s*(?:-[rc]\s*|--(?:requirement|constraint)(?:\s*=\s*|\s+))(\S+)")
_MAX_INCLUDES = 100
_PREFERRED_NAMES = ("app", "api")
_ENTRYPOINT = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_NO_APP_HINT = (
    'Add a main.py with `app = FastAPI()`, or set [tool.fastapi] entrypoint = "module:app" in pyproject.toml.'
)


@dataclass(frozen=True)
class DependencySpec:
    kind: DependencyKind
    files: tuple[Path, ...]
    """The files whose content defines the environment (empty for ``default``: fastapi[standard])."""


@dataclass(frozen=True)
class Project:
    root: Path
    """The app directory: the upload root or its configured subdirectory."""
    entrypoint: str
    """``module.path:attr``, importable with ``import_dir`` first on sys.path."""
    import_dir: Path
    """Directory to put first on sys.path. FastAPI CLI keeps the working directory at ``root``, so
    relative paths in the app (templates, static files) resolve against ``root``, not this."""
    dependencies: DependencySpec
    python_version: str | None
    """From .python-version or ``requires-python`` when present; informational."""
    health_path: str | None = None
    """``[tool.fastapi-deploy] health_path`` of pyproject.toml: the path verification and health checks
    ask (with the app's Host); None when the project does not say (the app's setting applies)."""


def detect_project(source: Path, directory: str | None = None) -> Project:
    """Find the app in the extracted upload ``source`` (its ``directory`` subfolder if given).

    Raises:
        BuildError: the directory is invalid or missing, pyproject.toml is not valid TOML, the
            configured entrypoint is malformed or its module is missing, no app was found, or
            ``[tool.fastapi-deploy] health_path`` is not a valid path.
    """
    source = source.resolve()
    root = _app_root(source, directory)
    pyproject = _read_pyproject(root / "pyproject.toml")
    configured = _lookup(pyproject, "tool", "fastapi", "entrypoint")
    if configured is not None:
        entrypoint, import_dir = _configured_entrypoint(root, configured)
    else:
        entrypoint, import_dir = _discover_entrypoint(source, root)
    dependencies, spec_dir = _dependencies(source, root)
    return Project(
        root=root,
        entrypoint=entrypoint,
        import_dir=import_dir,
        dependencies=dependencies,
        python_version=_python_version(source, root, spec_dir),
        health_path=_configured_health_path(pyproject),
    )


MAX_HEALTH_PATH = 200
HEALTH_PATH_PATTERN = r"^/[\x21-\x7e]*$"
"""A health path: ``/`` then printable ASCII, no spaces (at most ``MAX_HEALTH_PATH`` characters)."""
_HEALTH_PATH = re.compile(HEALTH_PATH_PATTERN)


def check_health_path(value: str) -> str:
    """``value`` if it can be a health path: starts with ``/``, at most ``MAX_HEALTH_PATH`` characters,
    printable ASCII with no spaces (it goes into an HTTP request line as it is, query string allowed).

    Raises ValueError saying what is wrong.
    """
    if not value.startswith("/"):
        raise ValueError("the health path must start with '/'")
    if len(value) > MAX_HEALTH_PATH:
        raise ValueError(f"the health path must be at most {MAX_HEALTH_PATH} characters")
    if not _HEALTH_PATH.fullmatch(value):  # not match: "$" also matches before a final newline
        raise ValueError("the health path must be printable ASCII without spaces (percent-encode the rest)")
    return value


def _configured_health_path(pyproject: dict[str, Any]) -> str | None:
    configured = _lookup(pyproject, "tool", "fastapi-deploy", "health_path")
    if configured is None:
        return None
    hint = (
        'Set health_path = "/healthz" (a path of the app that answers below 500) under [tool.fastapi-deploy].'
    )
    if not isinstance(configured, str):
        raise BuildError(
            f"[tool.fastapi-deploy] health_path {configured!r} is not a string.",
            hint=hint,
            title="Invalid health path",
        )
    try:
        return check_health_path(configured)
    except ValueError as exc:
        raise BuildError(
            f"[tool.fastapi-deploy] health_path {configured!r} is not valid: {exc}.",
            hint=hint,
            title="Invalid health path",
        ) from exc


def _app_root(source: Path, directory: str | None) -> Path:
    if not directory:
        return source
    hint = "Set the app's directory to a folder inside the project (relative, no '..'), or leave it empty."
    candidate = (source / directory).resolve()
    if Path(directory).is_absolute() or ".." in Path(directory).parts or not candidate.is_relative_to(source):
        raise BuildError(f"The app directory {directory!r} is outside the project.", hint=hint)
    if not candidate.is_dir():
        raise BuildError(
            f"The app directory {directory!r} is not in the uploaded files.",
            hint=hint,
            title="App directory not found",
        )
    return candidate


def _read_pyproject(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BuildError(
            f"{path.name} is not valid TOML: {exc}.",
            hint="Fix pyproject.toml (for example with `uv lock`, which reads it) and deploy again.",
            title="Invalid pyproject.toml",
        ) from exc


def _lookup(table: dict[str, Any], *keys: str) -> object:
    """``table[k1][k2]...``, or None where a key is missing or a value is not a table."""
    value: object = table
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _configured_entrypoint(root: Path, configured: object) -> tuple[str, Path]:
    hint = 'Use the form entrypoint = "package.module:app" under [tool.fastapi] in pyproject.toml.'
    if not isinstance(configured, str) or not _ENTRYPOINT.match(configured):
        raise BuildError(
            f"[tool.fastapi] entrypoint {configured!r} is not of the form 'module:attribute'.",
            hint=hint,
            title="Invalid entrypoint",
        )
    module = configured.partition(":")[0]
    # FastAPI CLI imports from the working directory; a src/ layout works once the project is installed,
    # which we don't do, so look there too.
    for import_dir in (root, root / "src"):
        base = import_dir.joinpath(*module.split("."))
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return configured, import_dir
    raise BuildError(
        f"[tool.fastapi] entrypoint {configured!r} names module {module!r}, but neither "
        f"{module.replace('.', '/')}.py nor {module.replace('.', '/')}/__init__.py is in the upload.",
        hint=hint + " Paths are relative to the app directory.",
        title="Entrypoint module not found",
    )


def _discover_entrypoint(source: Path, root: Path) -> tuple[str, Path]:
    checked: list[str] = []
    for candidate in CANDIDATE_FILES:
        path = root / candidate
        if not path.is_file():
            checked.append(f"{candidate} (missing)")
            continue
        name = _find_app(path)
        if name is None:
            checked.append(f"{candidate} (no FastAPI app)")
            continue
        module, import_dir = _module_path(path, source)
        return f"{module}:{name}", import_dir
    raise BuildError(
        "No FastAPI app was found. Checked: " + ", ".join(checked) + ".",
        hint=_NO_APP_HINT,
        title="No FastAPI app found",
    )


def _module_path(path: Path, source: Path) -> tuple[str, Path]:
    """The dotted module name and the directory to import it from, as FastAPI CLI derives them."""
    parts = [path.stem]
    import_dir = path.parent
    # Every parent package (a directory with __init__.py) becomes part of the module name.
    while (import_dir / "__init__.py").is_file() and import_dir != source:
        parts.insert(0, import_dir.name)
        import_dir = import_dir.parent
    return ".".join(parts), import_dir


def _find_app(path: Path) -> str | None:
    """The name of the FastAPI app in ``path``; ``app`` if the file does not parse; None if none."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, RecursionError):
        return "app"  # chosen anyway: the module docstring says why
    finder = _AppFinder()
    finder.visit_block(tree.body)
    for name in _PREFERRED_NAMES:
        if name in finder.instances:
            return name
    if finder.instances:
        return finder.instances[0]
    for name in _PREFERRED_NAMES:
        if name in finder.maybe:
            return name
    return None


class _AppFinder:
    """Collects module-level names bound to ``FastAPI(...)``, and ``app``/``api`` bound otherwise."""

    def __init__(self) -> None:
        self.constructors = {"FastAPI"}
        self.instances: list[str] = []
        self.maybe: set[str] = set()  # app/api from a factory call or an import: probably the app

    def visit_block(self, body: list[ast.stmt]) -> None:
        for stmt in body:
            self.visit(stmt)

    def visit(self, stmt: ast.stmt) -> None:
        if isinstance(stmt, ast.ImportFrom):
            for alias in stmt.names:
                bound = alias.asname or alias.name
                if alias.name == "FastAPI":
                    self.constructors.add(bound)
                elif bound in _PREFERRED_NAMES:
                    self.maybe.add(bound)
        elif isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                self._bind(target, stmt.value)
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            self._bind(stmt.target, stmt.value)
        # Module-level blocks still run at import: `if settings.debug: app = FastAPI(debug=True)`.
        elif isinstance(stmt, ast.If | ast.For | ast.While):
            self.visit_block(stmt.body)
            self.visit_block(stmt.orelse)
        elif isinstance(stmt, ast.With):
            self.visit_block(stmt.body)
        elif isinstance(stmt, ast.Try | ast.TryStar):
            for block in (stmt.body, *(h.body for h in stmt.handlers), stmt.orelse, stmt.finalbody):
                self.visit_block(block)

    def _bind(self, target: ast.expr, value: ast.expr) -> None:
        if not isinstance(target, ast.Name):
            return
        name = target.id
        if isinstance(value, ast.Call) and self._is_fastapi(value.func):
            if name not in self.instances:
                self.instances.append(name)
        elif name in _PREFERRED_NAMES and isinstance(value, ast.Call | ast.Name | ast.Attribute):
            self.maybe.add(name)

    def _is_fastapi(self, func: ast.expr) -> bool:
        if isinstance(func, ast.Name):
            return func.id in self.constructors
        # fastapi.FastAPI(...), fastapi.applications.FastAPI(...), or an aliased module
        return isinstance(func, ast.Attribute) and func.attr == "FastAPI"


def _dependencies(source: Path, root: Path) -> tuple[DependencySpec, Path | None]:
    """The dependency spec in the app directory, else in the upload root, else the default."""
    for directory in dict.fromkeys((root, source)):
        spec = _dependencies_in(directory, source)
        if spec is not None:
            return spec, directory
    return DependencySpec(kind="default", files=()), None


def _dependencies_in(directory: Path, source: Path) -> DependencySpec | None:
    pyproject = directory / "pyproject.toml"
    # uv export needs the project next to its lock.
    if (directory / "uv.lock").is_file() and pyproject.is_file():
        return DependencySpec(kind="uv.lock", files=(directory / "uv.lock", pyproject))
    if (directory / "pylock.toml").is_file():
        return DependencySpec(kind="pylock.toml", files=(directory / "pylock.toml",))
    requirements = directory / "requirements.txt"
    if requirements.is_file():
        return DependencySpec(
            kind="requirements.txt", files=(requirements, *_included_files(requirements, source))
        )
    # Only a [project] table lists dependencies; a pyproject.toml holding tool settings alone does not.
    if "project" in _read_pyproject(pyproject):
        return DependencySpec(kind="pyproject.toml", files=(pyproject,))
    return None


def _included_files(requirements: Path, source: Path) -> list[Path]:
    """Files included by ``requirements`` (recursively) that exist in the upload.

    They define the environment as much as the top file does, so they belong in its key.
    """
    found: list[Path] = []
    pending = [requirements]
    seen = {requirements.resolve()}
    while pending and len(found) < _MAX_INCLUDES:
        current = pending.pop(0)
        for line in current.read_text(encoding="utf-8", errors="replace").splitlines():
            match = _INCLUDE.match(line)
            if match is None:
                continue
            included = (current.parent / match.group(1)).resolve()
            if included in seen or not included.is_file() or not included.is_relative_to(source):
                continue
            seen.add(included)
            found.append(included)
            pending.append(included)
    return found


def _python_version(source: Path, root: Path, spec_dir: Path | None) -> str | None:
    for directory in dict.fromkeys((root, source)):
        path = directory / ".python-version"
        if path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    return line
    for directory in dict.fromkeys((root, spec_dir or root, source)):
        requires = _lookup(_read_pyproject(directory / "pyproject.toml"), "project", "requires-python")
        if isinstance(requires, str):
            return requires
    return None
