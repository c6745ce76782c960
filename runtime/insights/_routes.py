"""Where async code runs on the event loop: routes of FastAPI apps and routers, and their dependencies.

An app or router is a name bound to ``FastAPI(...)`` or ``APIRouter(...)`` (or a project subclass), in a
module or inside a factory function. Routes come from decorators (``@router.get("/x")``) and from
``add_api_route``; prefixes and dependencies from the constructor (``APIRouter(prefix=..., dependencies=
[...])``) and from every ``include_router`` (a router included twice serves its routes twice). Mounted
apps get the mount path but none of the parent's dependencies, as Starlette does.

The *roots* of the analysis are the ``async def`` functions FastAPI awaits on the loop: endpoints,
dependencies (``Depends(fn)`` in parameters, in ``Annotated[...]``, in ``dependencies=[...]`` of a route,
a router or the app, and their sub-dependencies), ``@app.middleware`` functions and exception handlers.
A plain ``def`` endpoint or dependency is not a root: FastAPI runs it in a worker thread.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field

from runtime.insights._index import Binding, Function, Scope
from runtime.insights._resolve import Resolver

__all__ = ["Root", "find_roots"]

_VERBS = frozenset({"get", "post", "put", "patch", "delete", "head", "options", "trace"})
_DEPENDS = frozenset({"fastapi.Depends", "fastapi.Security"})
_DYNAMIC = "{?}"
_MAX_MOUNTS = 32

_Deps = list[tuple[ast.expr, Scope]]


@dataclass
class Root:
    """An async function run on the event loop, and the routes that run it."""

    kind: str
    """``endpoint``, ``dependency``, ``middleware`` or ``exception_handler``."""
    function: Function
    routes: set[str] = field(default_factory=set)


@dataclass
class _Router:
    prefix: str
    deps: _Deps
    parents: list[tuple[str, str, _Deps, bool]] = field(default_factory=list)
    """(parent key, include prefix, include dependencies, mounted)."""


@dataclass
class _Route:
    router: str
    methods: tuple[str, ...]
    path: str
    function: Function
    deps: _Deps


def find_roots(resolver: Resolver) -> list[Root]:
    """Every async function FastAPI runs on the loop, with the routes (``GET /items/{id}``) it serves."""
    index = resolver.index
    for binding in index.values:
        resolver.resolve_binding(binding)  # registers every app and router
    routers = {key: _router(binding) for key, binding in resolver.routers.items()}
    roots: dict[tuple[str, str], Root] = {}
    routes: list[_Route] = []

    def root(kind: str, function: Function | None, labels: set[str]) -> None:
        if function is not None and function.is_async:
            roots.setdefault((kind, function.key), Root(kind, function)).routes.update(labels)

    for function in index.functions.values():
        for decorator in function.node.decorator_list:
            if not isinstance(decorator, ast.Call) or not isinstance(decorator.func, ast.Attribute):
                continue
            owner = resolver.resolve(decorator.func.value, function.outer)
            attr = decorator.func.attr
            if owner not in routers:
                continue
            if attr == "middleware":
                root("middleware", function, {"*"})
            elif attr == "exception_handler":
                root("exception_handler", function, {"*"})
            elif (methods := _methods(decorator, attr)) is not None:
                path = _string(_arg(decorator, 0, "path"))
                routes.append(_Route(owner, methods, path, function, _deps(decorator, function.outer)))
    for call, scope in index.registrations:
        assert isinstance(call.func, ast.Attribute)
        owner = resolver.resolve(call.func.value, scope)
        if owner not in routers:
            continue
        attr = call.func.attr
        if attr in ("include_router", "mount"):
            mounted = attr == "mount"
            child = _arg(call, 1 if mounted else 0, "app" if mounted else "router")
            key = None if child is None else resolver.resolve(child, scope)
            if key in routers and key != owner:
                prefix = _string(_arg(call, 0, "path") if mounted else _arg(call, None, "prefix"))
                routers[key].parents.append((owner, prefix, [] if mounted else _deps(call, scope), mounted))
        elif attr in ("add_api_route", "add_api_websocket_route"):
            endpoint = _function(resolver, _arg(call, 1, "endpoint"), scope)
            websocket = attr == "add_api_websocket_route"
            methods = ("WEBSOCKET",) if websocket else _methods(call, "api_route") or ("GET",)
            if endpoint is not None:
                path = _string(_arg(call, 0, "path"))
                routes.append(_Route(owner, methods, path, endpoint, _deps(call, scope)))
        elif attr == "add_middleware":
            cls = _arg(call, 0, "middleware_class")
            symbol = None if cls is None else resolver.resolve(cls, scope)
            if symbol in resolver.classes:
                for method in ("dispatch", "__call__"):
                    found = resolver.member(symbol + "()", method)
                    root("middleware", index.functions.get(found or ""), {"*"})
        elif attr == "add_exception_handler":
            root("exception_handler", _function(resolver, _arg(call, 1, "handler"), scope), {"*"})

    for route in routes:
        for prefix, inherited in _mounts(route.router, routers, frozenset()):
            router = routers[route.router]
            path = prefix + router.prefix + route.path or "/"
            labels = {f"{method} {path}" for method in route.methods}
            root("endpoint", route.function, labels)
            deps = [*inherited, *router.deps, *route.deps, *_param_deps(route.function)]
            for dependency in _dependencies(resolver, deps, set()):
                root("dependency", dependency, labels)
    return sorted(roots.values(), key=lambda r: (r.function.module.path, r.function.node.lineno, r.kind))


def _router(binding: Binding) -> _Router:
    call = binding.expr if isinstance(binding.expr, ast.Call) else None
    if call is None or binding.scope is None:
        return _Router("", [])
    prefix = _arg(call, None, "prefix")
    return _Router("" if prefix is None else _string(prefix), _deps(call, binding.scope))


def _mounts(key: str, routers: dict[str, _Router], seen: frozenset[str]) -> list[tuple[str, _Deps]]:
    """Each (prefix, inherited dependencies) under which a router's routes are served."""
    parents = [p for p in routers[key].parents if p[0] not in seen and p[0] != key]
    if not parents:
        return [("", [])]
    found: list[tuple[str, _Deps]] = []
    for parent, prefix, deps, mounted in parents:
        owner = routers[parent]
        for outer, inherited in _mounts(parent, routers, seen | {key}):
            found.append((outer + owner.prefix + prefix, [] if mounted else [*inherited, *owner.deps, *deps]))
    return found[:_MAX_MOUNTS]


