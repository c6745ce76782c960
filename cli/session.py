"""The per-invocation state every command shares: output mode, configuration, API client.

``main()`` creates one Session and hands it to Typer as the context object; each command calls
``use(ctx, json_output)``. The configuration is read on first use (``--help`` never touches the disk) and
``main()`` renders any CLIError through ``session.output``, in the mode the command asked for.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import typer

from cli.client import Client
from cli.config import Config
from cli.output import Output


@dataclass
class Session:
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    output: Output = field(default_factory=Output)
    _config: Config | None = None
    _client: Client | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = Config.load(self.environ)
        return self._config

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.config)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def use(ctx: typer.Context, json_output: bool) -> Session:
    """The session of this invocation, switched to JSON output when ``--json`` was given."""
    session = ctx.ensure_object(Session)
    session.output.json_mode = json_output
    return session
