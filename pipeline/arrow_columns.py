"""Arrow columns as the checks on them need them: null-safe counts and numpy arrays."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def count_true(mask: pa.Array | pa.ChunkedArray) -> int:
    """How many values of a boolean column are true (null counts as false)."""
    return int(pc.sum(pc.fill_null(mask, False)).as_py() or 0)


def as_bools(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean column as numpy, null as False."""
    return pc.fill_null(values, False).to_numpy(zero_copy_only=False).astype(bool)


def as_floats(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric or boolean column as float64 numpy, null as NaN (which no comparison holds for)."""
    return pc.cast(values, pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
