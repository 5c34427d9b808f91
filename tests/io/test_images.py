from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageDraw, ImageOps, JpegImagePlugin

from pipeline.io import images
from pipeline.io.images import (
    ImageDecodeError,
    decode_image,
    decode_jpegs,
    decode_pictures,
    display_image,
    resize_for_model,
    to_model_tensor,
    torchvision_jpeg,
)

MAX_PIXELS = 50_000_000
MODEL_SIZE, MAX_SIDE = 224, 256  # the job's defaults
Decode = Callable[[bytes, str, int], np.ndarray]


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def random_rgb(rng: np.random.Generator, height: int | None = None, width: int | None = None) -> np.ndarray:
    height = height or int(rng.integers(8, 80))
    width = width or int(rng.integers(8, 80))
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def smooth_rgb(rng: np.random.Generator) -> np.ndarray:
    """A random image without high frequencies, so that JPEG keeps it close."""
    coarse = Image.fromarray(random_rgb(rng, 4, 4))
    return np.asarray(coarse.resize((int(rng.integers(40, 90)), int(rng.integers(40, 90))), Image.BILINEAR))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_without_pixels(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height RGB, and an empty IDAT: no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"") + png_chunk(b"IEND", b"")


def display_of_pictures(data: bytes, uri: str, max_pixels: int) -> np.ndarray:
    """decode_pictures' display picture, which is the full decode when the image fits in it."""
    return decode_pictures(data, uri, max_pixels, 16, 100_000).display


@pytest.fixture(params=[decode_image, display_of_pictures], ids=["decode_image", "decode_pictures"])
def decode(request: pytest.FixtureRequest) -> Decode:
    """Both decoders keep the same guarantees."""
    return request.param


def photo_jpeg(rng: np.random.Generator, width: int, height: int, orientation: int = 1) -> bytes:
    """A photo-like JPEG: smooth colours, solid discs and sensor noise, with an EXIF orientation."""
    img = Image.fromarray(random_rgb(rng, 6, 8)).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x, y, r = rng.integers(0, width), rng.integers(0, height), rng.integers(8, max(9, min(width, height) // 4))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    noisy = np.asarray(img) + rng.normal(0, 6, (height, width, 3))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), "JPEG", quality=90, exif=exif)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(int) - b).mean())


@pytest.mark.parametrize(("fmt", "params"), [("PNG", {}), ("BMP", {}), ("WEBP", {"lossless": True})])
def test_lossless_formats_roundtrip(decode: Decode, fmt: str, params: dict, rng: np.random.Generator) -> None:
    rgb = random_rgb(rng)
    decoded = decode(encode(Image.fromarray(rgb), fmt, **params), f"mem://x.{fmt}", MAX_PIXELS)
    assert decoded.dtype == np.uint8 and decoded.shape == rgb.shape
    np.testing.assert_array_equal(decoded, rgb)


@pytest.mark.parametrize(("fmt", "params"), [("JPEG", {"quality": 95}), ("WEBP", {"quality": 95})])
def test_lossy_formats_decode_close(decode: Decode, fmt: str, params: dict, rng: np.random.Generator) -> None:
    rgb = smooth_rgb(rng)
    decoded = decode(encode(Image.fromarray(rgb), fmt, **params), "mem://x", MAX_PIXELS)
    assert decoded.dtype == np.uint8 and decoded.shape == rgb.shape
    assert np.abs(decoded.astype(int) - rgb).mean() < 4


def test_exif_orientation_6_rotates_clockwise(decode: Decode, rng: np.random.Generator) -> None:
    rgb = random_rgb(rng, 20, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = decode(encode(Image.fromarray(rgb), "PNG", exif=exif), "mem://rot.png", MAX_PIXELS)
    assert decoded.shape == (40, 20, 3)
    np.testing.assert_array_equal(decoded, np.rot90(rgb, k=-1))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_pixels_as_pillow_does(decode: Decode, orientation: int, rng: np.random.Generator) -> None:
    rgb = random_rgb(rng, 9, 14)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(rgb), "PNG", exif=exif)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))  # Pillow's own
    np.testing.assert_array_equal(decode(data, "mem://o.png", MAX_PIXELS), upright)


@pytest.mark.parametrize(("source", "size"), [((480, 640), (224, 224)), ((31, 57), (224, 224)), ((240, 320), (256, 192)),
                                              ((97, 13), (5, 40))])
