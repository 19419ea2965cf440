"""Image decoding and preprocessing shared by the trainer and the plugin.

Both halves call these functions, so an image is turned into model input the
same way when a fold model is trained and when a new label is scored. Only
numpy and Pillow are used, so the plugin needs no torch.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps

# Pillow's own warning limit is about 89 million pixels. Labeling projects
# rarely need more than this, so a larger image is treated as a decompression bomb.
DEFAULT_MAX_PIXELS = 64_000_000

_RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


class ImageDecodeError(ValueError):
    """An image could not be decoded or was rejected before decoding."""


@dataclass(frozen=True)
class Preprocessing:
    """Settings of timm's evaluation transform: resize, center crop and normalization."""

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLING:
            raise ValueError(
                f"invalid interpolation {self.interpolation!r}: "
                f"use one of {sorted(_RESAMPLING)}"
            )
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"invalid crop_pct {self.crop_pct}: use a value in (0, 1]")

    @property
    def resize_size(self) -> int:
        """Shorter side after resizing, before the center crop."""
        return int(round(self.input_size / self.crop_pct))

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        return cls(
            input_size=int(data["input_size"]),
            crop_pct=float(data["crop_pct"]),
            interpolation=str(data["interpolation"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
        )

    def cache_key(self) -> str:
        return (
            f"{self.input_size}-{self.crop_pct}-{self.interpolation}-"
            f"{','.join(map(str, self.mean))}-{','.join(map(str, self.std))}"
        )


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes into an 8-bit RGB image.

    Grayscale, RGBA, palette, 16-bit and CMYK images are converted to RGB, and
    EXIF orientation is applied. Raises ``ImageDecodeError`` for unreadable or
    truncated data and for images with more than ``max_pixels`` pixels.
    """
    if not data:
        raise ImageDecodeError("empty file: no image data")
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as error:  # Pillow raises many types for bad data
        raise ImageDecodeError(f"not a readable image ({error})") from error

    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image of {width}x{height} pixels is over the limit of {max_pixels} "
            "pixels (possible decompression bomb); resize it or raise max_pixels"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except Exception as error:
        raise ImageDecodeError(f"truncated or corrupt image ({error})") from error

    image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16- and 32-bit grayscale: scale the value range to 8 bits.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max(initial=0) > 255 else 255.0
        array = np.clip(array / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min(initial=0)), float(array.max(initial=1))
        array = (array - low) / max(high - low, 1e-12) * 255.0
        return Image.fromarray(array.astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparent pixels on white, as viewers show them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """Resize the shorter side and center-crop; return an HWC uint8 array."""
    width, height = image.size
    scale = preprocessing.resize_size / min(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = image.resize(new_size, _RESAMPLING[preprocessing.interpolation])

    size = preprocessing.input_size
    left = int(round((new_size[0] - size) / 2.0))
    top = int(round((new_size[1] - size) / 2.0))
    cropped = resized.crop((left, top, left + size, top + size))
    return np.asarray(cropped, dtype=np.uint8)


def normalize(pixels: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """Turn HWC uint8 arrays (one image or a batch) into NCHW float32 input."""
    batch = pixels[None] if pixels.ndim == 3 else pixels
    mean = np.asarray(preprocessing.mean, dtype=np.float32)
    std = np.asarray(preprocessing.std, dtype=np.float32)
    scaled = (batch.astype(np.float32) / 255.0 - mean) / std
    return np.ascontiguousarray(scaled.transpose(0, 3, 1, 2))


def prepare_image(
    data: bytes, preprocessing: Preprocessing, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode, resize and crop image bytes into the HWC uint8 model view."""
    return resize_and_crop(decode_image(data, max_pixels=max_pixels), preprocessing)
