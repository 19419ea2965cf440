"""LocalProject: folders, manifests, stable ids, clear errors and the results store."""

import csv

import pytest
from PIL import Image

from plugin.metadata import Verdict, build_metadata, review_priority
from training.sources.base import AssetResult, SourceError
from training.sources.local import LocalProject


def make_folder(root, layout):
    for label, count in layout.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.new("RGB", (8, 8), (index * 20, 0, 0)).save(root / label / f"img_{index}.png")
    return root


def test_folder_classes_and_ids(tmp_path):
    project = LocalProject(make_folder(tmp_path / "data", {"cat": 2, "dog": 3}))

    assets = list(project.list_assets())

    assert project.classes() == ["cat", "dog"]
    assert [asset.asset_id for asset in assets] == [
        "cat/img_0.png", "cat/img_1.png", "dog/img_0.png", "dog/img_1.png", "dog/img_2.png",
    ]
    assert project.read_image(assets[0])[:4] == b"\x89PNG"


def test_manifest_with_and_without_asset_id(tmp_path):
    data = make_folder(tmp_path / "data", {"cat": 2, "dog": 2})
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "path,label,asset_id\n"
        "data/cat/img_0.png,cat,a1\n"
        "data/cat/img_1.png,dog,\n"
        f"{data / 'dog' / 'img_0.png'},dog,a3\n"
    )

    assets = list(LocalProject(manifest).list_assets())

    assert [(asset.asset_id, asset.label) for asset in assets] == [
        ("a1", "cat"), ("data/cat/img_1.png", "dog"), ("a3", "dog"),
    ]


def test_missing_folder_names_path(tmp_path):
    with pytest.raises(SourceError, match="project path not found: .*nowhere"):
        LocalProject(tmp_path / "nowhere")


def test_empty_folder_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()

    with pytest.raises(SourceError, match="no labeled images found"):
        LocalProject(tmp_path / "empty")


def test_single_class_is_rejected(tmp_path):
    with pytest.raises(SourceError, match="only one class \\('cat'\\)"):
        LocalProject(make_folder(tmp_path / "data", {"cat": 3}))


def test_manifest_missing_image_names_line(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\nmissing.png,cat\n")

    with pytest.raises(SourceError, match="line 2: image not found: .*missing.png"):
        LocalProject(manifest)


def test_manifest_label_outside_classes(tmp_path):
    make_folder(tmp_path / "data", {"cat": 1, "dog": 1})
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\ndata/cat/img_0.png,cat\ndata/dog/img_0.png,bird\n")

    with pytest.raises(SourceError, match=r"labels \['bird'\] are not in the given classes"):
        LocalProject(manifest, classes=["cat", "dog"])


def test_manifest_without_label_column(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("file,class\na.png,cat\n")

    with pytest.raises(SourceError, match="needs a header with path,label"):
        LocalProject(manifest)


def test_results_db_sits_beside_class_folders(tmp_path):
    project = LocalProject(make_folder(tmp_path / "data", {"cat": 1, "dog": 1}))

    assert project.results_db == tmp_path / "data" / "label_errors.sqlite"
    assert project.results_db.parent not in {tmp_path / "data" / "cat", tmp_path / "data" / "dog"}


def result_for(asset_id, score, flagged, version="v0001"):
    verdict = Verdict(score=score, flagged=flagged, suggested_label="dog", model_version=version)
    return AssetResult(asset_id=asset_id, metadata=build_metadata(verdict), priority=review_priority(verdict))


def test_results_round_trip_and_unchanged_rerun(tmp_path):
    project = LocalProject(make_folder(tmp_path / "data", {"cat": 1, "dog": 1}))
    first = project.write_results([result_for("cat/img_0.png", 0.1, True), result_for("dog/img_0.png", 0.9, False)])

    again = project.write_results([result_for("cat/img_0.png", 0.1, True), result_for("dog/img_0.png", 0.9, False)])

    stored = project.read_results()
    assert first.written == 2
    assert again.written == 0
    assert again.unchanged == 2
    assert stored["cat/img_0.png"]["label_error_flagged"] is True
    assert stored["cat/img_0.png"]["label_error_score"] == pytest.approx(0.1)
    assert project.read_priorities()["cat/img_0.png"] > project.read_priorities()["dog/img_0.png"]


def test_dry_run_writes_nothing(tmp_path):
    project = LocalProject(make_folder(tmp_path / "data", {"cat": 1, "dog": 1}))

    summary = project.write_results([result_for("cat/img_0.png", 0.1, True)], dry_run=True)

    assert summary.dry_run
    assert summary.written == 1
    assert project.read_results() == {}


def test_unwritable_results_db_gives_fix(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    project = LocalProject(make_folder(tmp_path / "data", {"cat": 1, "dog": 1}), results_db=blocker / "sub" / "r.sqlite")

    with pytest.raises(SourceError, match="pass --results-db PATH"):
        project.write_results([result_for("cat/img_0.png", 0.1, True)])


def test_small_score_change_is_not_rewritten(tmp_path):
    project = LocalProject(make_folder(tmp_path / "data", {"cat": 1, "dog": 1}))
    project.write_results([result_for("cat/img_0.png", 0.500, False)])

    nudged = project.write_results([result_for("cat/img_0.png", 0.505, False, version="v0002")])
    moved = project.write_results([result_for("cat/img_0.png", 0.600, False, version="v0002")])

    assert nudged.written == 0
    assert moved.written == 1
    assert project.read_results()["cat/img_0.png"]["label_error_score"] == pytest.approx(0.6)
