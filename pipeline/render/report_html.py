"""The run report: one self-contained static HTML page (inline CSS and JS, no fetches).

Everything taken from the summary or the rows is untrusted and goes through
`html.escape`; links pass `safe_href` first.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from pipeline.io.storage import redact_uri
from pipeline.render.histogram import Series, histogram_svg
from pipeline.render.html_text import LABEL_NAMES, escaped, finite_number, number_or_dash
from pipeline.render.report_assets import CSS, SCRIPT
from pipeline.thresholds import recorded_false_match_similarity

GALLERY_CAP = 2000
LOOK_FIRST_CAP = 24
ERROR_CAP = 1000
_SAFE_SCHEMES = {"", "http", "https", "file"}
_HEADING_KEYS = ("run_id", "model_id", "metric", "weighting", "target_layer")  # of the run record, or its config's model
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
_CSP = (
    "default-src 'none'; img-src 'self' data: file: http: https:; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{_SCRIPT_HASH}'; base-uri 'none'; form-action 'none'"
)

Row = dict[str, Any]  # one result row (pipeline/schema.py)


def _heading_values(summary: Mapping[str, Any]) -> dict[str, Any]:
    """What the page's heading says of the run: the record's keys, else its config's model's."""
    model = summary.get("config", {}).get("model", {})
    return {key: summary.get(key, model.get(key)) for key in _HEADING_KEYS}


def _label(row: Row) -> int | None:
    number = finite_number(row.get("label"))
    return int(number) if number in (0.0, 1.0) else None


def _label_key(label: int | None) -> str:
    return "none" if label is None else str(label)


def _similarity(row: Row) -> float | None:
    return finite_number(row.get("similarity"))


def _least_energy_in_box(row: Row) -> float | None:
    """The lower energy-in-box of the two images: how far the map strays from the object."""
    values = [finite_number(row.get(f"{side}_energy_in_box")) for side in ("query", "reference")]
    known = [v for v in values if v is not None]
    return min(known) if known else None


def safe_href(href: str | None) -> str | None:
    """`href` if it is a relative path or an http(s)/file URL, else None."""
    if not href or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in href):
        return None
    href = href.strip()
    try:
        parts = urlsplit(href)
    except ValueError:
        return None
    if parts.scheme.lower() not in _SAFE_SCHEMES or (not parts.scheme and parts.netloc):
        return None
    return href


def _data(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def _hit(value: object) -> str:
    number = finite_number(value)
    return "—" if number is None else ("✓" if number else "✗")


def _image(href: str | None, pair_id: str) -> str:
    if not href:
        return '<div class="noimg">no overlay</div>'
    href = html.escape(href)
    img = f'<img loading="lazy" src="{href}" alt="overlay of {pair_id}">'
    return f'<a href="{href}" target="_blank" rel="noopener">{img}</a>'


def _card(row: Row, href: str | None) -> str:
    """One pair: overlay, similarity, label, status, rank, energy in box; data-* attributes drive the inline JS."""
    pair_id = escaped(row.get("pair_id", ""), 200)
    status = "error" if row.get("status") == "error" else "ok"
    label = _label(row)
    similarity, rank = _similarity(row), finite_number(row.get("rank"))
    details = {"rank": number_or_dash(rank, ".0f"), "score": number_or_dash(row.get("score"), ".4g")}
    if _localised(row):
        details["in box"] = (f"q {number_or_dash(row.get('query_energy_in_box'), '.0%')} · "
                             f"r {number_or_dash(row.get('reference_energy_in_box'), '.0%')}")
        details["pointing"] = f"q {_hit(row.get('query_pointing_hit'))} · r {_hit(row.get('reference_pointing_hit'))}"
    badges = f'<span class="badge lab-{_label_key(label)}">{LABEL_NAMES[label]}</span>'
    if status == "error":
        badges += ' <span class="badge err">error</span>'
    error = f'<p class="error">{escaped(row.get("error") or "")}</p>' if status == "error" else ""
    return (
        f'<article class="card {status}" data-pair-id="{pair_id}" data-similarity="{_data(similarity)}" '
        f'data-rank="{_data(rank)}" data-energy="{_data(_least_energy_in_box(row))}" data-label="{_label_key(label)}" '
        f'data-status="{status}">'
        f'{_image(href, pair_id)}<div class="meta"><div class="pid" title="{pair_id}">{pair_id}</div>'
        f'<div class="sim"><b>{number_or_dash(similarity, ".3f")}</b> {badges}</div>'
        f'<dl>{"".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in details.items())}</dl>{error}</div></article>'
    )


def _localised(row: Row) -> bool:
    """Whether the pair was localised in a box on either side (never in a run whose manifest has no boxes)."""
    return any(row.get(f"{side}_energy_in_box") is not None for side in ("query", "reference"))


def _cards(rows: Iterable[Row], png_href: Callable[[Row], str | None]) -> str:
    return "".join(_card(row, safe_href(png_href(row))) for row in rows)


def _summary_value(value: object) -> str:
    if isinstance(value, float):
        return escaped(f"{value:.6g}" if abs(value) < 1e6 else f"{value:.0f}")
    if isinstance(value, (Mapping, list, tuple)):
        return f"<code>{escaped(json.dumps(value, default=str, ensure_ascii=False))}</code>"
    return escaped(value)


def _summary_table(summary: Mapping[str, Any]) -> str:
    body = "".join(f"<tr><th>{escaped(k, 100)}</th><td>{_summary_value(v)}</td></tr>" for k, v in summary.items())
    return f'<table class="kv">{body}</table>'


def _gates(summary: Mapping[str, Any]) -> str:
    """The run's quality gates, one row each: what was measured, against what, the verdict."""
    gates = [g for g in summary.get("gates") or [] if isinstance(g, Mapping)]
    if not gates:
        return ""
    rows = "".join(
        f'<tr class="{"pass" if g.get("passed") else "fail"}"><td>{escaped(g.get("name", "?"), 100)}</td>'
        f'<td>{number_or_dash(g.get("value"), ".4g", "n/a")}</td><td>{number_or_dash(g.get("threshold"), ".4g")}</td>'
        f'<td>{"passed" if g.get("passed") else "FAILED"}</td><td>{escaped(g.get("note") or "", 300)}</td></tr>'
        for g in gates
    )
    return ('<section id="gates"><h2>Quality gates</h2><table class="gates"><tr><th>gate</th><th>value</th>'
            f'<th>threshold</th><th>verdict</th><th>measured</th></tr>{rows}</table></section>')


