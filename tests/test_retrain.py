"""Retraining: the trigger policy, the single-run lock and failed runs."""

import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from plugin.model_version import CURRENT
from training.retrain import RetrainAlreadyRunning, RetrainLock, RetrainPolicy, read_status, run_retrain

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    "policy,new_labels,age_hours,expected",
    [
        (RetrainPolicy(after_labels=100), 99, 1, None),
        (RetrainPolicy(after_labels=100), 100, 1, "100 new labels"),
        (RetrainPolicy(after_hours=24), 1, 23.9, None),
        (RetrainPolicy(after_hours=24), 1, 24, "1 new labels and the version is 24.0 h old"),
        (RetrainPolicy(after_hours=24), 0, 100, None),
        (RetrainPolicy(after_labels=100, after_hours=24), 5, 30, "5 new labels and the version"),
        (RetrainPolicy(), 10_000, 10_000, None),
    ],
)
def test_policy_due_by_count_and_time(policy, new_labels, age_hours, expected):
    reason = policy.due(new_labels, NOW - timedelta(hours=age_hours), NOW)

    if expected is None:
        assert reason is None
    else:
        assert reason.startswith(expected)


@pytest.mark.parametrize(
    "data,message",
    [
        ({"after_labels": 0}, "retrain.after_labels is 0; expected a positive integer"),
        ({"after_hours": "daily"}, "retrain.after_hours is 'daily'; expected a positive number"),
        ({"command": "train.sh"}, "retrain.command is 'train.sh'; expected a list of strings"),
        ({"every": 3}, "unknown keys \\['every'\\]"),
    ],
)
def test_policy_rejects_invalid_values(data, message):
    with pytest.raises(ValueError, match=message):
        RetrainPolicy.from_dict(data)


def test_lock_allows_one_retrain(tmp_path):
    with RetrainLock(tmp_path):
        with pytest.raises(RetrainAlreadyRunning, match="already running on this models folder \\(started 20"):
            RetrainLock(tmp_path).acquire()

    with RetrainLock(tmp_path):
        pass


def test_second_request_while_running_is_rejected(tmp_path):
    policy = RetrainPolicy(command=[sys.executable, "-c", "import time; time.sleep(3)"], wait_for_version_seconds=0.5)
    started = threading.Event()
    worker = threading.Thread(target=run_retrain, args=(tmp_path, policy), kwargs={"on_start": lambda status: started.set(), "poll_seconds": 0.1})
    worker.start()
    assert started.wait(10)

    with pytest.raises(RetrainAlreadyRunning) as raised:
        run_retrain(tmp_path, policy)

    worker.join(20)
    assert raised.value.started_at.startswith("20")
    assert read_status(tmp_path).state == "failed"  # no new version appeared


def test_failed_retrain_keeps_current_version(tmp_path):
    (tmp_path / CURRENT).write_text("v0001\n")
    policy = RetrainPolicy(command=[sys.executable, "-c", "import sys; print('out of memory'); sys.exit(3)"])

    status = run_retrain(tmp_path, policy, reason="test")

    assert status.state == "failed"
    assert status.exit_code == 3
    assert "out of memory" in status.error
    assert (tmp_path / CURRENT).read_text().strip() == "v0001"
    assert read_status(tmp_path).state == "failed"


def test_killed_retrain_keeps_current_version(tmp_path):
    (tmp_path / CURRENT).write_text("v0001\n")
    policy = RetrainPolicy(command=[sys.executable, "-c", "import time; time.sleep(60)"])

    def kill(status):
        import os
        import signal

        time.sleep(0.2)
        os.kill(status.pid, signal.SIGKILL)

    status = run_retrain(tmp_path, policy, on_start=kill)

    assert status.state == "failed"
    assert status.exit_code == -9
    assert (tmp_path / CURRENT).read_text().strip() == "v0001"


def test_external_command_waits_for_new_version(tmp_path):
    (tmp_path / CURRENT).write_text("v0001\n")
    script = f"import pathlib; pathlib.Path({str(tmp_path / CURRENT)!r}).write_text('v0002\\n')"
    policy = RetrainPolicy(command=[sys.executable, "-c", script], wait_for_version_seconds=5)

    status = run_retrain(tmp_path, policy, poll_seconds=0.05)

    assert status.state == "succeeded"
    assert status.version_before == "v0001"
    assert status.version_after == "v0002"


