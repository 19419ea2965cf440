"""`kili-label-errors deploy` (webhook and hosted plugin) and the PluginHandler, against the fake Kili server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import DIGITS_COUNT, DIGITS_PROJECT, FAKE_API_KEY
from fake_kili import add_digits_project
from plugin_helpers import PREFIX, SECRET, stable

from training.cli import main

URL = "http://127.0.0.1:9/webhook"


@pytest.fixture
def config_path(fake_kili, trained_digits, tmp_path, monkeypatch):
    add_digits_project(fake_kili, DIGITS_PROJECT, count=DIGITS_COUNT, noise=0.1, seed=0)
    monkeypatch.setenv("KLE_TEST_SECRET", SECRET)
    path = tmp_path / "plugin_config.json"
    path.write_text(json.dumps({
        "project_id": DIGITS_PROJECT, "models_dir": str(trained_digits["models_dir"]),
        "inbox_path": str(tmp_path / "inbox.sqlite"), "providers": ["CPUExecutionProvider"],
        "secret_env": "KLE_TEST_SECRET",
    }))
    return path


def test_deploy_creates_then_updates_webhook(fake_kili, config_path, capsys, caplog):
    created = main(["deploy", "--config", str(config_path), "--url", URL, "--plugin-name", "kle"])
    first = capsys.readouterr().out
    updated = main(["deploy", "--config", str(config_path), "--url", URL + "2", "--plugin-name", "kle"])
    second = capsys.readouterr().out

    plugin = fake_kili.plugins["kle"]
    assert created == 0
    assert updated == 0
    assert "webhook kle created" in first
    assert "activated on project digits" in first
    assert "webhook kle updated" in second
    assert "already active" in second
    assert plugin["kind"] == "webhook"
    assert plugin["webhookUrl"] == URL + "2"
    assert plugin["header"] == SECRET
    assert plugin["handlerTypes"] == ["onSubmit", "onReview"]
    assert plugin["projectIds"] == [DIGITS_PROJECT]
    assert SECRET not in first + second + caplog.text


def test_deploy_without_secret_fails(fake_kili, config_path, monkeypatch, capsys):
    monkeypatch.delenv("KLE_TEST_SECRET")

    code = main(["deploy", "--config", str(config_path), "--url", URL])

    assert code == 2
    assert "KLE_TEST_SECRET" in capsys.readouterr().err
    assert fake_kili.plugins == {}


def test_serve_without_secret_fails(config_path, monkeypatch, capsys):
    monkeypatch.delenv("KLE_TEST_SECRET")

    code = main(["serve", "--config", str(config_path)])

    assert code == 2
    assert "environment variable KLE_TEST_SECRET" in capsys.readouterr().err


def test_hosted_bundle_uploaded_and_runs(fake_kili, config_path, trained_digits, tmp_path, mocker):
    mocker.patch("kili.services.plugins.upload.time.sleep")  # the SDK polls the build status every 15 s
    bundle = tmp_path / "bundle"

    code = main(["deploy", "--config", str(config_path), "--hosted", "--plugin-name", "kle-hosted",
                 "--bundle-dir", str(bundle)])

    plugin = fake_kili.plugins["kle-hosted"]
    assert code == 0
    assert plugin["kind"] == "hosted"
    assert plugin["handlerTypes"] == ["onSubmit", "onReview"]
    assert plugin["projectIds"] == [DIGITS_PROJECT]
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(__import__("io").BytesIO(plugin["archive"])) as archive:
        names = set(archive.namelist())
        archive.extractall(unpacked)
    assert {"main.py", "requirements.txt", "plugin/bundled_model.py", "plugin/bundled_config.py",
            "plugin/worker.py", "training/sources/kili.py"} <= names
    assert all(name.endswith(".py") or name == "requirements.txt" for name in names)

    # Run the uploaded code as Kili would: from the unpacked folder, with no configuration file around.
    asset_id = "digit-0006"
    label = fake_kili.assets[asset_id].labels[0]
    script = (
        "import json, os, sys\n"
        "from kili.client import Kili\n"
        "import main, plugin\n"
        "assert plugin.__file__.startswith(os.getcwd()), plugin.__file__\n"
        "kili = Kili(api_key=os.environ['KILI_API_KEY'], api_endpoint=os.environ['KILI_API_ENDPOINT'])\n"
        f"label = {{'id': {label.id!r}, 'jsonResponse': {json.dumps(label.json_response)}, 'labelType': 'DEFAULT'}}\n"
        f"main.PluginHandler(kili, {DIGITS_PROJECT!r}).on_submit(label=label, asset_id={asset_id!r})\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment.pop("KILI_LABEL_ERRORS_CONFIG", None)
    run = subprocess.run([sys.executable, "-c", script], cwd=unpacked, env=environment,
                         capture_output=True, text=True, timeout=300)

    assert run.returncode == 0, run.stderr
    assert stable(fake_kili.assets[asset_id].metadata) == stable(trained_digits["metadata"][asset_id])


def test_hosted_without_model_fails(fake_kili, config_path, tmp_path, capsys):
    config = json.loads(config_path.read_text())
    config["models_dir"] = str(tmp_path / "empty")
    config_path.write_text(json.dumps(config))

    code = main(["deploy", "--config", str(config_path), "--hosted", "--bundle-dir", str(tmp_path / "bundle")])

    assert code == 2
    assert "no model version" in capsys.readouterr().err
    assert fake_kili.plugins == {}


def test_handler_on_submit_and_review(fake_kili, config_path, trained_digits, monkeypatch):
    from kili.client import Kili

    from plugin.main import PluginHandler

    monkeypatch.setenv("KILI_LABEL_ERRORS_CONFIG", str(config_path))
    kili = Kili(api_key=FAKE_API_KEY, api_endpoint=fake_kili.endpoint)
    handler = PluginHandler(kili, DIGITS_PROJECT)
    submitted, reviewed = "digit-0013", "digit-0014"

    handler.on_submit(label=_label(fake_kili, submitted), asset_id=submitted)
    handler.on_review(label=_label(fake_kili, reviewed), asset_id=reviewed)

    for asset_id in (submitted, reviewed):
        assert stable(fake_kili.assets[asset_id].metadata) == stable(trained_digits["metadata"][asset_id])
        assert fake_kili.assets[asset_id].priority == trained_digits["priority"][asset_id]


def test_handler_body_defines_handlers():
    import ast

    source = (Path(__file__).resolve().parent.parent / "plugin" / "main.py").read_text()
    handler = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef) and node.name == "PluginHandler")
    methods = {node.name for node in handler.body if isinstance(node, ast.FunctionDef)}

    assert {"on_submit", "on_review"} <= methods


def _label(server, asset_id: str) -> dict:
    label = server.assets[asset_id].labels[0]
    return {"id": label.id, "jsonResponse": label.json_response, "labelType": label.label_type}