def _similarities(rows: Sequence[Row], label: int | None) -> list[float]:
    return [s for r in rows if _label(r) == label and (s := _similarity(r)) is not None]


def _figures(ok: Sequence[Row], errors: Sequence[Row], total: int) -> str:
    tiles = [("pairs", f"{total:,}"), ("ok", f"{len(ok):,}"), ("error", f"{len(errors):,}")]
    for label in (1, 0, None):
        values = _similarities(ok, label)
        if values:
            name = f"mean similarity, {LABEL_NAMES[label]} (n={len(values):,})"
            tiles.append((name, f"{sum(values) / len(values):.3f}"))
    return "".join(f'<div class="tile"><div class="v">{v}</div><div class="k">{escaped(k)}</div></div>' for k, v in tiles)


def _histogram(ok: Sequence[Row]) -> str:
    colours = {1: "#1f77b4", 0: "#d62728", None: "#9a9a9a"}
    names = {1: "same label", 0: "different label", None: "unlabelled"}
    return histogram_svg([Series(names[label], colours[label], _similarities(ok, label)) for label in (1, 0, None)])


def _ranked(rows: Sequence[Row], key: Callable[[Row], float | None], *, descending: bool) -> list[Row]:
    """The first `LOOK_FIRST_CAP` rows with a key, ordered by it (ties keep row order)."""
    keyed = [(k, r) for r in rows if (k := key(r)) is not None]
    keyed.sort(key=lambda item: -item[0] if descending else item[0])
    return [r for _, r in keyed[:LOOK_FIRST_CAP]]


