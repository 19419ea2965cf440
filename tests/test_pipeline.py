"""End-to-end training runs on real digit images: outputs, caching, faults."""

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from plugin.model_version import CURRENT, ModelVersion, ModelVersionError, current_version_dir
from plugin.preprocess import prepare_image
from projects import write_digits_project
from training.cli import main
from training.crossval import FoldError
from training.pipeline import TrainConfig, train
from training.sources.local import LocalProject
from training.versions import list_versions


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("digits")
    truth = write_digits_project(root / "data", per_class=60, flip_fraction=0.1, seed=1)
    source = LocalProject(root / "data")
    config = TrainConfig(models_dir=root / "models", cache_dir=cache_dir, folds=3, progress=False)
    return source, config, train(source, config), truth


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_version_layout(first_run):
    _, config, result, _ = first_run
    manifest = json.loads((result.version_dir / "manifest.json").read_text())

    assert current_version_dir(config.models_dir) == result.version_dir
    assert manifest["classes"] == ["0", "1", "2", "3"]
    assert manifest["preprocessing"]["input_size"] == 224
    assert manifest["backbone"]["model_name"] == "tf_efficientnet_lite0"
    assert len(manifest["training_assets"]) == 240
    assert {entry["fold"] for entry in manifest["training_assets"].values()} == {0, 1, 2}
    assert set(manifest["files"]) == {"backbone.onnx", "fold_0.onnx", "fold_1.onnx", "fold_2.onnx", "out_of_fold.npz", "label_issues.csv"}
    assert manifest["decision"]["filter_by"] == "prune_by_noise_rate"
    assert len(manifest["decision"]["thresholds"]) == 4


def test_issues_csv_matches_summary(first_run):
    _, _, result, _ = first_run
    rows = read_csv(result.issues_csv)

    assert list(rows[0]) == ["asset_id", "given_label", "suggested_label", "score", "is_issue", "rank"]
    assert len(rows) == 240
    assert sum(row["is_issue"] == "True" for row in rows) == result.summary["flagged"]
    assert [int(row["rank"]) for row in rows] == list(range(1, 241))
    flagged_scores = [float(row["score"]) for row in rows if row["is_issue"] == "True"]
    assert flagged_scores == sorted(flagged_scores)


def test_flags_find_most_flips(first_run):
    _, _, result, truth = first_run
    flips = {asset_id for asset_id, (true, given) in truth.items() if true != given}
    flagged = {row["asset_id"] for row in result.rows if row["is_issue"]}

    assert len(flagged & flips) / len(flips) >= 0.6
    assert len(flagged & flips) / len(flagged) >= 0.6


def test_results_written_to_project(first_run):
    source, _, result, _ = first_run
    stored = source.read_results()

    assert len(stored) == 240
    flagged = [row["asset_id"] for row in result.rows if row["is_issue"]]
    assert all(stored[asset_id]["label_error_flagged"] is True for asset_id in flagged)
    assert stored[flagged[0]]["label_error_model_version"] == result.version_dir.name


def test_plugin_decisions_equal_offline(first_run):
    source, _, result, _ = first_run
    version = ModelVersion.load(result.version_dir, providers=["CPUExecutionProvider"])
    assets = list(source.list_assets())
    pixels = np.stack([prepare_image(source.read_image(asset), version.preprocessing) for asset in assets])
    oof = np.load(result.version_dir / "out_of_fold.npz")
    oof_rows = {asset_id: row for row, asset_id in enumerate(oof["asset_ids"])}

    predictions = version.predict(pixels, [asset.asset_id for asset in assets])
    probabilities = np.stack([prediction.probabilities for prediction in predictions])
    labels = np.array([version.class_index(asset.label) for asset in assets])
    verdicts = version.judge(probabilities, labels)

    expected = {row["asset_id"]: row for row in result.rows}
    rows = [oof_rows[asset.asset_id] for asset in assets]
    assert np.abs(probabilities - oof["pred_probs"][rows]).max() < 1e-4
    assert [v.flagged for v in verdicts] == [expected[a.asset_id]["is_issue"] for a in assets]
    assert [v.suggested_label for v in verdicts] == [expected[a.asset_id]["suggested_label"] for a in assets]


def test_new_asset_uses_fold_mean(first_run):
    source, _, result, _ = first_run
    version = ModelVersion.load(result.version_dir, providers=["CPUExecutionProvider"])
    asset = next(iter(source.list_assets()))
    pixels = prepare_image(source.read_image(asset), version.preprocessing)[None]

    prediction = version.predict(pixels, [None])[0]

    assert prediction.fold is None
    assert prediction.probabilities.sum() == pytest.approx(1.0, abs=1e-5)


def test_rerun_trains_nothing(first_run):
    source, config, result, _ = first_run

    again = train(source, config)

    assert again.version_dir == result.version_dir
    assert again.summary["reused_version"] == result.version_dir.name
    assert again.summary["features_computed"] == 0
    assert again.write_summary.written == 0
    assert again.write_summary.unchanged == 240
    assert again.summary["flagged"] == result.summary["flagged"]


