"""Unit tests of the Kili source: job parsing, label choice and writes, with a mocked gateway."""

from __future__ import annotations

import pytest

from training.sources.base import AssetResult, SourceError
from training.sources.kili import (
    SKIP_EMPTY_RESPONSE,
    SKIP_NO_LABEL,
    SKIP_SEVERAL_CATEGORIES,
    KiliProject,
    choose_job,
    classification_jobs,
    content_key,
    label_category,
    label_that_counts,
)
from training.sources.kili_gateway import ImageDownloader, KiliApiError, KiliGateway, is_transient

PREFIX = "label_error_"


def radio_job(categories=("CAT", "DOG"), input_type="radio", is_child=False) -> dict:
    return {
        "mlTask": "CLASSIFICATION",
        "isChild": is_child,
        "required": 1,
        "content": {"input": input_type, "categories": {key: {"name": key.title(), "children": []} for key in categories}},
    }


def interface(**jobs) -> dict:
    return {"jobs": jobs}


def label(label_type: str, created_at: str, category: str | None = "CAT", job: str = "JOB_0", label_id: str = "") -> dict:
    response = {} if category is None else {job: {"categories": [{"name": category, "confidence": 100}]}}
    return {"id": label_id or f"{label_type}-{created_at}", "labelType": label_type, "createdAt": created_at, "jsonResponse": response}


def ours(score: float, flagged: bool, suggested: str = "DOG", version: str = "v0001", scored_at: str = "t1") -> dict:
    return {
        PREFIX + "score": score, PREFIX + "flagged": flagged, PREFIX + "suggested_label": suggested,
        PREFIX + "model_version": version, PREFIX + "scored_at": scored_at, PREFIX + "status": "scored",
    }


@pytest.fixture
def gateway(mocker):
    gateway = mocker.create_autospec(KiliGateway, instance=True)
    gateway.endpoint = "https://kili.example/api/label/v2/graphql"
    gateway.api_key = "secret"
    gateway.project.return_value = {
        "id": "p1", "title": "Pets", "inputType": "IMAGE", "workflowVersion": "V1",
        "jsonInterface": interface(JOB_0=radio_job()),
    }
    gateway.metadata_properties.return_value = {}
    gateway.set_priority.return_value = {"succeeded": [], "declined": [], "failed": []}
    gateway.add_to_review.return_value = {"succeeded": [], "declined": [], "failed": []}
    gateway.create_issues.return_value = ["issue-1"]
    return gateway


def test_jobs_keep_interface_order_and_names():
    jobs = classification_jobs(interface(
        B_JOB=radio_job(("Z", "A", "M")),
        TOOL={"mlTask": "OBJECT_DETECTION", "content": {"input": "radio", "categories": {}}},
    ))
    assert [job.name for job in jobs] == ["B_JOB"]
    assert jobs[0].categories == ("Z", "A", "M")
    assert jobs[0].display_names == {"Z": "Z", "A": "A", "M": "M"}


def test_choose_job_needs_job_when_several():
    jobs = classification_jobs(interface(JOB_A=radio_job(), JOB_B=radio_job()))
    with pytest.raises(SourceError, match="JOB_A .*JOB_B.*--job"):
        choose_job(jobs, None, "p1")
    assert choose_job(jobs, "JOB_B", "p1").name == "JOB_B"


def test_choose_job_unknown_name_lists_jobs():
    jobs = classification_jobs(interface(JOB_A=radio_job()))
    with pytest.raises(SourceError, match="'NOPE' is not a classification job.*JOB_A \\(radio\\)"):
        choose_job(jobs, "NOPE", "p1")


def test_choose_job_checkbox_not_supported_yet():
    jobs = classification_jobs(interface(MULTI=radio_job(input_type="checkbox")))
    with pytest.raises(SourceError, match="multi-choice .*not supported yet"):
        choose_job(jobs, "MULTI", "p1")
    with pytest.raises(SourceError, match="no single-choice .*not supported yet"):
        choose_job(jobs, None, "p1")


def test_choose_job_ignores_child_jobs():
    jobs = classification_jobs(interface(PARENT=radio_job(), CHILD=radio_job(is_child=True)))
    assert choose_job(jobs, None, "p1").name == "PARENT"


def test_label_that_counts_prefers_latest_review():
    labels = [
        label("DEFAULT", "2026-01-03"), label("REVIEW", "2026-01-01"), label("REVIEW", "2026-01-02"),
        label("PREDICTION", "2026-01-09"), label("AUTOSAVE", "2026-01-09"), label("INFERENCE", "2026-01-09"),
    ]
    assert label_that_counts(labels)["id"] == "REVIEW-2026-01-02"


def test_label_that_counts_falls_back_to_default():
    labels = [label("DEFAULT", "2026-01-01"), label("DEFAULT", "2026-01-05"), label("PREDICTION", "2026-01-09")]
    assert label_that_counts(labels)["id"] == "DEFAULT-2026-01-05"
    assert label_that_counts([label("PREDICTION", "2026-01-09")]) is None
    assert label_that_counts(None) is None


