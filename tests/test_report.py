"""Tests of the HTML review report, in Python and in a real headless Chromium."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.cli import main
from training.pipeline import TrainConfig, train
from training.report import ReportError, render_report
from training.sources.base import Asset, ProjectSource, WriteSummary
from training.sources.local import LocalProject

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
)
SCRIPT_CLASS = "<script>document.body.setAttribute('data-injected','class')</script>"
IMG_ASSET_ID = "<img src=x onerror=\"document.body.setAttribute('data-injected','asset')\">"


# Helpers ------------------------------------------------------------------------


def write_version(folder: Path, classes: list[str], rows: list[dict], *, assets: int | None = None,
                  display_names: dict[str, str] | None = None) -> Path:
    """Write a minimal version folder by hand: manifest, label_issues.csv and out_of_fold.npz."""
    folder.mkdir(parents=True)
    count = assets if assets is not None else len(rows)
    metrics = {
        "source": "hand-made project", "mode": "linear", "assets": count,
        "flagged": sum(1 for row in rows if row["is_issue"]), "failed_images": 0, "skipped_labels": {},
        "excluded_classes": [], "cv_accuracy": 0.9, "filter_by": "prune_by_noise_rate",
        "estimated_noise_per_class": {name: 0.05 * (index + 1) for index, name in enumerate(classes)},
        "seconds": 1.5,
    }
    manifest = {
        "format": 1, "version": folder.name, "created_at": "2026-01-01T00:00:00+00:00",
        "source": "hand-made project", "mode": "linear", "classes": classes,
        "class_display_names": display_names or {name: name for name in classes}, "metrics": metrics,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with open(folder / "label_issues.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["asset_id", "given_label", "suggested_label", "score", "is_issue", "rank"])
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    labels = np.array([classes.index(row["given_label"]) for row in rows], dtype=np.int64)
    np.savez_compressed(
        folder / "out_of_fold.npz", asset_ids=np.array([row["asset_id"] for row in rows]), labels=labels,
        pred_probs=np.full((len(rows), len(classes)), 1 / len(classes)), folds=np.zeros(len(rows), dtype=np.int64),
    )
    return folder


class SuspectRowCounter(HTMLParser):
    """Count the <tr class="suspect"> rows of a page and record the page's text."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0
        self.text: list[str] = []
        self.body_attributes: dict[str, str | None] = {}

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "tr" and attributes.get("class") == "suspect":
            self.rows += 1
        if tag == "body":
            self.body_attributes = attributes

    def handle_data(self, data):
        self.text.append(data)


