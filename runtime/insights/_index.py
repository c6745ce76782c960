"""The project's code as data: modules, scopes, bindings, functions and classes.

Nothing is imported or executed. Every file is parsed once; one pass records, per scope, what each name
is bound to (an import, a definition, an assigned expression, a parameter's annotation) without resolving
anything: resolution (``_resolve.py``) is lazy, so the order in which modules are indexed never matters.
"""

from __future__ import annotations

import ast
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

__all__ = ["Binding", "Class", "Function", "Index", "Module", "Scope", "discover"]

MAX_FILES = 5000
MAX_FILE_BYTES = 1_000_000
_SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages", "node_modules", "tests", "test"})
_STDLIB = frozenset(sys.stdlib_module_names)
# Methods whose calls register routes, routers or handlers wherever they appear (a factory function too).
_REGISTRATIONS = frozenset(
    {"include_router", "mount", "add_api_route", "add_api_websocket_route", "add_middleware"}
    | {"add_exception_handler"}
)

BindingKind = Literal["import", "def", "value", "symbol", "opaque"]


@dataclass(eq=False)
class Binding:
    kind: BindingKind
    key: str
    """The bound name, qualified by its scope (``main.app``): the identity of an app or router."""
    target: str = ""
    """What an ``import`` names, a ``def`` defines, a ``symbol`` is."""
    expr: ast.expr | None = None
    annotation: ast.expr | None = None
    scope: Scope | None = None


@dataclass(eq=False)
class Scope:
    module: Module
    qual: str
    parent: Scope | None
    bindings: dict[str, list[Binding]] = field(default_factory=dict)
    declared: set[str] = field(default_factory=set)
    """``global``/``nonlocal`` names: looked up outside."""
    stars: list[str] = field(default_factory=list)
    self_name: str | None = None
    cls: Class | None = None

    def bind(self, name: str, binding: Binding) -> None:
        if name not in self.declared:
            self.bindings.setdefault(name, []).append(binding)


@dataclass(eq=False)
class Module:
    name: str
    path: str
    """Relative to the project root, POSIX separators."""
    package: str
    tree: ast.Module
    scope: Scope = field(init=False)


@dataclass(eq=False)
class Function:
    key: str
    node: ast.FunctionDef | ast.AsyncFunctionDef
    module: Module
    outer: Scope
    """Where it is defined: decorators and defaults resolve here."""
    scope: Scope

    @property
    def is_async(self) -> bool:
        return isinstance(self.node, ast.AsyncFunctionDef)


@dataclass(eq=False)
class Class:
    key: str
    node: ast.ClassDef
    outer: Scope
    methods: dict[str, str] = field(default_factory=dict)
    attrs: dict[str, list[Binding]] = field(default_factory=dict)


def discover(root: Path) -> tuple[list[Path], bool]:
    """The project's own Python files under ``root``, sorted, and whether ``MAX_FILES`` cut the list."""
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not _skip_dir(here / d, d))
        for name in sorted(filenames):
            if name.endswith(".py") and not _skip_file(name) and not (here / name).is_symlink():
                files.append(here / name)
                if len(files) >= MAX_FILES:
                    return files, True
    return files, False


def _skip_dir(path: Path, name: str) -> bool:
    return (
        name.startswith(".")
        or name in _SKIP_DIRS
        or name.endswith(".egg-info")
        or (path / "pyvenv.cfg").exists()
    )


def _skip_file(name: str) -> bool:
    return name.startswith((".", "test_")) or name.endswith("_test.py") or name == "conftest.py"