def _methods(call: ast.Call, attr: str) -> tuple[str, ...] | None:
    if attr in _VERBS:
        return (attr.upper(),)
    if attr in ("websocket", "websocket_route"):
        return ("WEBSOCKET",)
    if attr not in ("api_route", "route"):
        return None
    methods = _arg(call, None, "methods")
    if isinstance(methods, ast.List | ast.Tuple | ast.Set):
        names = [
            e.value.upper() for e in methods.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)
        ]
        return tuple(sorted(names)) or ("GET",)
    return ("GET",)


def _arg(call: ast.Call, position: int | None, name: str) -> ast.expr | None:
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    if (
        position is not None
        and position < len(call.args)
        and not isinstance(call.args[position], ast.Starred)
    ):
        return call.args[position]
    return None


def _string(node: ast.expr | None) -> str:
    if node is None:
        return ""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return _DYNAMIC


def _deps(call: ast.Call, scope: Scope) -> _Deps:
    value = _arg(call, None, "dependencies")
    if isinstance(value, ast.List | ast.Tuple):
        return [(element, scope) for element in value.elts]
    return []


def _function(resolver: Resolver, node: ast.expr | None, scope: Scope) -> Function | None:
    symbol = None if node is None else resolver.resolve(node, scope)
    return None if symbol is None else resolver.functions.get(symbol)


def _param_deps(function: Function) -> _Deps:
    """``Depends(...)`` in the parameters: as a default value or in ``Annotated[T, Depends(...)]``."""
    args = function.node.args
    positional = [*args.posonlyargs, *args.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    found: _Deps = []
    pairs = [*zip(positional, defaults, strict=True), *zip(args.kwonlyargs, args.kw_defaults, strict=True)]
    for arg, default in pairs:
        annotation = arg.annotation
        if isinstance(default, ast.Call):
            found.append((_with_annotation(default, annotation), function.outer))
        if isinstance(annotation, ast.Subscript) and isinstance(annotation.slice, ast.Tuple):
            first, *metadata = annotation.slice.elts
            found.extend(
                (_with_annotation(m, first), function.outer) for m in metadata if isinstance(m, ast.Call)
            )
    return found


def _with_annotation(call: ast.Call, annotation: ast.expr | None) -> ast.expr:
    """``Depends()`` with no argument depends on the parameter's type: make that explicit."""
    if call.args or any(k.arg == "dependency" for k in call.keywords) or annotation is None:
        return call
    return ast.Call(func=call.func, args=[annotation], keywords=call.keywords)


def _dependencies(resolver: Resolver, deps: _Deps, seen: set[str]) -> Iterator[Function]:
    """Every function the dependencies run, sub-dependencies included (each once)."""
    for node, scope in deps:
        if not isinstance(node, ast.Call) or resolver.resolve(node.func, scope) not in _DEPENDS:
            continue
        target = _arg(node, 0, "dependency")
        symbol = None if target is None else resolver.resolve(target, scope)
        if symbol is None:
            continue
        if symbol in resolver.classes:  # FastAPI calls the class: its __init__ (sync) takes the parameters
            symbol = resolver.member(symbol + "()", "__init__") or ""
        elif symbol.endswith("()") and symbol[:-2] in resolver.classes:  # an instance: its __call__
            symbol = resolver.member(symbol, "__call__") or ""
        function = resolver.functions.get(symbol)
        if function is None or function.key in seen:
            continue
        seen.add(function.key)
        yield function
        yield from _dependencies(resolver, _param_deps(function), seen)
