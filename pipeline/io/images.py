"""Image decoding and resizing: bytes in, RGB uint8 arrays out (no file access here)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import numbers
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError
from torch.nn import functional as F

from pipeline.errors import UserError
from pipeline.io.storage import redact_uri
from pipeline.models.spec import model_hw

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
_OTHER_FORMATS = {b"GIF87a": "GIF", b"GIF89a": "GIF", b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"%PDF": "PDF"}  # first bytes
_ISO_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"avif": "AVIF"}  # bytes 8-12 after "ftyp"
# _open, where every image here is opened, refuses more than max_image_pixels from the header;
# Pillow's own guard would warn above 89 M pixels and refuse above 179 M whatever that limit says
Image.MAX_IMAGE_PIXELS = None
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_WHITE = (255, 255, 255, 255)
_EXIF_TRANSPOSE = {  # EXIF orientation -> the transposition that shows the picture upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_TRANSPOSE_VIEWS = {  # Pillow's transpositions as views of (h, w, 3) arrays
    Image.Transpose.FLIP_LEFT_RIGHT: lambda a: a[:, ::-1],
    Image.Transpose.ROTATE_180: lambda a: a[::-1, ::-1],
    Image.Transpose.FLIP_TOP_BOTTOM: lambda a: a[::-1],
    Image.Transpose.TRANSPOSE: lambda a: a.transpose(1, 0, 2),
    Image.Transpose.ROTATE_270: lambda a: a.transpose(1, 0, 2)[:, ::-1],  # 90 degrees clockwise
    Image.Transpose.TRANSVERSE: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    Image.Transpose.ROTATE_90: lambda a: a.transpose(1, 0, 2)[::-1],  # 90 degrees counter-clockwise
}
_SWAPS_AXES = (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90)
_JPEG_END = b"\xff\xd9"  # the EOI marker: a file without it at its end is truncated, or carries trailing data
DECODE_PIXELS = 1 << 25  # JPEG pixels decode_jpegs decodes in one call: 96 MiB of pixels, 384 MiB as floats
MAX_DEVICE_SHRINK = 64  # decode_jpegs leaves to Pillow a picture whose longer side is more than this times its smallest target


class ImageDecodeError(UserError):
    """An image could not be decoded. The message names the URI (credentials redacted) and the reason."""

    def __init__(self, uri: str, reason: str) -> None:
        self.uri = uri
        self.reason = reason
        super().__init__(redact_uri(f"{uri}: {reason}"))


@dataclass(frozen=True)
class Pictures:
    """One image decoded once: what the model sees and what a person is shown."""

    model_input: np.ndarray  # (height, width, 3) uint8 of the model's input size: the whole image squeezed, not cropped
    display: np.ndarray  # (h, w, 3) uint8: aspect ratio kept, longest side <= max_side, never upscaled
    size: tuple[int, int]  # the original (width, height) after EXIF orientation: the frame boxes are given in


def decode_image(data: bytes, uri: str, max_pixels: int) -> np.ndarray:
    """Decode JPEG / PNG / WebP / BMP bytes to an (H, W, 3) uint8 RGB array at full resolution.

    The pixel count is checked from the header before any pixel is decoded;
    EXIF orientation is applied; alpha is composited on white; truncated or
    corrupt files raise :class:`ImageDecodeError` (`uri` only names the image in it).
    """
    with _decode_errors(uri):
        img = _open(data, uri, max_pixels)
        img.load()
        return _orient(np.array(_to_rgb(img)), _transpose_method(img))


def decode_pictures(data: bytes, uri: str, max_pixels: int, model_size: int | tuple[int, int],
                    max_side: int) -> Pictures:
    """Decode once into the model's input and the display picture, with :func:`decode_image`'s guarantees.

    The same pictures as `resize_for_model(rgb, model_size)` and `display_image(rgb, max_side)`
    of the full decode, but cheaper: a JPEG is decoded in draft mode, scaled by 1/2, 1/4 or 1/8
    inside the decoder (DCT domain) to the smallest size that still covers both pictures, so most
    of its pixels are never produced. Both pictures are resized before the EXIF rotation, which
    commutes with the resize, so the rotation moves few pixels. model_size: one side (square), or
    (height, width).
    """
    height, width = model_hw(model_size)
    with _decode_errors(uri):
        img = _open(data, uri, max_pixels)
        stored_size = img.size
        display_size = _display_size(stored_size, max_side)
        side = max(height, width)  # covers the model's picture whichever way the EXIF rotation turns it
        drafted = img.draft(None, (max(side, display_size[0]), max(side, display_size[1])))
        box = drafted[1] if drafted else None  # the whole picture in drafted pixels (whose count rounds up)
        img.load()
        method = _transpose_method(img)
        rgb = np.array(_to_rgb(img))  # (h, w, 3) drafted pixels
        display = rgb if display_size == stored_size else _resize(rgb, display_size, box)
        stored_model_size = (height, width) if method in _SWAPS_AXES else (width, height)  # (width, height) before turning
        return Pictures(
            model_input=_orient(_resize(rgb, stored_model_size, box), method),
            display=_orient(display, method),
            size=_oriented_size(stored_size, method),
        )


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG checked by :func:`torchvision_jpeg`, still to be decoded by :func:`decode_jpegs`."""

    data: bytes
    orientation: int  # EXIF orientation, 1 to 8
    size: tuple[int, int]  # the original (width, height) after EXIF orientation


