"""Blocking calls in async code, found at build time by reading the project's source.

The most common FastAPI production incident: an ``async def`` endpoint calls something synchronous that
waits (``time.sleep``, ``requests.get``, a sync database driver) and, while it waits, the event loop serves
nobody else. FastAPI runs a plain ``def`` endpoint in a worker thread; an ``async def`` one it awaits on
the loop, so one slow call there stalls every request of the instance.

``analyze_project`` parses every Python file of the project with ``ast`` — never importing or executing
it — finds the async functions FastAPI runs on the loop (``_routes.py``), and follows their calls through
the project's own functions, across modules, to the known blocking APIs (``_catalog.py``). Not reported:
awaited calls, calls handed to a worker thread (``run_in_threadpool``, ``asyncio.to_thread``,
``loop.run_in_executor``, ``anyio.to_thread.run_sync``), lambdas and nested functions that are only
passed around, and names that merely look like a blocking module (a local ``requests`` list, a
``self.sleep`` method). A file that does not parse is an entry in ``Report.errors``, never an exception.
"""

from __future__ import annotations

import ast
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from runtime.insights._catalog import OFFLOAD, Rule, display, lookup
from runtime.insights._index import MAX_FILE_BYTES, Function, Index, discover
from runtime.insights._resolve import Resolver
from runtime.insights._routes import Root, find_roots

__all__ = ["MAX_DEPTH", "Finding", "ParseError", "Report", "analyze_project", "format_findings"]

MAX_DEPTH = 8
"""Calls followed from an async function through the project's own functions before giving up."""

# Nodes that never contain a call: not worth a visit (every Name would otherwise cost two).
_LEAVES = (ast.Name, ast.Constant, ast.expr_context, ast.operator, ast.cmpop, ast.unaryop, ast.boolop)
_KIND_NAMES = {
    "endpoint": "endpoint",
    "dependency": "dependency",
    "middleware": "middleware",
    "exception_handler": "exception handler",
}


@dataclass(frozen=True)
class Finding:
    """One blocking call reachable from one async function."""

    file: str
    """Where the blocking call is, relative to the project root (POSIX separators)."""
    line: int
    column: int
    """1-based, like editors and compilers print it."""
    call: str
    """The blocking API, dotted: ``requests.get``, ``sqlite3.Connection.execute``."""
    category: str
    severity: str
    chain: tuple[str, ...]
    """The async function, the project functions in between, the call (``main.read``, ``db.load``,
    ``sqlite3.connect``)."""
    routes: tuple[str, ...]
    """``GET /items/{id}``, prefixes applied; ``*`` for middleware and exception handlers."""
    function: str
    """The async function FastAPI runs on the loop (the endpoint, or the dependency)."""
    kind: str
    """``endpoint``, ``dependency``, ``middleware`` or ``exception_handler``."""
    fix: str

    @property
    def dependency(self) -> str | None:
        """The dependency's name, for a finding in one (its ``routes`` are those that depend on it)."""
        return self.function if self.kind == "dependency" else None

    @property
    def message(self) -> str:
        where = ", ".join(self.routes) if self.routes != ("*",) else "every request"
        what = _KIND_NAMES.get(self.kind, self.kind)
        return f"`{self.call}` blocks the event loop in async {what} `{self.function}` ({where})"

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["chain"], data["routes"] = list(self.chain), list(self.routes)
        data["dependency"], data["message"] = self.dependency, self.message
        return data


@dataclass(frozen=True)
class ParseError:
    """A file that could not be analysed (a syntax error, an undecodable file, a file too large)."""

    file: str
    line: int | None
    message: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Report:
    root: str
    entrypoint: str | None
    findings: tuple[Finding, ...]
    files_scanned: int
    async_functions: int
    """Async endpoints, dependencies, middleware and handlers analysed."""
    duration_s: float
    errors: tuple[ParseError, ...]
    truncated: bool
    """More files than the analysis reads (``_index.MAX_FILES``): the rest were not scanned."""

    def as_dict(self) -> dict[str, object]:
        return {
            "root": self.root,
            "entrypoint": self.entrypoint,
            "findings": [finding.as_dict() for finding in self.findings],
            "files_scanned": self.files_scanned,
            "async_functions": self.async_functions,
            "duration_s": round(self.duration_s, 4),
            "errors": [error.as_dict() for error in self.errors],
            "truncated": self.truncated,
        }


