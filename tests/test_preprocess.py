"""Image decoding: every common mode becomes RGB, bad files fail clearly."""

import io

import numpy as np
import pytest
from PIL import Image

from plugin.preprocess import ImageDecodeError, Preprocessing, decode_image, normalize, prepare_image

PREPROCESSING = Preprocessing(input_size=64, crop_pct=0.875)


def encode(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def gradient(mode: str, size=(40, 30)) -> Image.Image:
    array = np.linspace(0, 255, size[0] * size[1]).reshape(size[1], size[0]).astype(np.uint8)
    return Image.fromarray(array, mode="L").convert(mode)


@pytest.mark.parametrize(
    "mode,format",
    [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("RGB", "JPEG"), ("LA", "PNG")],
)
def test_modes_convert_to_rgb(mode, format):
    pixels = prepare_image(encode(gradient(mode), format), PREPROCESSING)

    assert pixels.shape == (64, 64, 3)
    assert pixels.dtype == np.uint8


def test_sixteen_bit_grayscale_keeps_its_range():
    array = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    data = encode(Image.fromarray(array), "PNG")  # uint16 arrays become mode I;16

    image = decode_image(data)

    values = np.asarray(image)
    assert image.mode == "RGB"
    assert values.max() >= 250
    assert values.min() <= 5


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))

    decoded = decode_image(encode(image, "PNG"))

    assert np.asarray(decoded).min() == 255


def test_truncated_image_is_rejected():
    data = encode(gradient("RGB", (200, 200)), "JPEG")

    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2])


def test_garbage_is_rejected():
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        decode_image(b"this is not an image")


def test_empty_file_is_rejected():
    with pytest.raises(ImageDecodeError, match="empty file"):
        decode_image(b"")


def test_pixel_limit_rejects_decompression_bomb():
    data = encode(Image.new("L", (3000, 3000)), "PNG")

    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(data, max_pixels=1_000_000)


def test_normalize_matches_mean_and_std():
    pixels = np.full((2, 8, 8, 3), 255, dtype=np.uint8)

    batch = normalize(pixels, Preprocessing(input_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))

    assert batch.shape == (2, 3, 8, 8)
    assert np.allclose(batch, 1.0)


def test_invalid_interpolation_names_choices():
    with pytest.raises(ValueError, match="invalid interpolation 'cubic'"):
        Preprocessing(interpolation="cubic")