def chromium(*arguments: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        return subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", *arguments],
            capture_output=True, text=True, timeout=180, check=True,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def dump_dom(report: Path) -> SuspectRowCounter:
    parser = SuspectRowCounter()
    parser.feed(chromium("--dump-dom", report.as_uri()).stdout)
    return parser


def embedded_rows(report: Path) -> list[dict]:
    match = re.search(r"<script type='application/json' id='suspect-data'>(.*?)</script>", report.read_text(encoding="utf-8"), re.S)
    return json.loads(match.group(1))["rows"] if match else []


# Fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """Train on 3 digit classes x 30 images with 3 labels per class moved to the next class."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    project = root / "project"
    digits = load_digits()
    per_class: dict[int, int] = {}
    for pixels, target in zip(digits.images, digits.target):
        target = int(target)
        if target > 2 or per_class.get(target, 0) >= 30:
            continue
        per_class[target] = per_class.get(target, 0) + 1
        given = (target + 1) % 3 if per_class[target] <= 3 else target
        folder = project / str(given)
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((pixels * 16).clip(0, 255).astype(np.uint8)).resize((32, 32))
        image.save(folder / f"digit{target}_{per_class[target]}.png")

    source = LocalProject(project)
    config = TrainConfig(models_dir=root / "models", folds=3, workers=2, progress=False, write_results=False)
    result = train(source, config)
    return source, result


# Rendering ----------------------------------------------------------------------


def test_report_digits_run(digits_run, tmp_path):
    source, result = digits_run
    flagged = result.summary["flagged"]
    report = render_report(result.version_dir, source=source, output=tmp_path / "report.html")
    document = report.read_text(encoding="utf-8")
    rows = embedded_rows(report)

    assert flagged > 0, "the flipped digits should give at least one suspect"
    assert len(rows) == flagged
    assert [row["rank"] for row in rows] == sorted(row["rank"] for row in rows)
    assert all(row["thumb"].startswith("data:image/jpeg;base64,") for row in rows)
    assert f"{result.summary['assets']}" in document
    assert result.version_dir.name in document
    assert document.count("data:image/png;base64,") == 2  # heat map and noise bars
    assert "http://" not in document.replace("http://www.w3.org", "")  # no external resource


def test_report_default_output_in_version(digits_run):
    _, result = digits_run
    report = render_report(result.version_dir, thumbnails=False)
    assert report == result.version_dir / "report.html"
    assert "No thumbnails" not in report.read_text(encoding="utf-8")


def test_report_without_source_notes(digits_run, tmp_path):
    _, result = digits_run
    report = render_report(result.version_dir, output=tmp_path / "report.html")
    assert "No thumbnails: the report was made without the project" in report.read_text(encoding="utf-8")
    assert all(row["thumb"] is None for row in embedded_rows(report))


def test_report_thumbnail_cap(digits_run, tmp_path):
    source, result = digits_run
    report = render_report(result.version_dir, source=source, output=tmp_path / "report.html", max_thumbnails=1)
    rows = embedded_rows(report)
    assert sum(1 for row in rows if row["thumb"]) == min(1, len(rows))
    if len(rows) > 1:
        assert f"first 1 of {len(rows)} suspects" in report.read_text(encoding="utf-8")


def test_report_thumbnail_size(digits_run, tmp_path):
    import base64
    import io

    source, result = digits_run
    report = render_report(result.version_dir, source=source, output=tmp_path / "report.html", thumbnail_px=16)
    first = embedded_rows(report)[0]["thumb"].split(",", 1)[1]
    image = Image.open(io.BytesIO(base64.b64decode(first)))
    assert max(image.size) <= 16


def test_report_empty_result(tmp_path):
    rows = [
        {"asset_id": f"a{index}", "given_label": "cat", "suggested_label": "cat", "score": "0.9", "is_issue": "False", "rank": index + 1}
        for index in range(3)
    ]
    version = write_version(tmp_path / "v0001", ["cat", "dog"], rows)
    report = render_report(version)
    document = report.read_text(encoding="utf-8")
    assert "No suspects: cleanlab flagged no asset" in document
    assert "id='suspect-data'" not in document
    assert embedded_rows(report) == []


def test_report_escapes_labels_and_ids(tmp_path):
    rows = [{"asset_id": IMG_ASSET_ID, "given_label": SCRIPT_CLASS, "suggested_label": "dog & co",
             "score": "0.01", "is_issue": "True", "rank": 1}]
    version = write_version(tmp_path / "v0001", [SCRIPT_CLASS, "dog & co"], rows)
    document = render_report(version).read_text(encoding="utf-8")
    assert SCRIPT_CLASS not in document
    assert IMG_ASSET_ID not in document
    assert document.count("<script") == 2  # the JSON data block and the page script
    assert "&lt;script&gt;" in document


def test_report_links_only_http(tmp_path):
    class LinkedSource(ProjectSource):
        name = "linked"

        def classes(self):
            return ["cat", "dog"]

        def list_assets(self):
            return iter([Asset("good", "cat"), Asset("bad", "cat")])

        def read_image(self, asset):
            raise OSError("no image in this test")

        def read_results(self, asset_ids=None):
            return {}

        def write_results(self, results, *, dry_run=False):
            return WriteSummary()

        def asset_url(self, asset_id):
            if asset_id == "good":
                return "https://cloud.kili-technology.com/label/projects/p1/explore?asset=good"
            return "javascript:alert(1)"

    rows = [{"asset_id": asset_id, "given_label": "cat", "suggested_label": "dog", "score": "0.1",
             "is_issue": "True", "rank": rank} for rank, asset_id in enumerate(["good", "bad"], start=1)]
    version = write_version(tmp_path / "v0001", ["cat", "dog"], rows)
    report = render_report(version, source=LinkedSource())
    urls = {row["id"]: row["url"] for row in embedded_rows(report)}
    assert urls["good"] == "https://cloud.kili-technology.com/label/projects/p1/explore?asset=good"
    assert urls["bad"] is None
    assert "2 images could not be read" in report.read_text(encoding="utf-8")


def test_report_missing_manifest(tmp_path):
    with pytest.raises(ReportError, match="no manifest.json"):
        render_report(tmp_path)


def test_report_invalid_thumbnail_size(tmp_path):
    with pytest.raises(ValueError, match="invalid thumbnail size 5"):
        render_report(tmp_path, thumbnail_px=5)


def kili_digits_version(server, folder: Path, flagged: int) -> tuple[Path, list[str]]:
    """Add a fake Kili digits project and a hand-made version that flags its first assets."""
    from fake_kili import add_digits_project

    truth = add_digits_project(server, "digits", count=12)
    classes = [f"D{digit}" for digit in range(10)]
    rows = []
    for rank, (asset_id, (_, given)) in enumerate(sorted(truth.items()), start=1):
        suggested = "D9" if given != "D9" else "D8"
        rows.append({"asset_id": asset_id, "given_label": given, "suggested_label": suggested,
                     "score": f"{rank / 100:.6f}", "is_issue": str(rank <= flagged), "rank": rank})
    display_names = {name: name[1:] for name in classes}
    version = write_version(folder / "versions" / "v0001", classes, rows, display_names=display_names)
    (folder / "CURRENT").write_text("v0001\n", encoding="utf-8")
    return version, [row["asset_id"] for row in rows[:flagged]]


def test_report_kili_links_and_thumbnails(fake_kili, tmp_path):
    from training.sources.kili import KiliProject
    from training.sources.kili_gateway import KiliGateway

    version, flagged_ids = kili_digits_version(fake_kili, tmp_path / "models", flagged=4)
    gateway = KiliGateway(api_key="test-key", api_endpoint=fake_kili.endpoint)
    project = KiliProject(gateway, "digits", cache_dir=tmp_path / "cache")
    rows = embedded_rows(render_report(version, source=project))

    assert [row["id"] for row in rows] == flagged_ids
    for row in rows:
        assert row["url"] == project.asset_url(row["id"])
        assert row["url"].startswith(fake_kili.base_url)
        assert row["thumb"].startswith("data:image/jpeg;base64,")
        assert row["given"].endswith(")")  # display name with the category key, e.g. "3 (D3)"
    assert rows[0]["suggested"] == "9 (D9)"


def test_cli_report_kili_project(fake_kili, tmp_path, capsys):
    models_dir = tmp_path / "models"
    _, flagged_ids = kili_digits_version(fake_kili, models_dir, flagged=3)
    output = tmp_path / "kili.html"
    assert main(["report", "--models-dir", str(models_dir), "--project-id", "digits", "--output", str(output)]) == 0
    assert f"Report: {output}" in capsys.readouterr().out
    rows = embedded_rows(output)
    assert [row["id"] for row in rows] == flagged_ids
    assert all(row["thumb"] for row in rows)
    assert all(row["url"].startswith(fake_kili.base_url) for row in rows)


# Command line -------------------------------------------------------------------


def test_cli_report_current_version(digits_run, tmp_path, capsys):
    _, result = digits_run
    models_dir = result.version_dir.parent.parent
    output = tmp_path / "cli.html"
    assert main(["report", "--models-dir", str(models_dir), "--output", str(output), "--no-thumbnails"]) == 0
    assert f"Report: {output}" in capsys.readouterr().out
    assert len(embedded_rows(output)) == result.summary["flagged"]


def test_cli_train_with_report(digits_run, tmp_path, capsys):
    source, result = digits_run
    cache = result.version_dir.parent.parent / "cache"  # reuse the fixture's features and heads
    models_dir = tmp_path / "models"
    arguments = ["train", "--data", str(source.path), "--output", str(models_dir), "--cache-dir", str(cache),
                 "--folds", "3", "--workers", "2", "--no-progress", "--no-write", "--report"]
    assert main(arguments) == 0
    report = models_dir / "versions" / "v0001" / "report.html"
    assert f"Report:             {report}" in capsys.readouterr().out
    assert len(embedded_rows(report)) == result.summary["flagged"]


def test_cli_report_unknown_version(digits_run, capsys):
    _, result = digits_run
    models_dir = result.version_dir.parent.parent
    assert main(["report", "--models-dir", str(models_dir), "--version", "v9999"]) == 2
    assert "version 'v9999' not found" in capsys.readouterr().err


def test_cli_report_empty_models_dir(tmp_path, capsys):
    assert main(["report", "--models-dir", str(tmp_path)]) == 2
    assert "no model version" in capsys.readouterr().err


# Headless browser ---------------------------------------------------------------


@needs_chromium
def test_browser_rows_equal_flagged(digits_run, tmp_path):
    source, result = digits_run
    flagged = result.summary["flagged"]
    report = render_report(result.version_dir, source=source, output=tmp_path / "report.html", page_size=flagged + 10)
    page = dump_dom(report)
    assert page.rows == flagged


@needs_chromium
def test_browser_pages_rows(digits_run, tmp_path):
    source, result = digits_run
    flagged = result.summary["flagged"]
    report = render_report(result.version_dir, source=source, output=tmp_path / "report.html", page_size=2)
    page = dump_dom(report)
    assert page.rows == min(2, flagged)
    assert f"Page 1 of {(flagged + 1) // 2} ({flagged} rows)" in "".join(page.text)


@needs_chromium
def test_browser_empty_result(tmp_path):
    rows = [{"asset_id": "a1", "given_label": "cat", "suggested_label": "cat", "score": "0.9", "is_issue": "False", "rank": 1}]
    report = render_report(write_version(tmp_path / "v0001", ["cat", "dog"], rows))
    page = dump_dom(report)
    assert page.rows == 0
    assert "No suspects" in "".join(page.text)


@needs_chromium
def test_browser_script_category_not_run(tmp_path):
    rows = [{"asset_id": IMG_ASSET_ID, "given_label": SCRIPT_CLASS, "suggested_label": "dog",
             "score": "0.01", "is_issue": "True", "rank": 1}]
    report = render_report(write_version(tmp_path / "v0001", [SCRIPT_CLASS, "dog"], rows))
    page = dump_dom(report)
    text = "".join(page.text)
    assert "data-injected" not in page.body_attributes
    assert page.rows == 1
    assert SCRIPT_CLASS in text  # shown as text
    assert IMG_ASSET_ID in text


@needs_chromium
def test_browser_screenshot(digits_run, tmp_path):
    source, result = digits_run
    report = render_report(result.version_dir, source=source, output=tmp_path / "report.html")
    screenshot = tmp_path / "report.png"
    chromium(f"--screenshot={screenshot}", "--window-size=1280,2000", report.as_uri())
    data = screenshot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000
    with Image.open(screenshot) as image:
        assert image.size == (1280, 2000)