def _look_first(ok: Sequence[Row], png_href: Callable[[Row], str | None], threshold: float | None) -> str:
    """threshold: the run's false_match_similarity, below which a different-label pair is no false
    match; None where it cannot apply (then the most similar different-label pairs are shown)."""
    different = _similarities(ok, 0)

    def false_match(row: Row) -> float | None:
        similarity = _similarity(row)
        return similarity if similarity is not None and (threshold is None or similarity >= threshold) else None

    false_matches = _ranked([r for r in ok if _label(r) == 0], false_match, descending=True)
    off_object = _ranked([r for r in ok if _label(r) == 1], _least_energy_in_box, descending=False)
    if threshold is None:
        title, hint = "Most similar different-label pairs", "different-label pairs, most similar first"
    else:
        title = "False matches"
        hint = f"different-label pairs at or above the run's false_match_similarity {threshold:g}, most similar first"
    sections = [
        ("false-matches", title, hint, false_matches,
         ("no different-label (label 0) pairs in this run" if not different or threshold is None else
          f"no different-label (label 0) pair reaches similarity {threshold:g}; the most similar is at {max(different):.3f}")),
        ("off-object", "True matches, least of the map on the object first",
         "same-label pairs with boxes, lowest share of map energy inside the box first: the first ones are those "
         "whose map falls outside the object (a pointing miss is marked ✗)", off_object,
         "no same-label pairs with bounding boxes in this run"),
    ]
    return "".join(
        f'<div class="look" id="{key}"><h3>{title}</h3><p class="hint">{hint}</p>'
        + (f'<div class="cards">{_cards(chosen, png_href)}</div>' if chosen else f'<p class="empty">{empty}</p>')
        + "</div>"
        for key, title, hint, chosen, empty in sections
    )


def _gallery(rows: Sequence[Row], png_href: Callable[[Row], str | None]) -> str:
    shown = rows[:GALLERY_CAP]
    note = (
        f'<p class="note">Showing the first {len(shown):,} of {len(rows):,} pairs, in the order the job wrote them: '
        "the sorting, filters and search below see these only. The result table holds them all (query it, "
        "e.g. with DuckDB), and <code>sfam render</code> draws any pair's overlay.</p>"
        if len(rows) > len(shown)
        else ""
    )
    controls = (
        '<div class="controls">'
        '<label>sort <select id="sort"><option value="table:asc">table order</option>'
        '<option value="similarity:desc">similarity, high first</option>'
        '<option value="similarity:asc">similarity, low first</option><option value="rank:asc">rank</option>'
        + ('<option value="energy:asc">energy in box, low first</option>'
           '<option value="energy:desc">energy in box, high first</option>' if any(map(_localised, shown)) else "")
        + '<option value="pairId:asc">pair id</option></select></label>'
        '<label>label <select id="f-label"><option value="">all</option><option value="1">same</option>'
        '<option value="0">different</option><option value="none">unlabelled</option></select></label>'
        '<label>status <select id="f-status"><option value="">all</option><option value="ok">ok</option>'
        '<option value="error">error</option></select></label>'
        '<label>pair id <input id="f-text" type="search" placeholder="contains…"></label>'
        f'<span class="count"><span id="shown">{len(shown):,}</span> shown</span></div>'
    )
    return f'{controls}{note}<div class="cards" id="gallery-cards">{_cards(shown, png_href)}</div>'


def _errors(errors: Sequence[Row]) -> str:
    if not errors:
        return '<p class="empty">No errors.</p>'
    body = "".join(
        f"<tr><td>{escaped(r.get('pair_id', ''), 200)}</td><td>{escaped(r.get('query_uri', ''))}</td>"
        f"<td>{escaped(r.get('reference_uri', ''))}</td><td>{escaped(r.get('error') or '', 2000)}</td></tr>"
        for r in errors[:ERROR_CAP]
    )
    note = ""
    if len(errors) > ERROR_CAP:
        note = f'<p class="note">Showing the first {ERROR_CAP:,} of {len(errors):,} errors.</p>'
    head = "<tr><th>pair id</th><th>query</th><th>reference</th><th>reason</th></tr>"
    return f'{note}<table class="errors">{head}{body}</table>'


UNCOMMITTED = ("failed", "running")  # run statuses whose report shows its attempt's own rows


def _render_hint(summary: Mapping[str, Any], ok: Sequence[Row]) -> str:
    """How to draw the overlays the run's render policy left out."""
    missing = sum(1 for row in ok if not row.get("png_uri"))
    if not missing:
        return ""
    config = summary.get("config", {})
    policy = escaped(config.get("render_png", "?"))
    if summary.get("status") in UNCOMMITTED:  # its rows are not in the table, which sfam render reads
        return (f'<p class="note">{missing:,} pair(s) have no overlay (render_png: {policy}); sfam render draws '
                'pairs of a committed run, so draw them once an attempt of this run_id has succeeded.</p>')
    # an Iceberg table or an S3 endpoint is named by the job's config, not by the output root
    needs_config = (config.get("table") or {}).get("format") == "iceberg" or bool(
        (config.get("storage_options") or {}).get("endpoint_url"))
    source = "--config JOB_CONFIG.yaml" if needs_config else config.get("output", "OUTPUT")
    command = f"sfam render {source} --run-id {summary.get('run_id', 'RUN_ID')} --pair-id PAIR_ID -o pair.png"
    return (f'<p class="note">{missing:,} pair(s) have no overlay (render_png: {policy}); their maps are in the '
            f'table. Draw any of them with <code>{escaped(command)}</code>.</p>')


