"""The fake API server's storage: objects, resourceVersions, managedFields and the watch event log.

Semantics kept from the real API server (what the platform relies on):

- one cluster-wide ``resourceVersion`` counter; every write bumps it; lists carry it; an update or a
  patch that names a stale ``metadata.resourceVersion`` fails with 409 ``Conflict``;
- server-side apply per field manager: an ``Apply`` entry per manager in ``metadata.managedFields``;
  a field another manager owns with a different value is a 409 conflict unless ``force``; fields a
  manager stops applying are removed unless someone else owns them; ``Update`` operations (create,
  update, patch, the ``status`` and ``scale`` subresources) take ownership of what they change;
- the ``status`` subresource: writes to the main resource keep the stored status, and back;
- ``metadata.generation`` bumps on spec changes; pods are deleted gracefully (``deletionTimestamp``,
  the kubelet finishes them); other objects at once, their dependents by the garbage collector;
- an event log for watches, bounded (``window``): a watch from a ``resourceVersion`` older than the log
  gets 410 ``Expired``, like a compacted etcd.
"""

from __future__ import annotations

import copy
import random
import re
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.kubefake import fields
from tests.kubefake.resources import Kind, default, field_matcher, kind_of, label_matcher

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAMES_63 = {"Service", "Namespace"}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class ApiError(Exception):
    """An API ``Status`` failure."""

    def __init__(
        self, code: int, reason: str, message: str, *, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


def _resource(kind: Kind) -> str:
    return f"{kind.plural}.{kind.group}" if kind.group else kind.plural


def not_found(kind: Kind, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{_resource(kind)} "{name}" not found',
        details={"name": name, "group": kind.group, "kind": kind.plural},
    )


def stale(kind: Kind, name: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {_resource(kind)} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
        details={"name": name, "group": kind.group, "kind": kind.plural},
    )


def invalid(kind: Kind, name: str, message: str) -> ApiError:
    return ApiError(
        422,
        "Invalid",
        f'{kind.kind} "{name}" is invalid: {message}',
        details={"name": name, "group": kind.group, "kind": kind.kind},
    )


@dataclass
class Event:
    rv: int
    type: str
    kind: Kind
    obj: dict[str, Any]
    old: dict[str, Any] | None


def _key(kind: Kind, namespace: str | None, name: str) -> tuple[str, str, str]:
    return (kind.kind, namespace or "" if kind.namespaced else "", name)


class Store:
    """Every object of the fake cluster. Thread-safe: one lock, one condition for watchers."""

    def __init__(self, *, window: int = 20000) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.rv = 1000
        self.events: deque[Event] = deque(maxlen=window)
        self.compacted_to = self.rv
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._uids: dict[str, tuple[str, str, str]] = {}
        self.closed = False
        self.validator: Callable[[Kind, dict[str, Any], bool], None] | None = None
        """Checks what clients write (``validation``: Strict rejects unknown fields); raises ApiError."""

    # -- reads --------------------------------------------------------------------------------------------

    def get(self, kind: Kind, namespace: str | None, name: str) -> dict[str, Any]:
        with self.lock:
            obj = self._objects.get(_key(kind, namespace, name))
            if obj is None:
                raise not_found(kind, name)
            return copy.deepcopy(obj)

    def find(self, kind: Kind, namespace: str | None, name: str) -> dict[str, Any] | None:
        with self.lock:
            obj = self._objects.get(_key(kind, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def list(
        self,
        kind: Kind,
        namespace: str | None = None,
        labels: str | None = None,
        field_selector: str | None = None,
    ) -> tuple[list[dict[str, Any]], int]:
        match_labels, match_fields = label_matcher(labels), field_matcher(field_selector)
        with self.lock:
            items = [
                copy.deepcopy(obj)
                for (k, ns, _), obj in sorted(self._objects.items())
                if k == kind.kind
                and (namespace is None or ns == namespace)
                and match_labels(obj["metadata"].get("labels"))
                and match_fields(obj)
            ]
            return items, self.rv

    def exists_uid(self, uid: str) -> bool:
        with self.lock:
            return uid in self._uids

    # -- writes -------------------------------------------------------------------------------------------

    def create(
        self,
        kind: Kind,
        namespace: str | None,
        body: dict[str, Any],
        *,
        manager: str,
        admit: Callable[[dict[str, Any]], None] | None = None,
        validation: str | None = None,
    ) -> dict[str, Any]:
        with self.lock:
            meta = body.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + "".join(random.choices(_SUFFIX, k=5))
            name = meta.get("name") or ""
            if kind.namespaced:
                namespace = namespace or meta.get("namespace") or "default"
                if self.find(kind_of("Namespace"), None, namespace) is None:
                    raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found')
            if _key(kind, namespace, name) in self._objects:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{_resource(kind)} "{name}" already exists',
                    details={"name": name, "group": kind.group, "kind": kind.plural},
                )
            self._check_names(kind, name, body)
            owned = fields.fields_of(body)
            obj = default(kind, body)
            obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
            meta = obj["metadata"]
            if kind.namespaced:
                meta["namespace"] = namespace
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = now()
            if kind.generation:
                meta["generation"] = 1
            if kind.status and "status" in obj and kind.kind not in ("Node", "Namespace"):
                obj["status"] = {}
            if admit is not None:
                admit(obj)
            _set_entries(obj, [(_entry(manager, "Update", kind, None), owned)])
            return self._commit(kind, None, obj, validation=validation)

    def update(
        self,
        kind: Kind,
        namespace: str | None,
        name: str,
        body: dict[str, Any],
        *,
        manager: str,
        subresource: str | None = None,
        validation: str | None = None,
    ) -> dict[str, Any]:
        """PUT: replace the object (or its status), with ``metadata.resourceVersion`` as a precondition."""
        with self.lock:
            old = self.get(kind, namespace, name)
            wanted = (body.get("metadata") or {}).get("resourceVersion")
            if wanted and wanted != old["metadata"]["resourceVersion"]:
                raise stale(kind, name)
            if subresource == "status":
                new = copy.deepcopy(old)
                new["status"] = copy.deepcopy(body.get("status") or {})
            else:
                self._check_names(kind, name, body)
                new = default(kind, body)
                new["apiVersion"], new["kind"] = kind.api_version, kind.kind
                new["metadata"] = {
                    **{k: v for k, v in old["metadata"].items() if k in fields._SYSTEM_METADATA},
                    **{k: v for k, v in new.get("metadata", {}).items() if k not in fields._SYSTEM_METADATA},
                }
                if kind.status:
                    new["status"] = copy.deepcopy(old.get("status", {}))
            self._record_update(kind, old, new, manager, subresource)
            return self._commit(kind, old, new, validation=validation)

    def patch(
        self,
        kind: Kind,
        namespace: str | None,
        name: str,
        patch: Any,
        patch_type: str,
        *,
        manager: str,
        subresource: str | None = None,
        force: bool = False,
        admit: Callable[[dict[str, Any]], None] | None = None,
        validation: str | None = None,
    ) -> dict[str, Any]:
        with self.lock:
            if patch_type == "apply":
                return self._apply(kind, namespace, name, patch, manager, force, admit, validation)
            old = self.get(kind, namespace, name)
            try:
                if patch_type == "merge":
                    new = fields.merge_patch(old, patch)
                elif patch_type == "strategic":
                    new = fields.strategic_merge_patch(old, patch)
                else:
                    new = fields.json_patch(old, patch)
            except fields.PatchError as exc:
                raise ApiError(422, "Invalid", str(exc)) from exc
            wanted = (patch.get("metadata") or {}).get("resourceVersion") if isinstance(patch, dict) else None
            if wanted and wanted != old["metadata"]["resourceVersion"]:
                raise stale(kind, name)
            new["metadata"] = {
                **new.get("metadata", {}),
                **{k: v for k, v in old["metadata"].items() if k in fields._SYSTEM_METADATA},
            }
            if subresource == "status":
                status = new.get("status")
                new = copy.deepcopy(old)
                new["status"] = status
            elif kind.status:
                new["status"] = copy.deepcopy(old.get("status", {}))
            self._check_names(kind, name, new)
            new = default(kind, new)
            self._record_update(kind, old, new, manager, subresource)
            return self._commit(kind, old, new, validation=validation)

    def scale(
        self, kind: Kind, namespace: str | None, name: str, replicas: int, *, manager: str, rv: str | None
    ) -> dict[str, Any]:
        """The ``scale`` subresource: ``spec.replicas`` of a Deployment or ReplicaSet."""
        with self.lock:
            old = self.get(kind, namespace, name)
            if rv and rv != old["metadata"]["resourceVersion"]:
                raise stale(kind, name)
            if replicas < 0:
                raise invalid(kind, name, f"spec.replicas: Invalid value: {replicas}: must be >= 0")
            new = copy.deepcopy(old)
            new["spec"]["replicas"] = replicas
            self._record_update(kind, old, new, manager, "scale")
            return self._commit(kind, old, new)

    def delete(
        self,
        kind: Kind,
        namespace: str | None,
        name: str,
        *,
        grace: int | None = None,
        propagation: str | None = None,
        preconditions: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        with self.lock:
            obj = self.get(kind, namespace, name)
            meta = obj["metadata"]
            preconditions = preconditions or {}
            if preconditions.get("uid") and preconditions["uid"] != meta["uid"]:
                raise stale(kind, name)
            if (
                preconditions.get("resourceVersion")
                and preconditions["resourceVersion"] != meta["resourceVersion"]
            ):
                raise stale(kind, name)
            if kind.kind == "Pod" and obj["spec"].get("nodeName"):
                if grace is None:
                    grace = int(obj["spec"].get("terminationGracePeriodSeconds", 30))
                if grace > 0:
                    deadline = datetime.now(UTC) + timedelta(seconds=grace)
                    current = meta.get("deletionTimestamp")
                    if current and parse_time(current) <= deadline:
                        return obj  # already terminating sooner
                    new = copy.deepcopy(obj)
                    new["metadata"]["deletionTimestamp"] = deadline.strftime("%Y-%m-%dT%H:%M:%SZ")
                    new["metadata"]["deletionGracePeriodSeconds"] = grace
                    return self._commit(kind, obj, new)
            if propagation == "Orphan":
                self._orphan(meta["uid"])
            return self._remove(kind, obj)

    def _remove(self, kind: Kind, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        key = _key(kind, meta.get("namespace"), meta["name"])
        self._objects.pop(key, None)
        self._uids.pop(meta["uid"], None)
        self.rv += 1
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self.events.append(Event(self.rv, "DELETED", kind, gone, obj))
        self.changed.notify_all()
        return gone

    def _orphan(self, uid: str) -> None:
        for key, obj in list(self._objects.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if any(r.get("uid") == uid for r in refs):
                new = copy.deepcopy(obj)
                new["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid]
                self._commit(kind_of(key[0]), obj, new)

    # -- apply --------------------------------------------------------------------------------------------

    def _apply(
        self,
        kind: Kind,
        namespace: str | None,
        name: str,
        config: dict[str, Any],
        manager: str,
        force: bool,
        admit: Callable[[dict[str, Any]], None] | None,
        validation: str | None,
    ) -> dict[str, Any]:
        meta = config.get("metadata") or {}
        if meta.get("name") and meta["name"] != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
        if config.get("kind") != kind.kind or config.get("apiVersion") != kind.api_version:
            raise ApiError(
                400, "BadRequest", f"apply: kind/apiVersion must be {kind.api_version} {kind.kind}"
            )
        applied = fields.fields_of(config)
        old = self.find(kind, namespace, name)
        if old is None:
            body = copy.deepcopy(config)
            body["metadata"]["name"] = name
            obj = self.create(kind, namespace, body, manager=manager, admit=admit, validation=validation)
            new = copy.deepcopy(obj)
            _set_entries(new, [(_entry(manager, "Apply", kind, None), applied)])
            return self._commit(kind, obj, new, quiet=True)
        if meta.get("resourceVersion") and meta["resourceVersion"] != old["metadata"]["resourceVersion"]:
            raise stale(kind, name)
        entries = _get_entries(old)
        mine_key = (manager, "Apply", None)
        conflicts: list[tuple[str, fields.Path]] = []
        for entry, owned in entries:
            if (entry["manager"], entry["operation"], entry.get("subresource")) == mine_key:
                continue
            for path in applied & owned:
                if fields.is_item(path):
                    continue
                if fields.value_at(old, path) != fields.value_at(config, path):
                    conflicts.append((entry["manager"], path))
        if conflicts and not force:
            causes = [
                {
                    "reason": "FieldManagerConflict",
                    "message": f'conflict with "{m}" using {kind.api_version}',
                    "field": fields.render(p),
                }
                for m, p in conflicts
            ]
            n = len(conflicts)
            raise ApiError(
                409,
                "Conflict",
                f"Apply failed with {n} conflict{'s' if n > 1 else ''}: "
                + "; ".join(f"{c['message']}: {c['field']}" for c in causes),
                details={"name": name, "group": kind.group, "kind": kind.plural, "causes": causes},
            )
        taken = {p for _, p in conflicts}
        merged = fields.merge(old, {k: v for k, v in config.items() if k != "status"})
        previous = next(
            (
                owned
                for e, owned in entries
                if (e["manager"], e["operation"], e.get("subresource")) == mine_key
            ),
            set(),
        )
        others: set[fields.Path] = set()
        kept_entries = []
        for entry, owned in entries:
            if (entry["manager"], entry["operation"], entry.get("subresource")) == mine_key:
                continue
            owned = owned - taken
            others |= owned
            kept_entries.append((entry, owned))
        for path in sorted(previous - applied - others, key=len, reverse=True):
            fields.remove_at(merged, path)
        merged["metadata"] = {
            **merged.get("metadata", {}),
            **{k: v for k, v in old["metadata"].items() if k in fields._SYSTEM_METADATA},
        }
        if kind.status:
            merged["status"] = copy.deepcopy(old.get("status", {}))
        self._check_names(kind, name, merged)
        merged = default(kind, merged)
        _set_entries(merged, [*kept_entries, (_entry(manager, "Apply", kind, None), applied)])
        if admit is not None:
            admit(merged)
        return self._commit(kind, old, merged, validation=validation)

    # -- internals ----------------------------------------------------------------------------------------

    def _record_update(
        self, kind: Kind, old: dict[str, Any], new: dict[str, Any], manager: str, subresource: str | None
    ) -> None:
        scope = "status" if subresource == "status" else "main"
        before, after = fields.leaves(old, scope), fields.leaves(new, scope)
        changed = {
            p
            for p, v in after.items()
            if (p not in before if fields.is_item(p) else before.get(p, fields.MISSING) != v)
        }
        removed = set(before) - set(after)
        entries = []
        mine: set[fields.Path] = set()
        for entry, owned in _get_entries(old):
            if (entry["manager"], entry["operation"], entry.get("subresource")) == (
                manager,
                "Update",
                subresource,
            ):
                mine = owned - removed
                continue
            entries.append((entry, owned - changed - removed))
        if changed or mine:
            entries.append((_entry(manager, "Update", kind, subresource), mine | changed))
        _set_entries(new, entries)

    def _commit(
        self,
        kind: Kind,
        old: dict[str, Any] | None,
        new: dict[str, Any],
        *,
        quiet: bool = False,
        validation: str | None = None,
    ) -> dict[str, Any]:
        meta = new["metadata"]
        if validation and self.validator is not None:
            self.validator(kind, new, validation == "Strict")
        if old is not None and kind.generation and _spec_of(old) != _spec_of(new):
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        if old is not None and _same(old, new):
            return copy.deepcopy(new)  # a no-op write changes nothing, not even the resourceVersion
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        key = _key(kind, meta.get("namespace"), meta["name"])
        self._objects[key] = new
        self._uids[meta["uid"]] = key
        if quiet and self.events and self.events[-1].obj["metadata"].get("uid") == meta["uid"]:
            self.events.pop()  # the create of an apply: one ADDED event, with the apply's managedFields
            self.events.append(Event(self.rv, "ADDED", kind, copy.deepcopy(new), None))
        else:
            self.events.append(
                Event(self.rv, "ADDED" if old is None else "MODIFIED", kind, copy.deepcopy(new), old)
            )
        self.changed.notify_all()
        return copy.deepcopy(new)

    def _check_names(self, kind: Kind, name: str, obj: dict[str, Any]) -> None:
        pattern = _DNS_LABEL if kind.kind in _LABEL_NAMES_63 else _DNS_SUBDOMAIN
        limit = 63 if kind.kind in _LABEL_NAMES_63 else 253
        if not name or len(name) > limit or not pattern.match(name):
            raise invalid(kind, name, f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 name")
        for where, labels in _label_sets(obj):
            for key, value in (labels or {}).items():
                if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
                    raise invalid(kind, name, f"{where}: Invalid value: {value!r}: a valid label value")
                prefix, _, short = key.rpartition("/")
                if (
                    len(short) > 63
                    or not re.match(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", short)
                    or (prefix and not _DNS_SUBDOMAIN.match(prefix))
                ):
                    raise invalid(kind, name, f"{where}: Invalid value: {key!r}: a valid label key")

    # -- watches ------------------------------------------------------------------------------------------

    def watch(
        self,
        kind: Kind,
        namespace: str | None,
        labels: str | None,
        field_selector: str | None,
        resource_version: str | None,
        *,
        until: float,
        bookmarks: bool,
        clock: Callable[[], float],
    ) -> Iterator[dict[str, Any]]:
        """The events of a watch, as the JSON objects the API streams. Ends at ``until`` (monotonic)."""
        match_labels, match_fields = label_matcher(labels), field_matcher(field_selector)

        def matches(obj: dict[str, Any] | None) -> bool:
            if obj is None:
                return False
            meta = obj["metadata"]
            return (
                (namespace is None or meta.get("namespace") == namespace)
                and match_labels(meta.get("labels"))
                and match_fields(obj)
            )

        with self.lock:
            if resource_version in (None, "", "0"):
                items, cursor = self.list(kind, namespace, labels, field_selector)
                initial = [{"type": "ADDED", "object": obj} for obj in items]
            else:
                cursor, initial = int(resource_version), []
                if cursor < self.compacted_to or (self.events and cursor < self.events[0].rv - 1):
                    initial = [_expired(cursor, self.rv)]
                    cursor = -1
        yield from initial
        if cursor < 0:
            return
        last_bookmark = clock()
        while clock() < until and not self.closed:
            with self.lock:
                if self.events and cursor < self.events[0].rv - 1:
                    yield _expired(cursor, self.rv)
                    return
                pending = []
                for event in reversed(self.events):
                    if event.rv <= cursor:
                        break
                    pending.append(event)
                if not pending:
                    self.changed.wait(min(0.5, max(0.0, until - clock())))
                    if bookmarks and clock() - last_bookmark > 1.0:
                        last_bookmark = clock()
                        yield {
                            "type": "BOOKMARK",
                            "object": {
                                "kind": kind.kind,
                                "apiVersion": kind.api_version,
                                "metadata": {"resourceVersion": str(max(cursor, 0))},
                            },
                        }
                    continue
            for event in reversed(pending):
                cursor = event.rv
                if event.kind is not kind:
                    continue
                now_matches, before = matches(event.obj), matches(event.old)
                if event.type == "DELETED":
                    if before or now_matches:
                        yield {"type": "DELETED", "object": event.obj}
                elif now_matches and not before:
                    yield {"type": "ADDED", "object": event.obj}
                elif now_matches:
                    yield {"type": "MODIFIED", "object": event.obj}
                elif before:
                    yield {"type": "DELETED", "object": event.obj}

    def compact(self) -> None:
        """Forget the event log (as etcd compaction does): older resourceVersions can't be watched from."""
        with self.lock:
            self.events.clear()
            self.compacted_to = self.rv

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.changed.notify_all()


_SUFFIX = "bcdfghjklmnpqrstvwxz2456789"


def _expired(cursor: int, current: int) -> dict[str, Any]:
    return {
        "type": "ERROR",
        "object": ApiError(410, "Expired", f"too old resource version: {cursor} ({current})").status(),
    }


def _spec_of(obj: dict[str, Any]) -> Any:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _same(old: dict[str, Any], new: dict[str, Any]) -> bool:
    def strip(obj: dict[str, Any]) -> dict[str, Any]:
        out = dict(obj)
        meta = dict(out.get("metadata", {}))
        meta.pop("resourceVersion", None)
        meta["managedFields"] = [
            {k: v for k, v in e.items() if k != "time"} for e in meta.get("managedFields") or []
        ]
        out["metadata"] = meta
        return out

    return strip(old) == strip(new)


def _label_sets(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = [("metadata.labels", (obj.get("metadata") or {}).get("labels") or {})]
    template = ((obj.get("spec") or {}).get("template") or {}).get("metadata") or {}
    if template.get("labels"):
        out.append(("spec.template.metadata.labels", template["labels"]))
    return out


def _entry(manager: str, operation: str, kind: Kind, subresource: str | None) -> dict[str, Any]:
    entry = {
        "manager": manager,
        "operation": operation,
        "apiVersion": kind.api_version,
        "time": now(),
        "fieldsType": "FieldsV1",
    }
    if subresource:
        entry["subresource"] = subresource
    return entry


def _get_entries(obj: dict[str, Any]) -> list[tuple[dict[str, Any], set[fields.Path]]]:
    return [
        ({k: v for k, v in e.items() if k != "fieldsV1"}, fields.from_fieldsv1(e.get("fieldsV1") or {}))
        for e in obj["metadata"].get("managedFields") or []
    ]


def _set_entries(obj: dict[str, Any], entries: list[tuple[dict[str, Any], set[fields.Path]]]) -> None:
    obj["metadata"]["managedFields"] = [
        {**entry, "fieldsV1": fields.to_fieldsv1(owned)} for entry, owned in entries if owned
    ]