def test_label_category_skip_reasons():
    job = classification_jobs(interface(JOB_0=radio_job()))[0]
    assert label_category(label("DEFAULT", "t", "DOG"), job) == ("DOG", None)
    assert label_category(label("DEFAULT", "t", None), job) == (None, SKIP_EMPTY_RESPONSE)
    assert label_category(label("DEFAULT", "t", "DOG", job="OTHER"), job) == (None, "job JOB_0 missing from the label")
    two = {"jsonResponse": {"JOB_0": {"categories": [{"name": "CAT"}, {"name": "DOG"}]}}}
    assert label_category(two, job) == (None, SKIP_SEVERAL_CATEGORIES)


def test_label_category_unknown_category_raises():
    job = classification_jobs(interface(JOB_0=radio_job()))[0]
    with pytest.raises(SourceError, match="'BIRD', which job 'JOB_0' does not define.*CAT, DOG"):
        label_category(label("DEFAULT", "t", "BIRD", label_id="l9"), job)


def test_content_key_drops_tokens():
    first = content_key("https://kili.example/api/label/v2/files?id=abc&token=1")
    second = content_key("https://kili.example/api/label/v2/files?token=2&id=abc")
    assert first == second
    assert content_key("https://bucket.example/x.png?X-Amz-Signature=1") == "https://bucket.example/x.png"


def test_project_rejects_non_image(gateway):
    gateway.project.return_value["inputType"] = "TEXT"
    with pytest.raises(SourceError, match="input type 'TEXT'.*only IMAGE"):
        KiliProject(gateway, "p1")


def test_project_not_found(gateway):
    gateway.project.return_value = None
    with pytest.raises(SourceError, match="project 'missing' not found.*--project-id"):
        KiliProject(gateway, "missing")


def test_list_assets_counts_skips(gateway):
    gateway.iter_assets.return_value = iter([
        {"id": "a1", "content": "u1", "labels": [label("DEFAULT", "1", "CAT")]},
        {"id": "a2", "content": "u2", "labels": [label("DEFAULT", "1", "CAT"), label("REVIEW", "2", None)]},
        {"id": "a3", "content": "u3", "labels": []},
        {"id": "a4", "content": "u4", "labels": [label("PREDICTION", "1", "DOG")]},
    ])
    project = KiliProject(gateway, "p1")
    assets = list(project.list_assets())
    assert [(asset.asset_id, asset.label) for asset in assets] == [("a1", "CAT")]
    assert project.read_summary.skipped == {SKIP_EMPTY_RESPONSE: 1, SKIP_NO_LABEL: 2}


def test_asset_fields_follow_workflow_version(gateway):
    gateway.project.return_value["workflowVersion"] = "V2"
    gateway.iter_assets.return_value = iter([])
    list(KiliProject(gateway, "p1").list_assets())
    fields = gateway.iter_assets.call_args.args[1]
    assert "currentStep.status" in fields
    assert "status" not in fields


def test_write_merges_and_keeps_foreign_keys(gateway):
    gateway.iter_assets.return_value = iter([
        {"id": "a1", "jsonMetadata": {"customer": "x", PREFIX + "score": 0.5}, "labels": [label("DEFAULT", "1", label_id="l1")]},
        {"id": "a2", "jsonMetadata": {}, "labels": [label("DEFAULT", "1", label_id="l2")]},
    ])
    project = KiliProject(gateway, "p1")
    summary = project.write_results([
        AssetResult("a1", ours(0.05, True), 90),
        AssetResult("a2", ours(0.95, False, suggested="CAT"), 2),
    ])
    asset_ids, metadatas = gateway.update_metadata.call_args.args
    assert asset_ids == ["a1", "a2"]
    assert metadatas[0] == {"customer": "x", **ours(0.05, True)}
    assert metadatas[1] == ours(0.95, False, suggested="CAT")
    assert summary.written == 2
    gateway.set_priority.assert_called_once_with("p1", 90, ["a1"])
    gateway.add_to_review.assert_not_called()
    gateway.create_issues.assert_not_called()
    declared = gateway.set_metadata_properties.call_args.args[1]
    assert declared[PREFIX + "score"]["type"] == "number"


def test_write_unchanged_sends_nothing(gateway):
    gateway.iter_assets.return_value = iter([
        {"id": "a1", "jsonMetadata": {"customer": "x", **ours(0.05, True, scored_at="old")}, "labels": []},
    ])
    project = KiliProject(gateway, "p1", send_to_review=True, create_issues=True)
    summary = project.write_results([AssetResult("a1", ours(0.05, True, scored_at="new"), 90)])
    assert (summary.written, summary.unchanged) == (0, 1)
    gateway.update_metadata.assert_not_called()
    gateway.set_priority.assert_not_called()
    gateway.add_to_review.assert_not_called()
    gateway.create_issues.assert_not_called()


