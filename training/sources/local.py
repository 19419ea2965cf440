"""A project on local disk: one folder per class, or a CSV manifest.

Results are kept in a SQLite file beside the data (``label_errors.sqlite`` in
the project folder, or ``<manifest>.label_errors.sqlite`` beside a manifest),
never inside a class folder, so reruns and the plugin can read them back.
"""

from __future__ import annotations

import csv
import json
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path

from plugin.metadata import metadata_changed

from .base import Asset, AssetResult, ProjectSource, SourceError, WriteSummary

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
RESULTS_FILENAME = "label_errors.sqlite"


class LocalProject(ProjectSource):
    """Images on disk with their labels.

    ``path`` is a folder with one subfolder per class (the class is the folder
    name, the asset id the path relative to the folder) or a CSV file with the
    header ``path,label`` and an optional ``asset_id`` column (relative paths
    are resolved against the CSV's folder). ``classes`` fixes the class order;
    by default it is the sorted set of labels.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        classes: Sequence[str] | None = None,
        results_db: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.exists():
            raise SourceError(
                f"project path not found: {self.path}. Pass a folder with one subfolder per "
                "class, or a CSV manifest with the columns path,label[,asset_id]."
            )
        self.name = str(self.path)
        self.is_manifest = self.path.is_file()
        if self.is_manifest:
            self._assets = self._read_manifest()
            default_db = self.path.with_name(self.path.name + "." + RESULTS_FILENAME)
        else:
            self._assets = self._scan_folder()
            default_db = self.path / RESULTS_FILENAME
        self.results_db = Path(results_db) if results_db else default_db

        if not self._assets:
            raise SourceError(
                f"no labeled images found in {self.path}. A folder needs one subfolder per class "
                f"with images ({', '.join(sorted(IMAGE_SUFFIXES))}); a manifest needs data rows."
            )
        found = sorted({asset.label for asset in self._assets})
        if classes is None:
            self._classes = found
        else:
            self._classes = list(classes)
            unknown = sorted(set(found) - set(self._classes))
            if unknown:
                raise SourceError(
                    f"labels {unknown} are not in the given classes {self._classes}: "
                    "add them to the class list or fix the labels"
                )
        if len(self._classes) < 2:
            raise SourceError(
                f"only one class ({self._classes[0]!r}) in {self.path}: label-error detection "
                "needs at least two classes; add a folder (or manifest rows) for another class"
            )

    def _scan_folder(self) -> list[Asset]:
        assets = []
        for class_dir in sorted(child for child in self.path.iterdir() if child.is_dir()):
            if class_dir.name.startswith("."):
                continue
            for file in sorted(class_dir.rglob("*")):
                if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                    relative = file.relative_to(self.path).as_posix()
                    assets.append(Asset(asset_id=relative, label=class_dir.name, location=str(file)))
        return assets

    def _read_manifest(self) -> list[Asset]:
        with open(self.path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = set(reader.fieldnames or [])
            if not {"path", "label"} <= columns:
                raise SourceError(
                    f"manifest {self.path} has columns {sorted(columns)}; "
                    "it needs a header with path,label and optionally asset_id"
                )
            assets, seen = [], set()
            for line_number, row in enumerate(reader, start=2):
                raw_path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
                if not raw_path or not label:
                    raise SourceError(
                        f"manifest {self.path} line {line_number}: empty path or label; fill in both"
                    )
                file = Path(raw_path)
                if not file.is_absolute():
                    file = self.path.parent / file
                if not file.is_file():
                    raise SourceError(
                        f"manifest {self.path} line {line_number}: image not found: {file}. "
                        "Fix the path (relative paths start at the manifest's folder)."
                    )
                asset_id = (row.get("asset_id") or "").strip() or raw_path
                if asset_id in seen:
                    raise SourceError(
                        f"manifest {self.path} line {line_number}: duplicate asset id {asset_id!r}; "
                        "each row needs a unique asset_id (or path)"
                    )
                seen.add(asset_id)
                assets.append(Asset(asset_id=asset_id, label=label, location=str(file)))
            return assets

    def classes(self) -> list[str]:
        return list(self._classes)

    def list_assets(self) -> Iterator[Asset]:
        yield from self._assets

    def read_image(self, asset: Asset) -> bytes:
        return Path(asset.location).read_bytes()

    # Results store -------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            self.results_db.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.results_db)
        except (OSError, sqlite3.Error) as error:
            raise SourceError(
                f"cannot open the results database {self.results_db} ({error}); "
                "pass --results-db PATH to a writable place"
            ) from error
        connection.execute(
            "CREATE TABLE IF NOT EXISTS results ("
            " asset_id TEXT PRIMARY KEY, metadata TEXT NOT NULL, priority INTEGER NOT NULL)"
        )
        return connection

    def read_results(self, asset_ids: Sequence[str] | None = None) -> dict[str, dict]:
        if not self.results_db.exists():
            return {}
        with closing(self._connect()) as connection:
            rows = connection.execute("SELECT asset_id, metadata FROM results").fetchall()
        wanted = None if asset_ids is None else set(asset_ids)
        return {
            asset_id: json.loads(metadata)
            for asset_id, metadata in rows
            if wanted is None or asset_id in wanted
        }

    def read_priorities(self) -> dict[str, int]:
        if not self.results_db.exists():
            return {}
        with closing(self._connect()) as connection:
            return dict(connection.execute("SELECT asset_id, priority FROM results").fetchall())

    def write_results(self, results: Sequence[AssetResult], *, dry_run: bool = False) -> WriteSummary:
        summary = WriteSummary(dry_run=dry_run)
        current = self.read_results()
        priorities = self.read_priorities()
        # The priority follows from the metadata, so it is rewritten with it.
        changed = [
            result
            for result in results
            if metadata_changed(current.get(result.asset_id), dict(result.metadata))
            or result.asset_id not in priorities
        ]
        summary.unchanged = len(results) - len(changed)
        if dry_run:
            summary.written = len(changed)  # what a real run would write
            self._print_plan(changed)
            return summary
        if not changed:
            return summary
        with closing(self._connect()) as connection, connection:
            connection.executemany(
                "INSERT INTO results (asset_id, metadata, priority) VALUES (?, ?, ?) "
                "ON CONFLICT(asset_id) DO UPDATE SET metadata = excluded.metadata, "
                "priority = excluded.priority",
                [
                    (result.asset_id, json.dumps(dict(result.metadata), sort_keys=True), result.priority)
                    for result in changed
                ],
            )
        summary.written = len(changed)
        logger.info("Wrote results of %d assets to %s", summary.written, self.results_db)
        return summary

    @staticmethod
    def _print_plan(changed: Sequence[AssetResult], limit: int = 20) -> None:
        """Print the flagged assets a real run would write, highest priority first."""
        flagged = [result for result in changed if any(
            key.endswith("flagged") and value is True for key, value in result.metadata.items()
        )]
        flagged.sort(key=lambda result: -result.priority)
        print(f"Dry run: would write {len(changed)} assets, {len(flagged)} of them flagged")
        for result in flagged[:limit]:
            score = next((value for key, value in result.metadata.items() if key.endswith("score")), "")
            suggested = next((value for key, value in result.metadata.items() if key.endswith("suggested_label")), "")
            print(f"  {result.asset_id}: score {score}, suggested {suggested}, priority {result.priority}")
        if len(flagged) > limit:
            print(f"  ... and {len(flagged) - limit} more flagged assets")

    def clear_results(self, *, dry_run: bool = False) -> int:
        """Delete every stored result; return how many there were."""
        count = len(self.read_results())
        if not dry_run and count:
            with closing(self._connect()) as connection, connection:
                connection.execute("DELETE FROM results")
        return count