class Index:
    """Every module of one project: what the indexing pass recorded, nothing resolved yet."""

    def __init__(self) -> None:
        self.modules: dict[str, Module] = {}
        self.names: dict[str, str] = {}
        """Every importable name of a module -> its canonical name."""
        self.functions: dict[str, Function] = {}
        self.classes: dict[str, Class] = {}
        self.values: list[Binding] = []
        """Names bound to a call's result: where apps and routers are created."""
        self.registrations: list[tuple[ast.Call, Scope]] = []

    def add_module(
        self, rel: PurePosixPath, tree: ast.Module, names: list[str], is_init: bool, walrus: bool = True
    ) -> Module:
        """Index one parsed file; ``names`` are its importable names, the canonical one first;
        ``walrus``: whether the source contains ``:=`` (when it does not, expressions are not walked)."""
        canonical = names[0] if names[0] not in self.modules else ".".join(rel.with_suffix("").parts)
        package = canonical if is_init else canonical.rpartition(".")[0]
        module = Module(canonical, rel.as_posix(), package, tree)
        module.scope = Scope(module, canonical, None)
        self.modules[canonical] = module
        for name in names:
            if name and name.split(".")[0] not in _STDLIB:
                self.names.setdefault(name, canonical)
        _Indexer(self, module, walrus).body(tree.body, module.scope, None)
        return module


