"""Two runs compared, as HTML: a section for the later run's report, and a page of its own.

Self-contained like report_html.py (inline CSS, no script, no fetches). Everything taken
from the runs (ids, models, pair ids, labels) is untrusted and goes through `html.escape`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.render.html_text import LABEL_NAMES, escaped, finite_number, number_or_dash
from pipeline.render.report_assets import CSS
from pipeline.thresholds import MOVED_BELOW, false_match_rule

Row = dict[str, Any]  # one row of the comparison's summary or pairs table (pipeline/comparison.py)
_CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
_STYLE = (  # up and down say the direction, not whether it is better: a false match gaining similarity is worse
    "#comparison td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }"
    "#comparison th, #by-label td { white-space: nowrap; } #by-label th, #by-label td { padding: 4px 6px; }"
    "#by-label { overflow-x: auto; }"  # a wide table scrolls inside the page, not past its edge
    "#comparison .up { color: #1f5fa8; } #comparison .down { color: #b35900; }"
    "#comparison .warning { background: #fff4e5; border-left: 4px solid #e67e22; padding: 4px 14px; }"
)
_RUN_FIELDS = (("run id", "run_id"), ("attempt", "attempt"), ("model", "model_id"), ("weights", "weights"),
               ("target layer", "target_layer"), ("metric", "metric"), ("weighting", "weighting"), ("input size", "input_size"), ("started", "started"))
_FIGURES = (("mean similarity", "mean_similarity"), ("pointing hit rate (query)", "pointing_hit_rate"),
            ("energy in box (mean of query and reference)", "energy_in_box"))
_COUNTS = (("maps not<br>comparable", "maps_not_comparable"), ("false<br>matches A", "false_matches_a"),
           ("false<br>matches B", "false_matches_b"), ("new", "new_false_matches"), ("vanished", "vanished_false_matches"))


@dataclass(frozen=True)
class ComparisonView:
    """What the HTML shows; pipeline/comparison.py builds it (`Comparison.view()`)."""

    runs: tuple[Mapping[str, Any], Mapping[str, Any]]  # A, B: what pipeline/comparison.py's _run_info says of each
    warnings: Sequence[str]  # what makes the comparison misleading (other metrics, B before A, ...), naming layers
    threshold: float | None
    counts: Mapping[str, int]
    summary: Sequence[Row]  # one row per label
    moved: Sequence[Row]  # pairs whose maps correlate below MOVED_BELOW, lowest first
    new_false_matches: Sequence[Row]
    vanished_false_matches: Sequence[Row]
    relabelled: Sequence[Row] = ()  # pairs whose label B changed (counted under B's)
    other_images: Sequence[Row] = ()  # pair ids that name other images in B (counted, not compared)


def _change(value: object) -> str:
    number = finite_number(value)
    if number is None:
        return "—"
    direction = "up" if number > 0 else "down" if number < 0 else ""
    return f'<span class="{direction}">{number:+.3f}</span>'


def label_name(label: object) -> str:
    """same, different, unlabelled (labels 1, 0, null); any other label as it is."""
    return str(LABEL_NAMES.get(label, label))  # type: ignore[call-overload]


def _label(value: object) -> str:
    return escaped(label_name(value))


def _cell(content: str, numeric: bool = True) -> str:
    return f'<td class="n">{content}</td>' if numeric else f"<td>{content}</td>"


def _runs(view: ComparisonView) -> str:
    head = "<tr><th></th>" + "".join(f"<th>{name}</th>" for name, _ in _RUN_FIELDS) + "</tr>"
    body = "".join(
        f"<tr><th>{side}</th>" + "".join(_cell(escaped(run.get(key) or "—"), numeric=False) for _, key in _RUN_FIELDS) + "</tr>"
        for side, run in zip("AB", view.runs)
    )
    warnings = "".join(f'<p class="warning">{escaped(warning, 2000)}</p>' for warning in view.warnings)
    return f"<table>{head}{body}</table>{warnings}"


def _tiles(view: ComparisonView) -> str:
    return "".join(f'<div class="tile"><div class="v">{value:,}</div><div class="k">pairs {escaped(name)}</div></div>'
                   for name, value in view.counts.items())


def _summary(view: ComparisonView) -> str:
    if not view.summary:
        return '<p class="empty">No pair is ok in both runs on the same images.</p>'
    head = ('<tr><th rowspan="2">label</th><th rowspan="2">pairs</th>'
            + "".join(f'<th colspan="3">{name}</th>' for name, _ in _FIGURES)
            + '<th rowspan="2">mean map<br>correlation</th>'
            + "".join(f'<th rowspan="2">{name}</th>' for name, _ in _COUNTS) + "</tr><tr>"
            + "<th>A</th><th>B</th><th>change</th>" * len(_FIGURES) + "</tr>")
    body = "".join(
        f"<tr>{_cell(_label(row['label']), numeric=False)}{_cell(number_or_dash(row['pairs'], ',.0f'))}"
        + "".join(_cell(number_or_dash(row[f"{key}_a"])) + _cell(number_or_dash(row[f"{key}_b"])) + _cell(_change(row[f"{key}_change"]))
                  for _, key in _FIGURES)
        + _cell(number_or_dash(row["mean_map_correlation"]))
        + "".join(_cell(number_or_dash(row[key], ",.0f")) for _, key in _COUNTS) + "</tr>"
        for row in view.summary
    )
    return f"<table>{head}{body}</table>"


Column = tuple[str, Callable[[Row], str]]
_PAIR_ID: Column = ("pair id", lambda row: _cell(escaped(row["pair_id"], 200), numeric=False))
_LABEL: Column = ("label", lambda row: _cell(_label(row["label"]), numeric=False))
_SIMILARITIES: tuple[Column, ...] = (
    ("similarity A", lambda row: _cell(number_or_dash(row["similarity_a"]))),
    ("similarity B", lambda row: _cell(number_or_dash(row["similarity_b"]))),
    ("change", lambda row: _cell(_change(row["similarity_change"]))),
)
_CORRELATIONS: tuple[Column, ...] = (
    ("map correlation, query", lambda row: _cell(number_or_dash(row["map_correlation_query"]))),
    ("map correlation, reference", lambda row: _cell(number_or_dash(row["map_correlation_reference"]))),
    ("mean", lambda row: _cell(number_or_dash(row["map_correlation"]))),
)


def _pairs(rows: Sequence[Row], columns: Sequence[Column], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{empty}</p>'
    head = "<tr>" + "".join(f"<th>{name}</th>" for name, _ in columns) + "</tr>"
    return f"<table>{head}" + "".join("<tr>" + "".join(cell(row) for _, cell in columns) + "</tr>" for row in rows) + "</table>"


def _no_map_moved(counts: Mapping[str, int]) -> str:
    """Why the list of moved maps is empty: none moved, or none could be compared."""
    incomparable, constant = counts.get("with maps not comparable", 0), counts.get("with a constant map", 0)
    constant_note = (f"; {constant:,} {'pair has' if constant == 1 else 'pairs have'} a constant map in A or B "
                     "(one cell, or the same value everywhere), which no correlation describes") if constant else ""
    if not counts.get("ok in both", 0):
        return "no maps compared: no pair is ok in both runs on the same images"
    if incomparable >= counts["ok in both"]:
        return (f"no maps compared: the {incomparable:,} pairs ok in both runs have maps of other shapes "
                "(map_shape differs: another model, layer or input size)")
    if incomparable + constant >= counts["ok in both"]:
        return f"no maps compared: {incomparable:,} pairs have maps of other shapes{constant_note}"
    return f"no map moved: every correlated pair's maps correlate at or above {MOVED_BELOW:g}{constant_note}"


def _lists(view: ComparisonView) -> str:
    rule = escaped(false_match_rule(view.threshold))
    false_match = (_PAIR_ID, *_SIMILARITIES)
    lists = (
        ("moved-maps", "Maps that moved most",
         f"correlation between the two runs' maps below {MOVED_BELOW:g}, lowest first (equal map shapes only)",
         _pairs(view.moved, (_PAIR_ID, _LABEL, *_CORRELATIONS, *_SIMILARITIES), _no_map_moved(view.counts))),
        ("new-false-matches", "New false matches",
         f"false matches in B but not in A, most similar first; a false match: {rule}",
         _pairs(view.new_false_matches, false_match, "no new false matches")),
        ("vanished-false-matches", "Vanished false matches",
         f"false matches in A but not in B; a false match: {rule}",
         _pairs(view.vanished_false_matches, false_match, "no vanished false matches")),
        ("relabelled", "Relabelled pairs", "the same images labelled otherwise in B; the figures count them under "
         "B's label (shown)", _pairs(view.relabelled, (_PAIR_ID, _LABEL, *_SIMILARITIES), "no pair relabelled")),
        ("other-images", "Pair ids that name other images in B",
         "counted, not compared: in B the id stands for another query or reference image (or the same URI now holds "
         "other bytes)", _pairs(view.other_images, (_PAIR_ID, _LABEL), "none")),
    )
    return "".join(f'<div id="{key}"><h3>{title}</h3><p class="hint">{hint}</p>{table}</div>'
                   for key, title, hint, table in lists)


def comparison_section(view: ComparisonView, heading: str) -> str:
    """The comparison as one `<section id="comparison">` with its own styles (for the run report)."""
    hint = ("per label, over the pairs that are ok in both runs on the same images; change is B minus A; "
            f"false matches: {escaped(false_match_rule(view.threshold))}")
    return (
        f'<section id="comparison"><style>{_STYLE}</style><h2>{escaped(heading)}</h2>{_runs(view)}'
        f'<div class="tiles">{_tiles(view)}</div>'
        f'<div id="by-label"><h3>By label</h3><p class="hint">{hint}</p>{_summary(view)}</div>{_lists(view)}</section>'
    )


def render_comparison(view: ComparisonView) -> str:
    """The comparison of two runs as a page of its own."""
    run_a, run_b = (escaped(run.get("run_id"), 120) for run in view.runs)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        f"<title>SFAM comparison {run_a} → {run_b}</title><style>{CSS}</style></head><body>"
        f'<header><h1>SFAM run comparison</h1><p class="sub">A {run_a} → B {run_b}</p></header>'
        f"{comparison_section(view, 'What changed from A to B')}</body></html>"
    )
