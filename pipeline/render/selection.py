"""Which result rows get a PNG overlay: the render policy `all | flagged | none`.

The maps are stored in the result table, so any pair can be rendered later; the job renders
only what an auditor looks at first. The job streams batches and never sees the whole run,
so every rule below is decided per row, from the row alone, plus one per-batch cap:

- only rows with status "ok" are rendered (the others have no maps);
- `all` renders every ok row, `none` none;
- `flagged` renders an ok row when at least one of these holds, in this priority order:

  1. false match: label 0 and similarity >= `false_match_similarity` (two different things
     that the model finds alike);
  2. pointing miss: a `query_pointing_hit` or `reference_pointing_hit` is False (the map's
     peak falls outside the box; rows without a box have null there and are not flagged);
  3. weak match: label 1 and similarity <= `weak_match_similarity` (a true match that the
     model barely sees);
  4. sample: `hash(pair_id)` falls in the lowest `sample_rate` share of the hash range. The
     hash (BLAKE2b) is stable across processes and runs, so the same pairs are sampled on
     every re-run; being independent of everything else, the sample keeps every stratum
     (label, similarity band, shard) in proportion, in expectation.

  Rules 1 and 3 need a `label` column and rule 2 the pointing-hit columns; a rule whose
  column is absent or null flags nothing.

- cap: at most `ceil(max_fraction * rows in the batch)` rows of a batch are flagged, so a run
  renders at most `max_fraction` of its rows plus one per batch. Over the cap, rows are
  kept by rule priority, then by severity (the most similar false matches, the least similar
  weak matches), then by hash.

The similarity thresholds are in the metric's units; the defaults suit cosine similarity.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import FiniteFloat

from pipeline.arrow_columns import as_bools, as_floats
from pipeline.thresholds import FALSE_MATCH_SIMILARITY, is_false_match

RenderPolicy = Literal["all", "flagged", "none"]
RENDER_POLICIES: tuple[str, ...] = get_args(RenderPolicy)

# The reasons a row is flagged, in priority order (lower first); NOT_FLAGGED sorts last.
FALSE_MATCH, POINTING_MISS, WEAK_MATCH, SAMPLE, NOT_FLAGGED = range(5)
POINTING_COLUMNS = ("query_pointing_hit", "reference_pointing_hit")


@dataclass(frozen=True)
class FlagRules:
    """Thresholds of the `flagged` policy (see the module docstring)."""

    false_match_similarity: FiniteFloat = FALSE_MATCH_SIMILARITY
    weak_match_similarity: FiniteFloat = 0.3
    sample_rate: FiniteFloat = 0.005
    max_fraction: FiniteFloat = 0.05

    def __post_init__(self) -> None:
        for name in ("sample_rate", "max_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


def select_for_render(batch: pa.Table | pa.RecordBatch, policy: RenderPolicy, rules: FlagRules = FlagRules()) -> np.ndarray:
    """Boolean mask of the rows of `batch` that get an overlay under `policy`.

    `batch` needs `status` and, for `flagged`, `pair_id` and `similarity`; `label` and the
    pointing-hit columns are used when present.
    """
    if policy not in RENDER_POLICIES:
        raise ValueError(f"render policy must be one of {', '.join(RENDER_POLICIES)}, got {policy!r}")
    ok = as_bools(pc.equal(batch.column("status"), "ok"))
    if policy != "flagged":
        return ok if policy == "all" else np.zeros_like(ok)
    reasons = np.where(ok, flag_reasons(batch, rules), NOT_FLAGGED)
    return _capped(batch, reasons, math.ceil(rules.max_fraction * batch.num_rows))


def flag_reasons(batch: pa.Table | pa.RecordBatch, rules: FlagRules) -> np.ndarray:
    """Per row, the first rule that flags it (FALSE_MATCH ... SAMPLE), or NOT_FLAGGED; status is ignored."""
    similarity = as_floats(batch.column("similarity"))
    label = as_floats(batch.column("label")) if "label" in batch.column_names else np.full(batch.num_rows, np.nan)
    conditions = [
        is_false_match(label, similarity, rules.false_match_similarity),
        _pointing_miss(batch),
        (label == 1) & (similarity <= rules.weak_match_similarity),
        sample_position(batch.column("pair_id")) < rules.sample_rate,
    ]
    return np.select(conditions, [FALSE_MATCH, POINTING_MISS, WEAK_MATCH, SAMPLE], NOT_FLAGGED)


def sample_position(pair_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A uniform number in [0, 1) per pair id, the same in every process and run."""
    digests = [hashlib.blake2b(str(pair_id).encode(), digest_size=8).digest() for pair_id in pair_ids.to_pylist()]
    return np.frombuffer(b"".join(digests), dtype=">u8").astype(np.float64) / 2.0**64


def _pointing_miss(batch: pa.Table | pa.RecordBatch) -> np.ndarray:
    miss = np.zeros(batch.num_rows, dtype=bool)
    for name in POINTING_COLUMNS:
        if name in batch.column_names:
            miss |= as_bools(pc.equal(batch.column(name), False))
    return miss


def _capped(batch: pa.Table | pa.RecordBatch, reasons: np.ndarray, cap: int) -> np.ndarray:
    """The flagged rows, at most `cap` of them: by reason, then severity, then hash."""
    flagged = reasons != NOT_FLAGGED
    if flagged.sum() <= cap:
        return flagged
    similarity = np.nan_to_num(as_floats(batch.column("similarity")))
    severity = np.select([reasons == FALSE_MATCH, reasons == WEAK_MATCH], [-similarity, similarity], 0.0)
    order = np.lexsort((sample_position(batch.column("pair_id")), severity, reasons))
    mask = np.zeros(batch.num_rows, dtype=bool)
    mask[order[:cap]] = True  # all flagged: unflagged rows sort last and there are more flagged than `cap`
    return mask


