"""Model versions: atomic publication, listing, rollback and retention."""

import pytest

from plugin.model_version import CURRENT, ModelVersionError, current_version_dir
from training.cli import main
from training.versions import VersionWriter, describe_versions, list_versions, prune_versions, rollback


def publish(models_dir, flagged, *, make_current=True):
    writer = VersionWriter(models_dir)
    writer.path("fold_0.onnx").write_bytes(b"model bytes " + str(flagged).encode())
    manifest = {"created_at": "2026-12-04T10:00:00+00:00", "mode": "linear",
                "metrics": {"assets": 100, "flagged": flagged, "cv_accuracy": 0.9}}
    return writer.commit(manifest, checksummed=["fold_0.onnx"], make_current=make_current)


def test_versions_are_numbered_and_current(tmp_path):
    first = publish(tmp_path, 3)
    second = publish(tmp_path, 5)

    assert [first.name, second.name] == ["v0001", "v0002"]
    assert current_version_dir(tmp_path) == second
    assert list_versions(tmp_path) == ["v0001", "v0002"]


def test_describe_marks_current(tmp_path):
    publish(tmp_path, 3)
    publish(tmp_path, 5)

    described = describe_versions(tmp_path)

    assert [(info.name, info.flagged, info.current) for info in described] == [("v0001", 3, False), ("v0002", 5, True)]


def test_rollback_switches_current(tmp_path):
    first = publish(tmp_path, 3)
    publish(tmp_path, 5)

    rollback(tmp_path, "v0001")

    assert current_version_dir(tmp_path) == first


def test_rollback_to_unknown_version_lists_available(tmp_path):
    publish(tmp_path, 3)

    with pytest.raises(ValueError, match="'v0009' not found.*available: v0001"):
        rollback(tmp_path, "v0009")


def test_rollback_refuses_damaged_version(tmp_path):
    first = publish(tmp_path, 3)
    publish(tmp_path, 5)
    (first / "fold_0.onnx").write_bytes(b"tampered")

    with pytest.raises(ModelVersionError, match="checksum of fold_0.onnx"):
        rollback(tmp_path, "v0001")

    assert (tmp_path / CURRENT).read_text().strip() == "v0002"


def test_prune_keeps_newest_and_current(tmp_path):
    for flagged in range(4):
        publish(tmp_path, flagged)
    rollback(tmp_path, "v0001")

    deleted = prune_versions(tmp_path, keep=2)

    assert deleted == ["v0002"]
    assert list_versions(tmp_path) == ["v0001", "v0003", "v0004"]


def test_aborted_writer_leaves_nothing(tmp_path):
    publish(tmp_path, 1)
    writer = VersionWriter(tmp_path)
    writer.path("fold_0.onnx").write_bytes(b"half")

    writer.abort()

    assert list_versions(tmp_path) == ["v0001"]
    assert not writer.temporary.exists()


def test_cli_versions_and_rollback(tmp_path, capsys):
    publish(tmp_path, 3)
    publish(tmp_path, 5)

    assert main(["rollback", "v0001", "--models-dir", str(tmp_path)]) == 0
    assert main(["versions", "--models-dir", str(tmp_path)]) == 0

    output = capsys.readouterr().out
    assert "* v0001" in output
    assert "  v0002" in output
