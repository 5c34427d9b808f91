"""How pictures travel between the job's stages: raw uint8 pixels in transient binary columns.

Each side of a row has the columns `_{side}_{name}` for the names in PICTURE_COLUMNS (fetch.py
writes them); columns whose names start with "_" are transient and never reach the result table.
Reading a picture back needs no torch: the render tasks' processes never import it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

PICTURE_COLUMNS = ("pixels", "display", "display_shape", "size", "jpeg", "orientation")  # each side's, "_{side}_{name}"


def picture_at(batch: pa.Table, column: str, row: int, hw: Sequence[int]) -> np.ndarray:
    """The (h, w, 3) uint8 picture in a binary column at `row`, read in place from its Arrow buffer."""
    return np.frombuffer(batch.column(column)[row].as_buffer(), np.uint8).reshape(*hw, 3)


def display_at(batch: pa.Table, side: str, row: int) -> np.ndarray:
    """The (h, w, 3) uint8 display picture of one side of `row`."""
    return picture_at(batch, f"_{side}_display", row, batch.column(f"_{side}_display_shape")[row].as_py())


def binary_column(arrays: list[np.ndarray | bytes | None]) -> pa.Array:
    """Each array's raw bytes (or the bytes) as one binary value, copied once into one buffer
    (64-bit offsets: a batch of large pictures may pass 2 GiB); None is null."""
    views = [np.frombuffer(a, np.uint8) if isinstance(a, bytes) else a for a in arrays]
    offsets = np.cumsum([0, *(0 if a is None else a.nbytes for a in views)], dtype=np.int64)
    present = [a.ravel() for a in views if a is not None]
    data = np.concatenate(present) if present else np.empty(0, np.uint8)
    valid = np.array([a is not None for a in views])
    validity = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(pa.large_binary(), len(views), [validity, pa.py_buffer(offsets), pa.py_buffer(data)])
