"""Field sets, merges and patches: the structured-merge-diff part of the fake API server.

A *field set* is a set of paths; each path is a tuple of elements ``("f", name)`` (a map field) and
``("k", key)`` (an item of an associative list, ``key`` the JSON of its merge keys, as in
``k:{"name":"app"}``). Leaves are scalars, atomic lists and empty maps; an associative list item is
also a member itself (FieldsV1 writes it as ``.: {}``). Field sets are serialized to and from the
``FieldsV1`` format of ``metadata.managedFields``.

Which lists are associative, and by which keys, comes from the Kubernetes OpenAPI
(``x-kubernetes-list-map-keys``) for the fields the platform uses; every other list is atomic (owned
and replaced as a whole), as ``x-kubernetes-list-type: atomic`` lists are.
"""

from __future__ import annotations

import copy
import json
from typing import Any

Path = tuple[tuple[str, str], ...]
MISSING: Any = object()

# field name -> merge keys (defaults applied before keying, as the API server defaults first)
_LIST_KEYS: dict[str, tuple[str, ...]] = {
    "containers": ("name",),
    "initContainers": ("name",),
    "ephemeralContainers": ("name",),
    "env": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("mountPath",),
    "imagePullSecrets": ("name",),
    "conditions": ("type",),
    "ownerReferences": ("uid",),
    "topologySpreadConstraints": ("topologyKey", "whenUnsatisfiable"),
    "containerStatuses": ("name",),
    "initContainerStatuses": ("name",),
}
_KEY_DEFAULTS = {"protocol": "TCP"}
# Top-level fields that are not part of any field set (the API server owns them).
_SYSTEM_METADATA = {
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
    "generateName",
}


def list_keys(field: str, items: list[Any]) -> tuple[str, ...] | None:
    """The merge keys of the list ``field`` (``None``: atomic)."""
    if not items or not all(isinstance(i, dict) for i in items):
        return _LIST_KEYS.get(field) if not items and field in _LIST_KEYS else None
    if field == "ports":
        if all("containerPort" in i for i in items):
            return ("containerPort", "protocol")
        if all("port" in i for i in items) and not any("addresses" in i for i in items):
            return ("port", "protocol")
        return None
    return _LIST_KEYS.get(field)


def item_key(keys: tuple[str, ...], item: dict[str, Any]) -> str:
    return json.dumps(
        {k: item.get(k, _KEY_DEFAULTS.get(k)) for k in keys}, sort_keys=True, separators=(",", ":")
    )


def fields_of(obj: dict[str, Any], scope: str = "main") -> set[Path]:
    """The field set of an object: ``main`` (everything but status and system metadata) or ``status``."""
    out: set[Path] = set()
    if scope == "status":
        if isinstance(obj.get("status"), dict):
            _walk(obj["status"], (("f", "status"),), out)
        return out
    for name, value in obj.items():
        if name in ("apiVersion", "kind", "status"):
            continue
        if name == "metadata":
            meta = {k: v for k, v in (value or {}).items() if k not in _SYSTEM_METADATA}
            if meta:
                _walk(meta, (("f", "metadata"),), out)
            continue
        _walk_value(name, value, (), out)
    return out


def _walk(mapping: dict[str, Any], path: Path, out: set[Path]) -> None:
    if not mapping:
        out.add(path)
        return
    for name, value in mapping.items():
        _walk_value(name, value, path, out)


def _walk_value(name: str, value: Any, path: Path, out: set[Path]) -> None:
    here = (*path, ("f", name))
    if isinstance(value, dict) and value:
        _walk(value, here, out)
    elif isinstance(value, list) and (keys := list_keys(name, value)) is not None and value:
        for item in value:
            item_path = (*here, ("k", item_key(keys, item)))
            out.add(item_path)
            for field, sub in item.items():
                _walk_value(field, sub, item_path, out)
    else:
        out.add(here)


def leaves(obj: dict[str, Any], scope: str = "main") -> dict[Path, Any]:
    """Every leaf path of the object's field set with its value (for diffs of updates)."""
    return {p: value_at(obj, p) for p in fields_of(obj, scope)}


def value_at(obj: Any, path: Path) -> Any:
    node = obj
    parent_field = ""
    for kind, name in path:
        if kind == "f":
            if not isinstance(node, dict) or name not in node:
                return MISSING
            parent_field, node = name, node[name]
        else:
            if not isinstance(node, list):
                return MISSING
            keys = list_keys(parent_field, node)
            found = [i for i in node if keys and item_key(keys, i) == name]
            if not found:
                return MISSING
            node = found[0]
    return node


def is_item(path: Path) -> bool:
    return bool(path) and path[-1][0] == "k"


def remove_at(obj: dict[str, Any], path: Path) -> None:
    """Remove the field or list item at ``path`` (nothing when it is not there)."""
    parent = value_at(obj, path[:-1]) if len(path) > 1 else obj
    kind, name = path[-1]
    if kind == "f":
        if isinstance(parent, dict):
            parent.pop(name, None)
        return
    field = path[-2][1]
    if isinstance(parent, list):
        keys = list_keys(field, parent)
        parent[:] = [i for i in parent if not (keys and item_key(keys, i) == name)]


