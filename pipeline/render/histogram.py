"""A grouped-bar histogram as inline SVG markup (no plotting library, no scripts)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import NamedTuple

_W, _H = 760, 280
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 16, 40, 44  # plot margins inside the view box
_FONT = 'font-family="system-ui, sans-serif" font-size="13"'


class Series(NamedTuple):
    name: str
    colour: str  # any SVG colour, e.g. "#d62728"
    values: Sequence[float]


def _edges(series: Sequence[Series], bins: int) -> list[float]:
    values = [v for s in series for v in s.values]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    return [lo + (hi - lo) * i / bins for i in range(bins + 1)]


def _counts(values: Sequence[float], edges: list[float]) -> list[int]:
    bins = len(edges) - 1
    counts = [0] * bins
    lo, span = edges[0], edges[-1] - edges[0]
    for v in values:
        counts[min(bins - 1, max(0, int((v - lo) / span * bins)))] += 1
    return counts


def _decimals(step: float, least: int) -> int:
    """Decimals that tell values `step` apart (at least `least`): 4 for ticks 0.0008 apart."""
    return max(least, -math.floor(math.log10(step))) if step > 0 else least


def _text(x: float, y: float, content: str, *, anchor: str = "middle", fill: str = "#333") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="{fill}">{html.escape(content)}</text>'


def _line(x1: float, y1: float, x2: float, y2: float, stroke: str) -> str:
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}"/>'


def histogram_svg(series: Sequence[Series], *, bins: int = 20, x_label: str = "similarity") -> str:
    """SVG of `bins` equal-width bins over the data range, one bar per series per bin.

    Non-finite values are dropped and series left empty are not drawn; with no data at
    all the SVG says so. Names and labels are HTML-escaped.
    """
    series = [s._replace(values=[float(v) for v in s.values if math.isfinite(v)]) for s in series]
    series = [s for s in series if s.values]
    parts = [f'<svg class="histogram" viewBox="0 0 {_W} {_H}" role="img" xmlns="http://www.w3.org/2000/svg" {_FONT}>']
    if not series:
        return "".join([*parts, _text(_W / 2, _H / 2, "no data to plot", fill="#666"), "</svg>"])

    edges = _edges(series, bins)
    counts = [_counts(s.values, edges) for s in series]
    peak = max(max(c) for c in counts)
    plot_w, base = _W - _LEFT - _RIGHT, _H - _BOTTOM
    bin_w = plot_w / bins
    bar_w = (bin_w - 2) / len(series)
    span = edges[-1] - edges[0]
    bin_digits, tick_digits = _decimals(span / bins, 3), _decimals(span / 5, 2)  # similarities 0.9951 to 0.9989 too

    def y_of(count: int) -> float:
        return base - count / peak * (base - _TOP)

    for tick in sorted({0, peak // 2, peak}):
        parts += [_line(_LEFT, y_of(tick), _W - _RIGHT, y_of(tick), "#e3e3e3"),
                  _text(_LEFT - 6, y_of(tick) + 4, str(tick), anchor="end", fill="#555")]
    for i, (s, c) in enumerate(zip(series, counts)):
        for b, n in enumerate(c):
            if n:
                x, y = _LEFT + b * bin_w + 1 + i * bar_w, y_of(n)
                tip = html.escape(f"{s.name}: {n} in [{edges[b]:.{bin_digits}f}, {edges[b + 1]:.{bin_digits}f})")
                parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{base - y:.1f}" '
                             f'fill="{html.escape(s.colour)}"><title>{tip}</title></rect>')
    parts.append(_line(_LEFT, base, _W - _RIGHT, base, "#333"))
    for i in range(6):
        x = _LEFT + plot_w * i / 5
        value = edges[0] + span * i / 5
        parts += [_line(x, base, x, base + 5, "#333"), _text(x, base + 19, f"{value:.{tick_digits}f}")]
    parts.append(_text(_LEFT + plot_w / 2, _H - 6, x_label))

    x = _LEFT
    for s in series:
        label = f"{s.name} (n={len(s.values)})"
        parts += [f'<rect x="{x}" y="12" width="14" height="14" fill="{html.escape(s.colour)}"/>',
                  _text(x + 20, 24, label, anchor="start", fill="#222")]
        x += 20 + 8 * len(label) + 24
    parts.append("</svg>")
    return "".join(parts)
