"""Contract tests: the real ``kili`` SDK against the fake Kili server on 127.0.0.1."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from training.cli import main
from training.sources.base import AssetResult, SourceError
from training.sources.kili import SKIP_EMPTY_RESPONSE, KiliProject
from training.sources.kili_gateway import KiliGateway

PREFIX = "label_error_"


def radio_job(categories=("CAT", "DOG")) -> dict:
    return {
        "mlTask": "CLASSIFICATION", "isChild": False, "required": 1,
        "content": {"input": "radio", "categories": {key: {"name": key.title(), "children": []} for key in categories}},
    }


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value % 256).save(buffer, "PNG")
    return buffer.getvalue()


def ours(score: float, flagged: bool, suggested: str = "DOG") -> dict:
    return {
        PREFIX + "score": score, PREFIX + "flagged": flagged, PREFIX + "suggested_label": suggested,
        PREFIX + "model_version": "v0001", PREFIX + "scored_at": "2026-01-01T00:00:00+00:00", PREFIX + "status": "scored",
    }


def add_pets(server, count: int, project_id: str = "p1", **project) -> None:
    server.add_project(project_id, {"jobs": {"JOB_0": radio_job()}}, **project)
    for index in range(count):
        server.add_asset(
            project_id, f"a{index:03d}", image=png(index),
            labels=[server.label("JOB_0", "CAT" if index % 2 else "DOG")],
            metadata={"customer_tag": f"batch-{index}"},
        )


def open_project(server, project_id: str = "p1", tmp_path=None, **kwargs) -> KiliProject:
    gateway = KiliGateway(api_key="test-key", api_endpoint=server.endpoint)
    return KiliProject(gateway, project_id, cache_dir=tmp_path / "cache" if tmp_path else None, **kwargs)


def test_paging_past_100_assets(fake_kili, tmp_path):
    add_pets(fake_kili, 130)
    project = open_project(fake_kili, tmp_path=tmp_path)
    assets = list(project.list_assets())
    assert len(assets) == 130
    assert {asset.asset_id for asset in assets} == set(fake_kili.assets)
    pages = fake_kili.calls("assets")
    assert len(pages) >= 2
    assert pages[-1]["skip"] > 0


def test_empty_json_response_is_counted(fake_kili, tmp_path):
    add_pets(fake_kili, 4)
    fake_kili.assets["a001"].labels.append(fake_kili.label(None, None, label_type="REVIEW", minutes=5))
    fake_kili.assets["a002"].labels = [fake_kili.label("JOB_0", "CAT", label_type="PREDICTION")]
    project = open_project(fake_kili, tmp_path=tmp_path)
    assets = list(project.list_assets())
    assert sorted(asset.asset_id for asset in assets) == ["a000", "a003"]
    assert project.read_summary.skipped[SKIP_EMPTY_RESPONSE] == 1
    assert sum(project.read_summary.skipped.values()) == 2


def test_workflow_v2_project_lists_assets(fake_kili, tmp_path):
    add_pets(fake_kili, 3, workflow_version="V2")
    project = open_project(fake_kili, tmp_path=tmp_path)
    assert len(list(project.list_assets())) == 3
    assets_queries = [query for name, query in fake_kili.queries if name == "assets"]
    assert assets_queries
    assert all("currentStep" in query for query in assets_queries)


def test_graphql_transient_503_then_success(fake_kili, tmp_path):
    add_pets(fake_kili, 3)
    project = open_project(fake_kili, tmp_path=tmp_path)
    fake_kili.fail_next("assets", status=503, times=1)
    assert len(list(project.list_assets())) == 3
    assert fake_kili.pending_failures() == 0


def test_image_transient_503_then_success(fake_kili, tmp_path):
    add_pets(fake_kili, 1)
    project = open_project(fake_kili, tmp_path=tmp_path)
    asset = next(project.list_assets())
    fake_kili.fail_next("files", status=503, times=1)
    assert project.read_image(asset) == png(0)
    assert [method for method, _, _ in fake_kili.file_requests] == ["GET", "GET"]


def test_image_cached_by_asset_and_content(fake_kili, tmp_path):
    add_pets(fake_kili, 1)
    project = open_project(fake_kili, tmp_path=tmp_path)
    asset = next(project.list_assets())
    project.read_image(asset)
    project.read_image(asset)
    assert len(fake_kili.file_requests) == 1
    fake_kili.files["file-new"] = (png(200), "image/png")
    fake_kili.assets["a000"].content = f"{fake_kili.base_url}/api/label/v2/files?id=file-new"
    changed = next(project.list_assets())
    assert project.read_image(changed) == png(200)
    assert len(fake_kili.file_requests) == 2


def test_api_key_not_sent_to_other_hosts(fake_kili, tmp_path):
    add_pets(fake_kili, 1)
    # Same server under another host name: it must not receive the key.
    other_host = fake_kili.base_url.replace("127.0.0.1", "localhost")
    fake_kili.assets["a000"].content = f"{other_host}/api/label/v2/files?id=file-a000"
    project = open_project(fake_kili, tmp_path=tmp_path)
    asset = next(project.list_assets())
    with pytest.raises(OSError, match="HTTP 401"):
        project.read_image(asset)
    assert fake_kili.file_requests == [("GET", "file-a000", False)]


def test_graphql_error_is_a_clear_message(fake_kili):
    add_pets(fake_kili, 1)
    fake_kili.graphql_error_next("projects", "Something broke in the resolver")
    with pytest.raises(SourceError, match="Kili rejected the read of project 'p1'.*Something broke"):
        open_project(fake_kili)
    assert fake_kili.pending_failures() == 0


def test_write_merges_and_keeps_foreign_keys(fake_kili, tmp_path):
    add_pets(fake_kili, 3)
    fake_kili.assets["a001"].metadata[PREFIX + "score"] = 0.5
    project = open_project(fake_kili, tmp_path=tmp_path)
    list(project.list_assets())
    summary = project.write_results([
        AssetResult("a001", ours(0.02, True), 95),
        AssetResult("a002", ours(0.97, False, suggested="DOG"), 1),
    ])
    assert summary.written == 2
    assert fake_kili.assets["a001"].metadata == {"customer_tag": "batch-1", **ours(0.02, True)}
    assert fake_kili.assets["a002"].metadata == {"customer_tag": "batch-2", **ours(0.97, False)}
    assert fake_kili.assets["a000"].metadata == {"customer_tag": "batch-0"}
    assert fake_kili.assets["a001"].priority == 95
    assert fake_kili.assets["a002"].priority == 0
    assert fake_kili.projects["p1"].metadata_properties[PREFIX + "score"]["type"] == "number"
    rerun = project.write_results([AssetResult("a001", ours(0.02, True), 95)])
    assert (rerun.written, rerun.unchanged) == (0, 1)
    assert len(fake_kili.calls("updatePropertiesInAssets")) == 1


def test_review_issues_and_declined(fake_kili, tmp_path):
    add_pets(fake_kili, 3)
    fake_kili.declined.add("a002")
    project = open_project(fake_kili, tmp_path=tmp_path, send_to_review=True, create_issues=True)
    list(project.list_assets())
    project.write_results([AssetResult("a001", ours(0.02, True), 95), AssetResult("a002", ours(0.03, True, "CAT"), 94)])
    assert fake_kili.reviewed == ["a001"]
    assert project.outcomes["review_declined"] == 1
    assert project.outcomes["priority_declined"] == 1
    label_ids = [issue["labelID"] for issue in fake_kili.issues]
    assert label_ids == [fake_kili.assets["a001"].labels[0].id, fake_kili.assets["a002"].labels[0].id]
    assert "expects Dog instead of Cat" in fake_kili.issues[0]["text"]


def test_clear_keeps_foreign_keys(fake_kili, tmp_path):
    add_pets(fake_kili, 2)
    fake_kili.assets["a000"].metadata.update(ours(0.1, True))
    code = main(["clear", "--project-id", "p1", "--api-endpoint", fake_kili.endpoint])
    assert code == 0
    assert fake_kili.assets["a000"].metadata == {"customer_tag": "batch-0"}
    assert fake_kili.assets["a001"].metadata == {"customer_tag": "batch-1"}


# Bad input: one clear message, exit code 2, nothing written --------------------


def run_train(tmp_path, *extra: str) -> int:
    return main(["train", "--project-id", "p1", "--output", str(tmp_path / "out"), "--no-progress", *extra])


def assert_nothing_written(server) -> None:
    written = {"updatePropertiesInAssets", "setAssetsPriority", "addAssetsToReview", "createIssues", "updatePropertiesInProject"}
    assert [name for name, _ in server.requests if name in written] == []


@pytest.mark.parametrize(
    ("setup", "arguments", "expected"),
    [
        ("no_key", [], "missing Kili API key.*--api-key"),
        ("bad_key", ["--api-key", "wrong-key"], "API key was rejected.*--api-key"),
        ("none", ["--project-id", "nope"], "project 'nope' not found.*--project-id"),
        ("text_project", [], "input type 'TEXT'.*only IMAGE"),
        ("two_jobs", [], "several single-choice classification jobs: JOB_0 \\(radio\\), JOB_1 \\(radio\\).*--job"),
        ("two_jobs", ["--job", "JOB_9"], "'JOB_9' is not a classification job.*JOB_0 \\(radio\\), JOB_1"),
        ("unknown_category", [], "category 'BIRD', which job 'JOB_0' does not define.*Fix the label"),
    ],
)
def test_bad_input_message(fake_kili, tmp_path, monkeypatch, capsys, setup, arguments, expected):
    import re

    add_pets(fake_kili, 4)
    if setup == "no_key":
        monkeypatch.delenv("KILI_API_KEY")
    elif setup == "text_project":
        fake_kili.projects["p1"].input_type = "TEXT"
    elif setup == "two_jobs":
        fake_kili.projects["p1"].json_interface = {"jobs": {"JOB_0": radio_job(), "JOB_1": radio_job(("SMALL", "BIG"))}}
    elif setup == "unknown_category":
        fake_kili.assets["a002"].labels = [fake_kili.label("JOB_0", "BIRD")]
    code = run_train(tmp_path, *arguments)
    error = capsys.readouterr().err
    assert code == 2
    assert re.search(expected, error), error
    assert error.count("error:") == 1
    assert "test-key" not in error
    assert "wrong-key" not in error
    assert_nothing_written(fake_kili)


def test_two_jobs_with_job_option(fake_kili, tmp_path):
    add_pets(fake_kili, 2)
    fake_kili.projects["p1"].json_interface = {"jobs": {"JOB_0": radio_job(), "JOB_1": radio_job(("SMALL", "BIG"))}}
    for asset in fake_kili.assets.values():
        asset.labels[0].json_response["JOB_1"] = {"categories": [{"name": "BIG", "confidence": 100}]}
    project = open_project(fake_kili, tmp_path=tmp_path, job="JOB_1")
    assert project.classes() == ["SMALL", "BIG"]
    assert project.class_display_names() == {"SMALL": "Small", "BIG": "Big"}
    assert [asset.label for asset in project.list_assets()] == ["BIG", "BIG"]
