"""`sfam render`: the overlay of any pair of a finished run, drawn later from the result table.

The job renders only the pairs its `render_png` policy selects; every row keeps its maps,
so any other pair is drawn here from its row and its two images, as the job would have.
"""

from __future__ import annotations

from pipeline.errors import UserError
from pipeline.io.iceberg_store import TableConfig
from pipeline.io.images import decode_pictures, image_sha256
from pipeline.io.storage import StorageError, StorageOptions, read_bytes, resolve_uri
from pipeline.io.stores import open_results_store
from pipeline.manifest import manifest_dir
from pipeline.models.spec import model_hw
from pipeline.render.result_row import DISPLAY_SIDE, OVERLAY_COLUMNS, render_result_row
from pipeline.run_history import read_run_record
from pipeline.schema import SIDES


class PairNotFound(UserError):
    """The run has no ok row with that pair_id."""


class ImageChanged(UserError):
    """An image of the pair is not the one the run explained (its bytes differ from the recorded SHA-256)."""


def render_pair_of_run(output: str, run_id: str, pair_id: str, options: StorageOptions,
                       table: TableConfig | None = None) -> bytes:
    """PNG overlay of `pair_id` in run `run_id` under the audit's `output` root (in its Hive or Iceberg table)."""
    record = read_run_record(output, run_id, options)
    store = open_results_store(output, options, table)
    rows = store.read(run_id=run_id, pair_ids=[pair_id]).to_pylist()
    if not rows or rows[0].get("status") != "ok":
        reason = rows[0].get("error") if rows else "no such pair_id in the run"
        raise PairNotFound(f"pair {pair_id[:200]!r} of run {run_id!r}: {reason}")
    row = rows[0]
    folder = manifest_dir(record["config"]["manifest"])
    model_size = model_hw(record["config"]["model"]["input_size"])  # one side, or [height, width]
    max_pixels = int(record["config"]["max_image_pixels"])
    displays, sizes = {}, {}
    for side in SIDES:
        uri = row[f"{side}_uri"]
        try:
            data = read_bytes(resolve_uri(uri, folder), options)
        except StorageError as error:  # the run's table holds the maps, not the pictures
            raise type(error)(error.uri, f"{error.reason} (sfam render reads the pair's images again, from where "
                                         "the run read them)") from error
        recorded = row.get(f"{side}_sha256")  # None in runs made before the job recorded it
        if recorded and image_sha256(data) != recorded:
            raise ImageChanged(f"pair {pair_id[:200]!r} of run {run_id!r}: the {side} image {uri} has changed since the run "
                               f"read it (SHA-256 {recorded[:12]}... then): its map would be drawn on another picture; "
                               "re-run the audit to explain the image as it is now")
        pictures = decode_pictures(data, uri, max_pixels, model_size, DISPLAY_SIDE)
        displays[side], sizes[side] = pictures.display, pictures.size
    return render_result_row({name: row.get(name) for name in OVERLAY_COLUMNS}, displays, sizes)
