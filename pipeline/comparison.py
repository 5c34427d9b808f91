"""`sfam compare`: what changed between two runs of an audit, A (earlier) and B (later).

Pairs are matched by `pair_id`; the two runs may use different models (model v7 against
v8: that is the point) and different manifests. Only committed rows are compared
(`ResultsStore.read(run_id=...)`), so both runs must have committed (`runs/ID/_SUCCESS`). The figures of
a label are taken over the pairs that are `ok` in both runs and show the same images in both
(query and reference URIs, resolved against each run's manifest folder), so that a change is the
change of the same pairs: a pair_id that names other images in B (a rank-shaped id such as
`q17/g3` in a new night's manifest) is counted, not compared. The label of a pair is B's (A's
where B has none), in both runs' figures; a pair whose label B changed is counted as relabelled.

Written next to the runs, under `{output}/comparisons/{A}/{B}/` (a folder per run id: run ids may hold `_`):

    summary.parquet    one row per label (1 same, 0 different, null unlabelled)
    pairs.parquet      one row per pair_id of either run
    comparison.html    both, for people (pipeline/render/comparison_html.py)

`summary.parquet` (over the pairs ok in both runs on the same images; `_a` is run A's figure, `_b` run B's,
`_change` is B's minus A's):

    run_a, run_b                       string    the run ids
    attempt_a, attempt_b               string    their committed attempts (a re-run of a run_id replaces it)
    threshold                          float64   the false-match similarity threshold (the metric's units;
                                                 null: none applies, and the false-match counts are null)
    label                              int64     1 same, 0 different, null unlabelled
    pairs                              int64     pairs of this label ok in both runs on the same images
    mean_similarity_a, _b, _change     float64   mean similarity
    pointing_hit_rate_a, _b, _change   float64   share of query_pointing_hit (null without boxes)
    energy_in_box_a, _b, _change       float64   mean of energy_in_box (see below; null without boxes)
                                                 (these three: over the pairs where both runs have the figure;
                                                 a map without positive evidence has no pointing or energy)
    mean_map_correlation               float64   mean of map_correlation over the comparable pairs
    maps_not_comparable                int64     pairs whose map_shape differs between the runs
    false_matches_a, false_matches_b   int64     false matches in each run (label 0 only; 0 for others)
    new_false_matches                  int64     false matches in B that were not in A
    vanished_false_matches             int64     false matches in A that are not in B

`pairs.parquet` (null where the pair is not in that run, or failed there):

    run_a, run_b, attempt_a, attempt_b, threshold   as in summary.parquet, on every row
    pair_id                            string
    label                              int64     B's label, else A's
    relabelled                         bool      A and B label the same images differently (null unless both
                                                 label the pair and it shows the same images in both)
    status_a, status_b                 string    `ok`, `error`, or null: not in that run
    same_images                        bool      the same query and reference images in both runs: the same URIs,
                                                 and the same bytes where both runs recorded them (null unless in both)
    similarity_a, _b, _change          float64
    query_pointing_hit_a, _b           bool
    energy_in_box_a, _b                float64   mean of query_energy_in_box and reference_energy_in_box
    map_comparable                     bool      equal map_shape (null unless ok in both on the same images)
    map_correlation_query              float64   Pearson correlation of A's and B's map_query
    map_correlation_reference          float64   the same for map_reference
    map_correlation                    float64   the mean of the two: low = the maps moved
    false_match_a, false_match_b       bool      label 0 and similarity >= threshold (null unless ok there)

A map that is constant has no correlation (null). The maps are read as stored (float32; float16
in runs written before 2026-11-28) and correlated in chunks of `CHUNK_ROWS` pairs.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.arrow_columns import as_floats, count_true
from pipeline.errors import UserError
from pipeline.io.iceberg_store import TableConfig
from pipeline.io.results_store import ResultsStore
from pipeline.io.storage import StorageOptions, join_uri, resolve_uri, write_bytes
from pipeline.io.stores import open_results_store
from pipeline.layout import comparison_dir
from pipeline.manifest import manifest_dir
from pipeline.models.spec import model_hw
from pipeline.render.comparison_html import ComparisonView, label_name, render_comparison
from pipeline.render.html_text import number_or_dash
from pipeline.run_history import first_started, read_run_record
from pipeline.schema import SIDES, result_type
from pipeline.thresholds import (
    MOVED_BELOW,
    false_match_rule,
    is_false_match,
    outside_cosine_range,
    recorded_false_match_similarity,
)

CHUNK_ROWS = 8192  # pairs whose maps are correlated at once: 16 MiB per float64 matrix of 16 x 16 maps
LISTED = 20  # pairs shown per list (moved maps, new and vanished false matches)
FIGURES = {"mean_similarity": "similarity", "pointing_hit_rate": "query_pointing_hit", "energy_in_box": "energy_in_box"}
_READ = ("pair_id", "query_uri", "reference_uri", "label", "status", "similarity", "query_pointing_hit",
         "query_energy_in_box", "reference_energy_in_box", "map_shape", "map_query", "map_reference",
         "query_sha256", "reference_sha256")
_OPTIONAL = {"label": pa.int64()}  # the manifest may have no labels; the box columns come from result_type
PAIR_COLUMNS = (
    "pair_id", "label", "relabelled", "status_a", "status_b", "same_images", "similarity_a", "similarity_b", "similarity_change",
    "query_pointing_hit_a", "query_pointing_hit_b", "energy_in_box_a", "energy_in_box_b", "map_comparable",
    "map_correlation_query", "map_correlation_reference", "map_correlation", "false_match_a", "false_match_b",
)
METRICS_DIFFER = "The runs use different metrics: their similarities and the threshold are in different units."
MAPS_DIFFER = {"target_layer": "of different target layers", "weighting": "of different weightings",
               "input_size": "of different input sizes"}
REVERSED = ("Run A first ran after run B: each change is B's figure minus A's, so it reads backwards in time. "
            "Name the earlier run first.")
OTHER_IMAGES = ("No pair is ok in both runs on the same images: every pair id of A that B has names other images in "
                "B. Either the ids stand for other pairs in B (rank-shaped ids such as q1/3), or the image URIs are "
                "relative to manifests in folders of their own, which makes the same image another URI: write "
                "absolute image URIs to compare such runs.")
FALSE_MATCH_COUNTS = ("false_matches_a", "false_matches_b", "new_false_matches", "vanished_false_matches")
# what both tables say on every row: the runs compared, their committed attempts and the false-match threshold
RUN_COLUMNS = pa.schema([("run_a", pa.string()), ("run_b", pa.string()), ("attempt_a", pa.string()),
                         ("attempt_b", pa.string()), ("threshold", pa.float64())])
SUMMARY_SCHEMA = pa.schema(
    [*RUN_COLUMNS, ("label", pa.int64()), ("pairs", pa.int64())]
    + [(f"{name}_{suffix}", pa.float64()) for name in FIGURES for suffix in ("a", "b", "change")]
    + [("mean_map_correlation", pa.float64())]
    + [(name, pa.int64()) for name in ("maps_not_comparable", *FALSE_MATCH_COUNTS)]
)


@dataclass(frozen=True)
class Comparison:
    """Two runs compared: `pairs` and `summary` are the tables of the module docstring."""

    runs: tuple[dict[str, Any], dict[str, Any]]  # A, B: _run_info's
    threshold: float | None
    pairs: pa.Table
    summary: pa.Table

    @property
    def run_ids(self) -> tuple[str, str]:
        return self.runs[0]["run_id"], self.runs[1]["run_id"]

    @cached_property
    def counts(self) -> dict[str, int]:
        """Pairs by what became of them: ok in both runs, only in one, on other images, ..."""
        status_a, status_b = self.pairs["status_a"], self.pairs["status_b"]
        in_a, in_b = pc.is_valid(status_a), pc.is_valid(status_b)
        same = pc.fill_null(self.pairs["same_images"], False)
        compared = _compared(self.pairs)
        return {
            "ok in both": count_true(compared),
            "only in A": count_true(pc.and_not(in_a, in_b)),
            "only in B": count_true(pc.and_not(in_b, in_a)),
            "with other images in B": count_true(pc.and_not(pc.and_(in_a, in_b), same)),
            "relabelled in B": count_true(self.pairs["relabelled"]),
            "failed in A or B": count_true(pc.and_not(same, compared)),
            "with maps not comparable": count_true(pc.invert(pc.fill_null(self.pairs["map_comparable"], True))),
            "with a constant map": count_true(pc.and_(pc.fill_null(self.pairs["map_comparable"], False),
                                                      pc.is_null(self.pairs["map_correlation"]))),
        }

    def view(self, listed: int = LISTED) -> ComparisonView:
        """What the HTML shows: the summary, and the first `listed` pairs of each list."""
        both = self.pairs.filter(_compared(self.pairs))
        moved = both.filter(pc.less(both["map_correlation"], MOVED_BELOW)).sort_by("map_correlation")
        new = both.filter(pc.and_not(both["false_match_b"], both["false_match_a"])).sort_by([("similarity_b", "descending")])
        vanished = both.filter(pc.and_not(both["false_match_a"], both["false_match_b"])).sort_by([("similarity_a", "descending")])
        relabelled = self.pairs.filter(pc.fill_null(self.pairs["relabelled"], False))  # as counts counts them
        other_images = self.pairs.filter(pc.equal(self.pairs["same_images"], False))
        return ComparisonView(
            runs=self.runs, warnings=self.warnings, threshold=self.threshold, counts=self.counts,
            summary=self.summary.to_pylist(),
            moved=moved.slice(0, listed).to_pylist(), new_false_matches=new.slice(0, listed).to_pylist(),
            vanished_false_matches=vanished.slice(0, listed).to_pylist(),
            relabelled=relabelled.slice(0, listed).to_pylist(), other_images=other_images.slice(0, listed).to_pylist(),
        )

    @cached_property
    def warnings(self) -> list[str]:
        """What makes this comparison misleading: other metrics, maps of other layers, weightings or
        input sizes, maps of other shapes, B run before A, no pair on the same images."""
        warnings = [METRICS_DIFFER] if len({run["metric"] for run in self.runs}) > 1 else []
        for field, what in MAPS_DIFFER.items():
            first, second = (run[field] for run in self.runs)
            if first != second:
                warnings.append(f"The runs' maps are {what} (A: {first}, B: {second}): the map correlations and the "
                                "changes of pointing and energy measure that difference, not a change of the model.")
        incomparable = self.counts["with maps not comparable"]
        if incomparable:
            warnings.append(f"{incomparable:,} {'pair' if incomparable == 1 else 'pairs'} ok in both runs "
                            f"{'has maps' if incomparable == 1 else 'have maps'} of another shape in B (map_shape "
                            "differs: another model, target layer or input size): no map correlation is taken for them.")
        started_a, started_b = (_when(run["started"]) for run in self.runs)
        if started_a and started_b and started_a > started_b:
            warnings.append(REVERSED)
        counts = self.counts
        in_both = sum(counts[name] for name in ("ok in both", "with other images in B", "failed in A or B"))
        if 0 < counts["with other images in B"] == in_both:
            warnings.append(OTHER_IMAGES)
        return warnings

    def lines(self) -> list[str]:
        """A short text summary: counts, then one line per label."""
        run_a, run_b = self.run_ids
        counts = self.counts
        lines = [f"compared {run_a} (A) with {run_b} (B); pairs: "
                 + ", ".join(f"{value} {name}" for name, value in counts.items()),
                 *(f"warning: {warning}" for warning in self.warnings),
                 f"false matches: {false_match_rule(self.threshold)}",
                 f"{'label':<11}{'pairs':>6}  {'similarity A -> B':<25}  {'pointing (q) A -> B':<23}  "
                 f"{'in box (q, r) A -> B':<23}  {'map corr':>8}  false matches A -> B (new, vanished)"]
        for row in self.summary.to_pylist():  # two spaces between columns, also when a value is wider than its column
            figures = "".join(f"{_arrow(row, name):<23}  " for name in ("pointing_hit_rate", "energy_in_box"))
            lines.append(
                f"{label_name(row['label']):<11}{row['pairs']:>6}  {_arrow(row, 'mean_similarity'):<25}  {figures}"
                f"{number_or_dash(row['mean_map_correlation']):>8}  {_whole(row['false_matches_a'])} -> "
                f"{_whole(row['false_matches_b'])} ({_whole(row['new_false_matches'])}, {_whole(row['vanished_false_matches'])})"
            )
        return lines


def _when(stamp: object) -> dt.datetime | None:
    """A run record's ISO 8601 time stamp (UTC where it names no zone), or None if it is not one."""
    try:
        when = dt.datetime.fromisoformat(stamp) if isinstance(stamp, str) else None
    except ValueError:
        return None
    return when.replace(tzinfo=dt.timezone.utc) if when is not None and when.tzinfo is None else when


