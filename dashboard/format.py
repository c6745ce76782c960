"""How the pages write numbers, times and states, and the small SVG pictures drawn on the server.

Sparklines, error-budget bars and trace waterfalls are SVG written here, not by script: they are in the
HTML the server sends (readable before, and without, JavaScript), cost no JS bytes, and need no inline
styles (the Content-Security-Policy allows none).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from markupsafe import Markup, escape

NOTHING = "\u2013"
"""What a missing value is written as (an en dash)."""

_OK = {"success", "serving", "verifying_skipped", "ok", "resolved"}
_BUSY = {
    "waiting_upload",
    "ready_for_build",
    "building",
    "extracting",
    "building_image",
    "deploying",
    "verifying",
    "starting",
}
_WARN = {"degraded", "degraded_oom", "draining", "warm", "build_skipped_superseded", "upload_cancelled"}
_MUTED = {"new", "stopped", "unset"}


def tone(status: str | None) -> str:
    """The badge class of a deployment, app, instance or span status."""
    value = str(status or "")
    if value in _OK:
        return "ok"
    if value in _BUSY:
        return "busy"
    if value in _WARN:
        return "warn"
    if value in _MUTED or not value:
        return "muted"
    return "bad"


def _parse(value: str | datetime | None) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def ago(value: str | datetime | None, now: datetime | None = None) -> str:
    """``12 s ago``, ``3 min ago``, ``5 h ago``, ``2 d ago`` (``in 3 d`` for the future)."""
    at = _parse(value)
    if at is None:
        return "never"
    seconds = ((now or datetime.now(UTC)) - at).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            text = f"{int(seconds // size)} {unit}"
            break
    else:
        text = f"{int(seconds)} s"
    return f"in {text}" if future else f"{text} ago"


def when(value: str | datetime | None) -> Markup:
    """A ``<time>`` element: relative text, the exact UTC time as its title."""
    at = _parse(value)
    if at is None:
        return Markup("<span class=muted>never</span>")
    exact = at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return Markup('<time datetime="{}" title="{}">{}</time>').format(at.isoformat(), exact, ago(at))


def utc(value: str | datetime | None) -> str:
    at = _parse(value)
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if at else ""


def seconds(value: float | None) -> str:
    """A duration: ``850 ms``, ``12.3 s``, ``4 min 5 s``, ``2 h 10 min``."""
    if value is None:
        return NOTHING
    v = float(value)
    if v < 1:
        return f"{v * 1000:.0f} ms"
    if v < 60:
        return f"{v:.1f} s"
    if v < 3600:
        return f"{int(v // 60)} min {int(v % 60)} s"
    return f"{int(v // 3600)} h {int(v % 3600 // 60)} min"


def ms(value: float | None) -> str:
    if value is None:
        return NOTHING
    v = float(value)
    if v >= 1000:
        return f"{v / 1000:.2f} s"
    return f"{v:.1f} ms" if v < 100 else f"{v:.0f} ms"


def pct(value: float | None) -> str:
    """A ratio (0.0123) as a percentage (``1.23 %``)."""
    if value is None:
        return NOTHING
    v = float(value) * 100
    return f"{v:.0f} %" if v >= 10 or v == 0 else f"{v:.2f} %"


def percent(value: float | None, digits: int = 3) -> str:
    """A ratio with its nines: 0.999 is ``99.9 %``, 0.99875 ``99.875 %`` (up to ``digits`` decimals,
    trailing zeros dropped). ``pct`` rounds to two digits, which makes every objective ``100 %``."""
    if value is None:
        return NOTHING
    text = f"{float(value) * 100:.{digits}f}".rstrip("0").rstrip(".")
    return f"{text} %"


def duration(value: float | None) -> str:
    """A span of time in at most two units: ``45 s``, ``5 min``, ``2 h 10 min``, ``6 h``, ``30 d``."""
    if value is None:
        return NOTHING
    total = max(0, round(float(value)))
    for unit, size, smaller, small in (("d", 86400, "h", 3600), ("h", 3600, "min", 60), ("min", 60, "s", 1)):
        if total >= size:
            rest = total % size // small
            return f"{total // size} {unit}" + (f" {rest} {smaller}" if rest else "")
    return f"{total} s"


def rate(value: float | None) -> str:
    """A burn rate: ``14.4x`` (1x spends the budget exactly over the SLO's window)."""
    if value is None:
        return NOTHING
    v = float(value)
    return f"{v:.1f}x" if v < 100 else f"{v:.0f}x"


def num(value: float | None) -> str:
    if value is None:
        return NOTHING
    v = float(value)
    if abs(v) >= 1_000_000:
        return f"{v / 1_000_000:.1f} M"
    if abs(v) >= 10_000:
        return f"{v / 1000:.1f} k"
    return f"{v:.0f}" if v == int(v) or abs(v) >= 100 else f"{v:.2f}"


def size(value: float | None) -> str:
    if value is None:
        return NOTHING
    v = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} TiB"


