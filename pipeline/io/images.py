"""Image decoding and resizing: bytes in, RGB uint8 arrays out (no file access here)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import UserError

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_WHITE = (255, 255, 255, 255)


class ImageDecodeError(UserError):
    """An image could not be decoded. The message names the URI and the reason."""

    def __init__(self, uri: str, reason: str) -> None:
        self.uri = uri
        self.reason = reason
        super().__init__(f"{uri}: {reason}")


def decode_image(data: bytes, uri: str, max_pixels: int) -> np.ndarray:
    """Decode JPEG / PNG / WebP / BMP bytes to an (H, W, 3) uint8 RGB array.

    The pixel count is checked from the header before any pixel is decoded;
    EXIF orientation is applied; alpha is composited on white; truncated or
    corrupt files raise :class:`ImageDecodeError` (`uri` only names the image in it).
    """
    if not data:
        raise ImageDecodeError(uri, "empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
        width, height = img.size
        if width * height > max_pixels:
            raise ImageDecodeError(
                uri, f"too many pixels: {width}x{height} exceeds max_pixels={max_pixels}"
            )
        img.load()
        return _to_rgb(ImageOps.exif_transpose(img))
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(uri, f"too many pixels (decompression bomb guard): {e}") from e
    except UnidentifiedImageError as e:
        formats = ", ".join(SUPPORTED_FORMATS)
        raise ImageDecodeError(uri, f"unrecognised or corrupt image (supported: {formats})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(uri, f"corrupt or truncated image: {e}") from e


def resize_for_model(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize to (size, size, 3) without cropping, so boxes map linearly (antialiased bilinear)."""
    return _resize(rgb, size, size)


def display_image(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale so that the longer side is at most `max_side`, keeping the aspect ratio."""
    height, width = rgb.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return rgb
    return _resize(rgb, max(1, round(width * scale)), max(1, round(height * scale)))


def to_model_tensor(
    batch_uint8: np.ndarray | torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) `(x / 255 - mean) / std` on `device`.

    The uint8 batch is moved first (4x less traffic); the arithmetic runs in
    float64 for float64 output and float32 otherwise, then is cast to `dtype`.
    """
    batch = torch.as_tensor(batch_uint8)
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected a (B, H, W, 3) uint8 batch, got {tuple(batch.shape)} {batch.dtype}")
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    x = batch.to(device).permute(0, 3, 1, 2).to(compute) / 255
    mean_t = torch.tensor(mean, dtype=compute, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=compute, device=x.device).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).to(dtype).contiguous()


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in _SIXTEEN_BIT_MODES:  # 16-bit grayscale: scale, do not clip, to 8 bits
        levels = np.asarray(img, dtype=np.float64) / 257
        img = Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8), "L")
    if img.has_transparency_data:
        img = Image.alpha_composite(Image.new("RGBA", img.size, _WHITE), img.convert("RGBA"))
    return np.array(img.convert("RGB"), dtype=np.uint8)


def _resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    resized = Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR)
    return np.array(resized, dtype=np.uint8)