def torchvision_jpeg(data: bytes, uri: str, max_pixels: int) -> EncodedJpeg | None:
    """The JPEG as :func:`decode_jpegs` takes it when torchvision can decode it: 8-bit colour or
    grey, with picture data (Pillow's header walk reached a scan) and its end-of-image marker at
    the end, within `max_pixels` (else ImageDecodeError, as decode_pictures). None for anything
    else, which decode_pictures decodes or names as broken (CMYK, truncated files, a header
    without a picture, which nvJPEG decodes to noise, other formats). Reads the header only."""
    with _decode_errors(uri):
        img = _open(data, uri, max_pixels)
        complete = bool(img.tile) and data.endswith(_JPEG_END)
        if img.format != "JPEG" or img.mode not in ("RGB", "L") or not complete:
            return None
        orientation = _orientation(img)
        return EncodedJpeg(data, orientation, _oriented_size(img.size, _EXIF_TRANSPOSE.get(orientation)))


def decode_jpegs(jpegs: Sequence[EncodedJpeg], uris: Sequence[str], max_pixels: int, model_size: int | tuple[int, int],
                 max_side: int, device: torch.device) -> list[Pictures | ImageDecodeError]:
    """decode_pictures' pictures of JPEGs that :func:`torchvision_jpeg` accepted, decoded by
    torchvision on `device` (nvJPEG on a GPU, up to DECODE_PIXELS pixels in one call) and resized there.

    The whole picture is decoded, then resized as decode_pictures resizes (antialiased bilinear),
    where decode_pictures decodes a large JPEG in draft mode: on the CPU (libjpeg-turbo, as
    Pillow) the pictures differ from decode_pictures' by under a grey level on average, up to
    about 30 levels at sharp edges of drafted pictures; nvJPEG also upsamples colour differently
    (about a grey level more, a few on pictures of a hundred pixels). A JPEG that torchvision
    refuses, or that does not fit in the device's memory, is decoded by decode_pictures, which
    names what is wrong with it. So is a picture shrunk more than MAX_DEVICE_SHRINK times: draft
    mode is made for it, and CUDA's antialiased resize refuses factors near 100 (pytorch#103589).
    """
    pictures: list[Pictures | ImageDecodeError | None] = [None] * len(jpegs)
    smallest_side = min(max_side, *model_hw(model_size))
    on_device = []
    for index, jpeg in enumerate(jpegs):
        if max(jpeg.size) > MAX_DEVICE_SHRINK * smallest_side:
            pictures[index] = _pillow_pictures(jpeg.data, uris[index], max_pixels, model_size, max_side)
        else:
            on_device.append(index)
    for start, stop in _pixel_chunks([jpegs[index].size for index in on_device], DECODE_PIXELS):
        chunk = on_device[start:stop]
        decoded = _decode_jpeg_chunk([jpegs[index] for index in chunk], [uris[index] for index in chunk], max_pixels,
                                     model_size, max_side, device)
        for index, picture in zip(chunk, decoded):
            pictures[index] = picture
    return pictures  # type: ignore[return-value]  # every index was filled