def short(value: str | None, n: int = 8) -> str:
    return (value or "")[:n]


def sparkline(
    values: Sequence[float | None], label: str, *, width: int = 120, height: int = 28, kind: str = ""
) -> Markup:
    """A line of ``values`` (None: a gap) as an inline SVG; ``label`` is what a screen reader hears."""
    known = [float(v) for v in values if v is not None]
    top = max(known) if known else 0.0
    n = len(values)
    segments: list[list[str]] = [[]]
    for i, value in enumerate(values):
        if value is None:
            if segments[-1]:
                segments.append([])
            continue
        x = 1 + (i * (width - 2) / (n - 1) if n > 1 else (width - 2) / 2)
        y = height - 2 - (float(value) / top * (height - 4) if top > 0 else 0)
        segments[-1].append(f"{x:.1f},{y:.1f}")
    lines = Markup("").join(
        Markup('<polyline points="{}"/>').format(" ".join(points)) for points in segments if len(points) > 1
    )
    dots = Markup("").join(
        Markup('<circle cx="{}" cy="{}" r="1.5"/>').format(*points[0].split(","))
        for points in segments
        if len(points) == 1
    )
    return Markup(
        '<svg class="spark {kind}" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
        'aria-label="{label}"><title>{label}</title>{lines}{dots}</svg>'
    ).format(kind=kind, w=width, h=height, label=label, lines=lines, dots=dots)


def budget_bar(remaining: float, label: str, *, width: int = 160, height: int = 10) -> Markup:
    """An error budget as a bar: the share left (``remaining``: 1 untouched, 0 or less used up) filled,
    its tone ``ok`` above a quarter, ``warn`` above nothing, ``bad`` when spent."""
    share = min(1.0, max(0.0, float(remaining)))
    tone = "ok" if share >= 0.25 else "warn" if share > 0 else "bad"
    return Markup(
        '<svg class="budget {tone}" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
        'aria-label="{label}"><title>{label}</title><rect class="track" width="{w}" height="{h}" rx="2"/>'
        '<rect class="fill" width="{fill}" height="{h}" rx="2"/></svg>'
    ).format(tone=tone, w=width, h=height, label=label, fill=round(share * width, 1))


def waterfall(spans: Sequence[dict[str, Any]], total_ms: float) -> list[dict[str, Any]]:
    """Each span with its bar's geometry on a 0..1000 axis (``x``, ``w``: at least a visible sliver)."""
    scale = 1000 / total_ms if total_ms > 0 else 0.0
    rows = []
    for span in spans:
        x = min(999.0, float(span["offset_ms"]) * scale)
        w = max(2.0, min(1000.0 - x, float(span["duration_ms"]) * scale))
        rows.append({**span, "x": round(x, 2), "w": round(w, 2), "indent": min(int(span["depth"]), 12)})
    return rows


def attr_value(value: Any) -> str:
    """A span attribute as text (lists joined, everything else ``str``)."""
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


FILTERS: dict[str, Callable[..., Any]] = {
    "tone": tone,
    "ago": ago,
    "when": when,
    "utc": utc,
    "seconds": seconds,
    "ms": ms,
    "pct": pct,
    "num": num,
    "percent": percent,
    "duration": duration,
    "rate": rate,
    "size": size,
    "short": short,
    "attr": attr_value,
    "e": escape,
}
