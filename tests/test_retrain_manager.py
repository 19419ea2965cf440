"""The service's retrain manager: triggers by count and by time, one run at a time."""

import json
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

from plugin.model_version import CURRENT
from plugin.retraining import RetrainManager
from training.retrain import RetrainAlreadyRunning, RetrainPolicy, read_status

CREATED = datetime(2026, 12, 4, 8, 0, tzinfo=timezone.utc)


def make_version(models_dir, name="v0001", created=CREATED):
    directory = models_dir / "versions" / name
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text(json.dumps({"created_at": created.isoformat(), "files": {}}))
    (models_dir / CURRENT).write_text(name + "\n")


def wait_until_idle(manager, timeout=20):
    deadline = time.monotonic() + timeout
    while manager.running() and time.monotonic() < deadline:
        time.sleep(0.05)


def switching_command(models_dir, name="v0002"):
    script = (
        "import json, pathlib, time; root = pathlib.Path(%r); time.sleep(0.3); "
        "d = root / 'versions' / %r; d.mkdir(parents=True); "
        "(d / 'manifest.json').write_text(json.dumps({'created_at': '2026-12-04T12:00:00+00:00', 'files': {}})); "
        "(root / 'CURRENT').write_text(%r)"
    ) % (str(models_dir), name, name + "\n")
    return [sys.executable, "-c", script]


def test_count_trigger_starts_retrain(tmp_path):
    make_version(tmp_path)
    counts = {"labels": 4}
    policy = RetrainPolicy(after_labels=5, command=switching_command(tmp_path), wait_for_version_seconds=20)
    manager = RetrainManager(tmp_path, policy, lambda since: counts["labels"], clock=lambda: CREATED + timedelta(hours=1))

    assert manager.check() is None
    counts["labels"] = 5
    reason = manager.check()
    wait_until_idle(manager)

    assert reason == "5 new labels (threshold 5)"
    assert read_status(tmp_path).state == "succeeded"
    assert (tmp_path / CURRENT).read_text().strip() == "v0002"


def test_time_trigger_uses_injected_clock(tmp_path):
    make_version(tmp_path)
    now = {"value": CREATED + timedelta(hours=23)}
    policy = RetrainPolicy(after_hours=24, command=switching_command(tmp_path), wait_for_version_seconds=20)
    manager = RetrainManager(tmp_path, policy, lambda since: 1, clock=lambda: now["value"])

    assert manager.check() is None
    now["value"] = CREATED + timedelta(hours=25)
    reason = manager.check()
    wait_until_idle(manager)

    assert reason.startswith("1 new labels and the version is 25.0 h old")
    assert read_status(tmp_path).version_after == "v0002"


def test_count_is_taken_since_version_creation(tmp_path):
    make_version(tmp_path)
    seen = []
    manager = RetrainManager(tmp_path, RetrainPolicy(after_labels=10), lambda since: seen.append(since) or 0)

    manager.check()

    assert seen == [CREATED]


def test_second_request_reports_start_time(tmp_path):
    make_version(tmp_path)
    policy = RetrainPolicy(command=[sys.executable, "-c", "import time; time.sleep(2)"], wait_for_version_seconds=0.2)
    manager = RetrainManager(tmp_path, policy, lambda since: 0)
    first = manager.request("by hand")

    with pytest.raises(RetrainAlreadyRunning) as raised:
        manager.request("again")

    wait_until_idle(manager)
    assert first.state == "running"
    assert raised.value.started_at == first.started_at
    assert manager.status()["running"] is False


def test_count_restarts_after_each_retrain(tmp_path):
    from training.retrain import RetrainStatus, write_status

    make_version(tmp_path)
    last_start = CREATED + timedelta(hours=2)
    write_status(tmp_path, RetrainStatus(state="succeeded", started_at=last_start.isoformat(), finished_at=last_start.isoformat()))
    policy = RetrainPolicy(after_labels=5, after_hours=1, command=switching_command(tmp_path))
    manager = RetrainManager(tmp_path, policy, lambda since: 7 if since == CREATED else 0,
                             clock=lambda: last_start + timedelta(minutes=5))

    assert manager.counted_since() == last_start
    assert manager.check() is None
    assert not manager.running()


def test_interrupted_retrain_is_marked_failed(tmp_path):
    from training.retrain import RetrainStatus, write_status

    make_version(tmp_path)
    write_status(tmp_path, RetrainStatus(state="running", started_at=CREATED.isoformat(), pid=999999))

    RetrainManager(tmp_path, RetrainPolicy(), lambda since: 0)

    status = read_status(tmp_path)
    assert status.state == "failed"
    assert status.error.startswith("interrupted")
