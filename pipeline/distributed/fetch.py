"""The fetch stage: the manifest's images read, decoded and resized, as picture columns (columns.py)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from pipeline.distributed.columns import PICTURE_COLUMNS, binary_column
from pipeline.io.images import EncodedJpeg, ImageDecodeError, Pictures, decode_pictures, image_sha256, torchvision_jpeg
from pipeline.io.storage import StorageError, StorageOptions, StorageUnavailable, as_given, is_local, read_bytes, resolve_uri
from pipeline.models.spec import model_hw
from pipeline.render.result_row import DISPLAY_SIDE
from pipeline.schema import SIDES

BYTES_PER_PIXEL_LIMIT = 8  # a compressed image is never much larger than its raw pixels: 8 bytes for 16-bit RGBA
READ_THREADS = 16  # objects a fetch task reads at once


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

    def _decode_all(self, uris: list[str]) -> tuple[dict[str, Pictures | EncodedJpeg], dict[str, str], dict[str, str]]:
        """The pictures of each distinct URI that decodes, the error of each that does not, and the
        SHA-256 of each that decodes (what `sfam render` and `sfam compare` check images against; none
        of a file that is no image, which a manifest could name to learn whether a guess of its content holds).

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
        return pictures, errors, {uri: image_sha256(contents[uri]) for uri in pictures}

    def __call__(self, batch: pa.Table) -> pa.Table:
        uris = {side: batch.column(f"{side}_uri").to_pylist() for side in SIDES}
        pictures, failures, digests = self._decode_all(list(dict.fromkeys(uris["query"] + uris["reference"])))
        for side in SIDES:
            batch = batch.append_column(f"{side}_sha256", pa.array([digests.get(uri) for uri in uris[side]], pa.string()))
        return with_pictures(batch, pictures, failures, encoded=not self.decode_jpegs)


def with_pictures(batch: pa.Table, pictures: dict[str, Pictures | EncodedJpeg], failures: dict[str, str],
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


def _picture_columns(pictures: list[Pictures | EncodedJpeg], encoded: bool) -> pa.Table:
    """One row per distinct image: model input, display picture and its (h, w), original (w, h);
    for an encoded JPEG its bytes and EXIF orientation instead of the pictures."""
    shapes = pa.list_(pa.int32())
    decoded = [p if isinstance(p, Pictures) else None for p in pictures]
    columns = {
        "pixels": binary_column([p and p.model_input for p in decoded]),  # (H, W, 3) uint8, the model input size
        "display": binary_column([p and p.display for p in decoded]),  # (h, w, 3) uint8, longest side <= DISPLAY_SIDE
        "display_shape": pa.array([p and list(p.display.shape[:2]) for p in decoded], shapes),
        "size": pa.array([list(p.size) for p in pictures], shapes),
    }
    if encoded:
        jpegs = [p if isinstance(p, EncodedJpeg) else None for p in pictures]
        columns["jpeg"] = binary_column([p and p.data for p in jpegs])
        columns["orientation"] = pa.array([p and p.orientation for p in jpegs], pa.int8())
    return pa.table(columns)