def analyze_project(root: Path, entrypoint: str | None = None) -> Report:
    """Find the blocking calls in the async endpoints and dependencies of the project at ``root``.

    ``entrypoint`` (``module.path:app``, as ``runtime.detect`` finds it) adds its import directory to the
    places module names are resolved from, for layouts where that is neither the root nor ``src/``.
    Never raises for the project's content: unreadable or invalid files are listed in ``errors``.
    """
    started = time.perf_counter()
    root = root.resolve()
    files, truncated = discover(root)
    rels = [PurePosixPath(path.relative_to(root).as_posix()) for path in files]
    base = _entrypoint_base(rels, entrypoint)
    index, errors = Index(), list[ParseError]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the user's invalid escape sequences are not our build's warnings
        for path, rel in zip(files, rels, strict=True):
            parsed = _parse(path, rel, errors)
            if parsed is not None:
                tree, source = parsed
                try:
                    index.add_module(rel, tree, *_module_names(root, rel, base), walrus=b":=" in source)
                except RecursionError:
                    errors.append(ParseError(rel.as_posix(), None, "nested too deeply to analyse"))
    resolver = Resolver(index)
    findings: list[Finding] = []
    try:
        roots = find_roots(resolver)
    except RecursionError:
        roots = []
        errors.append(ParseError("", None, "the project's code is nested too deeply to analyse"))
    walker = _Walker(resolver)
    for entry in roots:
        try:
            findings.extend(walker.findings(entry))
        except RecursionError:
            errors.append(
                ParseError(entry.function.module.path, entry.function.node.lineno, "too deeply nested")
            )
    findings.sort(key=lambda f: (f.file, f.line, f.column, f.routes, f.function))
    return Report(
        root=str(root),
        entrypoint=entrypoint,
        findings=tuple(findings),
        files_scanned=len(files),
        async_functions=len(roots),
        duration_s=time.perf_counter() - started,
        errors=tuple(errors),
        truncated=truncated,
    )


def format_findings(findings: tuple[Finding, ...] | list[Finding]) -> list[str]:
    """Build-log lines: ``file:line:col: severity: message`` then the call chain and the fix, indented."""
    lines: list[str] = []
    for finding in findings:
        lines.append(f"{finding.file}:{finding.line}:{finding.column}: {finding.severity}: {finding.message}")
        if len(finding.chain) > 2:
            lines.append(f"    via {' → '.join(finding.chain)}")
        lines.append(f"    fix: {finding.fix}")
    return lines


@dataclass(frozen=True)
class _Site:
    function: Function
    node: ast.Call
    symbol: str
    rule: Rule


class _Walker:
    """Follows calls from async roots; per-function scans and reachable sites are computed once."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self._scans: dict[str, tuple[list[_Site], list[Function]]] = {}
        self._reach: dict[tuple[str, int], dict[int, tuple[tuple[str, ...], _Site]]] = {}

    def findings(self, root: Root) -> list[Finding]:
        reached, _ = self.reach(root.function, 0, frozenset())
        function = root.function.key
        found = []
        for chain, site in reached.values():
            fix = [site.rule.fix]
            if site.rule.offload:
                fix.append("run it in a worker thread with `await run_in_threadpool(fn, ...)`")
            if root.kind in ("endpoint", "dependency"):
                short = function.rpartition(".")[2]
                fix.append(f"make `{short}` a plain `def` (FastAPI runs it in a worker thread)")
            found.append(
                Finding(
                    file=site.function.module.path,
                    line=site.node.lineno,
                    column=site.node.col_offset + 1,
                    call=display(site.symbol),
                    category=site.rule.category,
                    severity=site.rule.severity,
                    chain=(*chain, display(site.symbol)),
                    routes=tuple(sorted(root.routes)),
                    function=function,
                    kind=root.kind,
                    fix="; or ".join(fix),
                )
            )
        return found

    def reach(
        self, function: Function, depth: int, stack: frozenset[str]
    ) -> tuple[dict[int, tuple[tuple[str, ...], _Site]], bool]:
        """Blocking sites reachable from ``function`` (shortest chain each); True when a cycle was cut."""
        memo = self._reach.get((function.key, depth))
        if memo is not None:
            return memo, False
        sites, callees = self.scan(function)
        found: dict[int, tuple[tuple[str, ...], _Site]] = {}
        for site in sites:
            found[id(site.node)] = ((function.key,), site)
        cut = False
        if depth < MAX_DEPTH:
            for callee in callees:
                if callee.key in stack or callee.key == function.key:
                    cut = True
                    continue
                reached, inner_cut = self.reach(callee, depth + 1, stack | {function.key})
                cut = cut or inner_cut
                for ident, (chain, site) in reached.items():
                    if ident not in found or len(found[ident][0]) > len(chain) + 1:
                        found[ident] = ((function.key, *chain), site)
        if not cut:  # a result computed with part of a cycle cut off is only right for this path
            self._reach[(function.key, depth)] = found
        return found, cut

    def scan(self, function: Function) -> tuple[list[_Site], list[Function]]:
        """The blocking calls in ``function``'s own body, and the project functions it calls."""
        cached = self._scans.get(function.key)
        if cached is not None:
            return cached
        sites: list[_Site] = []
        callees: dict[str, Function] = {}
        awaited: set[int] = set()
        stack: list[ast.AST] = list(reversed(function.node.body))
        while stack:
            node = stack.pop()
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
                continue  # defined here, run only if called (a call is an edge)
            if isinstance(node, ast.Await) and isinstance(node.value, ast.Call):
                awaited.add(id(node.value))
            if isinstance(node, ast.Call):
                symbol = self.resolver.resolve(node.func, function.scope)
                if _offloaded(node, symbol):
                    continue  # runs in a worker thread: nothing inside blocks the loop
                callee = None if symbol is None else self._callee(symbol)
                if callee is not None:
                    callees.setdefault(callee.key, callee)
                elif symbol is not None and id(node) not in awaited:
                    rule = lookup(symbol)
                    if rule is not None:
                        sites.append(_Site(function, node, symbol, rule))
            stack.extend(reversed([c for c in ast.iter_child_nodes(node) if not isinstance(c, _LEAVES)]))
        result = (sites, list(callees.values()))
        self._scans[function.key] = result
        return result

    def _callee(self, symbol: str) -> Function | None:
        """The project function a call runs: a function, a class's ``__init__``, or ``__call__``."""
        resolver = self.resolver
        if symbol in resolver.functions:
            return resolver.functions[symbol]
        if symbol in resolver.classes:
            return resolver.functions.get(resolver.member(symbol + "()", "__init__") or "")
        if symbol.endswith("()") and symbol[:-2] in resolver.classes:
            return resolver.functions.get(resolver.member(symbol, "__call__") or "")
        return None


