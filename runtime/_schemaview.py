"""JSON Schema, flattened for comparison: the part of ``runtime/contract.py`` that reads schemas.

A ``View`` is what a schema allows, with ``$ref``s followed (into the same document, cycles cut),
``allOf`` merged and ``anyOf``/``oneOf`` read as unions. ``null`` is kept apart from the other types,
so ``X | None`` (Pydantic v2: ``anyOf: [X, {"type": "null"}]``; OpenAPI 3.0: ``nullable: true``;
3.1: ``type: [x, "null"]``) is the view of ``X`` with ``nullable`` set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["View", "covers", "deref", "escape", "mapping", "sequence", "types_text", "view"]

_MAX_DEPTH = 64
_MAX_REFS = 32

Schema = dict[str, Any]


@dataclass
class View:
    types: frozenset[str] | None = None
    """The JSON types allowed besides null; None: any."""
    nullable: bool = False
    enum: frozenset[Any] | None = None
    properties: dict[str, Schema] = field(default_factory=dict)
    """Property schemas as written (their own ``$ref``s are followed when they are compared)."""
    required: frozenset[str] = frozenset()
    items: Schema | None = None
    additional: Schema | bool | None = None
    refs: tuple[str, ...] = ()
    """The ``$ref``s followed to build this view: its identity for cutting cycles."""


def view(doc: Schema, raw: object, depth: int = 0) -> View:
    """The view of schema ``raw`` (a mapping, possibly a ``$ref``) in the document ``doc``."""
    resolved, refs = deref(doc, raw)
    schema = mapping(resolved)
    result = View(refs=refs)
    if depth > _MAX_DEPTH:
        return result
    kind = schema.get("type")
    if isinstance(kind, list):
        result.nullable = "null" in kind
        result.types = frozenset(str(t) for t in kind if t != "null") or None
    elif isinstance(kind, str):
        result.nullable = kind == "null"
        result.types = None if kind == "null" else frozenset({kind})
    elif "properties" in schema:
        result.types = frozenset({"object"})
    elif "items" in schema:
        result.types = frozenset({"array"})
    result.nullable = result.nullable or schema.get("nullable") is True
    if isinstance(schema.get("enum"), list):
        result.enum = frozenset(_hashable(v) for v in schema["enum"])
    elif "const" in schema:
        result.enum = frozenset({_hashable(schema["const"])})
    if result.enum is not None and None in result.enum:
        result.nullable, result.enum = True, result.enum - {None}
    result.properties = {str(k): v for k, v in mapping(schema.get("properties")).items()}
    result.required = frozenset(str(r) for r in sequence(schema.get("required")))
    items = schema.get("items")
    result.items = items if isinstance(items, dict) else None
    additional = schema.get("additionalProperties")
    result.additional = additional if isinstance(additional, dict | bool) else None
    for part in sequence(schema.get("allOf")):
        _merge(result, view(doc, part, depth + 1))
    branches = [*sequence(schema.get("anyOf")), *sequence(schema.get("oneOf"))]
    if branches:
        _union(result, [view(doc, branch, depth + 1) for branch in branches])
    return result


def _merge(result: View, part: View) -> None:
    """``allOf``: every part applies."""
    result.nullable = (result.nullable and part.nullable) if result.types is not None else part.nullable
    if part.types is not None:
        result.types = part.types if result.types is None else (result.types & part.types) or result.types
    if part.enum is not None:
        result.enum = part.enum if result.enum is None else result.enum & part.enum
    result.properties = {**result.properties, **part.properties}
    result.required |= part.required
    result.items = result.items if result.items is not None else part.items
    result.additional = result.additional if result.additional is not None else part.additional
    result.refs += part.refs


def _union(result: View, branches: list[View]) -> None:
    """``anyOf``/``oneOf``: one branch applies. A null branch only makes the schema nullable."""
    values = [b for b in branches if not (b.nullable and b.types is None and not b.properties)]
    nullable = result.nullable or len(values) < len(branches) or any(b.nullable for b in values)
    if len(values) <= 1:
        for value in values:
            _merge(result, value)
        result.nullable = nullable
        return
    result.nullable = nullable
    types = [b.types for b in values]
    result.types = None if any(t is None for t in types) else frozenset().union(*(t for t in types if t))
    enums = [b.enum for b in values]
    result.enum = None if any(e is None for e in enums) else frozenset().union(*(e for e in enums if e))
    objects = [b for b in values if b.properties]
    for branch in objects:
        result.properties = {**branch.properties, **result.properties}
    if objects:
        result.required = frozenset.intersection(*(b.required for b in objects))
    result.refs += tuple(ref for b in values for ref in b.refs)


def covers(wide: frozenset[str] | None, narrow: frozenset[str] | None) -> bool:
    """Whether every value of the ``narrow`` types is valid for the ``wide`` ones (an integer is a number)."""
    if wide is None:
        return True
    if narrow is None:
        return False
    return all(t in wide or (t == "integer" and "number" in wide) for t in narrow)


def types_text(types: frozenset[str] | None, nullable: bool = False) -> str:
    text = "any" if types is None else " | ".join(sorted(types))
    return f"{text} | null" if nullable and types is not None else text


def deref(doc: Schema, raw: object) -> tuple[object, tuple[str, ...]]:
    """Follow local ``$ref``s (sibling keywords kept, as OpenAPI 3.1 allows); also the refs followed."""
    refs: list[str] = []
    current = raw
    while isinstance(current, dict) and isinstance(current.get("$ref"), str) and len(refs) < _MAX_REFS:
        ref = current["$ref"]
        siblings = {k: v for k, v in current.items() if k != "$ref"}
        if ref in refs or not ref.startswith("#/"):
            return siblings, tuple(refs)  # a loop of bare refs, or a file we do not have: unconstrained
        refs.append(ref)
        target: object = doc
        for part in ref[2:].split("/"):
            target = mapping(target).get(part.replace("~1", "/").replace("~0", "~"))
        current = {**mapping(target), **siblings} if siblings else target
    return current, tuple(refs)


def escape(part: str) -> str:
    """A JSON pointer reference token."""
    return part.replace("~", "~0").replace("/", "~1")


def _hashable(value: object) -> object:
    return value if isinstance(value, str | int | float | bool | None) else repr(value)


def mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def sequence(value: object) -> list[Any]:
    return value if isinstance(value, list) else []
