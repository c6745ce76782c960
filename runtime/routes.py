"""Route templates: raw request paths -> the app's own templates (``/items/123`` -> ``/items/{item_id}``).

Metrics are labelled by route template, never by raw path, so their cardinality is bounded by the app's
code, not by its traffic. The templates come from the revision's OpenAPI document (fetched once, during
verification); matching follows Starlette's rules closely enough for metrics: ``{name}`` matches one
path segment, ``{name:path}`` the rest of the path, and the first template in declaration order wins
(an OpenAPI document lists paths in the order the routes were declared).

Paths that match no template get :data:`UNMATCHED`; methods outside the standard set get ``OTHER``.
Lookups are cached per path (bounded), so the regular expressions run once per distinct path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

UNMATCHED = "unmatched"
"""The route of a request no template matched (a 404, a path outside the OpenAPI document)."""

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})
_CACHE_SIZE = 4096
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::([A-Za-z_]+))?\}")


def _compile(template: str) -> re.Pattern[str]:
    out, at = [], 0
    for match in _PARAM.finditer(template):
        out.append(re.escape(template[at : match.start()]))
        out.append(".*" if match.group(2) == "path" else "[^/]+")
        at = match.end()
    out.append(re.escape(template[at:]))
    return re.compile("".join(out))


class RouteMatcher:
    """Matches ``(method, path)`` to ``"METHOD /template"`` labels. Not thread-safe (one event loop)."""

    def __init__(self, templates: Iterable[str] = ()) -> None:
        self.templates = list(dict.fromkeys(templates))
        self._static = {t for t in self.templates if "{" not in t}
        self._patterns = [(t, _compile(t)) for t in self.templates if "{" in t]
        self._cache: dict[bytes, str] = {}

    @classmethod
    def from_openapi(cls, schema: Mapping[str, Any] | None) -> RouteMatcher:
        """From an OpenAPI 3 document (its ``paths``, in order); an empty matcher for anything else."""
        paths = schema.get("paths") if isinstance(schema, Mapping) else None
        if not isinstance(paths, Mapping):
            return cls()
        return cls(str(p) for p in paths if isinstance(p, str) and p.startswith("/"))

    def template(self, path: bytes) -> str:
        """The template a raw path (bytes, no query string) belongs to, or :data:`UNMATCHED`."""
        found = self._cache.get(path)
        if found is not None:
            return found
        text = path.decode("latin-1")
        if text in self._static:
            found = text
        else:
            found = UNMATCHED
            for template, pattern in self._patterns:
                if pattern.fullmatch(text):
                    found = template
                    break
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()  # paths with ids in them: the cache would only grow
        self._cache[path] = found
        return found

    def label(self, method: bytes, path: bytes) -> str:
        """``"GET /items/{item_id}"``: the route label of one request."""
        name = method.decode("latin-1").upper()
        if name not in METHODS:
            name = "OTHER"
        return f"{name} {self.template(path)}"