def _whole(value: int | None) -> str:
    return "—" if value is None else str(value)


def _arrow(row: dict, name: str) -> str:
    a, b, change = (row[f"{name}{suffix}"] for suffix in ("_a", "_b", "_change"))
    return f"{number_or_dash(a)} -> {number_or_dash(b)} ({number_or_dash(change, '+.3f')})"


def _ok(status: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.fill_null(pc.equal(status, "ok"), False)


def _compared(pairs: pa.Table) -> pa.ChunkedArray:
    """The pairs the figures are taken over: ok in both runs, on the same images."""
    return _ok_on_same_images(pairs["status_a"], pairs["status_b"], pairs["same_images"])


def _ok_on_same_images(status_a: pa.ChunkedArray, status_b: pa.ChunkedArray, same_images: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.and_(pc.and_(_ok(status_a), _ok(status_b)), pc.fill_null(same_images, False))


def run_record(store: ResultsStore, run_id: str) -> dict:
    """The run's record; a run that is not there, or has no committed rows, is the user's mistake."""
    record = read_run_record(store.output, run_id, store.options)
    if store.committed_attempt(run_id) is None:
        raise UserError(f"run {run_id!r} never succeeded (status {record.get('status')}): it has no rows to compare")
    return record


def _run_info(record: dict) -> dict[str, Any]:
    """What the page and the text say about a run; the attempt tells a page written before a re-run
    of the run_id (a run report's "Compared with" section is not rewritten then) from the run as it is."""
    model = record.get("config", {}).get("model", {})
    weights, digest = model.get("weights"), record.get("weights_sha256")
    if weights:  # two checkpoints of one architecture differ here only
        weights = weights.rsplit("/", 1)[-1] + (f" (sha256 {digest[:12]})" if digest else "")
    return {"run_id": record["run_id"], "attempt": record.get("attempt"), "model_id": record.get("model_id"), "weights": weights,
            "target_layer": record.get("target_layer"), "metric": model.get("metric"), "weighting": model.get("weighting"),
            "input_size": _input_text(model.get("input_size")), "started": first_started(record)}


def _input_text(size: object) -> str | None:
    """A recorded input size as `64 x 64 px` (64 and [64, 64] are one size); None where unrecorded."""
    return None if size is None else "{} x {} px".format(*model_hw(size))


def _run_rows(store: ResultsStore, record: dict) -> pa.Table:
    """The run's committed rows, with null columns for the optional columns it lacks, and its
    image URIs resolved against its manifest's folder."""
    table = store.read(run_id=record["run_id"], columns=list(_READ))
    # a manifest may hold large_string ids: one type for both runs, which _aligned concatenates
    table = table.set_column(table.schema.get_field_index("pair_id"), "pair_id", pc.cast(table["pair_id"], pa.string()))
    folder = manifest_dir(record["config"]["manifest"])
    for name in ("query_uri", "reference_uri"):
        resolved = pa.array([resolve_uri(uri, folder) for uri in table[name].to_pylist()], pa.string())
        table = table.set_column(table.schema.get_field_index(name), name, resolved)
    for name in _READ:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, _OPTIONAL.get(name) or result_type(name)))
    return table.set_column(table.schema.get_field_index("label"), "label", pc.cast(table["label"], pa.int64()))