def merge(live: Any, config: Any, field: str = "") -> Any:
    """``config`` merged into ``live`` the way apply merges: maps by field, associative lists by key,
    everything else replaced."""
    if isinstance(live, dict) and isinstance(config, dict):
        out = dict(live)
        for name, value in config.items():
            out[name] = merge(live[name], value, name) if name in live else copy.deepcopy(value)
        return out
    if isinstance(live, list) and isinstance(config, list):
        keys = list_keys(field, config) or list_keys(field, live)
        if keys:
            by_key = {item_key(keys, i): i for i in live if isinstance(i, dict)}
            merged = []
            seen = set()
            for item in config:
                key = item_key(keys, item)
                seen.add(key)
                merged.append(merge(by_key[key], item, "") if key in by_key else copy.deepcopy(item))
            merged += [i for i in live if isinstance(i, dict) and item_key(keys, i) not in seen]
            return merged
    return copy.deepcopy(config)


def to_fieldsv1(paths: set[Path]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path in paths:
        node = root
        for kind, name in path:
            node = node.setdefault(f"{kind}:{name}", {})
        if is_item(path):
            node.setdefault(".", {})
    return root


def from_fieldsv1(fields: dict[str, Any], prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    for key, sub in fields.items():
        if key == ".":
            out.add(prefix)
            continue
        kind, _, name = key.partition(":")
        path = (*prefix, (kind, name))
        if sub:
            out |= from_fieldsv1(sub, path)
        else:
            out.add(path)
    return out


def render(path: Path) -> str:
    """``.spec.template.spec.containers[name="app"].image``, as the API server words conflicts."""
    out = ""
    for kind, name in path:
        if kind == "f":
            out += f".{name}"
        else:
            out += "[" + ",".join(f"{k}={json.dumps(v)}" for k, v in json.loads(name).items()) + "]"
    return out


# -- patches ---------------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = merge_patch(out.get(name), value)
    return out


def strategic_merge_patch(target: Any, patch: Any, field: str = "") -> Any:
    """Strategic merge patch, for the patch strategies of the fields above: associative lists merge by
    key (``$patch: delete`` removes an item), other lists are replaced, ``null`` deletes."""
    if isinstance(patch, dict) and isinstance(target, dict):
        out = dict(target)
        for name, value in patch.items():
            if value is None:
                out.pop(name, None)
            elif name in out:
                out[name] = strategic_merge_patch(out[name], value, name)
            else:
                out[name] = _strip_directives(copy.deepcopy(value))
        return out
    if isinstance(patch, list) and isinstance(target, list):
        keys = list_keys(field, [i for i in patch if isinstance(i, dict) and "$patch" not in i]) or list_keys(
            field, target
        )
        if keys:
            out_list = list(target)
            for item in patch:
                key = item_key(keys, item)
                index = next((n for n, i in enumerate(out_list) if item_key(keys, i) == key), None)
                if item.get("$patch") == "delete":
                    if index is not None:
                        del out_list[index]
                elif index is None:
                    out_list.append(_strip_directives(copy.deepcopy(item)))
                else:
                    out_list[index] = strategic_merge_patch(out_list[index], item)
            return out_list
    return _strip_directives(copy.deepcopy(patch))


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


class PatchError(Exception):
    pass


def json_patch(target: Any, operations: list[dict[str, Any]]) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, test, move, copy)."""
    doc = copy.deepcopy(target)

    def split(pointer: str) -> list[str]:
        if pointer == "":
            return []
        if not pointer.startswith("/"):
            raise PatchError(f"bad JSON pointer {pointer!r}")
        return [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]

    def parent(parts: list[str]) -> tuple[Any, str]:
        node = doc
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node, parts[-1]

    def get(pointer: str) -> Any:
        node = doc
        for part in split(pointer):
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node

    for op in operations:
        name, path = op.get("op"), op.get("path", "")
        try:
            if name == "test":
                if get(path) != op.get("value"):
                    raise PatchError(f"test failed at {path}")
                continue
            if name in ("move", "copy"):
                value = copy.deepcopy(get(op["from"]))
                if name == "move":
                    json_patch_remove = [{"op": "remove", "path": op["from"]}]
                    doc = json_patch(doc, json_patch_remove)
                op = {"op": "add", "path": path, "value": value}
                name = "add"
            node, last = parent(split(path))
            if name == "add":
                if isinstance(node, list):
                    node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
                else:
                    node[last] = copy.deepcopy(op["value"])
            elif name == "remove":
                del node[int(last) if isinstance(node, list) else last]
            elif name == "replace":
                key: Any = int(last) if isinstance(node, list) else last
                if not isinstance(node, list) and key not in node:
                    raise PatchError(f"replace of a missing path {path}")
                node[key] = copy.deepcopy(op["value"])
            else:
                raise PatchError(f"unknown op {name!r}")
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise PatchError(f"{name} {path}: {exc!r}") from exc
    return doc
