"""Validation of plugin_config.json: the example parses, and each bad value names its key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plugin.config import ConfigError, PriorityMapping, config_to_dict, load_config, parse_config
from plugin.metadata import Verdict, review_priority

REPO_ROOT = Path(__file__).resolve().parent.parent
VALID = {"project_id": "p1", "models_dir": "models"}


def test_example_file_parses():
    config = load_config(REPO_ROOT / "plugin_config.json")

    assert config.models_dir == REPO_ROOT / "label-errors"
    assert config.inbox_path == REPO_ROOT / "label-errors" / "inbox.sqlite"
    assert config.providers == ("auto",)
    assert config.secret_env == "KILI_LABEL_ERRORS_SECRET"
    assert config.priority == PriorityMapping()


def test_defaults_and_relative_paths(tmp_path):
    config = parse_config(VALID, tmp_path)

    assert config.models_dir == tmp_path / "models"
    assert config.inbox_path == tmp_path / "models" / "inbox.sqlite"
    assert config.no_model == "wait"
    assert config.job is None


def test_round_trip(tmp_path):
    config = parse_config({**VALID, "providers": ["CPUExecutionProvider"], "review": {"create_issues": True}}, tmp_path)

    assert parse_config(config_to_dict(config), tmp_path) == config


@pytest.mark.parametrize("change, key, expected", [
    ({"project_id": ""}, "project_id", "Kili project id"),
    ({"project_id": None}, "project_id", "Kili project id"),
    ({"models_dir": 3}, "models_dir", "non-empty path"),
    ({"job": ""}, "job", "single-choice classification job"),
    ({"key_prefix": "bad prefix!"}, "key_prefix", "letters, digits"),
    ({"thresholds": {"D0": 0.5}}, "thresholds", "model_version"),
    ({"priority": {"flagged_min": -1}}, "priority.flagged_min", "integer from 0"),
    ({"priority": {"flagged_min": 60, "flagged_max": 50}}, "priority.flagged_max", "at least priority.flagged_min"),
    ({"priority": {"unflagged_max": 80}}, "priority.unflagged_max", "below priority.flagged_min"),
    ({"priority": {"scale": 2}}, "priority", "only flagged_min"),
    ({"review": {"send_to_review": "yes"}}, "review.send_to_review", "true or false"),
    ({"review": {"review_all": True}}, "review", "only send_to_review"),
    ({"providers": ["TensorrtExecutionProvider"]}, "providers", "CUDAExecutionProvider"),
    ({"providers": []}, "providers", "non-empty list"),
    ({"secret_env": "s3cr3t value"}, "secret_env", "name of an environment variable"),
    ({"api_key_env": ""}, "api_key_env", "name of an environment variable"),
    ({"api_endpoint": "cloud.kili-technology.com"}, "api_endpoint", "http(s) GraphQL URL"),
    ({"no_model": "drop"}, "no_model", "\"wait\""),
    ({"max_batch_size": 0}, "max_batch_size", "integer from 1 to 1024"),
    ({"max_batch_size": True}, "max_batch_size", "integer from 1 to 1024"),
    ({"max_body_bytes": 10}, "max_body_bytes", "integer from 1024"),
    ({"download_workers": 100}, "download_workers", "integer from 1 to 64"),
    ({"retry": {"attempts": 0}}, "retry.attempts", "integer from 1 to 100"),
    ({"retry": {"max_wait_seconds": "long"}}, "retry.max_wait_seconds", "number from 0.0"),
    ({"listen": {"port": 70000}}, "listen.port", "integer from 0 to 65535"),
    ({"listen": {"host": ""}}, "listen.host", "interface address"),
    ({"secret": "abc"}, "(top level)", "known keys"),
])
def test_invalid_value_names_key(tmp_path, change, key, expected):
    with pytest.raises(ConfigError) as error:
        parse_config({**VALID, **change}, tmp_path)

    message = str(error.value)
    assert f'"{key}"' in message
    assert expected in message


def test_not_an_object(tmp_path):
    with pytest.raises(ConfigError, match="JSON object"):
        parse_config(["p1"], tmp_path)


def test_missing_and_invalid_files(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")

    with pytest.raises(ConfigError, match="not found: pass --config"):
        load_config(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(broken)


def test_error_names_the_file(tmp_path):
    path = tmp_path / "plugin_config.json"
    path.write_text(json.dumps({**VALID, "no_model": 1}))

    with pytest.raises(ConfigError, match=r"plugin_config\.json: .*\"no_model\""):
        load_config(path)


def test_secret_read_from_environment(tmp_path, monkeypatch):
    config = parse_config({**VALID, "secret_env": "KLE_SECRET_FOR_TEST"}, tmp_path)
    monkeypatch.delenv("KLE_SECRET_FOR_TEST", raising=False)

    with pytest.raises(ConfigError) as error:
        config.secret()
    monkeypatch.setenv("KLE_SECRET_FOR_TEST", "s3cret")

    assert "KLE_SECRET_FOR_TEST" in str(error.value)
    assert config.secret() == "s3cret"


@pytest.mark.parametrize("score", [0.0, 0.013, 0.2, 0.5, 0.77, 0.999, 1.0])
@pytest.mark.parametrize("flagged", [True, False])
def test_default_priority_equals_trainer(score, flagged):
    verdict = Verdict(score=score, flagged=flagged, suggested_label="D0", model_version="v0001")

    assert PriorityMapping().priority(score, flagged) == review_priority(verdict)


def test_custom_priority_ranges():
    mapping = PriorityMapping(flagged_min=900, flagged_max=1000, unflagged_max=10)

    assert mapping.priority(0.0, True) == 1000
    assert mapping.priority(1.0, True) == 900
    assert mapping.priority(0.0, False) == 10
    assert mapping.priority(1.0, False) == 0
