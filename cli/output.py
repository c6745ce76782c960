"""Human output vs ``--json``.

Human mode: text and tables on stdout, errors and warnings on stderr, colour only in a terminal.
JSON mode: stdout carries JSON only (one object per command, or one object per line for streams), so it can
be piped into ``jq``; human chatter is dropped and errors become ``{"error": {...}}`` on stdout.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cli.errors import CLIError

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of text.")]

# Piped output is read by scripts and greps: do not fold table cells at rich's default 80 columns.
_PIPE_WIDTH = 200


class Output:
    """Where a command writes; ``json_mode`` decides which methods print anything."""

    def __init__(
        self, *, json_mode: bool = False, stdout: Console | None = None, stderr: Console | None = None
    ) -> None:
        self.json_mode = json_mode
        self.stdout = stdout or _console(stderr=False)
        self.stderr = stderr or _console(stderr=True)

    @property
    def interactive(self) -> bool:
        """True when a human watches stderr (progress bars make sense)."""
        return not self.json_mode and self.stderr.is_terminal

    def say(self, text: str | Text = "", *, style: str | None = None) -> None:
        """A line of human output (no rich markup is interpreted in ``text``)."""
        if not self.json_mode:
            self.stdout.print(text, style=style, markup=False)

    def table(self, columns: Sequence[str], rows: Iterable[Sequence[str | Text]]) -> None:
        if self.json_mode:
            return
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            # Cells hold data (values, URLs): a plain str must not be read as rich markup ("[secret]").
            table.add_row(*(Text(cell) if isinstance(cell, str) else cell for cell in row))
        self.stdout.print(table)

    def emit(self, data: Any) -> None:
        """One JSON document on one line of stdout (JSON mode only)."""
        if self.json_mode:
            self.stdout.file.write(json.dumps(data, separators=(",", ":")) + "\n")
            self.stdout.file.flush()

    def note(self, text: str) -> None:
        """A side remark on stderr, shown in both modes (stdout stays clean JSON)."""
        self.stderr.print(text, markup=False, style="dim")

    def warn(self, title: str, message: str = "") -> None:
        if self.json_mode:
            return
        self.stderr.print(Text.assemble(("Warning: ", "bold yellow"), title))
        if message:
            self.stderr.print(message, markup=False)

    def error(self, err: CLIError) -> None:
        """Render an error: ``Error:``/message/``Hint:`` on stderr, or ``{"error": ...}`` on stdout."""
        if self.json_mode:
            self.stdout.file.write(json.dumps(err.as_json()) + "\n")
            self.stdout.file.flush()
            return
        self.stderr.print(Text.assemble(("Error: ", "bold red"), err.title))
        if err.message and err.message != err.title:
            self.stderr.print(err.message, markup=False)
        if err.hint:
            self.stderr.print(Text.assemble(("Hint: ", "bold"), err.hint))


def _console(*, stderr: bool) -> Console:
    console = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = _PIPE_WIDTH
    return console