def resize_for_model(rgb: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize to the model's (height, width, 3) without cropping, so boxes map linearly
    (antialiased bilinear); size: one side (square), or (height, width)."""
    height, width = model_hw(size)
    return _resize(rgb, (width, height))


def display_image(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale so that the longer side is at most `max_side`, keeping the aspect ratio."""
    height, width = rgb.shape[:2]
    size = _display_size((width, height), max_side)
    if size == (width, height):
        return rgb
    return _resize(rgb, size)


def to_model_tensor(
    batch_uint8: np.ndarray | torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) `(x / 255 - mean) / std` on `device`.

    The uint8 batch is moved and made channels-first first (4x less traffic than float), then
    converted and normalised in place as `x * (1 / (255 std)) - mean / std`, in float64 for
    float64 output and float32 otherwise, and cast to `dtype`.
    """
    batch = torch.as_tensor(batch_uint8)
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected a (B, H, W, 3) uint8 batch, got {tuple(batch.shape)} {batch.dtype}")
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    x = batch.to(device).permute(0, 3, 1, 2).contiguous().to(compute)  # (B, 3, H, W)
    mean_t = torch.tensor(mean, dtype=compute, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=compute, device=x.device).view(1, 3, 1, 1)
    return x.mul_(1 / (255 * std_t)).sub_(mean_t / std_t).to(dtype)


@contextlib.contextmanager
def _decode_errors(uri: str) -> Iterator[None]:
    """Turns whatever Pillow raises on bad bytes into an :class:`ImageDecodeError` naming `uri`."""
    try:
        yield
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as e:
        formats = ", ".join(SUPPORTED_FORMATS)
        raise ImageDecodeError(uri, f"unrecognised or corrupt image (supported: {formats})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(uri, f"corrupt or truncated image: {e}") from e


def _open(data: bytes, uri: str, max_pixels: int) -> Image.Image:
    """The image with only its header read, refused when it has more than `max_pixels` pixels."""
    if not data:
        raise ImageDecodeError(uri, "empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        other = _other_format(data)
        if other:
            raise ImageDecodeError(uri, f"{other} images are not supported (supported: {', '.join(SUPPORTED_FORMATS)}); "
                                        "convert it, e.g. to PNG") from None
        raise
    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError(uri, f"too many pixels: {width}x{height} exceeds max_image_pixels={max_pixels} (a "
                                    "setting of the job's config; sfam explain takes it as --config CONFIG --set "
                                    "max_image_pixels=N)")
    return img


def image_sha256(data: bytes) -> str:
    """The hex SHA-256 of an image's bytes, as the result table records it (query_sha256, reference_sha256)."""
    return hashlib.sha256(data).hexdigest()


def _other_format(data: bytes) -> str | None:
    """The name of a common image format that is not supported, from its first bytes; None for others."""
    if data[4:8] == b"ftyp":
        return _ISO_BRANDS.get(data[8:12])
    head = data[:1024].lstrip()
    if head[:4].lower() == b"<svg" or (head[:5] == b"<?xml" and b"<svg" in head):
        return "SVG"
    return next((name for magic, name in _OTHER_FORMATS.items() if data.startswith(magic)), None)


def _display_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(width, height) with the longer side at most `max_side`, aspect ratio kept, never larger."""
    width, height = size
    scale = max_side / max(width, height)
    if scale >= 1:
        return size
    return max(1, round(width * scale)), max(1, round(height * scale))


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation, 1 to 8: 1 (upright) where it is missing or not one of them."""
    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)  # a number, but a file may hold any type
    return int(orientation) if isinstance(orientation, numbers.Real) and orientation in _EXIF_TRANSPOSE else 1