def _aligned(a: pa.Table, b: pa.Table) -> tuple[pa.Array, pa.Array, pa.Array]:
    """Every pair_id of either run (A's order, then B's new ones) and the row of each in A and in B
    (null where the run does not have it)."""
    ids_a, ids_b = a["pair_id"].combine_chunks(), b["pair_id"].combine_chunks()
    ids = pa.concat_arrays([ids_a, ids_b.filter(pc.invert(pc.is_in(ids_b, value_set=ids_a)))])
    return ids, pc.index_in(ids, value_set=ids_a), pc.index_in(ids, value_set=ids_b)


def _same_shape(a: pa.ChunkedArray, b: pa.ChunkedArray) -> pa.ChunkedArray:
    """Whether two map_shape columns ([h, w]) are equal, row by row (null where either is null)."""
    return pc.and_(*(pc.equal(pc.list_element(a, i), pc.list_element(b, i)) for i in range(2)))


def _matrix(maps: pa.ChunkedArray, rows: np.ndarray, length: int) -> np.ndarray:
    flat = pc.list_flatten(maps.take(rows)).to_numpy(zero_copy_only=False)
    return flat.astype(np.float64).reshape(len(rows), length)


def _pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation; NaN where a row is constant."""
    x, y = x - x.mean(axis=1, keepdims=True), y - y.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x * y).sum(axis=1) / np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))


def _map_correlation(a: pa.ChunkedArray, b: pa.ChunkedArray, rows_a: np.ndarray, rows_b: np.ndarray,
                     comparable: np.ndarray) -> pa.Array:
    """Pearson correlation of A's and B's map of each comparable pair, grouped by map length, in
    chunks; `rows_a`, `rows_b`: each pair's row in A's and B's columns (the maps are not copied whole)."""
    result = np.full(len(comparable), np.nan)
    pairs = np.flatnonzero(comparable)
    lengths = pc.list_value_length(a).to_numpy(zero_copy_only=False)[rows_a[pairs]]
    for length in np.unique(lengths):
        group = pairs[lengths == length]
        for start in range(0, len(group), CHUNK_ROWS):
            chunk = group[start:start + CHUNK_ROWS]
            result[chunk] = _pearson(_matrix(a, rows_a[chunk], int(length)), _matrix(b, rows_b[chunk], int(length)))
    return pa.array(result, mask=np.isnan(result))


