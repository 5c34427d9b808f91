"""The audit job's stages, each a callable on a pyarrow Table of manifest rows.

Ray Data runs them (job.py), but none imports Ray, so each can be tested on its own:

    FetchImages   CPU task     URIs -> decoded, resized uint8 pixels (or JPEG bytes), or a per-row error
    ExplainPairs  actor        [JPEG bytes -> pixels,] pixels -> similarity, CIS, maps, localisation statistics
    RenderResults CPU task     maps -> PNG overlays; drops the transient pixel columns
    StageChain    actor        several of them one after another in one process

Pixels travel between stages as raw uint8 bytes in binary columns; columns whose names
start with "_" are transient and never reach the result table.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.explain import SFAMResult
from pipeline.io.images import (
    EncodedJpeg,
    ImageDecodeError,
    Pictures,
    decode_jpegs,
    decode_pictures,
    torchvision_decodes_jpegs_on,
    torchvision_jpeg,
)
from pipeline.io.storage import (
    StorageError,
    StorageOptions,
    StorageUnavailable,
    as_given,
    is_local,
    read_bytes,
    resolve_uri,
    write_bytes,
)
from pipeline.layout import RunLayout
from pipeline.localisation import box_in_image, localise
from pipeline.models.explainer import build_explainer, device_label
from pipeline.models.spec import ModelSpec, model_hw
from pipeline.render.result_row import DISPLAY_SIDE, OVERLAY_COLUMNS, matches_in_pixels, render_result_row
from pipeline.render.selection import FlagRules, RenderPolicy, select_for_render
from pipeline.schema import BOX_COLUMNS, EXPLAINED_COLUMNS, SIDES, TOP_CHANNELS, result_type

log = logging.getLogger("sfam.audit")
BYTES_PER_PIXEL_LIMIT = 8  # a compressed image is never much larger than its raw pixels: 8 bytes for 16-bit RGBA
READ_THREADS = 16  # objects a fetch task reads at once
PICTURE_COLUMNS = ("pixels", "display", "display_shape", "size", "jpeg", "orientation")  # each side's, "_{side}_{name}"


class FetchImages:
    """Reads and decodes each distinct image of a batch once; a failure marks its rows.

    The distinct images' pictures are built into Arrow columns once, with one copy of their
    pixels, and each side's columns are taken from them row by row in Arrow (no Python bytes
    per row). With `decode_jpegs=False` the JPEGs that torchvision can decode are only checked
    (header, pixel count) and passed on as bytes: the explain actors decode them on their device
    (DecodeJpegs), nvJPEG on a GPU. A JPEG file larger than the pictures it becomes is decoded
    here all the same: passing it on would move more bytes through the object store, once per
    row that holds the image.
    """

    def __init__(self, manifest_dir: str, input_size: int | tuple[int, int], max_image_pixels: int,
                 storage_options: StorageOptions, decode_jpegs: bool = True) -> None:
        self.manifest_dir = manifest_dir
        self.input_size = input_size
        self.max_image_pixels = max_image_pixels
        self.storage_options = storage_options
        self.decode_jpegs = decode_jpegs
        self.max_passed_jpeg_bytes = 3 * (math.prod(model_hw(input_size)) + DISPLAY_SIDE**2)  # the pictures' bytes

    def _read(self, uri: str, location: str) -> bytes | StorageError:
        """The bytes at `location`, where the manifest's `uri` led, or the error that names both;
        StorageUnavailable is raised (the job fails)."""
        try:
            return read_bytes(location, self.storage_options,
                              max_bytes=BYTES_PER_PIXEL_LIMIT * self.max_image_pixels + (1 << 20))
        except StorageUnavailable:
            raise
        except StorageError as error:
            return as_given(error, uri, location)

    def _decode(self, data: bytes, uri: str) -> Pictures | EncodedJpeg:
        passed = not self.decode_jpegs and len(data) <= self.max_passed_jpeg_bytes
        jpeg = torchvision_jpeg(data, uri, self.max_image_pixels) if passed else None
        return jpeg or decode_pictures(data, uri, self.max_image_pixels, self.input_size, DISPLAY_SIDE)

    def _decode_all(self, uris: list[str]) -> tuple[dict[str, Pictures | EncodedJpeg], dict[str, str]]:
        """The pictures of each distinct URI that decodes, and the error of each that does not.

        Objects in a store are read READ_THREADS at a time: one by one, the store's latency per
        request, not the CPU, set the pace (64 reads of 20 ms each are 1.3 s per batch). Local
        files are read one after another: threads would only add their own cost.
        """
        locations = {uri: resolve_uri(uri, self.manifest_dir) for uri in uris}
        remote = [uri for uri in uris if not is_local(locations[uri])]
        with ThreadPoolExecutor(max_workers=max(1, min(READ_THREADS, len(remote)))) as pool:
            # raises StorageUnavailable when the endpoint is down
            read = dict(zip(remote, pool.map(lambda uri: self._read(uri, locations[uri]), remote)))
        contents = {uri: read[uri] if uri in read else self._read(uri, locations[uri]) for uri in uris}
        pictures: dict[str, Pictures | EncodedJpeg] = {}
        errors: dict[str, str] = {}
        for uri, data in contents.items():
            try:
                if isinstance(data, StorageError):
                    raise data
                pictures[uri] = self._decode(data, uri)
            except (StorageError, ImageDecodeError) as error:
                errors[uri] = str(error)
        return pictures, errors

    def __call__(self, batch: pa.Table) -> pa.Table:
        uris = batch.column("query_uri").to_pylist() + batch.column("reference_uri").to_pylist()
        pictures, failures = self._decode_all(list(dict.fromkeys(uris)))
        return _with_pictures(batch, pictures, failures, encoded=not self.decode_jpegs)


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
        return _with_pictures(batch, pictures, failures, encoded=False)


def _array_at(batch: pa.Table, column: str, row: int, hw: Sequence[int]) -> np.ndarray:
    """The (h, w, 3) uint8 picture in a binary column at `row`, read in place from its Arrow buffer."""
    return np.frombuffer(batch.column(column)[row].as_buffer(), np.uint8).reshape(*hw, 3)


def _pictures_at(batch: pa.Table, side: str, row: int, input_size: int | tuple[int, int]) -> Pictures | EncodedJpeg:
    """The pictures (or the encoded JPEG) of one side of one row, as FetchImages left them."""
    size = tuple(batch.column(f"_{side}_size")[row].as_py())
    jpeg = batch.column(f"_{side}_jpeg")[row]
    if jpeg.is_valid:
        return EncodedJpeg(jpeg.as_py(), batch.column(f"_{side}_orientation")[row].as_py(), size)
    return Pictures(model_input=_array_at(batch, f"_{side}_pixels", row, model_hw(input_size)),
                    display=_array_at(batch, f"_{side}_display", row, batch.column(f"_{side}_display_shape")[row].as_py()),
                    size=size)


def _with_pictures(batch: pa.Table, pictures: dict[str, Pictures | EncodedJpeg], failures: dict[str, str],
                   encoded: bool) -> pa.Table:
    """The batch with each side's picture columns for the distinct images' `pictures` (with the
    columns of encoded JPEGs where `encoded`: every batch of a run has the same columns), and its
    status and error columns (their earlier errors kept) with the `failures` of images added."""
    uris = {side: batch.column(f"{side}_uri").to_pylist() for side in SIDES}
    earlier = batch.column("error").to_pylist() if "error" in batch.column_names else [None] * batch.num_rows
    errors = [
        "; ".join(sorted([*([before] if before else []),
                          *(f"{side}: {failures[uri]}" for side, uri in zip(SIDES, pair) if uri in failures)],
                         key=lambda message: message.startswith(f"{SIDES[1]}: "))) or None  # the query's first
        for before, pair in zip(earlier, zip(uris["query"], uris["reference"]))
    ]
    transient = [f"_{side}_{name}" for side in SIDES for name in PICTURE_COLUMNS]
    batch = batch.drop_columns([name for name in ("status", "error", *transient) if name in batch.column_names])
    batch = batch.append_column("status", pa.array(["error" if e else "ok" for e in errors]))
    batch = batch.append_column("error", pa.array(errors, pa.string()))
    slot = {uri: index for index, uri in enumerate(pictures)}
    distinct = _picture_columns(list(pictures.values()), encoded)
    for side in SIDES:
        rows = distinct.take(pa.array([slot.get(uri) for uri in uris[side]], pa.int32()))  # null: failed
        for name in rows.column_names:
            batch = batch.append_column(f"_{side}_{name}", rows.column(name))
    return batch


def _binary_column(arrays: list[np.ndarray | bytes | None]) -> pa.Array:
    """Each array's raw bytes (or the bytes) as one binary value, copied once into one buffer
    (64-bit offsets: a batch of large pictures may pass 2 GiB); None is null."""
    views = [np.frombuffer(a, np.uint8) if isinstance(a, bytes) else a for a in arrays]
    offsets = np.cumsum([0, *(0 if a is None else a.nbytes for a in views)], dtype=np.int64)
    present = [a.ravel() for a in views if a is not None]
    data = np.concatenate(present) if present else np.empty(0, np.uint8)
    valid = np.array([a is not None for a in views])
    validity = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(pa.large_binary(), len(views), [validity, pa.py_buffer(offsets), pa.py_buffer(data)])


def _picture_columns(pictures: list[Pictures | EncodedJpeg], encoded: bool) -> pa.Table:
    """One row per distinct image: model input, display picture and its (h, w), original (w, h);
    for an encoded JPEG its bytes and EXIF orientation instead of the pictures."""
    shapes = pa.list_(pa.int32())
    decoded = [p if isinstance(p, Pictures) else None for p in pictures]
    columns = {
        "pixels": _binary_column([p and p.model_input for p in decoded]),  # (H, W, 3) uint8, the model input size
        "display": _binary_column([p and p.display for p in decoded]),  # (h, w, 3) uint8, longest side <= DISPLAY_SIDE
        "display_shape": pa.array([p and list(p.display.shape[:2]) for p in decoded], shapes),
        "size": pa.array([list(p.size) for p in pictures], shapes),
    }
    if encoded:
        jpegs = [p if isinstance(p, EncodedJpeg) else None for p in pictures]
        columns["jpeg"] = _binary_column([p and p.data for p in jpegs])
        columns["orientation"] = pa.array([p and p.orientation for p in jpegs], pa.int8())
    return pa.table(columns)


def _has_boxes(batch: pa.Table) -> bool:
    return all(f"{side}_bbox" in batch.column_names for side in SIDES)


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

    @cached_property
    def decoder(self) -> DecodeJpegs:
        """Made at the first batch with encoded JPEGs: with the Pillow decoder, none arrive."""
        return DecodeJpegs(self.explainer.spec.input_size, self.max_image_pixels, self.explainer.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if "_query_jpeg" in batch.column_names:
            batch = self.decoder(batch)
        ok_rows = np.flatnonzero(pc.equal(batch.column("status"), "ok").to_numpy(zero_copy_only=False))
        columns = self._explain_in_pieces(batch, ok_rows)
        names = [*EXPLAINED_COLUMNS, *(BOX_COLUMNS.names if _has_boxes(batch) else ())]
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
        the device runs out of memory, the piece is halved, and so are the batches that follow, for
        the rest of the actor's run (a batch_size too large for a GPU shared by several replicas
        costs speed, not the job)."""
        columns: dict[str, list] = {}
        start = 0
        while start < len(ok_rows):
            piece = ok_rows[start:start + self.max_pairs]
            explained = self._explain_unless_out_of_memory(batch, piece)
            if explained is None:
                self.max_pairs = len(piece) // 2
                torch.cuda.empty_cache()  # outside the handler: its traceback no longer holds the failed pass's tensors
                log.warning("%s ran out of memory explaining %d pairs at once: now at most %d at a time",
                            self.device_label, len(piece), self.max_pairs)
                continue
            for name, values in explained.items():
                columns.setdefault(name, []).extend(values)
            start += len(piece)
        return columns

    def _explain_unless_out_of_memory(self, batch: pa.Table, ok_rows: np.ndarray) -> dict[str, list] | None:
        """The result columns of the `ok_rows`, or None where the device ran out of memory (never for one pair)."""
        try:
            return self._explain(batch, ok_rows)
        except torch.cuda.OutOfMemoryError:
            if len(ok_rows) == 1:
                raise
            return None

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
        pixels = np.stack([_array_at(batch, f"_{side}_pixels", row, hw) for side, row in sources])  # (N, H, W, 3) distinct
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
            columns[f"map_{side}"] = list(maps[side].reshape(len(ok_rows), -1).astype(np.float16))
            boxes = batch.column(f"{side}_bbox").take(pa.array(ok_rows)).to_pylist() if has_boxes else [None] * len(ok_rows)
            # a box wholly outside its image locates nothing: null, as a missing box
            located = [localise(m, tuple(s), b if b and box_in_image(b, tuple(s)) else None)
                       for m, b, s in zip(maps[side], boxes, sizes[side])]
            columns[f"{side}_peak_xy"] = [None if found.peak_xy is None else list(found.peak_xy) for found in located]
            if has_boxes:
                columns[f"{side}_energy_in_box"] = [found.energy_in_box for found in located]
                columns[f"{side}_pointing_hit"] = [found.pointing_hit for found in located]
        return columns


class RenderResults:
    """Writes the overlays its policy selects to their deterministic paths; leaves only result columns."""

    def __init__(self, layout: RunLayout, policy: RenderPolicy, rules: FlagRules, storage_options: StorageOptions) -> None:
        self.layout = layout
        self.policy = policy
        self.rules = rules
        self.storage_options = storage_options

    def _render(self, batch: pa.Table, row: int) -> str:
        displays = {side: _array_at(batch, f"_{side}_display", row, batch.column(f"_{side}_display_shape")[row].as_py())
                    for side in SIDES}
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


class StageChain:
    """Stages built and run one after another in one process, e.g. in each actor of a CPU-only
    cluster: a batch's pixels then never leave the process that decoded them."""

    def __init__(self, stages: Sequence[tuple[type, dict[str, Any]]]) -> None:
        self.stages = [stage(**kwargs) for stage, kwargs in stages]

    def __call__(self, batch: pa.Table) -> pa.Table:
        for stage in self.stages:
            batch = stage(batch)
        return batch