def _transpose_method(img: Image.Image) -> Image.Transpose | None:
    """How to turn the stored pixels upright, from the EXIF orientation (read after `load`)."""
    return _EXIF_TRANSPOSE.get(_orientation(img))


def _orient(rgb: np.ndarray, method: Image.Transpose | None) -> np.ndarray:
    """(h, w, 3) stored pixels -> upright pixels, as Pillow's `transpose(method)` moves them."""
    return rgb if method is None else np.ascontiguousarray(_TRANSPOSE_VIEWS[method](rgb))


def _oriented_size(size: tuple[int, int], method: Image.Transpose | None) -> tuple[int, int]:
    return (size[1], size[0]) if method in _SWAPS_AXES else size


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _SIXTEEN_BIT_MODES:  # 16-bit grayscale: scale, do not clip, to 8 bits
        values = np.asarray(img, dtype=np.uint16)  # 2 bytes a pixel: float64 took 8 (400 MB at 50 M pixels)
        grey = ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
        key = img.info.get("transparency")  # the 16-bit level a tRNS chunk makes transparent, lost in 8 bits
        if isinstance(key, int):
            grey[values == key] = 255  # on white, as the other modes' transparent pixels
        img = Image.fromarray(grey, "L")
    if img.has_transparency_data:
        img = Image.alpha_composite(Image.new("RGBA", img.size, _WHITE), img.convert("RGBA"))
    return img if img.mode == "RGB" else img.convert("RGB")


def _torchvision_io() -> types.ModuleType:
    """torchvision.io, imported where a JPEG is decoded by torchvision: importing torchvision takes
    seconds (torch._dynamo, through torchvision.ops), which every fetch task's process would pay."""
    import torchvision.io

    return torchvision.io


def torchvision_has_jpeg_decoder() -> bool:
    """Whether this torchvision still decodes JPEGs: deprecated since 0.29 for TorchCodec, to be removed."""
    return hasattr(_torchvision_io(), "decode_jpeg")


def torchvision_decodes_jpegs_on(device: torch.device) -> bool:
    """Whether this torchvision decodes JPEGs on `device` (a build without nvJPEG does not on CUDA)."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 90)).save(out, "JPEG")
    return _torchvision_decode(torch.frombuffer(bytearray(out.getvalue()), dtype=torch.uint8), device) is not None


def _torchvision_decode(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """(3, H, W) uint8 on `device`, or None where torchvision refuses the file."""
    tvio = _torchvision_io()
    try:
        return tvio.decode_jpeg(data, mode=tvio.ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def _pixel_chunks(sizes: Sequence[tuple[int, int]], limit: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive runs of pictures of `sizes` (width, height) of at most `limit`
    pixels together, or of one larger picture."""
    start, total = 0, 0
    for index, (width, height) in enumerate(sizes):
        if index > start and total + width * height > limit:
            yield start, index
            start, total = index, 0
        total += width * height
    if start < len(sizes):
        yield start, len(sizes)