def _offloaded(node: ast.Call, symbol: str | None) -> bool:
    if symbol is not None and (symbol in OFFLOAD or symbol.endswith(".run_in_executor")):
        return True
    return isinstance(node.func, ast.Attribute) and node.func.attr == "run_in_executor"


def _parse(path: Path, rel: PurePosixPath, errors: list[ParseError]) -> tuple[ast.Module, bytes] | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            errors.append(ParseError(rel.as_posix(), None, f"skipped: larger than {MAX_FILE_BYTES} bytes"))
            return None
        source = path.read_bytes()
        return ast.parse(source, filename=rel.as_posix()), source
    except SyntaxError as exc:
        errors.append(ParseError(rel.as_posix(), exc.lineno, f"{type(exc).__name__}: {exc.msg}"))
    except (OSError, ValueError, RecursionError, MemoryError) as exc:
        errors.append(ParseError(rel.as_posix(), None, f"{type(exc).__name__}: {exc}"))
    return None


def _module_names(root: Path, rel: PurePosixPath, base: PurePosixPath | None) -> tuple[list[str], bool]:
    """The names a file is importable as: from the root, from ``src/``, from the entrypoint's directory,
    and from the top of its package (the highest directory with an ``__init__.py``)."""
    parts = list(rel.with_suffix("").parts)
    is_init = parts[-1] == "__init__"
    if is_init:
        parts.pop()
    names = [".".join(parts[1:])] if parts[:1] == ["src"] and len(parts) > 1 else []
    names.append(".".join(parts))
    if base is not None and rel.is_relative_to(base) and base.parts:
        names.append(".".join(parts[len(base.parts) :]))
    directory, depth = root / rel.parent, 0
    while directory != root and (directory / "__init__.py").is_file():
        depth, directory = depth + 1, directory.parent
    keep = depth if is_init else depth + 1
    if 0 < keep <= len(parts):
        names.append(".".join(parts[-keep:]))
    return [name for name in dict.fromkeys(names) if name] or [rel.as_posix()], is_init


def _entrypoint_base(files: list[PurePosixPath], entrypoint: str | None) -> PurePosixPath | None:
    """The directory ``module.path`` of ``module.path:app`` is imported from, if it is in the project."""
    if not entrypoint:
        return None
    module = PurePosixPath(*entrypoint.partition(":")[0].split("."))
    for candidate in (module.with_suffix(".py"), module / "__init__.py"):
        matches = [rel for rel in files if rel.parts[-len(candidate.parts) :] == candidate.parts]
        if matches:
            rel = min(matches, key=lambda r: len(r.parts))
            return PurePosixPath(*rel.parts[: len(rel.parts) - len(candidate.parts)])
    return None
