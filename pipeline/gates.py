"""Quality gates of a scheduled audit: thresholds a finished run must meet.

A run that breaks a gate still commits its outputs (the rows are what the team needs to
see why), records each gate's value, threshold and verdict in run.json, and exits with
EXIT_GATES_FAILED so that a scheduler marks the run failed and alerting picks it up.

Gates (each off while its threshold is null):

    min_same_label_pointing  share of label-1 pairs whose query map peaks inside the query box
    max_false_match_rate     share of label-0 pairs with similarity >= false_match_similarity
    max_residual_share       median over pairs of mean(|residual|) / |similarity| (quality.py)
    max_similarity_drop      mean similarity of label-1 pairs: the baseline run minus this run.
                             The baseline is the latest run with the same metric that passed
                             its gates and first ran before this run did, of the same manifest (`similarity_baseline: same_manifest`)
                             or of any (`previous_run`: a scheduled audit of a new manifest each
                             night); without one the gate is not measured (n/a, and it says why)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

from pipeline.arrow_columns import as_floats
from pipeline.errors import EXIT_GATES_FAILED, PipelineError, UserError
from pipeline.manifest import BBOX_COLUMNS
from pipeline.quality import residual_share
from pipeline.thresholds import FALSE_MATCH_SIMILARITY, is_false_match


class GatesFailed(PipelineError):
    """The run finished and committed, but broke at least one quality gate; `summary` holds the
    lines a run prints when it finishes (its counts, results, overlays and record)."""

    exit_code = EXIT_GATES_FAILED
    prefix = "gates failed"

    def __init__(self, message: str, summary: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.summary = tuple(summary)


class Gates(BaseModel):
    """The config's `gates` section."""

    model_config = ConfigDict(extra="forbid")

    min_same_label_pointing: FiniteFloat | None = Field(None, ge=0, le=1)
    max_false_match_rate: FiniteFloat | None = Field(None, ge=0, le=1)
    false_match_similarity: FiniteFloat = FALSE_MATCH_SIMILARITY
    max_residual_share: FiniteFloat | None = Field(None, ge=0)
    max_similarity_drop: FiniteFloat | None = None
    similarity_baseline: Literal["same_manifest", "previous_run"] = "same_manifest"

    @property
    def enabled(self) -> bool:
        return any(getattr(self, name) is not None for name in
                   ("min_same_label_pointing", "max_false_match_rate", "max_residual_share", "max_similarity_drop"))

    def needed_columns(self) -> dict[str, str]:
        """Manifest columns the enabled gates need, and the gate that needs each."""
        needed = {}
        if self.min_same_label_pointing is not None:
            needed |= dict.fromkeys(("label", *BBOX_COLUMNS), "min_same_label_pointing")
        if self.max_false_match_rate is not None:
            needed.setdefault("label", "max_false_match_rate")
        if self.max_similarity_drop is not None:
            needed.setdefault("label", "max_similarity_drop")
        return needed


@dataclass(frozen=True)
class GateResult:
    name: str
    value: float | None  # None: nothing to measure (no pairs of that kind, no baseline run)
    threshold: float
    passed: bool
    note: str | None = None  # what the value was measured against, or why it was not

    def line(self) -> str:
        value = "n/a" if self.value is None else f"{self.value:.4g}"
        verdict = "passed" if self.passed else "FAILED"
        return f"gate {self.name}: {value} (threshold {self.threshold:g}) {verdict}" + (f"; {self.note}" if self.note else "")

    def as_record(self) -> dict:
        return asdict(self)


def check_manifest_supports(gates: Gates, manifest_columns: list[str]) -> None:
    """Refuses, before any work, gates whose columns the manifest lacks."""
    for column, gate in gates.needed_columns().items():
        if column not in manifest_columns:
            raise UserError(f"gates.{gate}: the manifest has no {column!r} column to measure it")


def _mean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else None


def same_label_similarity(rows: pa.Table) -> tuple[float | None, int]:
    """Mean similarity of the ok label-1 pairs of a run's rows, and how many there are; (None, 0)
    for a run without labels."""
    if "label" not in rows.column_names:
        return None, 0
    same = rows.filter(pc.and_(pc.equal(rows.column("status"), "ok"), pc.equal(rows.column("label"), 1)))
    return (_mean(as_floats(same.column("similarity"))) if same.num_rows else None), same.num_rows


@dataclass(frozen=True)
class Baseline:
    """The run max_similarity_drop compares with (its label-1 mean similarity over `pairs` pairs), or why there is none."""

    run_id: str | None
    same_label_similarity: float | None
    note: str
    pairs: int = 0


def evaluate(gates: Gates, rows: pa.Table, baseline: Baseline | None) -> list[GateResult]:
    """The enabled gates on a run's rows; a gate with nothing to measure passes (value None)."""
    ok = rows.filter(pc.equal(rows.column("status"), "ok"))
    has_label = "label" in ok.column_names
    results = []

    def add(name: str, value: float | None, threshold: float | None, higher_is_better: bool, note: str | None = None) -> None:
        if threshold is None:
            return
        passed = value is None or (value >= threshold if higher_is_better else value <= threshold)
        results.append(GateResult(name, value, threshold, passed, note))

    if has_label:
        same = ok.filter(pc.equal(ok.column("label"), 1))
        different = ok.filter(pc.equal(ok.column("label"), 0))
        pointing = as_floats(same.column("query_pointing_hit")) if "query_pointing_hit" in same.column_names else np.array([])
        add("min_same_label_pointing", _mean(pointing), gates.min_same_label_pointing, True)
        false_matches = is_false_match(as_floats(different.column("label")), as_floats(different.column("similarity")),
                                       gates.false_match_similarity)
        add("max_false_match_rate", float(false_matches.mean()) if different.num_rows else None,
            gates.max_false_match_rate, False)
        current, pairs = same_label_similarity(rows)
        previous = None if baseline is None else baseline.same_label_similarity
        drop = None if current is None or previous is None else previous - current
        note = None if baseline is None else baseline.note
        if drop is not None:  # means over each run's own pairs: other pairs where the manifests differ
            note = f"{note}: {previous:.4f} over its {baseline.pairs} ok label-1 pairs, {current:.4f} over this run's {pairs}"
        add("max_similarity_drop", drop, gates.max_similarity_drop, False, note)
    share = residual_share(*(as_floats(ok.column(c)) for c in ("similarity", "residual_query", "residual_reference")))
    measured = share[~np.isnan(share)]
    add("max_residual_share", float(np.median(measured)) if measured.size else None, gates.max_residual_share, False)
    return results
