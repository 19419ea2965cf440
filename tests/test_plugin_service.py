"""The webhook service over real HTTP on 127.0.0.1, backed by the fake Kili server and a trained version."""

from __future__ import annotations

import json

import pytest
from conftest import DIGITS_COUNT, DIGITS_PROJECT
from fake_kili import add_digits_project
from plugin_helpers import PREFIX, SECRET, plugin_config, stable, start_service, wait_for, webhook_body

from plugin.inbox import DONE, PROCESSING


@pytest.fixture
def digits(fake_kili, trained_digits):
    add_digits_project(fake_kili, DIGITS_PROJECT, count=DIGITS_COUNT, noise=0.1, seed=0)
    return fake_kili


@pytest.fixture
def live(digits, trained_digits, tmp_path):
    with start_service(plugin_config(tmp_path, trained_digits["models_dir"])) as live:
        yield live


def test_wrong_secret_gets_401(live, digits):
    body = webhook_body(digits, "digit-0000")

    missing = live.post(body, secret=None)
    wrong = live.post(body, secret=SECRET + "x")

    assert missing.status_code == 401
    assert wrong.status_code == 401
    assert live.service.inbox.counts()["pending"] == 0
    assert sum(live.service.inbox.counts().values()) == 0


@pytest.mark.parametrize("body, reason", [
    ("not json", "not valid JSON"),
    ([1, 2], "JSON object"),
    ({"eventType": "onDelete"}, "eventType"),
    ({"eventType": "onSubmit", "logPayload": {"projectId": "other"}, "payload": {}}, "logPayload.projectId"),
    ({"eventType": "onSubmit", "logPayload": {"projectId": DIGITS_PROJECT}, "payload": {"asset_id": "a"}},
     "payload.label"),
    ({"eventType": "onSubmit", "logPayload": {"projectId": DIGITS_PROJECT},
      "payload": {"asset_id": "a", "label": {"jsonResponse": {}}}}, "payload.label.id"),
    ({"eventType": "onSubmit", "logPayload": {"projectId": DIGITS_PROJECT},
      "payload": {"asset_id": "", "label": {"id": "l1"}}}, "payload.asset_id"),
])
def test_malformed_body_gets_422(live, body, reason):
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode()

    response = live.client.post("/webhook", content=content, headers={"Authorization": SECRET})

    assert response.status_code == 422
    assert reason in response.json()["error"]
    assert sum(live.service.inbox.counts().values()) == 0


def test_large_body_gets_413(live, digits):
    body = webhook_body(digits, "digit-0000")
    body["payload"]["label"]["padding"] = "x" * (live.service.config.max_body_bytes + 1)

    declared = live.post(body)

    def chunks():
        yield json.dumps(body).encode()

    chunked = live.client.post("/webhook", content=chunks(), headers={"Authorization": SECRET})

    assert declared.status_code == 413
    assert chunked.status_code == 413
    assert sum(live.service.inbox.counts().values()) == 0


def test_submits_write_trainer_metadata(live, digits, trained_digits):
    asset_ids = list(digits.assets)[:40]

    responses = [live.post(webhook_body(digits, asset_id)) for asset_id in asset_ids]
    live.wait_idle()

    assert {response.status_code for response in responses} == {202}
    assert {response.json()["status"] for response in responses} == {"queued"}
    for asset_id in asset_ids:
        written = digits.assets[asset_id].metadata
        expected = trained_digits["metadata"][asset_id]
        assert stable(written) == stable(expected), asset_id
        assert written["source"] == "sklearn-digits"
        assert digits.assets[asset_id].priority == trained_digits["priority"][asset_id], asset_id
    assert live.service.inbox.counts()[DONE] == len(asset_ids)


