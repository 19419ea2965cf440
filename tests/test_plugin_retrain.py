"""The service retrains by itself, switches versions mid-stream and re-scores."""

import json
import shutil
import time

from conftest import DIGITS_COUNT, DIGITS_PROJECT
from fake_kili import DIGITS_JOB, add_digits_project
from plugin_helpers import PREFIX, SECRET, plugin_config, start_service, wait_for, webhook_body

from plugin.model_version import CURRENT, set_current_version
from training.retrain import read_status


def copy_models(trained_digits, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(trained_digits["models_dir"], models, ignore=shutil.ignore_patterns("cache"))
    return models


def test_service_retrains_after_submits(fake_kili, trained_digits, tmp_path, request):
    truth = add_digits_project(fake_kili, DIGITS_PROJECT, count=DIGITS_COUNT, noise=0.1, seed=0)
    models = copy_models(trained_digits, tmp_path)
    cache = request.config.cache.mkdir("plugin-digits-cache")
    retrain = {
        "after_labels": 5,
        "check_seconds": 0.2,
        "train_arguments": ["--folds", "3", "--drop-rare-classes", "--cache-dir", str(cache)],
    }
    config = plugin_config(tmp_path, models, retrain=retrain)
    # Flipped labels that the model flagged and for which it suggested the true category.
    flagged_flips = [
        row["asset_id"] for row in trained_digits["rows"]
        if row["is_issue"] and truth[row["asset_id"]][0] != truth[row["asset_id"]][1]
        and row["suggested_label"] == truth[row["asset_id"]][0]
    ]
    fixed = flagged_flips[:5]

    with start_service(config) as live:
        assert live.client.get("/health").json()["retrain"]["new_labels"] == 0
        for minutes, asset_id in enumerate(fixed, start=1):
            label = fake_kili.label(DIGITS_JOB, truth[asset_id][0], minutes=minutes)
            fake_kili.assets[asset_id].labels.append(label)
            assert live.post(webhook_body(fake_kili, asset_id)).status_code == 202
        live.wait_idle()
        wait_for(lambda: read_status(models).state in ("succeeded", "failed"), 300, "the retrain to finish")
        status = read_status(models)

        next_asset = next(a for a in truth if a not in fixed)
        assert live.post(webhook_body(fake_kili, next_asset)).status_code == 202
        live.wait_idle()
        health = live.client.get("/health").json()

    assert status.state == "succeeded", (models / "retrain.log").read_text()[-3000:]
    assert status.reason == "5 new labels (threshold 5)"
    assert (models / CURRENT).read_text().strip() == "v0002"
    assert health["model_version"] == "v0002"
    assert health["retrain"]["state"] == "succeeded"
    versions = {fake_kili.assets[a].metadata.get(PREFIX + "model_version") for a in truth}
    assert "v0002" in versions
    for asset_id in fixed:
        assert fake_kili.assets[asset_id].metadata[PREFIX + "flagged"] is False


def test_retrain_request_over_http(fake_kili, trained_digits, tmp_path):
    add_digits_project(fake_kili, DIGITS_PROJECT, count=DIGITS_COUNT, noise=0.1, seed=0)
    models = copy_models(trained_digits, tmp_path)
    slow = {"command": ["python", "-c", "import time; time.sleep(3)"], "wait_for_version_seconds": 0.5}
    config = plugin_config(tmp_path, models, retrain=slow)

    with start_service(config) as live:
        unauthorized = live.client.post("/retrain", headers={"Authorization": "wrong"})
        first = live.client.post("/retrain", headers={"Authorization": SECRET})
        second = live.client.post("/retrain", headers={"Authorization": SECRET})
        running = live.client.get("/health").json()["retrain"]
        wait_for(lambda: not live.service.retrain.running(), 30, "the retrain to finish")

    assert unauthorized.status_code == 401
    assert first.status_code == 202
    assert second.status_code == 409
    assert second.json()["status"] == "already running"
    assert second.json()["started_at"] == first.json()["started_at"]
    assert running["running"] is True
    assert read_status(models).state == "failed"  # the command made no new version
    assert (models / CURRENT).read_text().strip() == "v0001"


def test_switch_during_burst_loses_no_event(fake_kili, trained_digits, tmp_path):
    truth = add_digits_project(fake_kili, DIGITS_PROJECT, count=DIGITS_COUNT, noise=0.1, seed=0)
    models = copy_models(trained_digits, tmp_path)
    second = models / "versions" / "v0002"
    shutil.copytree(models / "versions" / "v0001", second)
    manifest = json.loads((second / "manifest.json").read_text())
    (second / "manifest.json").write_text(json.dumps({**manifest, "version": "v0002"}))
    config = plugin_config(tmp_path, models, max_batch_size=4)
    assets = list(truth)[:40]

    with start_service(config) as live:
        for index, asset_id in enumerate(assets):
            assert live.post(webhook_body(fake_kili, asset_id)).status_code == 202
            if index == 20:
                set_current_version(models, "v0002")
            time.sleep(0.01)
        live.wait_idle()
        counts = live.service.inbox.counts()
        loaded = live.service.models.version.name

    assert counts["done"] == len(assets)
    assert counts["failed"] == 0
    assert loaded == "v0002"
    for asset_id in assets:
        assert fake_kili.assets[asset_id].metadata[PREFIX + "model_version"] in {"v0001", "v0002"}
