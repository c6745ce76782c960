"""The resolver: which symbol an expression evaluates to, statically.

A *symbol* is a dotted name; ``()`` marks an instance (see ``_catalog.py``). Project functions, classes
and modules resolve to their qualified keys (``app.services.fetch``), library objects to their canonical
dotted names (``requests.get``), and anything unknown to None. Resolution is memoised per binding, with a
guard against cycles (``a = b`` / ``b = a``), so a name that is only ever assigned something opaque
(``requests = load()``) shadows the module it looks like, and a name bound to two different things in one
scope resolves to nothing: an unknown name is never reported.
"""

from __future__ import annotations

import ast

from runtime.insights._catalog import CANONICAL, RETURNS
from runtime.insights._index import Binding, Class, Function, Index, Scope

__all__ = ["Resolver"]

_ROUTER_CLASSES = frozenset({"fastapi.FastAPI", "fastapi.APIRouter"})


class Resolver:
    """Names expressions: the symbol an expression evaluates to, from the bindings of an ``Index``."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.modules = index.modules
        self.names = index.names
        self.functions = index.functions
        self.classes = index.classes
        self.routers: dict[str, Binding] = {}
        """Apps and routers found while resolving, by binding key."""
        self._memo: dict[int, str | None] = {}
        self._busy: set[int] = set()
        self._stars: set[tuple[str, str]] = set()

    def resolve(self, node: ast.expr, scope: Scope) -> str | None:
        """The symbol ``node`` evaluates to in ``scope``, or None when it cannot be known statically."""
        if isinstance(node, ast.Name):
            return self.lookup(node.id, scope)
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value, scope)
            return None if base is None else self.member(base, node.attr)
        if isinstance(node, ast.Call):
            func = self.resolve(node.func, scope)
            return None if func is None else self.call_result(func)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            left = self.resolve(node.left, scope)
            return left if left == "pathlib.Path()" else None
        return None

    def lookup(self, name: str, scope: Scope) -> str | None:
        current: Scope | None = scope
        while current is not None:
            found = current.bindings.get(name) if name not in current.declared else None
            if found:
                return self._bindings(found)
            current = current.parent
        for star in scope.module.scope.stars:
            symbol = self._import(f"{star}.{name}")
            if symbol is not None:
                return symbol
        return "open" if name == "open" else None

    def member(self, base: str, attr: str) -> str | None:
        module = self.modules.get(base)
        if module is not None:
            found = module.scope.bindings.get(attr)
            if found:
                return self._bindings(found)
            sub = f"{base}.{attr}"
            if sub in self.modules:
                return sub
            for star in module.scope.stars:
                if star in self.names and (base, star) not in self._stars:
                    self._stars.add((base, star))
                    try:
                        symbol = self._import(f"{star}.{attr}")
                    finally:
                        self._stars.discard((base, star))
                    if symbol is not None:
                        return symbol
            return None
        instance = base.endswith("()")
        cls = self.classes.get(base[:-2] if instance else base)
        if cls is not None:
            return self._class_attr(cls, attr, instance)
        if base in self.functions or base in self.routers:
            return None
        symbol = f"{base}.{attr}"
        symbol = CANONICAL.get(symbol, symbol)
        return RETURNS.get(symbol, symbol)

    def call_result(self, func: str) -> str | None:
        function = self.functions.get(func)
        if function is not None:
            returns = function.node.returns
            kind = None if returns is None else self.annotation_type(returns, function.outer)
            return self._returned(function) if kind is None else kind + "()"
        if func in self.classes:
            return func + "()"
        if func in self.routers or func in self.modules:
            return None
        symbol = func + "()"
        return RETURNS.get(symbol, symbol)

    def annotation_type(self, node: ast.expr, scope: Scope, depth: int = 0) -> str | None:
        """The class an annotation names (``Annotated``, ``Optional`` and ``X | None`` unwrapped)."""
        if depth > 4:
            return None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                parsed = ast.parse(node.value, mode="eval").body
            except SyntaxError:
                return None
            return self.annotation_type(parsed, scope, depth + 1)
        if isinstance(node, ast.Subscript):
            base = self.resolve(node.value, scope)
            inner = (
                node.slice.elts[0] if isinstance(node.slice, ast.Tuple) and node.slice.elts else node.slice
            )
            if base in ("typing.Annotated", "typing.Optional"):
                return self.annotation_type(inner, scope, depth + 1)
            return None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            left = self.annotation_type(node.left, scope, depth + 1)
            return left if left is not None else self.annotation_type(node.right, scope, depth + 1)
        if isinstance(node, ast.Name | ast.Attribute):
            symbol = self.resolve(node, scope)
            if symbol is None or symbol.endswith("()") or symbol in self.functions or symbol in self.modules:
                return None
            return symbol
        return None

    def resolve_binding(self, binding: Binding) -> str | None:
        return self._binding(binding)

    def is_router(self, symbol: str) -> bool:
        if not symbol.endswith("()"):
            return False
        cls = symbol[:-2]
        return cls in _ROUTER_CLASSES or (cls in self.classes and self._subclasses_router(self.classes[cls]))

    def mro(self, cls: Class) -> list[Class]:
        """The class and its project base classes, depth first (close enough to C3 for lookups)."""
        seen: list[Class] = []
        stack = [cls]
        while stack and len(seen) < 16:
            current = stack.pop()
            if current in seen:
                continue
            seen.append(current)
            for base in reversed(current.node.bases):
                symbol = self.resolve(base, current.outer)
                if symbol in self.classes:
                    stack.append(self.classes[symbol])
        return seen

    def _returned(self, function: Function) -> str | None:
        """What a project function returns, when every ``return`` in it returns the same symbol."""
        ident = id(function)
        if ident in self._memo:
            return self._memo[ident]
        if ident in self._busy:
            return None
        self._busy.add(ident)
        results: set[str | None] = set()
        stack: list[ast.AST] = list(function.node.body)
        while stack and len(results) < 2:
            node = stack.pop()
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
                continue
            if isinstance(node, ast.Yield | ast.YieldFrom):
                results.update((None, ""))  # a generator returns a generator
            elif isinstance(node, ast.Return) and node.value is not None:
                results.add(self.resolve(node.value, function.scope))
            stack.extend(ast.iter_child_nodes(node))
        self._busy.discard(ident)
        symbol = results.pop() if len(results) == 1 else None
        self._memo[ident] = symbol
        return symbol

    def _subclasses_router(self, cls: Class) -> bool:
        for current in self.mro(cls):
            for base in current.node.bases:
                if self.resolve(base, current.outer) in _ROUTER_CLASSES:
                    return True
        return False

    def _class_attr(self, cls: Class, attr: str, instance: bool) -> str | None:
        classes = self.mro(cls)
        for current in classes:
            if attr in current.methods:
                return current.methods[attr]
            if attr in current.attrs:
                return self._bindings(current.attrs[attr])
        # A project subclass of a library class (``class Api(requests.Session)``) inherits its methods.
        for current in classes if instance else ():
            for base in current.node.bases:
                symbol = self.resolve(base, current.outer)
                if symbol is not None and symbol not in self.classes:
                    return self.member(symbol + "()", attr)
        return None

    def _bindings(self, bindings: list[Binding]) -> str | None:
        results = {self._binding(binding) for binding in bindings}
        return results.pop() if len(results) == 1 else None

    def _binding(self, binding: Binding) -> str | None:
        if binding.kind in ("def", "symbol"):
            return binding.target
        if binding.kind == "import":
            return self._import(binding.target)
        if binding.kind == "opaque" or binding.scope is None:
            return None
        ident = id(binding)
        if ident in self._memo:
            return self._memo[ident]
        if ident in self._busy:
            return None
        self._busy.add(ident)
        try:
            symbol = None if binding.expr is None else self.resolve(binding.expr, binding.scope)
            if symbol is None and binding.annotation is not None:
                kind = self.annotation_type(binding.annotation, binding.scope)
                symbol = None if kind is None else kind + "()"
            if symbol is not None and self.is_router(symbol):
                self.routers[binding.key] = binding
                symbol = binding.key
        finally:
            self._busy.discard(ident)
        self._memo[ident] = symbol
        return symbol

    def _import(self, dotted: str) -> str | None:
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            canonical = self.names.get(".".join(parts[:i]))
            if canonical is not None:
                symbol: str | None = canonical
                for part in parts[i:]:
                    symbol = None if symbol is None else self.member(symbol, part)
                return symbol
        symbol = parts[0]
        for part in parts[1:]:
            symbol = f"{symbol}.{part}"
            symbol = CANONICAL.get(symbol, symbol)
        return symbol
