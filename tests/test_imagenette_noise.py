"""Detection quality on real photos with known flipped labels (Imagenette, 25% noise)."""

import csv

import pytest

from projects import shared_data
from training.pipeline import TrainConfig, train
from training.sources.local import LocalProject


def imagenette_manifest(tmp_path, column: str):
    root = shared_data("imagenette_subset")
    manifest = tmp_path / "manifest.csv"
    flipped = set()
    with open(root / "noisy_labels.csv", newline="") as handle, open(manifest, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "label", "asset_id"])
        for row in csv.DictReader(handle):
            if row["is_valid"] != "False":
                continue
            writer.writerow([str(root / row["path"]), row[column], row["path"]])
            if row[column] != row["noisy_labels_0"]:
                flipped.add(row["path"])
    return manifest, flipped


@pytest.mark.slow
def test_linear_mode_finds_flipped_labels(tmp_path):
    manifest, flipped = imagenette_manifest(tmp_path, "noisy_labels_25")
    config = TrainConfig(models_dir=tmp_path / "models", progress=False, mode="linear")

    result = train(LocalProject(manifest), config)

    flagged = {row["asset_id"] for row in result.rows if row["is_issue"]}
    found = len(flagged & flipped)
    assert len(flipped) == 244
    assert found / len(flipped) >= 0.95, f"recall {found / len(flipped):.3f}"
    assert found / len(flagged) >= 0.93, f"precision {found / len(flagged):.3f}"
