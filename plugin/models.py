"""The model version in use: loaded once per process and reloaded when ``CURRENT`` changes.

ONNX Runtime sessions are kept between events. A version whose files do not
match their manifest checksums is rejected and logged once, and the previously
loaded version stays in use. The rejected version is tried again only when
``CURRENT`` or its manifest changes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .model_version import CURRENT, MANIFEST, ModelVersion, ModelVersionError, current_version_dir
from .runtime import AUTO

logger = logging.getLogger(__name__)


class ModelHolder:
    """Keeps the loaded ``ModelVersion`` of a models directory."""

    def __init__(self, models_dir: str | Path, *, providers: Sequence[str] = AUTO) -> None:
        self.models_dir = Path(models_dir)
        self.providers = tuple(providers)
        self.version: ModelVersion | None = None
        self.last_error: str | None = None
        self._loaded_key: tuple | None = None
        self._rejected_key: tuple | None = None
        self._lock = threading.Lock()

    def _pointer_key(self) -> tuple | None:
        """Identify what ``CURRENT`` points at, including the manifest's modification time."""
        pointer = self.models_dir / CURRENT
        try:
            name = pointer.read_text(encoding="utf-8").strip()
            manifest = self.models_dir / "versions" / name / MANIFEST
            return (name, manifest.stat().st_mtime_ns if manifest.exists() else None)
        except FileNotFoundError:
            return None

    def current(self) -> ModelVersion | None:
        """Return the version to score with, loading a new one when ``CURRENT`` changed; None if none exists."""
        with self._lock:
            key = self._pointer_key()
            if key is None or key == self._loaded_key or key == self._rejected_key:
                return self.version
            try:
                directory = current_version_dir(self.models_dir)
                loaded = ModelVersion.load(directory, providers=self.providers) if directory else None
            except ModelVersionError as error:
                self._rejected_key = key
                self.last_error = f"model version {key[0]} rejected: {error}"
                still_used = f"version {self.version.name} stays in use" if self.version else "no version is loaded"
                logger.error("Rejected model version %s in %s: %s; %s", key[0], self.models_dir, error, still_used)
                return self.version
            if loaded is None:
                return self.version
            # The first run of a session allocates its buffers; do it now rather than on the first event.
            size = loaded.preprocessing.input_size
            loaded.predict(np.zeros((1, size, size, 3), dtype=np.uint8), [None])
            previous = self.version.name if self.version else None
            self.version = loaded
            self._loaded_key = key
            self._rejected_key = None
            providers = ", ".join(loaded.folds[0].providers) if loaded.folds else "none"
            logger.info(
                "Loaded model version %s from %s (%d classes, %d folds, providers %s)%s",
                loaded.name, directory, len(loaded.classes), len(loaded.folds), providers,
                f"; replaces {previous}" if previous else "",
            )
            return loaded