def _warnings(summary: Mapping[str, Any], later_attempts: Sequence[Mapping[str, Any]]) -> str:
    """The run record's warnings (e.g. a residual that is most of the similarity), above everything;
    first, when the run failed, that it did and why, or that later attempts of it did not commit."""
    warnings = list(summary.get("warnings") or [])
    for attempt in reversed(later_attempts):
        outcome = (f"failed ({attempt.get('reason') or 'no reason recorded'})" if attempt.get("status") == "failed"
                   else "has not committed: it is running, or was killed")
        warnings.insert(0, f"A later attempt of this run, {attempt.get('attempt')} (started "
                           f"{(attempt.get('timings') or {}).get('started')}), {outcome}. This report shows the "
                           f"committed attempt, {summary.get('attempt')}, which that attempt left as it was.")
    if summary.get("status") == "failed":
        warnings.insert(0, f"This run failed and committed nothing ({summary.get('reason') or 'no reason recorded'}): "
                           "the rows below are its attempt's, outside the result table.")
    if summary.get("status") == "running":
        warnings.insert(0, "This run has committed nothing: its attempt is running, or was stopped without a chance to "
                           "record its end (killed). The rows below are those it had written, outside the result table.")
    if summary.get("status") == "gates_failed":
        broken = [g.get("name", "?") for g in summary.get("gates") or [] if not g.get("passed", True)]
        warnings.insert(0, f"This run broke its quality gate(s) {', '.join(broken) or '(not recorded)'}: its rows are "
                           "committed, but the audit did not pass (Quality gates, below).")
    items = "".join(f"<li>{escaped(w, 2000)}</li>" for w in warnings)
    return f'<section id="warnings" class="warning"><h2>Warnings</h2><ul>{items}</ul></section>' if items else ""


_SHOWN_URIS = ("query_uri", "reference_uri", "error")  # the fields of an error row that can hold a URI


def render_report(
    summary: Mapping[str, Any], rows: Sequence[Row], *, png_href: Callable[[Row], str | None], comparison: str = "",
    later_attempts: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The HTML report of one run.

    `summary` is the run record (shown as a key/value table), `rows` the result rows
    as dicts, `png_href(row)` the relative link to a row's overlay PNG or None,
    `comparison` a section comparing the run with an earlier one (placed before the gallery), and
    `later_attempts` the records of attempts after the committed one that did not commit.
    """
    # an error row shows its URIs and reason: a manifest's URI may hold user:password or a signature
    rows = [{**r, **{k: redact_uri(r[k]) for k in _SHOWN_URIS if r.get(k)}} if r.get("status") == "error" else r
            for r in rows]
    ok = [r for r in rows if r.get("status") == "ok"]
    errors = [r for r in rows if r.get("status") == "error"]
    heading = " · ".join(
        [f"{k} {escaped(value, 120)}" for k, value in _heading_values(summary).items() if value is not None]
        + ['<a href="#run">run record</a>']
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        f'<title>SFAM audit {escaped(summary.get("run_id", ""), 120)}</title><style>{CSS}</style></head><body>'
        f'<header><h1>SFAM audit report</h1><p class="sub">{heading}</p></header>'
        f'{_warnings(summary, later_attempts)}{_gates(summary)}<section id="figures"><div class="tiles">{_figures(ok, errors, len(rows))}</div></section>'
        f'<section id="histogram"><h2>Similarity by label</h2>{_histogram(ok)}</section>'
        f'<section id="look-first"><h2>Look first</h2>{_look_first(ok, png_href, recorded_false_match_similarity(summary))}</section>'
        f'{comparison}<section id="gallery"><h2>All pairs</h2>{_render_hint(summary, ok)}{_gallery(rows, png_href)}</section>'
        f'<section id="errors"><h2>Errors ({len(errors):,})</h2>{_errors(errors)}</section>'
        f'<section id="run"><h2>Run record</h2>{_summary_table(summary)}</section>'
        f"<script>{SCRIPT}</script></body></html>"
    )
