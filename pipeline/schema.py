"""The result table's columns: one pyarrow schema for every stage, the validation and the report.

A result row is the manifest row (passed through unchanged) plus the columns below. The
partition columns come from the Hive path (`run_date=.../run_id=...`), not from the files.
The box columns exist only when the manifest has `query_bbox` and `reference_bbox`.
"""

from __future__ import annotations

import pyarrow as pa

SIDES = ("query", "reference")
TOP_CHANNELS = 10  # length of cis_top_channels

PARTITION_COLUMNS = pa.schema([
    pa.field("run_date", pa.string()),
    pa.field("run_id", pa.string()),
])

# what each column means: docs/cluster.md, "Where the results land" (tests/test_docs.py keeps its table and these names equal)
RESULT_COLUMNS = pa.schema([
    pa.field("attempt", pa.string()),
    pa.field("model_id", pa.string()),
    pa.field("metric", pa.string()),
    pa.field("weighting", pa.string()),
    pa.field("target_layer", pa.string()),
    pa.field("similarity", pa.float32()),
    pa.field("cis_query", pa.list_(pa.float32())),
    pa.field("cis_reference", pa.list_(pa.float32())),
    pa.field("residual_query", pa.float32()),
    pa.field("residual_reference", pa.float32()),
    pa.field("cis_top_channels", pa.list_(pa.int32())),
    pa.field("map_query", pa.list_(pa.float32())),
    pa.field("map_reference", pa.list_(pa.float32())),
    pa.field("map_shape", pa.list_(pa.int32())),
    pa.field("query_peak_xy", pa.list_(pa.float32())),
    pa.field("reference_peak_xy", pa.list_(pa.float32())),
    pa.field("correspondences", pa.list_(pa.struct([
        pa.field("query_xy", pa.list_(pa.float32())),
        pa.field("reference_xy", pa.list_(pa.float32())),
        pa.field("score", pa.float32()),
    ]))),
    pa.field("query_sha256", pa.string()),
    pa.field("reference_sha256", pa.string()),
    pa.field("png_uri", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("forward_share", pa.float32()),
    pa.field("device", pa.string()),
])

LOCALISATION_COLUMNS = pa.schema([
    pa.field("query_energy_in_box", pa.float32()),
    pa.field("query_pointing_hit", pa.bool_()),
    pa.field("reference_energy_in_box", pa.float32()),
    pa.field("reference_pointing_hit", pa.bool_()),
])

# written by the explain stage for every row, null where the row failed before explaining
EXPLAINED_COLUMNS = (
    "similarity", "cis_query", "cis_reference", "residual_query", "residual_reference", "cis_top_channels",
    "map_query", "map_reference", "map_shape", "query_peak_xy", "reference_peak_xy", "correspondences",
    "forward_share",
)


def reserved_names() -> frozenset[str]:
    """Names a manifest column may not have: the job writes them."""
    return frozenset(PARTITION_COLUMNS.names + RESULT_COLUMNS.names + LOCALISATION_COLUMNS.names)


def result_type(name: str) -> pa.DataType:
    """The Arrow type of a result column."""
    for schema in (RESULT_COLUMNS, LOCALISATION_COLUMNS, PARTITION_COLUMNS):
        index = schema.get_field_index(name)
        if index >= 0:
            return schema.field(index).type
    raise KeyError(f"{name!r} is not a result column")
