"""Backbone features extracted with ONNX Runtime and cached in SQLite.

A feature vector is keyed by the backbone name, its weights checksum, the
preprocessing and the image's content hash, so changing any of them
recomputes it and nothing else does.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from plugin.preprocess import Preprocessing, normalize
from plugin.runtime import OnnxModel

from .images import ImageCache, load_images
from .sources.base import Asset, ProjectSource

logger = logging.getLogger(__name__)

BATCH_SIZE = 32


class FeatureStore:
    """Feature vectors in one SQLite file, keyed by backbone and image content."""

    def __init__(self, path: Path, backbone_key: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.backbone_key = backbone_key
        with closing(sqlite3.connect(self.path)) as connection, connection:
            connection.execute(
                "CREATE TABLE IF NOT EXISTS features (key TEXT PRIMARY KEY, vector BLOB NOT NULL)"
            )

    def _key(self, sha256: str) -> str:
        return f"{self.backbone_key}|{sha256}"

    def get_many(self, sha256s: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with closing(sqlite3.connect(self.path)) as connection:
            for start in range(0, len(sha256s), 500):
                chunk = list(sha256s[start : start + 500])
                keys = [self._key(sha) for sha in chunk]
                marks = ",".join("?" * len(keys))
                rows = connection.execute(
                    f"SELECT key, vector FROM features WHERE key IN ({marks})", keys
                ).fetchall()
                for key, blob in rows:
                    found[key.rsplit("|", 1)[1]] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        with closing(sqlite3.connect(self.path)) as connection, connection:
            connection.executemany(
                "INSERT OR REPLACE INTO features (key, vector) VALUES (?, ?)",
                [(self._key(sha), np.asarray(v, dtype=np.float32).tobytes()) for sha, v in items.items()],
            )


@dataclass
class FeatureResult:
    """Features of the assets that loaded, in asset order, and what happened."""

    assets: list[Asset]
    sha256s: list[str]
    features: np.ndarray
    failed: list[tuple[Asset, str]] = field(default_factory=list)
    computed: int = 0
    reused: int = 0


def extract_features(
    source: ProjectSource,
    assets: Sequence[Asset],
    backbone: OnnxModel,
    store: FeatureStore,
    image_cache: ImageCache,
    preprocessing: Preprocessing,
    *,
    workers: int = 8,
    progress: bool = True,
) -> FeatureResult:
    """Return the backbone features of every asset, computing only the missing ones."""
    cached: dict[str, np.ndarray] = {}

    def need_pixels(sha256: str) -> bool:
        if sha256 not in cached:
            cached.update(store.get_many([sha256]))
        return sha256 not in cached

    result = FeatureResult(assets=[], sha256s=[], features=np.zeros((0, 0), dtype=np.float32))
    vectors: list[np.ndarray | None] = []
    pending: list[tuple[int, np.ndarray, str]] = []

    def flush() -> None:
        if not pending:
            return
        batch = normalize(np.stack([pixels for _, pixels, _ in pending]), preprocessing)
        output = backbone.run(batch)
        store.put_many({sha: output[row] for row, (_, _, sha) in enumerate(pending)})
        for row, (index, _, sha) in enumerate(pending):
            vectors[index] = output[row]
            cached[sha] = output[row]
        result.computed += len(pending)
        pending.clear()

    loaded = load_images(source, assets, image_cache, need_pixels=need_pixels, workers=workers)
    for item in tqdm(loaded, total=len(assets), desc="Features", unit="img", disable=not progress):
        if item.error:
            logger.warning("Skipping asset %s: %s", item.asset.asset_id, item.error)
            result.failed.append((item.asset, item.error))
            continue
        result.assets.append(item.asset)
        result.sha256s.append(item.sha256)
        if item.pixels is None:
            vectors.append(cached[item.sha256])
            result.reused += 1
        else:
            vectors.append(None)
            pending.append((len(vectors) - 1, item.pixels, item.sha256))
            if len(pending) >= BATCH_SIZE:
                flush()
    flush()

    if vectors:
        result.features = np.stack(vectors).astype(np.float32)
    logger.info(
        "Features: %d computed, %d reused from the cache, %d images failed",
        result.computed,
        result.reused,
        len(result.failed),
    )
    return result