def _mean_energy_in_box(rows: pa.Table) -> pa.ChunkedArray:
    return pc.divide(pc.add(pc.cast(rows["query_energy_in_box"], pa.float64()), rows["reference_energy_in_box"]), 2.0)


def _side(rows: pa.Table, suffix: str, label: pa.Array, threshold: float | None) -> dict[str, Any]:
    """One run's columns of the pairs table; a false match is label 0 and similarity >= threshold
    (null without a threshold)."""
    ok = _ok(rows["status"])
    similarity = pc.if_else(ok, pc.cast(rows["similarity"], pa.float64()), None)
    false_match = pa.nulls(rows.num_rows, pa.bool_()) if threshold is None else pa.array(
        is_false_match(as_floats(label), as_floats(similarity), threshold))
    return {
        f"status_{suffix}": rows["status"],
        f"similarity_{suffix}": similarity,
        f"query_pointing_hit_{suffix}": pc.if_else(ok, rows["query_pointing_hit"], None),
        f"energy_in_box_{suffix}": pc.if_else(ok, _mean_energy_in_box(rows), None),
        f"false_match_{suffix}": pc.if_else(ok, false_match, None),
    }


def pair_changes(a: pa.Table, b: pa.Table, threshold: float | None) -> pa.Table:
    """The pairs table of the module docstring, from the two runs' rows."""
    ids, rows_a, rows_b = _aligned(a, b)
    maps = {side: (a[f"map_{side}"], b[f"map_{side}"]) for side in SIDES}  # the large columns, read in chunks
    kept = [name for name in a.column_names if name not in ("map_query", "map_reference")]
    a, b = a.select(kept).take(rows_a), b.select(kept).take(rows_b)
    label = pc.coalesce(b["label"], a["label"])
    same_images = pc.and_(pc.equal(a["query_uri"], b["query_uri"]), pc.equal(a["reference_uri"], b["reference_uri"]))
    for side in SIDES:  # an image replaced at its URI between the runs is another image; a run before digests says nothing
        same_images = pc.and_(same_images, pc.fill_null(pc.equal(a[f"{side}_sha256"], b[f"{side}_sha256"]), True))
    both = _ok_on_same_images(a["status"], b["status"], same_images)
    comparable = pc.if_else(both, pc.fill_null(_same_shape(a["map_shape"], b["map_shape"]), False), None)
    mask = pc.fill_null(comparable, False).to_numpy(zero_copy_only=False)
    index_a, index_b = (pc.fill_null(rows, -1).to_numpy(zero_copy_only=False) for rows in (rows_a, rows_b))
    correlation = {side: _map_correlation(*maps[side], index_a, index_b, mask) for side in SIDES}
    columns = {
        "pair_id": ids, "label": label, "relabelled": pc.if_else(same_images, pc.not_equal(a["label"], b["label"]), None),
        "same_images": same_images,
        **_side(a, "a", label, threshold), **_side(b, "b", label, threshold),
        "map_comparable": comparable, "map_correlation_query": correlation["query"],
        "map_correlation_reference": correlation["reference"],
        "map_correlation": pc.divide(pc.add(correlation["query"], correlation["reference"]), 2.0),
    }
    columns["similarity_change"] = pc.subtract(columns["similarity_b"], columns["similarity_a"])
    return pa.table({name: columns[name] for name in PAIR_COLUMNS})