def test_dry_run_writes_nothing(gateway, capsys):
    gateway.iter_assets.return_value = iter([{"id": "a1", "jsonMetadata": {}, "labels": []}])
    project = KiliProject(gateway, "p1", send_to_review=True)
    summary = project.write_results([AssetResult("a1", ours(0.05, True), 90)], dry_run=True)
    assert summary.written == 1
    assert summary.dry_run
    gateway.update_metadata.assert_not_called()
    gateway.set_priority.assert_not_called()
    gateway.add_to_review.assert_not_called()
    gateway.set_metadata_properties.assert_not_called()
    output = capsys.readouterr().out
    assert "a1: score 0.05, suggested DOG, priority 90" in output
    assert "nothing was written" in output


def test_review_and_issue_for_newly_flagged(gateway):
    gateway.iter_assets.side_effect = [
        iter([{"id": "a1", "content": "u", "jsonMetadata": {}, "labels": [label("DEFAULT", "1", "CAT", label_id="l1")]}]),
        iter([{"id": "a1", "jsonMetadata": {}, "labels": [label("DEFAULT", "1", "CAT", label_id="l1")]}]),
    ]
    gateway.add_to_review.return_value = {"succeeded": [], "declined": [{"assetId": "a1", "externalId": "e1"}], "failed": []}
    project = KiliProject(gateway, "p1", send_to_review=True, create_issues=True)
    list(project.list_assets())
    summary = project.write_results([AssetResult("a1", ours(0.05, True), 90)])
    gateway.add_to_review.assert_called_once_with("p1", ["a1"])
    label_ids, texts = gateway.create_issues.call_args.args[1:]
    assert label_ids == ["l1"]
    assert "expects Dog instead of Cat" in texts[0]
    assert "0.05" in texts[0]
    assert project.outcomes["review_declined"] == 1
    assert project.outcomes["issues_created"] == 1
    assert any("declined review for 1 assets" in error for error in summary.errors)


def test_unflagged_again_resets_priority(gateway):
    gateway.iter_assets.return_value = iter([{"id": "a1", "jsonMetadata": ours(0.05, True), "labels": []}])
    project = KiliProject(gateway, "p1")
    project.write_results([AssetResult("a1", ours(0.9, False), 3)])
    gateway.set_priority.assert_called_once_with("p1", 0, ["a1"])


def test_failed_metadata_batch_is_counted(gateway):
    gateway.iter_assets.return_value = iter([{"id": "a1", "jsonMetadata": {}, "labels": []}])
    gateway.update_metadata.side_effect = KiliApiError("Kili rejected the metadata update of 1 assets: boom")
    project = KiliProject(gateway, "p1")
    summary = project.write_results([AssetResult("a1", ours(0.05, True), 90)])
    assert (summary.written, summary.failed) == (0, 1)
    assert "boom" in summary.errors[0]
    gateway.set_priority.assert_not_called()


def test_clear_removes_only_own_keys(gateway):
    gateway.iter_assets.return_value = iter([
        {"id": "a1", "jsonMetadata": {"customer": "x", **ours(0.1, True)}, "labels": []},
        {"id": "a2", "jsonMetadata": {"customer": "y"}, "labels": []},
    ])
    project = KiliProject(gateway, "p1")
    assert project.clear_results() == 1
    gateway.update_metadata.assert_called_once_with(["a1"], [{"customer": "x"}])


def test_downloader_sends_key_only_to_kili_host():
    downloader = ImageDownloader("https://kili.example/api/label/v2/graphql", "secret")
    assert downloader.is_trusted("https://kili.example/api/label/v2/files?id=1")
    assert not downloader.is_trusted("https://bucket.example/image.png")
    assert not downloader.is_trusted("http://kili.example/api/label/v2/files?id=1")
    assert not downloader.is_trusted("https://kili.example.evil.test/files?id=1")


def test_transient_error_kinds():
    import requests

    def http_error(status: int) -> requests.HTTPError:
        response = requests.Response()
        response.status_code = status
        return requests.HTTPError(response=response)

    assert is_transient(http_error(503))
    assert is_transient(http_error(429))
    assert not is_transient(http_error(404))
    assert not is_transient(http_error(401))
    assert is_transient(requests.ConnectionError())


def test_new_model_version_alone_writes_nothing(gateway):
    gateway.iter_assets.return_value = iter([{"id": "a1", "jsonMetadata": ours(0.05, True, version="v0001"), "labels": []}])
    project = KiliProject(gateway, "p1")
    summary = project.write_results([AssetResult("a1", ours(0.05, True, version="v0002", scored_at="t2"), 90)])
    assert (summary.written, summary.unchanged) == (0, 1)
    gateway.update_metadata.assert_not_called()
