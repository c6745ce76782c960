"""The OCI registry images are pushed to: where, as whom, and how a revision's image is named there.

    FASTAPI_DEPLOY_REGISTRY=127.0.0.1:5000/fastapi-deploy      host[:port][/namespace]
                            https://registry.example.com/team  (a scheme is accepted and dropped:
                                                              the engine picks TLS; loopback may be HTTP)

An app's images live in ``{host}/{namespace}/{app_id}``; a revision is tagged with its deployment id and
deployed *by digest* (``{repository}@sha256:...``), so what runs is exactly what was verified, whatever
happens to the tag later (the Kubernetes backend deploys digests only).

Credentials never appear in a log line, a build argument or an image: they are handed to the engine for
one push or pull (``auth_config``) and this object's ``repr`` hides the password.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Registry"]

_HOST = re.compile(r"^[A-Za-z0-9.-]+(:\d+)?$")
_PATH = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$")


@dataclass(frozen=True)
class Registry:
    host: str
    """``host[:port]`` as the engine names it (``127.0.0.1:5000``, ``ghcr.io``)."""
    namespace: str = "fastapi-deploy"
    """Path under the host that every app's repository lives in."""
    username: str = ""
    password: str = field(default="", repr=False)

    @classmethod
    def parse(cls, url: str, *, username: str = "", password: str = "") -> Registry:
        """``[scheme://]host[:port][/namespace]``. Raises ValueError for anything else."""
        rest = url.strip()
        if "://" in rest:
            scheme, rest = rest.split("://", 1)
            if scheme not in ("http", "https"):
                raise ValueError(f"registry URL {url!r}: scheme must be http or https")
        host, _, namespace = rest.strip("/").partition("/")
        namespace = namespace or "fastapi-deploy"
        if not _HOST.match(host) or not _PATH.match(namespace):
            raise ValueError(
                f"registry URL {url!r} is not host[:port][/namespace] (namespace: lowercase, digits, ._-/)"
            )
        return cls(host=host, namespace=namespace, username=username, password=password)

    def repository(self, app_id: str) -> str:
        """Where ``app_id``'s images live: ``host/namespace/app_id`` (app ids are lowercase hex)."""
        return f"{self.host}/{self.namespace}/{app_id.lower()}"

    def auth_config(self) -> dict[str, str] | None:
        """What the engine needs for one push or pull; ``None`` for an anonymous registry."""
        if not self.username:
            return None
        return {"username": self.username, "password": self.password, "serveraddress": self.host}
