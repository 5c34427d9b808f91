"""The render policy: which result rows get a PNG overlay."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from pipeline.render.selection import (
    FALSE_MATCH,
    NOT_FLAGGED,
    POINTING_MISS,
    WEAK_MATCH,
    FlagRules,
    flag_reasons,
    sample_position,
    select_for_render,
)

EVERY_FLAG = FlagRules(sample_rate=0.0, max_fraction=1.0)  # no sample, no cap: the rules alone

# pair_id, status, label, similarity, query_pointing_hit, reference_pointing_hit, expected reason
ROWS = [
    ("false-match", "ok", 0, 0.95, None, None, FALSE_MATCH),
    ("plain-negative", "ok", 0, 0.10, None, None, NOT_FLAGGED),
    ("weak-match", "ok", 1, 0.10, True, True, WEAK_MATCH),
    ("plain-positive", "ok", 1, 0.90, True, True, NOT_FLAGGED),
    ("query-misses-box", "ok", 1, 0.90, False, True, POINTING_MISS),
    ("reference-misses-box", "ok", 1, 0.90, True, False, POINTING_MISS),
    ("false-match-missing-box", "ok", 0, 0.99, False, None, FALSE_MATCH),
    ("unlabelled", "ok", None, 0.99, None, None, NOT_FLAGGED),
    ("failed", "error", 0, None, None, None, NOT_FLAGGED),
]


def results(rows: list[tuple] = ROWS) -> pa.Table:
    names = ["pair_id", "status", "label", "similarity", "query_pointing_hit", "reference_pointing_hit"]
    types = [pa.string(), pa.string(), pa.int64(), pa.float32(), pa.bool_(), pa.bool_()]
    columns = [[row[i] for row in rows] for i in range(len(names))]
    return pa.table([pa.array(values, kind) for values, kind in zip(columns, types)], names=names)


def random_results(rng: np.random.Generator, num_rows: int, start: int = 0) -> pa.Table:
    return pa.table({
        "pair_id": [f"pair-{i}" for i in range(start, start + num_rows)],
        "status": ["ok"] * num_rows,
        "label": rng.integers(0, 2, num_rows),
        "similarity": rng.uniform(-1, 1, num_rows),
    })


def test_each_rule_flags_its_rows() -> None:
    table = results()
    assert flag_reasons(table, EVERY_FLAG).tolist() == [row[-1] for row in ROWS]
    mask = select_for_render(table, "flagged", EVERY_FLAG)
    assert table.filter(pa.array(mask)).column("pair_id").to_pylist() == [
        "false-match", "weak-match", "query-misses-box", "reference-misses-box", "false-match-missing-box"]


def test_all_and_none_follow_the_status() -> None:
    table = results()
    assert select_for_render(table, "all").tolist() == [row[1] == "ok" for row in ROWS]
    assert not select_for_render(table, "none").any()


def test_rules_whose_columns_are_absent_flag_nothing() -> None:
    table = results().drop_columns(["label", "query_pointing_hit", "reference_pointing_hit"])
    assert not select_for_render(table, "flagged", EVERY_FLAG).any()
    assert select_for_render(table, "flagged", FlagRules(sample_rate=1.0, max_fraction=1.0)).tolist() == [
        row[1] == "ok" for row in ROWS]


def test_thresholds_are_inclusive() -> None:
    rows = [("at-high", "ok", 0, 0.5, None, None, FALSE_MATCH), ("at-low", "ok", 1, 0.25, None, None, WEAK_MATCH)]
    rules = FlagRules(false_match_similarity=0.5, weak_match_similarity=0.25, sample_rate=0.0, max_fraction=1.0)
    assert flag_reasons(results(rows), rules).tolist() == [FALSE_MATCH, WEAK_MATCH]


def test_sample_is_uniform_stable_and_independent_of_batching(rng: np.random.Generator) -> None:
    table = random_results(rng, 20_000)
    rules = FlagRules(false_match_similarity=math.inf, weak_match_similarity=-math.inf, sample_rate=0.02, max_fraction=1.0)
    mask = select_for_render(table, "flagged", rules)
    assert abs(mask.mean() - 0.02) < 0.005  # 5 standard deviations of a Bernoulli(0.02) mean over 20,000 rows
    for label in (0, 1):  # every stratum in proportion
        assert abs(mask[table.column("label").to_numpy() == label].mean() - 0.02) < 0.007
    streamed = np.concatenate([select_for_render(b, "flagged", rules) for b in table.to_batches(max_chunksize=777)])
    np.testing.assert_array_equal(streamed, mask)


def test_sample_position_is_pinned() -> None:
    # BLAKE2b, not Python's per-process salted hash(): a change here changes which pairs every run renders.
    positions = sample_position(pa.chunked_array([["pair-0"], ["pair-1", "pair-0"]]))
    assert positions[0] == positions[2]
    np.testing.assert_allclose(positions[:2], [0.2712361855932978, 0.8269234915044311], rtol=1e-12)


def test_cap_keeps_the_most_telling_rows() -> None:
    false_matches = [(f"false-{i}", "ok", 0, s, None, None, FALSE_MATCH) for i, s in enumerate(np.linspace(0.85, 0.99, 10))]
    weak_matches = [(f"weak-{i}", "ok", 1, s, None, None, WEAK_MATCH) for i, s in enumerate(np.linspace(-0.9, 0.0, 10))]
    plain = [(f"plain-{i}", "ok", 1, 0.9, None, None, NOT_FLAGGED) for i in range(80)]
    table = results(plain[:40] + weak_matches + false_matches + plain[40:])
    rules = FlagRules(sample_rate=0.0, max_fraction=0.15)  # 15 of the 20 flagged rows
    kept = table.filter(pa.array(select_for_render(table, "flagged", rules))).column("pair_id").to_pylist()
    assert sorted(kept) == sorted([f"false-{i}" for i in range(10)] + [f"weak-{i}" for i in range(5)])


def test_cap_bounds_a_streamed_run(rng: np.random.Generator) -> None:
    flag_everything = FlagRules(false_match_similarity=-math.inf, weak_match_similarity=math.inf, sample_rate=1.0,
                                max_fraction=0.03)
    sizes = rng.integers(1, 300, 40)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rendered = sum(int(select_for_render(random_results(rng, int(n), int(s)), "flagged", flag_everything).sum())
                   for n, s in zip(sizes, starts))
    assert rendered <= 0.03 * sizes.sum() + len(sizes)
    assert rendered == sum(math.ceil(0.03 * n) for n in sizes)


def test_empty_batch() -> None:
    assert select_for_render(results([]), "flagged").shape == (0,)


def test_rejects_bad_policies_and_rules() -> None:
    with pytest.raises(ValueError, match="all, flagged, none"):
        select_for_render(results(), "some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sample_rate"):
        FlagRules(sample_rate=1.5)
    with pytest.raises(ValueError, match="max_fraction"):
        FlagRules(max_fraction=-0.1)
