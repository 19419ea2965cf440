"""Bad input and faults: each case runs through the live service and the fake Kili server."""

from __future__ import annotations

import shutil

import pytest
from conftest import DIGITS_COUNT, DIGITS_PROJECT
from fake_kili import DIGITS_JOB, FakeLabel, add_digits_project
from plugin_helpers import PREFIX, plugin_config, start_service, wait_for, webhook_body

from plugin.inbox import DONE, FAILED, PENDING, SKIPPED
from plugin.model_version import CURRENT, set_current_version
from plugin.models import ModelHolder


@pytest.fixture
def digits(fake_kili, trained_digits):
    add_digits_project(fake_kili, DIGITS_PROJECT, count=DIGITS_COUNT, noise=0.1, seed=0)
    return fake_kili


def copy_models(trained_digits, target):
    """Copy the trained version into a models folder of the test's own."""
    shutil.copytree(trained_digits["version_dir"], target / "versions" / "v0001")
    set_current_version(target, "v0001")
    return target


def relabel(server, asset_id: str, json_response: dict) -> FakeLabel:
    label = FakeLabel(id=f"label-{asset_id}-new", json_response=json_response, created_at="2026-02-01T00:00:00.000Z")
    server.assets[asset_id].labels.append(label)
    return label


def test_class_not_in_model(digits, trained_digits, tmp_path):
    interface = digits.projects[DIGITS_PROJECT].json_interface
    interface["jobs"][DIGITS_JOB]["content"]["categories"]["D10"] = {"name": "10", "children": []}
    label = relabel(digits, "digit-0002", {DIGITS_JOB: {"categories": [{"name": "D10", "confidence": 100}]}})

    with start_service(plugin_config(tmp_path, trained_digits["models_dir"])) as live:
        live.post(webhook_body(digits, "digit-0002", label=label))
        live.wait_idle()
        row = live.service.inbox.get(label.id)

    metadata = digits.assets["digit-0002"].metadata
    assert metadata[PREFIX + "status"] == "not scorable: class D10 not in model version v0001"
    assert metadata[PREFIX + "model_version"] == "v0001"
    assert PREFIX + "score" not in metadata
    assert metadata["source"] == "sklearn-digits"
    assert row["status"] == DONE


@pytest.mark.parametrize("json_response, status", [
    ({DIGITS_JOB: {"categories": [{"name": "D1", "confidence": 100}, {"name": "D2", "confidence": 100}]}},
     "not scorable: several categories in a single-choice job"),
    ({}, "not scorable: empty jsonResponse"),
    ({DIGITS_JOB: {"categories": []}}, "not scorable: no category chosen in the job"),
    ({DIGITS_JOB: {"categories": [{"name": "D99"}]}}, "not scorable: category D99 is not defined in job DIGIT"),
])
def test_unusable_label_stored_as_not_scorable(digits, trained_digits, tmp_path, json_response, status):
    label = relabel(digits, "digit-0004", json_response)

    with start_service(plugin_config(tmp_path, trained_digits["models_dir"])) as live:
        response = live.post(webhook_body(digits, "digit-0004", label=label))
        live.wait_idle()
        row = live.service.inbox.get(label.id)

    assert response.status_code == 202
    assert digits.assets["digit-0004"].metadata[PREFIX + "status"] == status
    assert row["status"] == DONE


def test_trainer_flag_cleared_by_unscorable_label(digits, trained_digits, tmp_path):
    flagged = next(row["asset_id"] for row in trained_digits["rows"] if row["is_issue"])
    digits.assets[flagged].metadata = dict(trained_digits["metadata"][flagged])
    digits.assets[flagged].priority = trained_digits["priority"][flagged]
    label = relabel(digits, flagged, {})

    with start_service(plugin_config(tmp_path, trained_digits["models_dir"])) as live:
        live.post(webhook_body(digits, flagged, label=label))
        live.wait_idle()

    assert PREFIX + "flagged" not in digits.assets[flagged].metadata
    assert digits.assets[flagged].priority == 0


def test_image_fetch_failure(digits, trained_digits, tmp_path):
    digits.add_asset(DIGITS_PROJECT, "no-image", labels=[digits.label(DIGITS_JOB, "D3")])

    with start_service(plugin_config(tmp_path, trained_digits["models_dir"])) as live:
        live.post(webhook_body(digits, "no-image"))
        live.wait_idle()
        row = live.service.inbox.get(digits.assets["no-image"].labels[0].id)
        health = live.client.get("/health").json()

    status = digits.assets["no-image"].metadata[PREFIX + "status"]
    assert status.startswith("not scorable: image download failed")
    assert "HTTP 404" in status
    assert row["status"] == FAILED
    assert "HTTP 404" in row["error"]
    assert "HTTP 404" in health["last_error"]