def test_resize_computes_pillows_bilinear_resize(source: tuple[int, int], size: tuple[int, int],
                                                 rng: np.random.Generator) -> None:
    rgb = random_rgb(rng, *source)
    pillow = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR)).astype(int)
    ours = resize_for_model(rgb, size[0]) if size[0] == size[1] else display_image(rgb, max(size))
    assert ours.shape == pillow.shape and ours.flags.c_contiguous
    difference = np.abs(ours.astype(int) - pillow)
    # measured on noise: up to a fifth of the values 1 level apart (rounding between the two passes), none over 2
    assert difference.mean() < 0.3 and difference.max() <= 2


def test_grayscale_becomes_rgb(decode: Decode, rng: np.random.Generator) -> None:
    gray = random_rgb(rng)[..., 0]
    decoded = decode(encode(Image.fromarray(gray, "L"), "PNG"), "mem://g.png", MAX_PIXELS)
    np.testing.assert_array_equal(decoded, np.repeat(gray[..., None], 3, axis=2))


def test_sixteen_bit_grayscale_is_scaled(decode: Decode, rng: np.random.Generator) -> None:
    levels = rng.integers(0, 65536, (23, 31), dtype=np.uint16)
    decoded = decode(encode(Image.fromarray(levels), "PNG"), "mem://g16.png", MAX_PIXELS)
    expected = np.rint(levels / 257).astype(np.uint8)
    np.testing.assert_array_equal(decoded, np.repeat(expected[..., None], 3, axis=2))


def test_sixteen_bit_grayscale_transparency_is_kept(decode: Decode, rng: np.random.Generator) -> None:
    """A tRNS level of a 16-bit image names one of 65,536 levels: it is applied before the scaling to 8 bits."""
    levels = rng.integers(0, 65536, (23, 31), dtype=np.uint16)
    key = int(levels[5, 7])
    decoded = decode(encode(Image.fromarray(levels), "PNG", transparency=key), "mem://g16t.png", MAX_PIXELS)
    expected = np.where(levels == key, 255, np.rint(levels / 257)).astype(np.uint8)
    np.testing.assert_array_equal(decoded, np.repeat(expected[..., None], 3, axis=2))
    assert decoded[5, 7].tolist() == [255, 255, 255]


def test_rgba_is_composited_on_white(decode: Decode, rng: np.random.Generator) -> None:
    rgb = random_rgb(rng)
    alpha = np.where(rng.random(rgb.shape[:2]) < 0.5, 0, 255).astype(np.uint8)
    img = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    decoded = decode(encode(img, "PNG"), "mem://a.png", MAX_PIXELS)
    expected = np.where(alpha[..., None] == 255, rgb, 255)
    np.testing.assert_array_equal(decoded, expected)


def test_palette_with_transparency(decode: Decode, rng: np.random.Generator) -> None:
    rgb = random_rgb(rng)
    img = Image.fromarray(rgb).quantize(colors=16)
    img.info["transparency"] = 0
    decoded = decode(encode(img, "PNG", transparency=0), "mem://p.png", MAX_PIXELS)
    indices = np.asarray(img)
    assert decoded.shape == rgb.shape
    np.testing.assert_array_equal(decoded[indices == 0], 255)
    palette = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(decoded[indices != 0], palette[indices != 0])


def test_cmyk_jpeg_becomes_rgb(decode: Decode, rng: np.random.Generator) -> None:
    height, width = int(rng.integers(16, 64)), int(rng.integers(16, 64))
    cmyk = np.zeros((height, 2 * width, 4), dtype=np.uint8)
    cmyk[:, width:, 3] = 255  # left half paper white, right half full black ink
    decoded = decode(encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95), "mem://c.jpg", MAX_PIXELS)
    assert decoded.shape == (height, 2 * width, 3)
    assert decoded[:, : width - 8].min() > 245
    assert decoded[:, width + 8 :].max() < 10


