"""A `kili-label-errors serve` process killed mid-batch and restarted loses no event and writes none twice."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest
from conftest import DIGITS_COUNT, DIGITS_PROJECT
from fake_kili import add_digits_project
from plugin_helpers import PREFIX, SECRET, wait_for, webhook_body

REPO_ROOT = Path(__file__).resolve().parent.parent
EVENTS = 12


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServeProcess:
    """`kili-label-errors serve` in a child process."""

    def __init__(self, config_path: Path, port: int, log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        environment = {**os.environ, "KLE_TEST_SECRET": SECRET}
        self.log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import sys; from training.cli import main; sys.exit(main(sys.argv[1:]))",
             "serve", "--config", str(config_path), "--port", str(port)],
            cwd=REPO_ROOT, env=environment, stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_for(self._healthy, 90, "the service to answer /health")

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"serve exited with code {self.process.returncode}")
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def post(self, body: dict) -> httpx.Response:
        return httpx.post(self.url + "/webhook", json=body, headers={"Authorization": SECRET}, timeout=30)

    def queue_depth(self) -> int:
        return httpx.get(self.url + "/health", timeout=5).json()["queue_depth"]

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self.log.close()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)
        self.log.close()


def statuses(inbox: Path) -> Counter:
    with sqlite3.connect(inbox) as db:
        return Counter(status for (status,) in db.execute("SELECT status FROM events"))


@pytest.mark.parametrize("stalled_call", ["assets", "updatePropertiesInAssets"])
def test_killed_mid_batch_then_restarted(fake_kili, trained_digits, tmp_path, stalled_call):
    add_digits_project(fake_kili, DIGITS_PROJECT, count=DIGITS_COUNT, noise=0.1, seed=0)
    inbox = tmp_path / "inbox.sqlite"
    config_path = tmp_path / "plugin_config.json"
    config_path.write_text(json.dumps({
        "project_id": DIGITS_PROJECT, "models_dir": str(trained_digits["models_dir"]), "inbox_path": str(inbox),
        "providers": ["CPUExecutionProvider"], "secret_env": "KLE_TEST_SECRET",
    }))
    asset_ids = list(fake_kili.assets)[:EVENTS]
    port = free_port()

    first = ServeProcess(config_path, port, tmp_path / "serve.log")
    fake_kili.delay(stalled_call, 3.0)
    responses = [first.post(webhook_body(fake_kili, asset_id)) for asset_id in asset_ids]
    wait_for(lambda: len(fake_kili.calls(stalled_call)) >= 1, 30, f"the first batch to reach {stalled_call}")
    first.kill()

    before_restart = statuses(inbox)
    fake_kili.delay(stalled_call, 0)
    if stalled_call == "updatePropertiesInAssets":
        # The stalled write still lands after the client died; wait for it so the restart reads it.
        first_write = fake_kili.calls("updatePropertiesInAssets")[0]["where"][0]["id"]
        wait_for(lambda: PREFIX + "status" in fake_kili.assets[first_write].metadata, 30, "the stalled write")
    second = ServeProcess(config_path, port, tmp_path / "serve.log")
    wait_for(lambda: second.queue_depth() == 0, 90, "the restarted service to drain the inbox")
    second.stop()

    assert [response.status_code for response in responses] == [202] * EVENTS
    assert before_restart["processing"] >= 1
    assert before_restart["done"] == 0
    assert statuses(inbox) == Counter({"done": EVENTS})
    written = Counter(where["id"] for call in fake_kili.calls("updatePropertiesInAssets") for where in call["where"])
    assert set(written) == set(asset_ids)
    assert max(written.values()) == 1
    for asset_id in asset_ids:
        assert fake_kili.assets[asset_id].metadata[PREFIX + "status"] == "scored", asset_id
