"""Untrusted values turned into text for the HTML pages: escaped and bounded, or numbers."""

from __future__ import annotations

import html
import math
import re

MAX_TEXT = 300  # longest untrusted string drawn in a card or table cell
LABEL_NAMES = {1: "same", 0: "different", None: "unlabelled"}  # the manifest's label column


# control characters (NUL, ESC, ...) and the bidirectional overrides that reorder what is shown
# (U+202E makes "gnp.exe" read as "exe.png"): untrusted text shows each as U+FFFD
_HIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def escaped(value: object, limit: int = MAX_TEXT) -> str:
    """`str(value)` HTML-escaped, cut to `limit` characters with an ellipsis, its control and
    direction characters shown as U+FFFD."""
    text = _HIDDEN.sub("\ufffd", str(value))
    return html.escape(text if len(text) <= limit else text[: limit - 1] + "…")


def number_or_dash(value: object, spec: str = ".3f", missing: str = "—") -> str:
    """A finite number formatted with `spec`; `missing` for None, NaN, infinities and non-numbers."""
    number = finite_number(value)
    return missing if number is None else format(number, spec)


def finite_number(value: object) -> float | None:
    """A finite float, or None for None, NaN, infinities and non-numbers."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