@pytest.mark.parametrize(
    ("make_bytes", "reason"),
    [
        (lambda rng: b"", "empty file"),
        (lambda rng: rng.bytes(500), "unrecognised or corrupt image"),
        (lambda rng: encode(Image.fromarray(random_rgb(rng)), "GIF"), r"GIF images are not supported \(supported: JPEG"),
        (lambda rng: encode(Image.fromarray(random_rgb(rng)), "TIFF"), "TIFF images are not supported"),
        (lambda rng: b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG images are not supported"),
        (lambda rng: b"\x00\x00\x00\x18ftypheic" + rng.bytes(100), "HEIC images are not supported"),
        # a PNG signature over random bytes: Pillow may reject it at once or while reading its chunks
        (lambda rng: b"\x89PNG\r\n\x1a\n" + rng.bytes(200), "unrecognised or corrupt image|corrupt or truncated image"),
    ],
    ids=["empty", "random-bytes", "gif", "tiff", "svg", "heic", "png-garbage"],
)
def test_bad_bytes(decode: Decode, make_bytes, reason: str, rng: np.random.Generator) -> None:
    with pytest.raises(ImageDecodeError, match=reason) as info:
        decode(make_bytes(rng), "s3://bucket/bad.img", MAX_PIXELS)
    assert info.value.uri == "s3://bucket/bad.img"
    assert str(info.value).startswith("s3://bucket/bad.img: ")


def test_truncated_jpeg(decode: Decode, rng: np.random.Generator) -> None:
    data = encode(Image.fromarray(random_rgb(rng, 64, 64)), "JPEG", quality=95)
    with pytest.raises(ImageDecodeError, match="truncated") as info:
        decode(data[: len(data) // 2], "mem://cut.jpg", MAX_PIXELS)
    assert "mem://cut.jpg" in str(info.value)


@pytest.mark.parametrize(("side", "max_pixels"), [(30_000, MAX_PIXELS), (3_000, 1_000_000)])
def test_pixel_limit_is_checked_from_the_header(decode: Decode, side: int, max_pixels: int) -> None:
    data = png_without_pixels(side, side)
    assert len(data) < 100
    with pytest.raises(ImageDecodeError, match="too many pixels") as info:
        decode(data, "mem://bomb.png", max_pixels)
    assert f"{side}x{side}" in str(info.value) or str(side * side) in str(info.value)


@pytest.mark.parametrize(("width", "height", "max_pixels"), [(300, 200, MAX_PIXELS), (15_000, 12_000, 200_000_000)])
def test_header_only_png_is_truncated_within_the_limit(decode: Decode, width: int, height: int, max_pixels: int) -> None:
    # The same kind of file, allowed by the limit: decoding is tried and fails. So the
    # "too many pixels" errors above came before any pixel was decoded. max_image_pixels is the
    # only limit: Pillow's own guard (a warning above 89 M pixels, an error above 179 M) is off.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
            decode(png_without_pixels(width, height), "mem://empty.png", max_pixels)


def test_pixel_limit_is_inclusive(decode: Decode, rng: np.random.Generator) -> None:
    rgb = random_rgb(rng)
    data = encode(Image.fromarray(rgb), "PNG")
    pixels = rgb.shape[0] * rgb.shape[1]
    assert decode(data, "mem://ok.png", pixels).shape == rgb.shape
    with pytest.raises(ImageDecodeError, match=f"max_image_pixels={pixels - 1}"):
        decode(data, "mem://big.png", pixels - 1)


def test_resize_for_model_is_a_plain_square_resize(rng: np.random.Generator) -> None:
    size = int(rng.integers(16, 64))
    color = rng.integers(0, 256, 3, dtype=np.uint8)
    height, width = 3 * size, size  # tall image, squeezed, not cropped
    rgb = np.broadcast_to(color, (height, width, 3)).copy()
    rgb[: height // 3] = 255 - color  # top third marked
    resized = resize_for_model(rgb, size)
    assert resized.shape == (size, size, 3) and resized.dtype == np.uint8
    third = size // 3
    np.testing.assert_array_equal(resized[: third - 1], np.broadcast_to(255 - color, (third - 1, size, 3)))
    np.testing.assert_array_equal(resized[third + 2 :], np.broadcast_to(color, (size - third - 2, size, 3)))


def test_display_image_keeps_aspect_and_never_upscales(rng: np.random.Generator) -> None:
    rgb = random_rgb(rng, 60, 150)
    assert display_image(rgb, 50).shape == (20, 50, 3)
    assert display_image(rgb, 150) is rgb
    assert display_image(rgb, 1000) is rgb


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("as_torch", [False, True])
def test_to_model_tensor_matches_float64_reference(dtype, as_torch: bool, rng: np.random.Generator) -> None:
    batch = rng.integers(0, 256, (3, 11, 13, 3), dtype=np.uint8)
    mean = rng.uniform(0.3, 0.6, 3)
    std = rng.uniform(0.1, 0.4, 3)
    reference = (batch.transpose(0, 3, 1, 2) / 255.0 - mean[:, None, None]) / std[:, None, None]

    out = to_model_tensor(torch.from_numpy(batch) if as_torch else batch, tuple(mean), tuple(std), "cpu", dtype)

    assert out.shape == (3, 3, 11, 13) and out.dtype == dtype and out.is_contiguous()
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3}[dtype]
    np.testing.assert_allclose(out.double().numpy(), reference, rtol=tolerance, atol=tolerance)


def test_to_model_tensor_rejects_non_uint8(rng: np.random.Generator) -> None:
    with pytest.raises(ValueError, match="uint8"):
        to_model_tensor(rng.random((2, 8, 8, 3)), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        to_model_tensor(rng.integers(0, 256, (2, 3, 8, 8), dtype=np.uint8), (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize(("width", "height"), [(640, 480), (641, 479), (480, 640), (1600, 1200)])
def test_decode_pictures_is_close_to_the_full_decode(width: int, height: int, rng: np.random.Generator) -> None:
    data = photo_jpeg(rng, width, height)
    full = decode_image(data, "mem://p.jpg", MAX_PIXELS)
    pictures = decode_pictures(data, "mem://p.jpg", MAX_PIXELS, MODEL_SIZE, MAX_SIDE)
    assert pictures.size == (width, height)
    # measured: 0.4 to 1.1 uint8 levels on average (DCT-domain scaling, then a smaller bilinear step)
    assert mean_abs_diff(pictures.model_input, resize_for_model(full, MODEL_SIZE)) < 2.0
    assert mean_abs_diff(pictures.display, display_image(full, MAX_SIDE)) < 2.0


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_a_non_square_model_input_is_the_upright_picture_at_height_by_width(orientation: int,
                                                                            rng: np.random.Generator) -> None:
    """Re-ID models see 256 x 128 (height x width): the model's picture is the upright image
    squeezed to that size, whichever way its EXIF orientation turns it."""
    data = photo_jpeg(rng, 640, 360, orientation)
    full = decode_image(data, "mem://p.jpg", MAX_PIXELS)
    pictures = decode_pictures(data, "mem://p.jpg", MAX_PIXELS, (256, 128), MAX_SIDE)
    expected = resize_for_model(full, (256, 128))
    assert pictures.model_input.shape == expected.shape == (256, 128, 3)
    assert mean_abs_diff(pictures.model_input, expected) < 2.0
    assert pictures.size == (full.shape[1], full.shape[0])


@pytest.mark.parametrize(
    ("width", "height", "model_size", "max_side", "drafted"),
    [(640, 480, 224, 256, (320, 240)), (1600, 1200, 112, 128, (200, 150)), (1203, 2701, 224, 256, (300.75, 675.25))],
)
def test_decode_pictures_decodes_jpeg_near_the_size_needed(
    width: int, height: int, model_size: int, max_side: int, drafted: tuple[float, float],
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch,
) -> None:
    boxes = []
    draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda img, *a: boxes.append(draft(img, *a)) or boxes[-1])
    decode_pictures(photo_jpeg(rng, width, height), "mem://p.jpg", MAX_PIXELS, model_size, max_side)
    assert [box for _, box in boxes] == [(0, 0, *drafted)]


def test_decode_pictures_of_a_small_image_equals_the_full_path(rng: np.random.Generator) -> None:
    data = photo_jpeg(rng, 64, 48)
    full = decode_image(data, "mem://s.jpg", MAX_PIXELS)
    pictures = decode_pictures(data, "mem://s.jpg", MAX_PIXELS, MODEL_SIZE, MAX_SIDE)
    np.testing.assert_array_equal(pictures.model_input, resize_for_model(full, MODEL_SIZE))
    np.testing.assert_array_equal(pictures.display, full)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_pictures_applies_exif_orientation(orientation: int, rng: np.random.Generator) -> None:
    data = photo_jpeg(rng, 640, 320, orientation)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))  # Pillow's own
    pictures = decode_pictures(data, "mem://o.jpg", MAX_PIXELS, MODEL_SIZE, MAX_SIDE)
    assert pictures.size == (upright.shape[1], upright.shape[0])
    assert mean_abs_diff(pictures.model_input, resize_for_model(upright, MODEL_SIZE)) < 2.0
    assert mean_abs_diff(pictures.display, display_image(upright, MAX_SIDE)) < 2.0


def bright_span(rgb: np.ndarray, axis: int) -> tuple[int, int]:
    """First and one-past-last index along `axis` (0 rows, 1 columns) of pixels brighter than mid-grey."""
    bright = np.flatnonzero((rgb.mean(axis=2) > 128).any(axis=1 - axis))
    return int(bright[0]), int(bright[-1]) + 1


def test_decode_pictures_keeps_boxes_linear(rng: np.random.Generator) -> None:
    width, height = 1203, 2701  # odd sizes: the drafted picture's last row and column are partial
    box = (301, 1000, 902, 1700)
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[box[1]:box[3], box[0]:box[2]] = 255
    pictures = decode_pictures(encode(Image.fromarray(rgb), "JPEG", quality=95), "mem://b.jpg", MAX_PIXELS, MODEL_SIZE, MAX_SIDE)
    display_scale = MAX_SIDE / height
    assert pictures.display.shape == (MAX_SIDE, round(width * display_scale), 3)
    for picture, (sx, sy) in [(pictures.model_input, (MODEL_SIZE / width, MODEL_SIZE / height)),
                              (pictures.display, (display_scale, display_scale))]:
        for axis, scale, (lo, hi) in [(1, sx, (box[0], box[2])), (0, sy, (box[1], box[3]))]:
            first, end = bright_span(picture, axis)
            assert abs(first - lo * scale) <= 1 and abs(end - hi * scale) <= 1, (axis, first, end, lo * scale, hi * scale)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
# mean grey levels from decode_pictures' pictures, which draft large JPEGs: libjpeg-turbo decodes as Pillow does
# (0.1 to 0.8 measured here); nvJPEG upsamples colour differently (H200: 0.3 to 0.4 on 640 x 320 photos, 2.9
# and 4.6 on a 90 x 70 one)
DECODER_TOLERANCE = {"cpu": 1.5, "cuda": 8.0}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("model_size", [MODEL_SIZE, (256, 128)])
def test_decode_jpegs_makes_decode_pictures_pictures(orientation: int, model_size: int | tuple[int, int], device: str,
                                                    rng: np.random.Generator) -> None:
    """torchvision's decoder (nvJPEG on a GPU) gives the pictures of decode_pictures: the same shapes
    and sizes, the same pixels within the decoders' difference (an EXIF turn gone wrong is tens of levels)."""
    datas = [photo_jpeg(rng, 640, 320, orientation), photo_jpeg(rng, 640, 320, orientation), photo_jpeg(rng, 90, 70)]
    jpegs = [torchvision_jpeg(data, "mem://t.jpg", MAX_PIXELS) for data in datas]
    assert [jpeg.orientation for jpeg in jpegs] == [orientation, orientation, 1]
    decoded = decode_jpegs(jpegs, ["mem://a.jpg", "mem://b.jpg", "mem://c.jpg"], MAX_PIXELS, model_size, MAX_SIDE,
                           torch.device(device))
    for data, jpeg, pictures in zip(datas, jpegs, decoded):
        expected = decode_pictures(data, "mem://t.jpg", MAX_PIXELS, model_size, MAX_SIDE)
        assert pictures.size == jpeg.size == expected.size
        assert mean_abs_diff(pictures.model_input, expected.model_input) < DECODER_TOLERANCE[device]
        assert mean_abs_diff(pictures.display, expected.display) < DECODER_TOLERANCE[device]


def exif_orientation(kind: int, count: int, value: bytes) -> bytes:
    """An EXIF block (for Pillow's `exif=`) of one Orientation entry of TIFF type `kind` (2 ASCII,
    3 SHORT, 4 LONG, 12 DOUBLE), `count` values whose little-endian bytes are `value`."""
    in_place = value.ljust(4, b"\0") if len(value) <= 4 else struct.pack("<I", 26)  # else after the IFD
    entry = struct.pack("<HHI", 0x0112, kind, count) + in_place
    return b"Exif\0\0" + b"II*\0" + struct.pack("<IH", 8, 1) + entry + struct.pack("<I", 0) + value * (len(value) > 4)


@pytest.mark.parametrize(("exif", "expected"), [
    (exif_orientation(3, 1, struct.pack("<H", 6)), 6),
    (exif_orientation(3, 1, struct.pack("<H", 200)), 1),
    (exif_orientation(4, 1, struct.pack("<I", 70000)), 1),
    (exif_orientation(2, 2, b"6\0"), 1),
    (exif_orientation(12, 1, struct.pack("<d", float("inf"))), 1),
    (exif_orientation(12, 1, struct.pack("<d", 6.0)), 6),
], ids=["short-6", "short-200", "long-70000", "ascii-6", "double-inf", "double-6"])
def test_an_exif_orientation_out_of_its_range_is_upright_in_both_decoders(exif: bytes, expected: int,
                                                                        rng: np.random.Generator) -> None:
    """EXIF orientations are 1 to 8 in a SHORT; a file may hold anything there. Both decoders read
    what is not one of them as upright (1), and never fail on it (in a batch, nor in its column)."""
    data = encode(Image.fromarray(random_rgb(rng, 48, 64)), "JPEG", quality=95, exif=exif)
    jpeg = torchvision_jpeg(data, "mem://o.jpg", MAX_PIXELS)
    assert jpeg.orientation == expected and jpeg.size == decode_pictures(data, "mem://o.jpg", MAX_PIXELS, 16, 64).size
    assert jpeg.size == ((48, 64) if expected == 6 else (64, 48))


def test_decode_jpegs_decodes_a_bounded_number_of_pixels_at_once(rng: np.random.Generator,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Large photos are decoded whole: DECODE_PIXELS bounds what one call holds, the pictures are the same."""
    datas = [photo_jpeg(rng, 80, 60), photo_jpeg(rng, 80, 60), photo_jpeg(rng, 160, 120), photo_jpeg(rng, 40, 30)]
    jpegs = [torchvision_jpeg(data, "mem://p.jpg", MAX_PIXELS) for data in datas]
    uris = ["mem://p.jpg"] * len(jpegs)
    whole = decode_jpegs(jpegs, uris, MAX_PIXELS, MODEL_SIZE, MAX_SIDE, torch.device("cpu"))
    calls: list[int] = []
    decode = torchvision.io.decode_jpeg
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda data, **kw: calls.append(len(data)) or decode(data, **kw))
    monkeypatch.setattr(images, "DECODE_PIXELS", 2 * 80 * 60)
    chunked = decode_jpegs(jpegs, uris, MAX_PIXELS, MODEL_SIZE, MAX_SIDE, torch.device("cpu"))
    assert calls == [2, 1, 1]  # two small photos, the large one alone, then the last
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a.model_input, b.model_input)
        np.testing.assert_array_equal(a.display, b.display)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("width", "height"), [(1, 300), (300, 1), (3, 2000)])
def test_decode_jpegs_of_thin_pictures(width: int, height: int, device: str, rng: np.random.Generator) -> None:
    """Pictures a few pixels wide: displays one pixel wide (torch's float kernel on the CPU gave all
    their rows one value) and, for a side of 2,000, one the device leaves to Pillow."""
    data = encode(Image.fromarray(random_rgb(rng, 4, 4)).resize((width, height), Image.Resampling.BICUBIC), "JPEG",
                  quality=95)
    [pictures] = decode_jpegs([torchvision_jpeg(data, "mem://t.jpg", MAX_PIXELS)], ["mem://t.jpg"], MAX_PIXELS, 24, 28,
                              torch.device(device))
    expected = decode_pictures(data, "mem://t.jpg", MAX_PIXELS, 24, 28)
    assert mean_abs_diff(pictures.model_input, expected.model_input) < DECODER_TOLERANCE[device]
    assert mean_abs_diff(pictures.display, expected.display) < DECODER_TOLERANCE[device]


def test_decode_jpegs_leaves_pictures_shrunk_too_far_to_pillow(rng: np.random.Generator,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    datas = [photo_jpeg(rng, 64 * 24 + 1, 40), photo_jpeg(rng, 64 * 24, 40)]  # one past MAX_DEVICE_SHRINK, one at it
    jpegs = [torchvision_jpeg(data, "mem://w.jpg", MAX_PIXELS) for data in datas]
    calls: list[int] = []
    decode = torchvision.io.decode_jpeg
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda data, **kw: calls.append(len(data)) or decode(data, **kw))
    wide, at_limit = decode_jpegs(jpegs, ["mem://a.jpg", "mem://b.jpg"], MAX_PIXELS, 24, 28, torch.device("cpu"))
    assert calls == [1]  # only the second
    expected = decode_pictures(datas[0], "mem://a.jpg", MAX_PIXELS, 24, 28)
    np.testing.assert_array_equal(wide.model_input, expected.model_input)
    np.testing.assert_array_equal(wide.display, expected.display)
    assert at_limit.display.shape == decode_pictures(datas[1], "mem://b.jpg", MAX_PIXELS, 24, 28).display.shape


def test_decode_jpegs_of_grey_jpegs_is_rgb(rng: np.random.Generator) -> None:
    data = encode(Image.fromarray(smooth_rgb(rng)).convert("L"), "JPEG", quality=95)
    [pictures] = decode_jpegs([torchvision_jpeg(data, "mem://g.jpg", MAX_PIXELS)], ["mem://g.jpg"], MAX_PIXELS,
                              MODEL_SIZE, MAX_SIDE, torch.device("cpu"))
    expected = decode_pictures(data, "mem://g.jpg", MAX_PIXELS, MODEL_SIZE, MAX_SIDE)
    assert mean_abs_diff(pictures.model_input, expected.model_input) < 1.5
    assert (pictures.display[..., 0] == pictures.display[..., 2]).all()


def test_what_torchvision_does_not_decode_is_left_to_decode_pictures(rng: np.random.Generator) -> None:
    jpeg = photo_jpeg(rng, 64, 48)
    assert torchvision_jpeg(encode(Image.fromarray(smooth_rgb(rng)), "PNG"), "mem://p.png", MAX_PIXELS) is None
    assert torchvision_jpeg(encode(Image.fromarray(smooth_rgb(rng)).convert("CMYK"), "JPEG"), "mem://c.jpg",
                            MAX_PIXELS) is None
    assert torchvision_jpeg(jpeg[:-100], "mem://t.jpg", MAX_PIXELS) is None  # truncated: Pillow names it
    no_picture = jpeg[:jpeg.rindex(b"\xff\xda")] + b"\xff\xd9"  # nvJPEG decodes it to noise
    assert torchvision_jpeg(no_picture, "mem://h.jpg", MAX_PIXELS) is None
    exif = Image.Exif()
    exif[0x9286] = b"\xff\xda\x00\x0c"  # a user comment that holds a start-of-scan marker (as thumbnails do)
    commented = encode(Image.fromarray(smooth_rgb(rng)), "JPEG", exif=exif)
    assert commented.index(b"\xff\xda") < commented.rindex(b"\xff\xda")
    assert torchvision_jpeg(commented, "mem://c.jpg", MAX_PIXELS) is not None
    no_picture = commented[:commented.rindex(b"\xff\xda")] + b"\xff\xd9"
    assert torchvision_jpeg(no_picture, "mem://h.jpg", MAX_PIXELS) is None
    with pytest.raises(ImageDecodeError, match="too many pixels"):
        torchvision_jpeg(jpeg, "mem://t.jpg", 64 * 48 - 1)
    with pytest.raises(ImageDecodeError, match="mem://x.jpg: unrecognised"):
        torchvision_jpeg(b"\xff\xd8 not a jpeg \xff\xd9", "mem://x.jpg", MAX_PIXELS)


def test_a_jpeg_torchvision_refuses_fails_alone(rng: np.random.Generator) -> None:
    """One bad file among good ones: the good ones are decoded, the bad one is named by decode_pictures
    (a Huffman table that counts more codes than it holds: its header reads well, libjpeg refuses it)."""
    good = photo_jpeg(rng, 80, 60)
    table = good.index(b"\xff\xc4") + 5  # the marker, its length and the table's class and id
    bad = good[:table] + b"\xff" * 16 + good[table + 16:]
    jpegs = [torchvision_jpeg(data, "mem://j.jpg", MAX_PIXELS) for data in (good, bad)]
    decoded = decode_jpegs(jpegs, ["mem://g.jpg", "mem://b.jpg"], MAX_PIXELS, MODEL_SIZE, MAX_SIDE, torch.device("cpu"))
    assert mean_abs_diff(decoded[0].model_input,
                         decode_pictures(good, "mem://g.jpg", MAX_PIXELS, MODEL_SIZE, MAX_SIDE).model_input) < 1.5
    assert isinstance(decoded[1], ImageDecodeError) and str(decoded[1]).startswith("mem://b.jpg: ")