def _decode_jpeg_chunk(jpegs: Sequence[EncodedJpeg], uris: Sequence[str], max_pixels: int,
                       model_size: int | tuple[int, int], max_side: int,
                       device: torch.device) -> list[Pictures | ImageDecodeError]:
    """decode_jpegs of JPEGs decoded in one call."""
    tensors = [torch.from_numpy(np.frombuffer(jpeg.data, np.uint8).copy()) for jpeg in jpegs]
    tvio = _torchvision_io()
    try:
        images = tvio.decode_jpeg(tensors, mode=tvio.ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad file (or too little memory) fails the whole call: each again on its own
        images = [_torchvision_decode(tensor, device) for tensor in tensors]
    height, width = model_hw(model_size)
    pictures: list[Pictures | ImageDecodeError | None] = [None] * len(jpegs)
    groups: dict[tuple[int, int, Image.Transpose | None], list[int]] = {}  # pictures resized together
    for index, image in enumerate(images):
        if image is None:
            pictures[index] = _pillow_pictures(jpegs[index].data, uris[index], max_pixels, model_size, max_side)
        else:
            groups.setdefault((*image.shape[1:], _EXIF_TRANSPOSE.get(jpegs[index].orientation)), []).append(index)
    for (stored_height, stored_width, method), members in groups.items():
        stored_model_size = (height, width) if method in _SWAPS_AXES else (width, height)
        try:
            stack = torch.stack([images[index] for index in members])  # (n, 3, H, W) uint8 stored pixels
            model_inputs = _resize_on_device(stack, stored_model_size)
            displays = _resize_on_device(stack, _display_size((stored_width, stored_height), max_side))
        except RuntimeError:  # out of memory (the model's batch beside it took the device's), or a kernel's limit
            for index in members:
                pictures[index] = _pillow_pictures(jpegs[index].data, uris[index], max_pixels, model_size, max_side)
            continue
        for index, model_input, display in zip(members, model_inputs, displays):
            pictures[index] = Pictures(model_input=_orient(model_input, method), display=_orient(display, method),
                                       size=_oriented_size((stored_width, stored_height), method))
    return pictures  # type: ignore[return-value]  # every index was filled


def _pillow_pictures(data: bytes, uri: str, max_pixels: int, model_size: int | tuple[int, int],
                     max_side: int) -> Pictures | ImageDecodeError:
    try:
        return decode_pictures(data, uri, max_pixels, model_size, max_side)
    except ImageDecodeError as error:
        return error


def _resize_on_device(images: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(n, 3, H, W) uint8 pixels -> (n, height, width, 3) uint8 on the host, resized to `size`
    (width, height), antialiased bilinear: on the CPU with torch's uint8 kernel (Pillow's BILINEAR,
    see _resize; its float one gets pictures one pixel wide wrong), elsewhere in float (CUDA has
    no uint8 kernel). torch copies back to (h, w, 3) faster than numpy."""
    if images.shape[-2:] != (size[1], size[0]):
        hw = (size[1], size[0])
        if images.device.type == "cpu":
            images = F.interpolate(images.contiguous(memory_format=torch.channels_last), size=hw, mode="bilinear",
                                   antialias=True)
        else:
            images = F.interpolate(images.float(), size=hw, mode="bilinear", antialias=True).round_().clamp_(0, 255)
    return images.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _resize(rgb: np.ndarray, size: tuple[int, int], box: tuple[float, ...] | None = None) -> np.ndarray:
    """Antialiased bilinear resize of `box` (default: the whole picture) of (h, w, 3) uint8 pixels to
    `size` (width, height).

    torch's uint8 kernel computes Pillow's BILINEAR resize (measured: equal on pictures, 1 or 2
    levels apart where noise makes rounding differ) in about 0.55 of its time with the copy back
    to (h, w, 3); Pillow keeps the boxes that end inside a pixel, which a JPEG drafted from a
    size its scale does not divide has.
    """
    height, width = rgb.shape[:2]
    if box is not None and tuple(box) != (0, 0, width, height):
        return np.array(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR, box=box))
    pixels = torch.from_numpy(np.require(rgb, np.uint8, "CW")).permute(2, 0, 1)[None]  # (1, 3, h, w), channels last in memory
    return _resize_on_device(pixels, size)[0]
