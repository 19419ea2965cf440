"""Fetching, hashing, decoding and caching the images of a project.

Decoded images are cached on disk by content hash and preprocessing, as the
HWC uint8 arrays that preprocessing produces before normalisation, so a rerun
neither downloads nor decodes an image it has seen.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plugin.preprocess import DEFAULT_MAX_PIXELS, ImageDecodeError, Preprocessing, prepare_image

from .sources.base import Asset, ProjectSource

logger = logging.getLogger(__name__)


@dataclass
class LoadedImage:
    """One asset's image: its content hash and, where it was needed, its pixels."""

    asset: Asset
    sha256: str = ""
    pixels: np.ndarray | None = None
    error: str = ""


class ImageCache:
    """Decoded images on disk, keyed by content hash and preprocessing."""

    def __init__(self, root: Path, preprocessing: Preprocessing, *, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.root = Path(root) / preprocessing.cache_key()
        self.preprocessing = preprocessing
        self.max_pixels = max_pixels

    def _path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.npy"

    def get(self, sha256: str) -> np.ndarray | None:
        path = self._path(sha256)
        if path.is_file():
            try:
                return np.load(path)
            except (OSError, ValueError):
                logger.warning("Ignoring a corrupt cached image at %s", path)
        return None

    def decode(self, sha256: str, data: bytes) -> np.ndarray:
        """Return the cached pixels for this content, decoding and storing them if missing."""
        cached = self.get(sha256)
        if cached is not None:
            return cached
        pixels = prepare_image(data, self.preprocessing, max_pixels=self.max_pixels)
        path = self._path(sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        with open(temporary, "wb") as handle:
            np.save(handle, pixels)
        os.replace(temporary, path)
        return pixels


def load_images(
    source: ProjectSource,
    assets: Sequence[Asset],
    cache: ImageCache,
    *,
    need_pixels,
    workers: int = 8,
) -> Iterator[LoadedImage]:
    """Fetch and hash each asset's image in a bounded thread pool, in order.

    ``need_pixels(sha256)`` returns whether the decoded pixels are needed (for
    example because the features of that content are not cached yet). A
    failed fetch or decode yields a ``LoadedImage`` with ``error`` set.
    """

    def load(asset: Asset) -> LoadedImage:
        try:
            data = source.read_image(asset)
        except OSError as error:
            return LoadedImage(asset, error=f"could not read the image ({error})")
        sha256 = hashlib.sha256(data).hexdigest()
        if not need_pixels(sha256):
            return LoadedImage(asset, sha256=sha256)
        try:
            return LoadedImage(asset, sha256=sha256, pixels=cache.decode(sha256, data))
        except ImageDecodeError as error:
            return LoadedImage(asset, sha256=sha256, error=str(error))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        yield from pool.map(load, assets)