def _known(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Whether each value is known: not null, and not NaN (the energy in the box of a map without
    positive mass), which the gates leave out too."""
    values = pc.cast(column, pa.float64())
    return pc.fill_null(pc.invert(pc.is_nan(values)), False)


def _mean(column: pa.ChunkedArray) -> float | None:
    """The mean of the known values; None without any."""
    return pc.mean(pc.filter(pc.cast(column, pa.float64()), _known(column))).as_py()


def _paired_means(a: pa.ChunkedArray, b: pa.ChunkedArray) -> tuple[float | None, float | None]:
    """Both runs' means over the pairs whose value both know: a change of the same pairs, not of
    two subsets (a map without positive evidence in one run has no energy or pointing there)."""
    both = pc.and_(_known(a), _known(b))
    return _mean(pc.filter(a, both)), _mean(pc.filter(b, both))


def _figures_of(rows: pa.Table) -> dict[str, Any]:
    """The figures of one label's pairs (ok in both runs)."""
    summary: dict[str, Any] = {"pairs": rows.num_rows}
    for name, column in FIGURES.items():
        before, after = _paired_means(rows[f"{column}_a"], rows[f"{column}_b"])
        change = None if before is None or after is None else after - before
        summary |= {f"{name}_a": before, f"{name}_b": after, f"{name}_change": change}
    false_a, false_b = rows["false_match_a"], rows["false_match_b"]
    return summary | {
        "mean_map_correlation": _mean(rows["map_correlation"]),
        "maps_not_comparable": count_true(pc.invert(rows["map_comparable"])),
        "false_matches_a": count_true(false_a), "false_matches_b": count_true(false_b),
        "new_false_matches": count_true(pc.and_not(false_b, false_a)),
        "vanished_false_matches": count_true(pc.and_not(false_a, false_b)),
    }


def _label_order(labels: Iterable[int | None]) -> list[int | None]:
    """1, 0 (and any other label, high first), then unlabelled."""
    return sorted(labels, key=lambda label: (label is None, -(label or 0)))


def _run_values(records: tuple[dict, dict], threshold: float | None) -> dict[str, Any]:
    """RUN_COLUMNS' values, from the two runs' records."""
    a, b = records
    return {"run_a": a["run_id"], "run_b": b["run_id"], "attempt_a": a["attempt"], "attempt_b": b["attempt"],
            "threshold": threshold}


def label_summary(pairs: pa.Table, runs: dict[str, Any]) -> pa.Table:
    """The summary table of the module docstring, from the pairs table and RUN_COLUMNS' values."""
    both = pairs.filter(_compared(pairs))
    rows = []
    for label in _label_order(pc.unique(both["label"]).to_pylist()):
        chosen = both.filter(pc.is_null(both["label"]) if label is None else pc.equal(both["label"], label))
        figures = _figures_of(chosen)
        if runs["threshold"] is None:  # none counted, not none found
            figures |= dict.fromkeys(FALSE_MATCH_COUNTS)
        rows.append({**runs, "label": label, **figures})
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)