def test_trainer_killed_midway_keeps_serving_version(tmp_path):
    import os
    import signal

    from plugin.model_version import ModelVersion, current_version_dir
    from projects import write_digits_project
    from training.pipeline import TrainConfig, train
    from training.sources.local import LocalProject

    write_digits_project(tmp_path / "data", per_class=30, classes=(0, 1, 2), flip_fraction=0.1)
    models = tmp_path / "models"
    cache = tmp_path / "cache"
    train(LocalProject(tmp_path / "data"), TrainConfig(models_dir=models, cache_dir=cache, folds=3, progress=False))
    # A changed label forces a new version, so the retrain gets as far as writing one.
    moved = sorted((tmp_path / "data" / "0").iterdir())[0]
    moved.rename(tmp_path / "data" / "1" / moved.name)
    policy = RetrainPolicy(train_arguments=["--data", str(tmp_path / "data"), "--folds", "3", "--cache-dir", str(cache)])
    seen_temporary = []

    def kill_when_writing(status):
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if any(path.name.startswith(".tmp-") for path in (models / "versions").iterdir()):
                seen_temporary.append(True)
                break
            time.sleep(0.05)
        os.kill(status.pid, signal.SIGKILL)

    status = run_retrain(models, policy, on_start=kill_when_writing)

    assert seen_temporary
    assert status.state == "failed"
    assert (models / CURRENT).read_text().strip() == "v0001"
    assert ModelVersion.load(current_version_dir(models)).name == "v0001"
    result = train(LocalProject(tmp_path / "data"), TrainConfig(models_dir=models, cache_dir=cache, folds=3, progress=False))
    assert result.version_dir.name == "v0002"
    assert not [path for path in (models / "versions").iterdir() if path.name.startswith(".tmp-")]


def test_retrain_clears_flag_of_fixed_label(tmp_path):
    import csv

    from projects import write_digits_project
    from training.pipeline import TrainConfig, train
    from training.sources.local import LocalProject

    truth = write_digits_project(tmp_path / "data", per_class=40, classes=(0, 1, 2), flip_fraction=0.1, seed=4)
    manifest = tmp_path / "manifest.csv"

    def write_manifest(fixed: set[str]) -> None:
        with open(manifest, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "asset_id"])
            for asset_id, (true_label, given_label) in sorted(truth.items()):
                label = true_label if asset_id in fixed else given_label
                writer.writerow([f"data/{asset_id}", label, asset_id])

    write_manifest(set())
    config = TrainConfig(models_dir=tmp_path / "models", cache_dir=tmp_path / "cache", folds=3, progress=False)
    first = train(LocalProject(manifest), config)
    flipped_and_flagged = [
        row["asset_id"] for row in first.rows
        if row["is_issue"] and truth[row["asset_id"]][0] != truth[row["asset_id"]][1]
    ]
    fixed = flipped_and_flagged[0]
    assert LocalProject(manifest).read_results()[fixed]["label_error_flagged"] is True

    write_manifest({fixed})
    second = train(LocalProject(manifest), config)

    stored = LocalProject(manifest).read_results()
    assert second.version_dir.name == "v0002"
    assert stored[fixed]["label_error_flagged"] is False
    assert stored[fixed]["label_error_model_version"] == "v0002"
    assert second.write_summary.written < len(truth)


def test_cli_retrain_runs_trainer(tmp_path, capsys):
    from projects import write_digits_project
    from training.cli import main

    write_digits_project(tmp_path / "data", per_class=20, classes=(0, 1), flip_fraction=0.1)

    code = main(["retrain", "--models-dir", str(tmp_path / "models"), "--", "--data", str(tmp_path / "data"), "--folds", "3"])

    output = capsys.readouterr().out
    assert code == 0, (tmp_path / "models" / "retrain.log").read_text()[-2000:]
    assert "retrain succeeded: version None -> v0001" in output
    assert (tmp_path / "models" / CURRENT).read_text().strip() == "v0001"


def test_cli_retrain_without_project_names_fix(tmp_path, capsys):
    from training.cli import main

    code = main(["retrain", "--models-dir", str(tmp_path)])

    assert code == 2
    assert "pass --config plugin_config.json, or train options after --" in capsys.readouterr().err


def test_manual_train_waits_for_running_one(tmp_path, capsys):
    from projects import write_digits_project
    from training.cli import main
    from training.retrain import training_lock

    write_digits_project(tmp_path / "data", per_class=10, classes=(0, 1), flip_fraction=0.0)

    with training_lock(tmp_path / "models"):
        code = main(["train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "models"), "--folds", "3"])

    assert code == 3
    assert "a training run is already running on this models folder" in capsys.readouterr().err