def test_changed_setting_reuses_caches(first_run):
    source, config, result, _ = first_run
    changed = TrainConfig(**{**config.__dict__, "filter_by": "both"})

    again = train(source, changed)

    manifest = json.loads((again.version_dir / "manifest.json").read_text())
    assert again.version_dir != result.version_dir
    assert again.summary["features_computed"] == 0
    assert manifest["training"]["heads_trained"] == 0
    assert manifest["decision"]["filter_by"] == "both"


def test_five_percent_new_images_recompute_only_those(tmp_path, cache_dir):
    write_digits_project(tmp_path / "data", per_class=60, flip_fraction=0.1, seed=1)
    config = TrainConfig(models_dir=tmp_path / "models", cache_dir=cache_dir, folds=3, progress=False)
    train(LocalProject(tmp_path / "data"), config)
    write_digits_project(tmp_path / "extra", per_class=63, flip_fraction=0.0, seed=1)
    added = 0
    for digit in "0123":
        for file in sorted((tmp_path / "extra" / digit).iterdir())[60:]:
            shutil.copy(file, tmp_path / "data" / digit / file.name)
            added += 1

    result = train(LocalProject(tmp_path / "data"), config)

    assert added == 12
    assert result.summary["features_computed"] == added
    assert result.summary["assets"] == 252


def test_crash_leaves_no_half_written_version(first_run, mocker):
    source, config, _, _ = first_run
    before = list_versions(config.models_dir)
    current = (config.models_dir / CURRENT).read_text()
    mocker.patch("training.pipeline.detect_label_issues", side_effect=RuntimeError("power cut"))

    with pytest.raises(RuntimeError, match="power cut"):
        train(source, config)

    assert list_versions(config.models_dir) == before
    assert (config.models_dir / CURRENT).read_text() == current
    assert not [p for p in (config.models_dir / "versions").iterdir() if p.name.startswith(".tmp")]


def test_changed_model_file_is_refused(first_run, tmp_path):
    _, _, result, _ = first_run
    copy = tmp_path / result.version_dir.name
    shutil.copytree(result.version_dir, copy)
    with open(copy / "fold_1.onnx", "r+b") as handle:
        handle.seek(200)
        byte = handle.read(1)
        handle.seek(200)
        handle.write(bytes([byte[0] ^ 0xFF]))

    with pytest.raises(ModelVersionError, match="checksum of fold_1.onnx"):
        ModelVersion.load(copy)


def test_unreadable_image_is_skipped(tmp_path, cache_dir):
    write_digits_project(tmp_path / "data", per_class=30, flip_fraction=0.0, seed=2)
    good = (tmp_path / "data" / "1" / "broken.png")
    Image.new("RGB", (64, 64), (10, 200, 30)).save(good)
    good.write_bytes(good.read_bytes()[:40])

    result = train(LocalProject(tmp_path / "data"), TrainConfig(models_dir=tmp_path / "m", cache_dir=cache_dir, folds=3, progress=False))

    assert result.summary["failed_images"] == 1
    assert result.summary["assets"] == 120


def test_rare_class_is_named(tmp_path, cache_dir):
    write_digits_project(tmp_path / "data", per_class=20, classes=(0, 1), flip_fraction=0.0)
    (tmp_path / "data" / "rare").mkdir()
    for index in range(2):
        shutil.copy(sorted((tmp_path / "data" / "0").iterdir())[index], tmp_path / "data" / "rare" / f"r{index}.png")
    config = TrainConfig(models_dir=tmp_path / "m", cache_dir=cache_dir, folds=3, progress=False)

    with pytest.raises(FoldError, match=r"'rare' \(2\).*--drop-rare-classes"):
        train(LocalProject(tmp_path / "data"), config)

    config.drop_rare_classes = True
    result = train(LocalProject(tmp_path / "data"), config)
    assert result.summary["excluded_classes"] == ["rare"]
    assert result.summary["assets"] == 40


def test_evaluate_cleaning_reports_both_accuracies(tmp_path, cache_dir):
    write_digits_project(tmp_path / "data", per_class=40, flip_fraction=0.15, seed=3)
    config = TrainConfig(models_dir=tmp_path / "m", cache_dir=cache_dir, folds=3, progress=False, evaluate_cleaning=True)

    cleaning = train(LocalProject(tmp_path / "data"), config).summary["cleaning"]

    assert cleaning["assets_before"] == 160
    assert cleaning["assets_after"] < 160
    assert cleaning["cv_accuracy_after"] > cleaning["cv_accuracy_before"]


def test_cli_reports_missing_folder(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "m")])

    assert code == 2
    assert "project path not found" in capsys.readouterr().err


def test_cli_dry_run_writes_nothing(tmp_path, cache_dir, capsys):
    write_digits_project(tmp_path / "data", per_class=20, classes=(0, 1), flip_fraction=0.1)

    code = main([
        "train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "m"),
        "--cache-dir", str(cache_dir), "--folds", "3", "--dry-run", "--no-progress",
    ])

    output = capsys.readouterr().out
    assert code == 0
    assert "would write 40" in output
    assert "Dry run: would write 40 assets" in output
    assert LocalProject(tmp_path / "data").read_results() == {}
    assert (tmp_path / "m" / "versions" / "v0001" / "label_issues.csv").is_file()
    assert not (tmp_path / "m" / "CURRENT").exists()
