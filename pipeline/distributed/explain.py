"""The explain stage: one model replica per actor explains each batch's pairs (on its GPU where it has one)."""

from __future__ import annotations

import logging
import sys
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.distributed.columns import display_at, picture_at
from pipeline.distributed.fetch import with_pictures
from pipeline.explain import SFAMResult
from pipeline.io.images import EncodedJpeg, ImageDecodeError, Pictures, decode_jpegs, torchvision_decodes_jpegs_on
from pipeline.io.storage import StorageOptions
from pipeline.localisation import box_in_image, localise
from pipeline.manifest import BBOX_COLUMNS
from pipeline.models.explainer import build_explainer, device_label
from pipeline.models.spec import ModelSpec, model_hw
from pipeline.render.result_row import DISPLAY_SIDE, matches_in_pixels
from pipeline.schema import EXPLAINED_COLUMNS, LOCALISATION_COLUMNS, SIDES, TOP_CHANNELS, result_type

log = logging.getLogger("sfam.audit")
REGROW_AFTER = 32  # batches that fill a lowered size before the actor tries twice that size again
REGROW_AFTER_AT_MOST = 1024  # the wait after regrown sizes that ran out again, each doubling it
# what the libraries that allocate their own workspace or handles say in the RuntimeError they raise when the
# device's memory is full, where torch's allocator raises torch.cuda.OutOfMemoryError: cuBLAS (CUBLAS_STATUS_ALLOC_FAILED;
# CUBLAS_STATUS_NOT_INITIALIZED from cublasCreate), cuDNN 8 (CUDNN_STATUS_ALLOC_FAILED), cuDNN 9
# (CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED), cuFFT (CUFFT_ALLOC_FAILED), CUDA's runtime ("out of memory")
_OUT_OF_MEMORY_MESSAGES = ("ALLOC_FAILED", "ALLOCATION_FAILED", "CUBLAS_STATUS_NOT_INITIALIZED", "out of memory")


class DecodeJpegs:
    """Decodes, on `device`, the JPEGs that FetchImages left encoded; a JPEG that fails marks its rows.

    Leaves the batch as FetchImages would have made it with decode_jpegs=True (the pictures of
    the other images are kept as they are).
    """

    def __init__(self, input_size: int | tuple[int, int], max_image_pixels: int, device: torch.device) -> None:
        self.input_size = input_size
        self.max_image_pixels = max_image_pixels
        self.device = device
        if not torchvision_decodes_jpegs_on(device):
            log.warning("this torchvision cannot decode JPEGs on %s (built without nvJPEG?): decoding them on the CPU", device)
            self.device = torch.device("cpu")

    def __call__(self, batch: pa.Table) -> pa.Table:
        pictures: dict[str, Pictures | EncodedJpeg] = {}
        for side in SIDES:
            for row, uri in enumerate(batch.column(f"{side}_uri").to_pylist()):
                if uri not in pictures and batch.column(f"_{side}_size")[row].is_valid:  # null: failed to fetch
                    pictures[uri] = _pictures_at(batch, side, row, self.input_size)
        encoded = {uri: jpeg for uri, jpeg in pictures.items() if isinstance(jpeg, EncodedJpeg)}
        if not encoded:
            return batch.drop_columns([f"_{side}_{name}" for side in SIDES for name in ("jpeg", "orientation")])
        decoded = decode_jpegs(list(encoded.values()), list(encoded), self.max_image_pixels, self.input_size,
                               DISPLAY_SIDE, self.device)
        failures = {uri: str(result) for uri, result in zip(encoded, decoded) if isinstance(result, ImageDecodeError)}
        pictures.update({uri: result for uri, result in zip(encoded, decoded) if isinstance(result, Pictures)})
        for uri in failures:
            del pictures[uri]
        return with_pictures(batch, pictures, failures, encoded=False)


def _pictures_at(batch: pa.Table, side: str, row: int, input_size: int | tuple[int, int]) -> Pictures | EncodedJpeg:
    """The pictures (or the encoded JPEG) of one side of one row, as FetchImages left them."""
    size = tuple(batch.column(f"_{side}_size")[row].as_py())
    jpeg = batch.column(f"_{side}_jpeg")[row]
    if jpeg.is_valid:
        return EncodedJpeg(jpeg.as_py(), batch.column(f"_{side}_orientation")[row].as_py(), size)
    return Pictures(model_input=picture_at(batch, f"_{side}_pixels", row, model_hw(input_size)),
                    display=display_at(batch, side, row),
                    size=size)