def test_no_model_events_wait(digits, trained_digits, tmp_path):
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    config = plugin_config(tmp_path, models_dir)

    with start_service(config) as live:
        live.post(webhook_body(digits, "digit-0007"))
        label_id = digits.assets["digit-0007"].labels[0].id
        wait_for(lambda: live.service.inbox.get(label_id)["attempts"] == 0
                 and live.service.inbox.get(label_id)["status"] == PENDING, 10, "the event to be released")
        health = live.client.get("/health").json()
        assert health["model_version"] is None
        assert health["status"] == "degraded"
        assert digits.calls("updatePropertiesInAssets") == []

        copy_models(trained_digits, models_dir)
        live.wait_idle()

    assert digits.assets["digit-0007"].metadata[PREFIX + "status"] == "scored"


def test_no_model_events_skipped(digits, trained_digits, tmp_path):
    models_dir = tmp_path / "models"
    models_dir.mkdir()

    with start_service(plugin_config(tmp_path, models_dir, no_model="skip")) as live:
        live.post(webhook_body(digits, "digit-0008"))
        live.wait_idle()
        row = live.service.inbox.get(digits.assets["digit-0008"].labels[0].id)

    metadata = digits.assets["digit-0008"].metadata
    assert metadata[PREFIX + "status"] == "not scorable: no trained model version yet"
    assert metadata[PREFIX + "model_version"] == "none"
    assert row["status"] == SKIPPED


def corrupt_copy(models_dir, name: str) -> None:
    """Add version ``name`` as a copy of v0001 with one ONNX file changed, and make it current."""
    target = models_dir / "versions" / name
    shutil.copytree(models_dir / "versions" / "v0001", target)
    with open(target / "fold_1.onnx", "ab") as handle:
        handle.write(b"\0")
    set_current_version(models_dir, name)


def test_checksum_mismatch_keeps_previous_version(trained_digits, tmp_path):
    models_dir = copy_models(trained_digits, tmp_path / "models")
    holder = ModelHolder(models_dir, providers=["CPUExecutionProvider"])
    first = holder.current()

    corrupt_copy(models_dir, "v0002")
    second = holder.current()

    assert first.name == "v0001"
    assert second is first
    assert "v0002" in holder.last_error
    assert "checksum of fold_1.onnx" in holder.last_error
    assert (models_dir / CURRENT).read_text().strip() == "v0002"


def test_checksum_mismatch_in_service(digits, trained_digits, tmp_path):
    models_dir = copy_models(trained_digits, tmp_path / "models")

    with start_service(plugin_config(tmp_path, models_dir)) as live:
        corrupt_copy(models_dir, "v0002")
        live.post(webhook_body(digits, "digit-0009"))
        live.wait_idle()
        health = live.client.get("/health").json()

    assert digits.assets["digit-0009"].metadata[PREFIX + "model_version"] == "v0001"
    assert health["model_version"] == "v0001"
    assert "v0002" in health["last_error"]


def test_kili_503_retried(digits, trained_digits, tmp_path):
    digits.fail_next("assets", status=503, times=3)
    digits.fail_next("updatePropertiesInAssets", status=503, times=2)

    with start_service(plugin_config(tmp_path, trained_digits["models_dir"])) as live:
        live.post(webhook_body(digits, "digit-0010"))
        live.wait_idle(timeout=120)
        row = live.service.inbox.get(digits.assets["digit-0010"].labels[0].id)
        metrics = live.client.get("/metrics").text

    assert digits.pending_failures() == 0
    assert digits.assets["digit-0010"].metadata[PREFIX + "status"] == "scored"
    assert row["status"] == DONE
    assert "kle_kili_retries_total 2.0" in metrics


def test_kili_down_fails_batch_then_recovers(digits, trained_digits, tmp_path):
    config = plugin_config(tmp_path, trained_digits["models_dir"],
                           retry={"attempts": 2, "initial_wait_seconds": 0.01, "max_wait_seconds": 0.01})
    digits.fail_next("updatePropertiesInAssets", status=503, times=2)

    with start_service(config) as live:
        live.post(webhook_body(digits, "digit-0011"))
        live.wait_idle(timeout=120)
        failed = live.service.inbox.get(digits.assets["digit-0011"].labels[0].id)
        health = live.client.get("/health").json()
        live.post(webhook_body(digits, "digit-0012"))
        live.wait_idle(timeout=120)

    assert failed["status"] == FAILED
    assert "failed after 2 attempts" in failed["error"]
    assert "updatePropertiesInAssets" in health["last_error"] or "metadata" in health["last_error"]
    assert digits.assets["digit-0012"].metadata[PREFIX + "status"] == "scored"
