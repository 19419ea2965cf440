"""Writing model versions so that a crash never leaves a half-written one visible.

A version is written into a hidden temporary folder, checksummed, then renamed
into ``versions/`` in one step, and only then made current.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from plugin.model_version import (
    CURRENT,
    MANIFEST,
    MANIFEST_FORMAT,
    VERSIONS,
    set_current_version,
    sha256_file,
    verify_version,
)

logger = logging.getLogger(__name__)

_VERSION_NAME = re.compile(r"^v(\d{4,})$")


def list_versions(models_dir: Path) -> list[str]:
    """Return the complete versions, oldest first."""
    root = Path(models_dir) / VERSIONS
    if not root.is_dir():
        return []
    names = [child.name for child in root.iterdir() if child.is_dir() and _VERSION_NAME.match(child.name)]
    return sorted(names, key=lambda name: int(_VERSION_NAME.match(name).group(1)))


def next_version_name(models_dir: Path) -> str:
    existing = list_versions(models_dir)
    number = int(_VERSION_NAME.match(existing[-1]).group(1)) + 1 if existing else 1
    return f"v{number:04d}"


class VersionWriter:
    """A version being written: files go to a temporary folder until ``commit``."""

    def __init__(self, models_dir: Path):
        self.models_dir = Path(models_dir)
        self.name = next_version_name(self.models_dir)
        self.temporary = self.models_dir / VERSIONS / f".tmp-{self.name}-{os.getpid()}"
        if self.temporary.exists():
            shutil.rmtree(self.temporary)
        self.temporary.mkdir(parents=True)

    def path(self, filename: str) -> Path:
        return self.temporary / filename

    def commit(self, manifest: dict, *, checksummed: list[str], make_current: bool = True) -> Path:
        """Write the manifest with file checksums, publish the folder and point CURRENT at it."""
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": self.name,
            **manifest,
            "files": {name: sha256_file(self.temporary / name) for name in checksummed},
        }
        manifest_path = self.temporary / MANIFEST
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=False), encoding="utf-8")
        final = self.models_dir / VERSIONS / self.name
        os.replace(self.temporary, final)
        if make_current:
            set_current_version(self.models_dir, self.name)
        logger.info("Model version %s written to %s", self.name, final)
        return final

    def abort(self) -> None:
        shutil.rmtree(self.temporary, ignore_errors=True)


def remove_stale_temporaries(models_dir: Path) -> int:
    """Delete temporary folders left by interrupted runs; return how many."""
    root = Path(models_dir) / VERSIONS
    if not root.is_dir():
        return 0
    stale = [child for child in root.iterdir() if child.is_dir() and child.name.startswith(".tmp-")]
    for child in stale:
        shutil.rmtree(child, ignore_errors=True)
    return len(stale)


@dataclass(frozen=True)
class VersionInfo:
    """One complete version with the figures users compare versions by."""

    name: str
    created_at: str
    assets: int
    flagged: int
    cv_accuracy: float
    mode: str
    current: bool


def describe_versions(models_dir: Path) -> list[VersionInfo]:
    """Return every complete version, oldest first, with its metrics."""
    models_dir = Path(models_dir)
    current = _current_name(models_dir)
    described = []
    for name in list_versions(models_dir):
        manifest_path = models_dir / VERSIONS / name / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            logger.warning("Skipping version %s: unreadable manifest (%s)", name, error)
            continue
        metrics = manifest.get("metrics", {})
        described.append(
            VersionInfo(
                name=name,
                created_at=manifest.get("created_at", ""),
                assets=int(metrics.get("assets", 0)),
                flagged=int(metrics.get("flagged", 0)),
                cv_accuracy=float(metrics.get("cv_accuracy", 0.0)),
                mode=manifest.get("mode", ""),
                current=name == current,
            )
        )
    return described


def _current_name(models_dir: Path) -> str | None:
    pointer = Path(models_dir) / CURRENT
    return pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None


def rollback(models_dir: Path, name: str) -> None:
    """Make an older complete version current after checking its files."""
    models_dir = Path(models_dir)
    available = list_versions(models_dir)
    if name not in available:
        raise ValueError(
            f"model version {name!r} not found in {models_dir / VERSIONS}; "
            f"available: {', '.join(available) or 'none'}"
        )
    verify_version(models_dir / VERSIONS / name)
    set_current_version(models_dir, name)
    logger.info("Model version %s is now current in %s", name, models_dir)


def prune_versions(models_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` versions, never the current one; return the deleted names."""
    if keep < 1:
        raise ValueError(f"invalid number of versions to keep: {keep}; keep at least 1")
    models_dir = Path(models_dir)
    current = _current_name(models_dir)
    names = list_versions(models_dir)
    doomed = [name for name in names[: max(len(names) - keep, 0)] if name != current]
    for name in doomed:
        shutil.rmtree(models_dir / VERSIONS / name, ignore_errors=True)
    if doomed:
        logger.info("Deleted %d old model versions: %s", len(doomed), ", ".join(doomed))
    return doomed
