"""End to end: train on a fake Kili project of digits with known flipped labels, through the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

from fake_kili import add_digits_project

from training.cli import main

PREFIX = "label_error_"


def read_issues(output: Path) -> dict[str, dict]:
    versions = sorted((output / "versions").iterdir())
    with open(versions[-1] / "label_issues.csv", newline="", encoding="utf-8") as handle:
        return {row["asset_id"]: row for row in csv.DictReader(handle)}


def test_flagged_metadata_lands_on_right_assets(fake_kili, tmp_path, request, capsys):
    truth = add_digits_project(fake_kili, "digits", count=200, noise=0.1, seed=0)
    flipped = {asset_id for asset_id, (true, given) in truth.items() if true != given}
    output = tmp_path / "out"
    # The backbone's ONNX export and the features are cached across test runs.
    cache = request.config.cache.mkdir("kili-e2e-cache")
    arguments = ["train", "--project-id", "digits", "--folds", "3", "--output", str(output),
                 "--cache-dir", str(cache), "--no-progress", "--review", "--create-issues"]

    assert main(arguments) == 0
    first = capsys.readouterr().out
    assert "Project results:    wrote 200, unchanged 0, failed 0" in first

    issues = read_issues(output)
    flagged = {asset_id for asset_id, row in issues.items() if row["is_issue"] == "True"}
    assert len(flagged & flipped) >= len(flipped) // 2
    for asset_id, row in issues.items():
        metadata = fake_kili.assets[asset_id].metadata
        assert metadata["source"] == "sklearn-digits"
        assert metadata[PREFIX + "flagged"] is (asset_id in flagged), asset_id
        assert metadata[PREFIX + "suggested_label"] == row["suggested_label"], asset_id
        assert abs(metadata[PREFIX + "score"] - float(row["score"])) < 1e-5, asset_id
    for asset_id in flagged:
        assert fake_kili.assets[asset_id].priority > 50, asset_id
    assert sorted(fake_kili.reviewed) == sorted(flagged)
    issue_labels = {issue["labelID"] for issue in fake_kili.issues}
    assert issue_labels == {fake_kili.assets[asset_id].labels[0].id for asset_id in flagged}
    assert fake_kili.projects["digits"].metadata_properties[PREFIX + "score"]["type"] == "number"

    writes = len(fake_kili.calls("updatePropertiesInAssets"))
    assert main(arguments) == 0
    second = capsys.readouterr().out
    assert "Project results:    wrote 0, unchanged 200, failed 0" in second
    assert len(fake_kili.calls("updatePropertiesInAssets")) == writes
    assert len(fake_kili.issues) == len(flagged)
