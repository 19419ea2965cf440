"""Loading an exported model version and scoring labels with it.

A models directory contains one folder per version (``versions/v0001`` ...) and
a ``CURRENT`` file naming the version in use. A version folder contains the
ONNX files, ``manifest.json`` and the out-of-fold results. It is only used
when every file's SHA-256 matches the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .decision import DecisionTables, decide
from .metadata import Verdict
from .preprocess import Preprocessing, normalize
from .runtime import AUTO, OnnxModel

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
VERSIONS = "versions"
MANIFEST_FORMAT = 1


class ModelVersionError(RuntimeError):
    """A model version is missing, incomplete or does not match its checksums."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def current_version_dir(models_dir: str | Path) -> Path | None:
    """Return the folder of the current version, or None when there is none yet."""
    models_dir = Path(models_dir)
    pointer = models_dir / CURRENT
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    directory = models_dir / VERSIONS / name
    if not directory.is_dir():
        raise ModelVersionError(
            f"{pointer} names version {name!r}, but {directory} does not exist; "
            "run `kili-label-errors rollback VERSION` with an existing version"
        )
    return directory


def set_current_version(models_dir: str | Path, name: str) -> None:
    """Point ``CURRENT`` at a version with one atomic rename."""
    models_dir = Path(models_dir)
    temporary = models_dir / f".{CURRENT}.{os.getpid()}.tmp"
    temporary.write_text(name + "\n", encoding="utf-8")
    os.replace(temporary, models_dir / CURRENT)


def verify_version(directory: str | Path) -> dict:
    """Return a version's manifest after checking the SHA-256 of every file it lists.

    Raises ``ModelVersionError`` naming the version and the file when the
    manifest is missing, unreadable or of another format, or a file is missing
    or changed.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise ModelVersionError(f"no {MANIFEST} in {directory}: not a complete model version")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelVersionError(f"{manifest_path} is not valid JSON ({error})") from error
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ModelVersionError(
            f"{manifest_path} has format {manifest.get('format')!r}, this tool reads format "
            f"{MANIFEST_FORMAT}; retrain or upgrade kili-label-errors"
        )
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ModelVersionError(f"model version {manifest['version']}: file {name} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelVersionError(
                f"model version {manifest['version']}: checksum of {name} is {actual[:12]}..., "
                f"the manifest expects {expected[:12]}...; the file was changed or damaged, retrain"
            )
    return manifest


@dataclass(frozen=True)
class Prediction:
    """Probabilities of one image and how they were obtained."""

    probabilities: np.ndarray
    fold: int | None  # the held-out fold for a training asset, None for the fold mean


class ModelVersion:
    """An exported version: ONNX sessions, classes and decision tables."""

    def __init__(self, directory: Path, manifest: dict, providers: Sequence[str] = AUTO):
        self.directory = directory
        self.manifest = manifest
        self.name: str = manifest["version"]
        self.classes: list[str] = list(manifest["classes"])
        self.preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
        self.tables = DecisionTables.from_dict(manifest["decision"])
        self.score_method: str = manifest["decision"].get("score_method", "self_confidence")
        self.training_folds: dict[str, int] = {
            asset_id: int(entry["fold"]) for asset_id, entry in manifest["training_assets"].items()
        }
        graph = manifest["graph"]
        self.backbone = OnnxModel(directory / graph["backbone"], providers=providers) if graph.get("backbone") else None
        self.folds = [OnnxModel(directory / name, providers=providers) for name in graph["folds"]]

    @classmethod
    def load(cls, directory: str | Path, *, providers: Sequence[str] = AUTO) -> "ModelVersion":
        """Load a version after checking that every file matches its checksum."""
        directory = Path(directory)
        manifest = verify_version(directory)
        return cls(directory, manifest, providers)

    def class_index(self, category: str) -> int | None:
        try:
            return self.classes.index(category)
        except ValueError:
            return None

    def predict(self, pixels: np.ndarray, asset_ids: Sequence[str | None]) -> list[Prediction]:
        """Return probabilities for a batch of HWC uint8 images.

        A training asset is scored by the fold model that held it out, so its
        result equals its out-of-fold row; any other asset by the mean of the
        fold models.
        """
        batch = normalize(pixels, self.preprocessing)
        inputs = self.backbone.run(batch) if self.backbone is not None else batch
        per_fold = [fold.run(inputs).astype(np.float64) for fold in self.folds]
        predictions = []
        for row, asset_id in enumerate(asset_ids):
            fold = self.training_folds.get(asset_id) if asset_id is not None else None
            if fold is None:
                probabilities = np.mean([output[row] for output in per_fold], axis=0)
            else:
                probabilities = per_fold[fold][row]
            predictions.append(Prediction(probabilities=probabilities, fold=fold))
        return predictions

    def judge(self, probabilities: np.ndarray, label_indices: np.ndarray) -> list[Verdict]:
        """Decide each label with the stored tables, as cleanlab did offline."""
        verdicts = decide(label_indices, probabilities, self.tables, score_method=self.score_method)
        return [
            Verdict(
                score=float(verdicts.scores[row]),
                flagged=bool(verdicts.is_issue[row]),
                suggested_label=self.classes[int(verdicts.suggested_labels[row])],
                model_version=self.name,
            )
            for row in range(len(label_indices))
        ]