def test_decisions_equal_offline_run(live, digits, trained_digits):
    asset_ids = list(digits.assets)
    rows = {row["asset_id"]: row for row in trained_digits["rows"]}

    for asset_id in asset_ids:
        live.post(webhook_body(digits, asset_id))
    live.wait_idle(timeout=120)

    for asset_id in asset_ids:
        metadata = digits.assets[asset_id].metadata
        assert metadata[PREFIX + "flagged"] is bool(rows[asset_id]["is_issue"]), asset_id
        assert metadata[PREFIX + "suggested_label"] == rows[asset_id]["suggested_label"], asset_id
        assert metadata[PREFIX + "score"] == pytest.approx(rows[asset_id]["score"], abs=1e-5), asset_id


def test_kili_calls_batched_across_events(live, digits):
    asset_ids = list(digits.assets)[:32]
    digits.delay("assets", 0.5)  # hold the first batch's query so that the others queue up behind it

    for asset_id in asset_ids:
        live.post(webhook_body(digits, asset_id))
    digits.delay("assets", 0)
    live.wait_idle()

    asset_queries = len(digits.calls("assets"))
    writes = len(digits.calls("updatePropertiesInAssets"))
    assert asset_queries < len(asset_ids) / 2
    assert writes == asset_queries


def test_duplicate_label_processed_once(live, digits):
    body = webhook_body(digits, "digit-0003")

    first = live.post(body)
    live.wait_idle()
    second = live.post(body)
    live.wait_idle()

    assert first.json()["status"] == "queued"
    assert second.json()["status"] == "duplicate"
    assert len(digits.calls("updatePropertiesInAssets")) == 1


def test_new_asset_scored_with_fold_mean(live, digits):
    image = digits.files["file-digit-0005"][0]
    digits.add_asset(DIGITS_PROJECT, "new-asset", image=image, labels=[digits.label("DIGIT", "D5")])

    live.post(webhook_body(digits, "new-asset"))
    live.wait_idle()

    metadata = digits.assets["new-asset"].metadata
    assert metadata[PREFIX + "status"] == "scored"
    assert 0.0 <= metadata[PREFIX + "score"] <= 1.0
    assert metadata[PREFIX + "model_version"] == "v0001"


def test_health_and_metrics(live, digits):
    live.post(webhook_body(digits, "digit-0001"))
    live.post(webhook_body(digits, "digit-0001"))
    live.post(webhook_body(digits, "digit-0001"), secret="wrong")
    live.wait_idle()

    health = live.client.get("/health").json()
    metrics = live.client.get("/metrics")

    assert health["model_version"] == "v0001"
    assert health["queue_depth"] == 0
    assert health["status"] == "ok"
    assert health["last_error"] is None
    text = metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "kle_events_received_total 1.0" in text
    assert "kle_events_duplicate_total 1.0" in text
    assert 'kle_requests_rejected_total{status="401"} 1.0' in text
    assert 'kle_event_latency_recent_seconds{quantile="0.5"}' in text
    assert "kle_event_latency_seconds_count 1.0" in text


def test_labels_of_one_asset_written_in_order(live, digits):
    asset_id = "digit-0020"  # a handwritten 0, labeled D0
    first = digits.assets[asset_id].labels[0]
    second = digits.label("DIGIT", "D7", minutes=5)
    digits.assets[asset_id].labels.append(second)
    digits.delay("updatePropertiesInAssets", 0.5)  # keep the first write running while the second label arrives

    live.post(webhook_body(digits, asset_id, label=first))
    wait_for(lambda: live.service.inbox.get(first.id)["status"] == PROCESSING, 10, "the first label to be claimed")
    live.post(webhook_body(digits, asset_id, label=second))
    digits.delay("updatePropertiesInAssets", 0)
    live.wait_idle()

    writes = [json.loads(call["data"][0]["jsonMetadata"]) for call in digits.calls("updatePropertiesInAssets")
              if call["where"][0]["id"] == asset_id]
    assert len(writes) == 2
    assert writes[0][PREFIX + "flagged"] is False
    assert writes[1][PREFIX + "flagged"] is True
    assert writes[1][PREFIX + "suggested_label"] == "D0"
    assert digits.assets[asset_id].metadata == writes[1]
