"""The render stage: PNG overlays of the rows its policy selects; only the result columns go on."""

from __future__ import annotations

import pyarrow as pa

from pipeline.distributed.columns import display_at
from pipeline.io.storage import StorageOptions, write_bytes
from pipeline.layout import RunLayout
from pipeline.render.result_row import OVERLAY_COLUMNS, render_result_row
from pipeline.render.selection import FlagRules, RenderPolicy, select_for_render
from pipeline.schema import SIDES


class RenderResults:
    """Writes the overlays its policy selects to their deterministic paths; leaves only result columns."""

    def __init__(self, layout: RunLayout, policy: RenderPolicy, rules: FlagRules, storage_options: StorageOptions) -> None:
        self.layout = layout
        self.policy = policy
        self.rules = rules
        self.storage_options = storage_options

    def _render(self, batch: pa.Table, row: int) -> str:
        displays = {side: display_at(batch, side, row) for side in SIDES}
        sizes = {side: tuple(batch.column(f"_{side}_size")[row].as_py()) for side in SIDES}
        columns = [c for c in OVERLAY_COLUMNS if c in batch.column_names]
        values = {name: batch.column(name)[row].as_py() for name in columns}
        uri = self.layout.png_uri(values["pair_id"])
        write_bytes(uri, render_result_row(values, displays, sizes), self.storage_options)
        return uri

    def __call__(self, batch: pa.Table) -> pa.Table:
        selected = select_for_render(batch, self.policy, self.rules)
        png_uris = [self._render(batch, row) if chosen else None for row, chosen in enumerate(selected.tolist())]
        batch = batch.append_column("png_uri", pa.array(png_uris, pa.string()))
        return batch.drop_columns([name for name in batch.column_names if name.startswith("_")])