def _has_boxes(batch: pa.Table) -> bool:
    return all(name in batch.column_names for name in BBOX_COLUMNS)


def _with_nulls(values: list, ok_rows: np.ndarray, num_rows: int) -> list:
    """A full column: values at the ok rows, None elsewhere."""
    column: list = [None] * num_rows
    for row, value in zip(ok_rows.tolist(), values):
        column[row] = value
    return column


class ExplainPairs:
    """One model replica: decodes the JPEGs FetchImages left encoded on its device, forwards each
    distinct image of a batch once and explains its pairs."""

    def __init__(self, model: ModelSpec, storage_options: StorageOptions, attempt: str, max_image_pixels: int) -> None:
        self.explainer = build_explainer(model, storage_options)
        self.explainer.trial()  # resolves a default target layer before any batch, even one with no ok row
        self.max_image_pixels = max_image_pixels
        self.attempt = attempt
        self.device_label = device_label(self.explainer.device)
        self.max_pairs = sys.maxsize  # pairs explained at once: lowered where the device runs out of memory
        self.largest_batch = 0  # the most pairs a batch has asked to explain
        self.fitted_batches = 0  # batches that filled the lowered max_pairs without running out since it changed
        self.regrow_after = REGROW_AFTER  # fitted batches before the next regrow: doubled where a regrow ran out
        self.regrown_from: int | None = None  # max_pairs before a regrow, until a larger piece fits or runs out

    @cached_property
    def decoder(self) -> DecodeJpegs:
        """Made at the first batch with encoded JPEGs: with the Pillow decoder, none arrive."""
        return DecodeJpegs(self.explainer.spec.input_size, self.max_image_pixels, self.explainer.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if "_query_jpeg" in batch.column_names:
            batch = self.decoder(batch)
        ok_rows = np.flatnonzero(pc.equal(batch.column("status"), "ok").to_numpy(zero_copy_only=False))
        columns = self._explain_in_pieces(batch, ok_rows)
        names = [*EXPLAINED_COLUMNS, *(LOCALISATION_COLUMNS.names if _has_boxes(batch) else ())]
        for name in names:
            values = _with_nulls(columns.get(name, []), ok_rows, batch.num_rows)
            batch = batch.append_column(name, pa.array(values, result_type(name)))
        spec = self.explainer.spec
        constants = {"attempt": self.attempt, "model_id": spec.model_id, "metric": spec.metric,
                     "weighting": spec.weighting, "target_layer": self.explainer.target_layer,
                     "device": self.device_label}
        for name, value in constants.items():
            batch = batch.append_column(name, pa.array([value] * batch.num_rows, result_type(name)))
        return batch.drop_columns([f"_{side}_pixels" for side in SIDES])

    def _explain_in_pieces(self, batch: pa.Table, ok_rows: np.ndarray) -> dict[str, list]:
        """The result columns of the `ok_rows`, explained at most `max_pairs` rows at a time: where
        the device runs out of memory, the piece is halved, and so are the batches that follow (a
        batch_size too large for a GPU shared by several replicas costs speed, not the job). After
        REGROW_AFTER batches that filled the smaller pieces, the actor tries twice the size again: a
        replica beside it may have held the memory only for a while. A regrown size that runs out
        again doubles that wait (up to REGROW_AFTER_AT_MOST batches); one that fits resets it."""
        self.largest_batch = max(self.largest_batch, len(ok_rows))
        columns: dict[str, list] = {}
        start, lowered = 0, False
        while start < len(ok_rows):
            piece = ok_rows[start:start + self.max_pairs]
            explained = self._explain_unless_out_of_memory(batch, piece)
            if isinstance(explained, str):
                if self.regrown_from is not None:  # the regrown size runs out again: wait longer before the next
                    self.regrow_after, self.regrown_from = min(2 * self.regrow_after, REGROW_AFTER_AT_MOST), None
                self.max_pairs, self.fitted_batches, lowered = len(piece) // 2, 0, True
                torch.cuda.empty_cache()  # outside the handler: its traceback no longer holds the failed pass's tensors
                log.warning("%s ran out of memory explaining %d pairs at once (%s): now at most %d at a time (twice "
                            "that again after %d batches that fill them)", self.device_label, len(piece), explained,
                            self.max_pairs, self.regrow_after)
                continue
            if self.regrown_from is not None and len(piece) > self.regrown_from:  # the regrown size fits
                self.regrow_after, self.regrown_from = REGROW_AFTER, None
            for name, values in explained.items():
                columns.setdefault(name, []).extend(values)
            start += len(piece)
        if not lowered and len(ok_rows) >= self.max_pairs:  # a smaller batch says nothing of the limit
            self._fitted()
        return columns

    def _fitted(self) -> None:
        """Counts a batch that filled pieces of a lowered `max_pairs`; doubles it after `regrow_after` of
        them, and lifts it where twice is as large as the largest batch."""
        self.fitted_batches += 1
        if self.fitted_batches < self.regrow_after:
            return
        self.regrown_from = self.max_pairs
        self.max_pairs = sys.maxsize if 2 * self.max_pairs >= self.largest_batch else 2 * self.max_pairs
        self.fitted_batches = 0
        log.info("%s tries %s at once again", self.device_label,
                 "whole batches" if self.max_pairs == sys.maxsize else f"{self.max_pairs} pairs")

    def _explain_unless_out_of_memory(self, batch: pa.Table, ok_rows: np.ndarray) -> dict[str, list] | str:
        """The result columns of the `ok_rows`, or the first line of what the device said where it ran
        out of memory (never for one pair: that error is raised)."""
        try:
            return self._explain(batch, ok_rows)
        except RuntimeError as error:  # torch.cuda.OutOfMemoryError is one
            out_of_memory = isinstance(error, torch.cuda.OutOfMemoryError) or any(
                message in str(error) for message in _OUT_OF_MEMORY_MESSAGES)
            if not out_of_memory or len(ok_rows) == 1:
                raise
            return str(error).splitlines()[0]

    def _explain(self, batch: pa.Table, ok_rows: np.ndarray) -> dict[str, list]:
        slot_of_uri: dict[str, int] = {}
        sources: list[tuple[str, int]] = []  # (side, row) holding each distinct image's pixels
        slots: dict[str, list[int]] = {side: [] for side in SIDES}
        for side in SIDES:
            uris = batch.column(f"{side}_uri").to_pylist()
            for row in ok_rows.tolist():
                if uris[row] not in slot_of_uri:
                    slot_of_uri[uris[row]] = len(sources)
                    sources.append((side, row))
                slots[side].append(slot_of_uri[uris[row]])
        hw = self.explainer.spec.input_hw
        pixels = np.stack([picture_at(batch, f"_{side}_pixels", row, hw) for side, row in sources])  # (N, H, W, 3) distinct
        result = self.explainer.explain_pairs(pixels, slots["query"], slots["reference"])
        return self._rows(batch, ok_rows, result, forward_share=len(sources) / len(ok_rows))

    def _rows(self, batch: pa.Table, ok_rows: np.ndarray, result: SFAMResult, forward_share: float) -> dict[str, list]:
        cis = {"query": result.cis_query.cpu().numpy(), "reference": result.cis_reference.cpu().numpy()}
        maps = {"query": result.map_query.float().cpu().numpy(), "reference": result.map_reference.float().cpu().numpy()}
        columns: dict[str, list] = {
            "similarity": result.similarity.cpu().tolist(),
            "residual_query": result.residual_query.cpu().tolist(),
            "residual_reference": result.residual_reference.cpu().tolist(),
            "cis_top_channels": result.top_channels(TOP_CHANNELS).cpu().tolist(),
            "map_shape": [list(maps["query"].shape[1:])] * len(ok_rows),
            "forward_share": [forward_share] * len(ok_rows),
        }
        sizes = {side: [batch.column(f"_{side}_size")[int(r)].as_py() for r in ok_rows] for side in SIDES}
        if result.correspondences is not None:
            columns["correspondences"] = matches_in_pixels(result.correspondences.cpu().numpy(), maps["query"].shape[1:],
                                                          sizes["query"], sizes["reference"])
        has_boxes = _has_boxes(batch)
        for side in SIDES:
            columns[f"cis_{side}"] = list(cis[side])
            columns[f"map_{side}"] = list(maps[side].reshape(len(ok_rows), -1))
            boxes = batch.column(f"{side}_bbox").take(pa.array(ok_rows)).to_pylist() if has_boxes else [None] * len(ok_rows)
            # a box wholly outside its image locates nothing: null, as a missing box
            located = [localise(m, tuple(s), b if b and box_in_image(b, tuple(s)) else None)
                       for m, b, s in zip(maps[side], boxes, sizes[side])]
            columns[f"{side}_peak_xy"] = [None if found.peak_xy is None else list(found.peak_xy) for found in located]
            if has_boxes:
                columns[f"{side}_energy_in_box"] = [found.energy_in_box for found in located]
                columns[f"{side}_pointing_hit"] = [found.pointing_hit for found in located]
        return columns
