"""What an attempt records of itself: its summary's warnings."""

from __future__ import annotations

import time

import pyarrow as pa

from pipeline.distributed.run_record import summarise
from pipeline.io.storage import StorageOptions, join_uri
from pipeline.layout import RunLayout
from pipeline.models.loading import random_weights_warning

from audit_data import job_config, model_config


def staged_rows() -> pa.Table:
    """One ok row with the columns summarise reads."""
    return pa.table({"status": ["ok"], "forward_share": [1.0], "device": ["cpu"], "similarity": [0.9],
                     "residual_query": [0.01], "residual_reference": [0.02],
                     "query_peak_xy": [[3.0, 4.0]], "reference_peak_xy": [[5.0, 6.0]], "map_shape": [[7, 7]]})


def test_a_model_without_weights_is_a_warning_of_the_run(tmp_path) -> None:
    """Logged when the job starts, it was missing from the summary, run.json and the report: a run
    of a random model (a `--set model=ARCH` that dropped the weights) read as a real one."""
    root, options = str(tmp_path), StorageOptions()
    random_model = {"arch": "resnet18", "embedding_dim": 16, "input_size": 64}
    for model, warned in ((random_model, True), (model_config(join_uri(root, "model.pt")), False)):
        config = job_config(root, options, join_uri(root, "pairs.parquet"), "r1", model=model)
        layout = RunLayout(config.output, "r1", "2026-11-28", "a1")
        summary = summarise(staged_rows(), layout, config, time.time() - 2, time.time() - 1, 0.0)
        expected = random_weights_warning(config.model)
        assert (expected is not None) == warned
        assert (expected in summary.warnings) == warned and all(w for w in summary.warnings)
        assert (f"warning: {expected}" in summary.lines()) == warned