def compare_runs(output: str, run_a: str, run_b: str, options: StorageOptions,
                 threshold: float | None = None, table: TableConfig | None = None) -> Comparison:
    """Compares the committed rows of two runs under one output root (in its Hive or Iceberg table).

    threshold: a false match's similarity; by default run B's own (its config's gates.false_match_similarity),
        none (no false matches counted) where that is above every similarity of a euclidean run.
    """
    store = open_results_store(output, options, table)
    records = [run_record(store, run_id) for run_id in (run_a, run_b)]
    if threshold is None:
        threshold = recorded_false_match_similarity(records[1])
    else:  # a threshold that one run's metric can reach still counts its false matches
        outside = [outside_cosine_range(threshold, record["config"]["model"]["metric"]) for record in records]
        if all(outside):
            raise UserError(f"--threshold {outside[0]}")
    pairs = pair_changes(*(_run_rows(store, record) for record in records), threshold)
    runs = _run_values((records[0], records[1]), threshold)
    pairs = pa.table({**{field.name: pa.array([runs[field.name]] * pairs.num_rows, field.type) for field in RUN_COLUMNS},
                      **{name: pairs[name] for name in pairs.column_names}})
    return Comparison(runs=(_run_info(records[0]), _run_info(records[1])), threshold=threshold, pairs=pairs,
                      summary=label_summary(pairs, runs))


def _write_parquet(uri: str, table: pa.Table, options: StorageOptions) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(uri, buffer.getvalue(), options)


def write_comparison(comparison: Comparison, output: str, options: StorageOptions) -> dict[str, str]:
    """Writes summary.parquet, pairs.parquet and comparison.html; returns their URIs by name."""
    folder = comparison_dir(output, *comparison.run_ids)
    written = {name: join_uri(folder, name) for name in ("summary.parquet", "pairs.parquet", "comparison.html")}
    _write_parquet(written["summary.parquet"], comparison.summary, options)
    _write_parquet(written["pairs.parquet"], comparison.pairs, options)
    write_bytes(written["comparison.html"], render_comparison(comparison.view()).encode(), options)
    return written