class _Indexer:
    """One pass over a module: bindings per scope, functions, classes, registration calls."""

    def __init__(self, index: Index, module: Module, walrus: bool) -> None:
        self.index = index
        self.module = module
        self.walrus = walrus
        """Whether the source has ``:=`` at all: expressions are only walked for one if it does."""

    def body(self, body: list[ast.stmt], scope: Scope, cls: Class | None) -> None:
        for stmt in body:
            self.stmt(stmt, scope, cls)

    def stmt(self, stmt: ast.stmt, scope: Scope, cls: Class | None) -> None:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
            self._function(stmt, scope, cls)
        elif isinstance(stmt, ast.ClassDef):
            self._class(stmt, scope, cls)
        elif cls is not None:
            if isinstance(stmt, ast.Assign | ast.AnnAssign) and stmt.value is not None:
                for target in stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]:
                    if isinstance(target, ast.Name):
                        binding = Binding("value", f"{cls.key}.{target.id}", expr=stmt.value, scope=scope)
                        cls.attrs.setdefault(target.id, []).append(binding)
        else:
            self._bindings(stmt, scope)
            call = stmt.value if isinstance(stmt, ast.Expr) else None
            if isinstance(call, ast.Await):
                call = call.value
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute):
                if call.func.attr in _REGISTRATIONS:  # app.include_router(...) is a statement of its own
                    self.index.registrations.append((call, scope))
            for name, value in ast.iter_fields(stmt):
                if name in ("body", "orelse", "finalbody"):
                    self.body(value, scope, None)
                elif name == "handlers":
                    for handler in value:
                        if handler.name:
                            scope.bind(handler.name, Binding("opaque", handler.name))
                        self.body(handler.body, scope, None)
                elif name == "cases":
                    for case in value:
                        self._walk(case.pattern, scope)
                        self.body(case.body, scope, None)
                elif self.walrus and isinstance(value, ast.AST):
                    self._walk(value, scope)
                elif self.walrus and isinstance(value, list):
                    for item in value:
                        if isinstance(item, ast.AST):
                            self._walk(item, scope)

    def _bindings(self, stmt: ast.stmt, scope: Scope) -> None:
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                target = alias.name if alias.asname else alias.name.split(".")[0]
                scope.bind(alias.asname or target, Binding("import", target, target=target))
        elif isinstance(stmt, ast.ImportFrom):
            base = self._from_base(stmt)
            for alias in stmt.names if base is not None else ():
                if alias.name == "*":
                    scope.stars.append(base or "")
                else:
                    bound = alias.asname or alias.name
                    scope.bind(bound, Binding("import", bound, target=f"{base}.{alias.name}"))
        elif isinstance(stmt, ast.Assign):
            for assigned in stmt.targets:
                self._target(assigned, stmt.value, None, scope)
        elif isinstance(stmt, ast.AnnAssign):
            self._target(stmt.target, stmt.value, stmt.annotation, scope)
        elif isinstance(stmt, ast.For | ast.AsyncFor):
            self._target(stmt.target, None, None, scope)
        elif isinstance(stmt, ast.With | ast.AsyncWith):
            for item in stmt.items:
                if item.optional_vars is not None:
                    self._target(item.optional_vars, item.context_expr, None, scope)
        elif isinstance(stmt, ast.Global | ast.Nonlocal):
            scope.declared.update(stmt.names)

    def _target(
        self, target: ast.expr, value: ast.expr | None, annotation: ast.expr | None, scope: Scope
    ) -> None:
        if isinstance(target, ast.Name):
            kind: BindingKind = "value" if value is not None or annotation is not None else "opaque"
            binding = Binding(
                kind, f"{scope.qual}.{target.id}", expr=value, annotation=annotation, scope=scope
            )
            scope.bind(target.id, binding)
            if isinstance(value, ast.Call):
                self.index.values.append(binding)
        elif isinstance(target, ast.Tuple | ast.List):
            for element in target.elts:
                self._target(element, None, None, scope)
        elif isinstance(target, ast.Starred):
            self._target(target.value, None, None, scope)
        elif (
            isinstance(target, ast.Attribute)
            and isinstance(target.value, ast.Name)
            and scope.cls is not None
            and target.value.id == scope.self_name
        ):
            key = f"{scope.cls.key}.{target.attr}"
            binding = Binding("value", key, expr=value, annotation=annotation, scope=scope)
            scope.cls.attrs.setdefault(target.attr, []).append(binding)

    def _from_base(self, stmt: ast.ImportFrom) -> str | None:
        if stmt.level == 0:
            return stmt.module
        parts = self.module.package.split(".") if self.module.package else []
        if stmt.level - 1 > len(parts):
            return None
        base = parts[: len(parts) - (stmt.level - 1)]
        if stmt.module:
            base.append(stmt.module)
        return ".".join(base) or None

    def _walk(self, node: ast.AST, scope: Scope) -> None:
        """Names bound inside expressions (``:=``) and patterns (``case Point(x=px)``)."""
        stack = [node]
        while stack:
            current = stack.pop()
            if isinstance(current, ast.Lambda | ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp):
                continue  # their own scopes (a walrus in a comprehension is rare enough to ignore)
            if isinstance(current, ast.NamedExpr):
                self._target(current.target, current.value, None, scope)
            elif isinstance(current, ast.MatchAs | ast.MatchStar) and current.name:
                scope.bind(current.name, Binding("opaque", current.name))
            elif isinstance(current, ast.MatchMapping) and current.rest:
                scope.bind(current.rest, Binding("opaque", current.rest))
            stack.extend(ast.iter_child_nodes(current))

    def _function(
        self, node: ast.FunctionDef | ast.AsyncFunctionDef, scope: Scope, cls: Class | None
    ) -> None:
        key = f"{(cls.key if cls else scope.qual)}.{node.name}"
        own = Scope(self.module, key, scope)
        function = Function(key, node, self.module, scope, own)
        self.index.functions[key] = function
        if cls is not None:
            cls.methods[node.name] = key
        else:
            scope.bind(node.name, Binding("def", key, target=key))
        args = node.args
        params = [*args.posonlyargs, *args.args, *args.kwonlyargs]
        params += [arg for arg in (args.vararg, args.kwarg) if arg is not None]
        decorators = {d.id for d in node.decorator_list if isinstance(d, ast.Name)}
        first = [*args.posonlyargs, *args.args][:1]
        for arg in params:
            if cls is not None and "staticmethod" not in decorators and arg in first:
                target = cls.key if "classmethod" in decorators else cls.key + "()"
                own.bind(arg.arg, Binding("symbol", arg.arg, target=target))
                own.self_name, own.cls = arg.arg, cls
            else:
                kind: BindingKind = "value" if arg.annotation is not None else "opaque"
                own.bind(arg.arg, Binding(kind, f"{key}.{arg.arg}", annotation=arg.annotation, scope=own))
        self.body(node.body, own, None)

    def _class(self, node: ast.ClassDef, scope: Scope, cls: Class | None) -> None:
        key = f"{(cls.key if cls else scope.qual)}.{node.name}"
        self.index.classes[key] = inner = Class(key, node, scope)
        if cls is None:
            scope.bind(node.name, Binding("def", key, target=key))
        self.body(node.body, scope, inner)
