"""API contract diffs: what a new revision's OpenAPI schema breaks for the clients of the serving one.

``diff_schemas(old, new)`` compares two OpenAPI 3.x documents (as FastAPI's ``app.openapi()`` produces
them) operation by operation. A change is *breaking* when a request that worked against the old revision
can fail against the new one, or a response the new revision sends can surprise a client written for the
old one — so the rules are opposite for the two directions:

* requests (parameters, bodies): the new schema must accept everything the old one accepted. Removing a
  type, an enum value or ``null``, or adding a required parameter or field, breaks; widening does not.
  ``number`` -> ``integer`` is a narrowing (``1.5`` is no longer accepted).
* responses (2xx only; error responses never break a contract): the old schema must accept everything
  the new one produces. Removing a field, making a required field optional or nullable, adding a type or
  an enum value, breaks; narrowing does not.

``$ref`` is followed into ``components`` (cycles are compared once); ``allOf`` is merged, and ``anyOf`` /
``oneOf`` are read as unions — a ``{"type": "null"}`` branch makes the schema nullable, which is how
Pydantic v2 writes ``X | None``. Paths match by template shape, so renaming ``{id}`` to ``{item_id}`` is
not a change.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from runtime._schemaview import View, covers, deref, escape, mapping, sequence, types_text, view

__all__ = ["Change", "Severity", "diff_schemas", "format_changes", "summarize"]

Severity = Literal["breaking", "non_breaking"]
BREAKING: Severity = "breaking"
NON_BREAKING: Severity = "non_breaking"

_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_MAX_DEPTH = 64
_Schema = dict[str, Any]


@dataclass(frozen=True)
class Change:
    kind: str
    """``path_removed``, ``parameter_added_required``, ``response_field_removed``, ... (one per rule)."""
    severity: Severity
    path: str
    """The path template, as the new schema writes it (the old one's when it was removed)."""
    method: str | None
    """Upper case; None for a change of the whole path."""
    location: str
    """Where, JSON-pointer-like, through resolved ``$ref``s: ``#/paths/~1items/post/requestBody/...``."""
    message: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def diff_schemas(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every change from ``old`` to ``new``, breaking ones first. Never raises on odd documents: what is
    not a mapping where one is expected is treated as absent."""
    differ = _Differ(old, new)
    differ.run()
    severity_order = {BREAKING: 0, NON_BREAKING: 1}
    method_order = {m.upper(): i for i, m in enumerate(_METHODS)}
    return sorted(
        differ.changes,
        key=lambda c: (severity_order[c.severity], c.path, method_order.get(c.method or "", -1), c.location),
    )


def summarize(changes: list[Change]) -> dict[str, object]:
    """Counts for an API response or a deployment record."""
    breaking = [c for c in changes if c.severity == BREAKING]
    return {
        "total": len(changes),
        "breaking": len(breaking),
        "non_breaking": len(changes) - len(breaking),
        "has_breaking": bool(breaking),
        "by_kind": dict(sorted(Counter(c.kind for c in changes).items())),
        "operations": sorted({f"{c.method} {c.path}" if c.method else c.path for c in breaking}),
    }


def format_changes(changes: list[Change]) -> list[str]:
    """Lines for the push output and the build log: a summary line, then one line per change."""
    if not changes:
        return ["API contract: no changes."]
    counts = summarize(changes)
    lines = [f"API contract: {counts['breaking']} breaking, {counts['non_breaking']} non-breaking change(s)."]
    for change in changes:
        label = "BREAKING" if change.severity == BREAKING else "ok"
        lines.append(f"  {label:<8} {change.message}")
    return lines


@dataclass(frozen=True)
class _Where:
    """Where a comparison is: the operation, the pointer, the field, and which direction rules apply."""

    path: str
    method: str
    """Upper case; empty for a change of the whole path."""
    location: str
    ctx: str
    """``path``, ``parameter``, ``request`` or ``response``."""
    field: str = ""
    """The field's dotted path for messages (``address.city``, ``tags[]``); empty at the top."""
    noun: str = ""
    """What the field is called in messages: ``query parameter``; default ``{ctx} field``."""
    strict: bool = True
    """False for non-2xx responses: their changes never break."""

    def at(self, location: str, name: str | None = None) -> _Where:
        field = self.field if name is None else name
        return replace(self, location=f"{self.location}/{location}", field=field)

    @property
    def subject(self) -> str:
        if self.field:
            return f"{self.noun or self.ctx + ' field'} `{self.field}`"
        return f"{self.ctx} body"


class _Differ:
    def __init__(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        self.old, self.new = mapping(old), mapping(new)
        self.changes: list[Change] = []
        self._stack: set[tuple[tuple[str, ...], tuple[str, ...], str]] = set()

    def add(self, kind: str, breaking: bool, where: _Where, message: str) -> None:
        prefix = f"{where.method} {where.path}" if where.method else where.path
        severity = BREAKING if breaking and where.strict else NON_BREAKING
        method = where.method or None
        self.changes.append(
            Change(kind, severity, where.path, method, where.location, f"{prefix}: {message}")
        )

    def run(self) -> None:
        old_paths, new_paths = _paths(self.old), _paths(self.new)
        for shape, (template, old_item) in old_paths.items():
            if shape not in new_paths:
                self.add(
                    "path_removed",
                    True,
                    _Where(template, "", _pointer("#/paths", template), "path"),
                    "removed",
                )
                continue
            new_template, new_item = new_paths[shape]
            for method in _METHODS:
                old_op, new_op = mapping(old_item.get(method)), mapping(new_item.get(method))
                base = _pointer(_pointer("#/paths", new_template), method)
                op = _Where(new_template, method.upper(), base, "parameter")
                if old_op and not new_op:
                    self.add("method_removed", True, replace(op, path=template), "operation removed")
                elif new_op and not old_op:
                    self.add("method_added", False, op, "operation added")
                elif old_op and new_op:
                    self._parameters(op, (old_item, old_op, template), (new_item, new_op, new_template))
                    self._request_body(op, old_op, new_op)
                    self._responses(op, old_op, new_op)
        for shape, (template, _) in new_paths.items():
            if shape not in old_paths:
                self.add(
                    "path_added", False, _Where(template, "", _pointer("#/paths", template), "path"), "added"
                )

    def _parameters(
        self, op: _Where, old: tuple[_Schema, _Schema, str], new: tuple[_Schema, _Schema, str]
    ) -> None:
        old_params, new_params = self._params(self.old, *old), self._params(self.new, *new)
        for key, param in new_params.items():
            name = str(param.get("name"))
            where = replace(op.at(f"parameters/{key[0]}/{escape(name)}", name), noun=f"{key[0]} parameter")
            previous = old_params.get(key)
            if previous is None:
                required = bool(param.get("required"))
                kind = "parameter_added_required" if required else "parameter_added"
                self.add(
                    kind, required, where, f"{'required' if required else 'optional'} {where.subject} added"
                )
                continue
            if param.get("required") and not previous.get("required"):
                self.add("parameter_made_required", True, where, f"{where.subject} is now required")
            elif previous.get("required") and not param.get("required"):
                self.add("parameter_made_optional", False, where, f"{where.subject} is now optional")
            self._schema(previous.get("schema"), param.get("schema"), where.at("schema"))
        for key, param in old_params.items():
            if key not in new_params:
                name = str(param.get("name"))
                where = replace(
                    op.at(f"parameters/{key[0]}/{escape(name)}", name), noun=f"{key[0]} parameter"
                )
                self.add("parameter_removed", False, where, f"{where.subject} removed")

    def _params(
        self, doc: _Schema, item: _Schema, op: _Schema, template: str
    ) -> dict[tuple[str, str], _Schema]:
        """Path-level and operation-level parameters by (in, name); path parameters by position."""
        positions = {name: i for i, name in enumerate(_path_params(template))}
        merged: dict[tuple[str, str], _Schema] = {}
        for raw in [*sequence(item.get("parameters")), *sequence(op.get("parameters"))]:
            param = mapping(deref(doc, raw)[0])
            where, name = str(param.get("in", "")), str(param.get("name", ""))
            if where == "path" and name in positions:
                name = f"{{{positions[name]}}}"
            merged[(where, name.lower() if where == "header" else name)] = param
        return merged

    def _request_body(self, op: _Where, old_op: _Schema, new_op: _Schema) -> None:
        old = mapping(deref(self.old, old_op.get("requestBody"))[0])
        new = mapping(deref(self.new, new_op.get("requestBody"))[0])
        where = replace(op.at("requestBody"), ctx="request")
        if not old and new:
            required = bool(new.get("required"))
            kind = "request_body_added_required" if required else "request_body_added"
            self.add(kind, required, where, f"{'required' if required else 'optional'} request body added")
        elif old and not new:
            self.add("request_body_removed", False, where, "request body removed")
        elif old and new:
            if new.get("required") and not old.get("required"):
                self.add("request_body_made_required", True, where, "request body is now required")
            self._content(where, mapping(old.get("content")), mapping(new.get("content")), "request body")

    def _responses(self, op: _Where, old_op: _Schema, new_op: _Schema) -> None:
        old_responses, new_responses = mapping(old_op.get("responses")), mapping(new_op.get("responses"))
        for status, raw in old_responses.items():
            success = str(status).upper().startswith("2")
            where = replace(op.at(f"responses/{status}"), ctx="response", strict=success)
            if status not in new_responses:
                self.add("response_status_removed", True, where, f"response {status} removed")
                continue
            old = mapping(deref(self.old, raw)[0])
            new = mapping(deref(self.new, new_responses[status])[0])
            self._content(
                where, mapping(old.get("content")), mapping(new.get("content")), f"response {status}"
            )
        for status in new_responses:
            if status not in old_responses:
                where = replace(op.at(f"responses/{status}"), ctx="response", strict=False)
                self.add("response_status_added", False, where, f"response {status} added")

    def _content(self, where: _Where, old: _Schema, new: _Schema, what: str) -> None:
        verb = "sends" if where.ctx == "response" else "accepts"
        for media, old_media in old.items():
            at = where.at(f"content/{escape(media)}", "")
            if media not in new:
                self.add(f"{where.ctx}_media_type_removed", True, at, f"{what} no longer {verb} {media}")
                continue
            self._schema(
                mapping(old_media).get("schema"), mapping(new[media]).get("schema"), at.at("schema", "")
            )
        for media in new:
            if media not in old:
                at = where.at(f"content/{escape(media)}", "")
                self.add(f"{where.ctx}_media_type_added", False, at, f"{what} now also {verb} {media}")

    def _schema(self, old_raw: object, new_raw: object, where: _Where, depth: int = 0) -> None:
        if depth > _MAX_DEPTH or old_raw is None or new_raw is None:
            return
        old, new = view(self.old, old_raw), view(self.new, new_raw)
        key = (old.refs, new.refs, where.ctx)
        if key in self._stack and (old.refs or new.refs):
            return  # a recursive model: its fields are being compared further up the stack
        self._stack.add(key)
        try:
            self._types(old, new, where)
            self._fields(old, new, where, depth)
            if old.items is not None and new.items is not None:
                self._schema(old.items, new.items, where.at("items", f"{where.field}[]"), depth + 1)
            if isinstance(old.additional, dict) and isinstance(new.additional, dict):
                self._schema(
                    old.additional, new.additional, where.at("additionalProperties", where.field), depth
                )
        finally:
            self._stack.discard(key)

    def _types(self, old: View, new: View, where: _Where) -> None:
        subject = where.subject
        if where.ctx == "response":  # the old schema must accept whatever the new one produces
            if not covers(old.types, new.types):
                was, now = types_text(old.types), types_text(new.types)
                self.add("response_type_changed", True, where, f"{subject} changed from {was} to {now}")
            elif old.types != new.types:
                was, now = types_text(old.types), types_text(new.types)
                self.add("response_type_narrowed", False, where, f"{subject} narrowed from {was} to {now}")
            if new.nullable and not old.nullable:
                self.add("response_field_made_nullable", True, where, f"{subject} may now be null")
            self._enums(old, new, where, added_breaks=True)
            return
        if not covers(new.types, old.types) or (old.nullable and not new.nullable):
            was, now = types_text(old.types, old.nullable), types_text(new.types, new.nullable)
            self.add(f"{where.ctx}_type_narrowed", True, where, f"{subject} narrowed from {was} to {now}")
        elif old.types != new.types or new.nullable != old.nullable:
            was, now = types_text(old.types, old.nullable), types_text(new.types, new.nullable)
            self.add(f"{where.ctx}_type_widened", False, where, f"{subject} widened from {was} to {now}")
        self._enums(new, old, where, added_breaks=False)

    def _enums(self, accepted: View, produced: View, where: _Where, added_breaks: bool) -> None:
        """Values ``produced`` may take that ``accepted`` does not allow (breaking), and the reverse.

        Requests: the new schema accepts what old clients produce; responses: old clients accept what
        the new schema produces. ``added_breaks`` says which way round the values are named."""
        ctx, subject = where.ctx, where.subject
        if accepted.enum is None:
            return
        if produced.enum is None:
            kind = "response_type_changed" if added_breaks else f"{ctx}_type_narrowed"
            verb = "is no longer" if added_breaks else "is now"
            self.add(kind, True, where, f"{subject} {verb} restricted to {sorted(accepted.enum, key=repr)}")
            return
        breaking, fine = ("added", "removed") if added_breaks else ("removed", "added")
        for value in sorted(produced.enum - accepted.enum, key=repr):
            self.add(f"{ctx}_enum_value_{breaking}", True, where, f"{subject}: value {value!r} {breaking}")
        for value in sorted(accepted.enum - produced.enum, key=repr):
            self.add(f"{ctx}_enum_value_{fine}", False, where, f"{subject}: value {value!r} {fine}")

    def _fields(self, old: View, new: View, where: _Where, depth: int) -> None:
        response = where.ctx == "response"
        ctx = "response" if response else "request"
        for name, schema in new.properties.items():
            dotted = f"{where.field}.{name}" if where.field else name
            at = where.at(f"properties/{escape(name)}", dotted)
            if name not in old.properties:
                required = name in new.required and not response
                kind = f"{ctx}_field_added_required" if required else f"{ctx}_field_added"
                self.add(kind, required, at, f"{'required ' if required else ''}{ctx} field `{dotted}` added")
                continue
            was, now = name in old.required, name in new.required
            if response and was and not now:
                self.add(
                    "response_field_made_optional", True, at, f"response field `{dotted}` is now optional"
                )
            elif not response and now and not was:
                self.add("request_field_made_required", True, at, f"request field `{dotted}` is now required")
            elif not response and was and not now:
                self.add(
                    "request_field_made_optional", False, at, f"request field `{dotted}` is now optional"
                )
            self._schema(old.properties[name], schema, at, depth + 1)
        for name in old.properties:
            if name not in new.properties:
                dotted = f"{where.field}.{name}" if where.field else name
                at = where.at(f"properties/{escape(name)}", dotted)
                # A request field the server no longer reads is ignored, unless extra fields are forbidden.
                breaks = response or new.additional is False
                self.add(f"{ctx}_field_removed", breaks, at, f"{ctx} field `{dotted}` removed")


def _paths(doc: _Schema) -> dict[str, tuple[str, _Schema]]:
    """Path items by template shape (``/items/{}``), so a renamed path parameter matches."""
    shaped: dict[str, tuple[str, _Schema]] = {}
    for template, item in mapping(doc.get("paths")).items():
        shape = "/".join(
            "{}" if s.startswith("{") and s.endswith("}") else s for s in str(template).split("/")
        )
        shaped[shape] = (str(template), mapping(item))
    return shaped


def _path_params(template: str) -> list[str]:
    return [s[1:-1] for s in template.split("/") if s.startswith("{") and s.endswith("}")]


def _pointer(base: str, part: str) -> str:
    return f"{base}/{escape(part)}"
