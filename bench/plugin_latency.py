"""Latency and throughput of the webhook service (CPU), from webhook request to metadata written.

Usage: python bench/plugin_latency.py [--models-dir DIR] [--work DIR] [--events 60,400] [--concurrency 1,16]

Starts the fake Kili server (tests/fake_kili) in this process with a digits
project, trains a model version on it unless --models-dir names one (the
trainer's default backbone, EfficientNet-Lite0 at 224 px). Each run gets a
fresh `kili-label-errors serve` child process on 127.0.0.1. Each client
thread sends one webhook call, waits until the fake server has applied the
metadata write of that asset, then sends the next (a closed loop), so the
concurrency is the number of events in flight. Each event is a new label on
an asset that was not in training, so it is scored by the mean of the fold
models. Prints the model's own time per image and a Markdown table of
p50/p95/p99 latency and events per second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from fake_kili import DIGITS_JOB, FakeKili, add_digits_project  # noqa: E402

PROJECT = "digits"
SECRET = "benchmark-secret"
API_KEY = "bench-key"


class TimedFakeKili(FakeKili):
    """The fake server, also recording when each asset's metadata was written."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.written_at: dict[str, float] = {}
        self.written = threading.Condition()

    def _update_assets(self, where_array, data_array):
        updated = super()._update_assets(where_array, data_array)
        now = time.perf_counter()
        with self.written:
            for where in where_array:
                self.written_at.setdefault(where["id"], now)
            self.written.notify_all()
        return updated


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train(server: FakeKili, work: Path) -> Path:
    from training.pipeline import TrainConfig, train as run_training
    from training.sources.kili import KiliProject
    from training.sources.kili_gateway import KiliGateway

    models_dir = work / "models"
    source = KiliProject(KiliGateway(api_key=API_KEY, api_endpoint=server.endpoint), PROJECT)
    run_training(source, TrainConfig(models_dir=models_dir, cache_dir=work / "cache", folds=3, progress=False,
                                     write_results=False))
    return models_dir


def add_bench_assets(server: FakeKili, count: int) -> list[str]:
    """Add ``count`` new labeled assets that reuse the digit images; return their ids."""
    images = [data for data, _ in server.files.values()]
    asset_ids = []
    for index in range(count):
        asset_id = f"bench-{index:05d}"
        digit = index % 10
        server.add_asset(PROJECT, asset_id, image=images[index % len(images)],
                         labels=[server.label(DIGITS_JOB, f"D{digit}")])
        asset_ids.append(asset_id)
    return asset_ids


def body(server: FakeKili, asset_id: str) -> dict:
    label = server.assets[asset_id].labels[0]
    return {"eventType": "onSubmit", "logPayload": {"runId": f"run-{label.id}", "projectId": PROJECT},
            "payload": {"label": {"id": label.id, "jsonResponse": label.json_response, "labelType": "DEFAULT"},
                        "asset_id": asset_id}}


def run_load(server: TimedFakeKili, url: str, asset_ids: list[str], concurrency: int) -> dict:
    """Send one event per asset with ``concurrency`` closed-loop clients; return the latency figures."""
    latencies: list[float] = []
    acknowledgements: list[float] = []  # request to the 202 response
    lock = threading.Lock()
    queue = list(reversed(asset_ids))

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while True:
                with lock:
                    if not queue:
                        return
                    asset_id = queue.pop()
                started = time.perf_counter()
                response = http.post("/webhook", json=body(server, asset_id), headers={"Authorization": SECRET})
                response.raise_for_status()
                acknowledged = time.perf_counter() - started
                with server.written:
                    if not server.written.wait_for(lambda: asset_id in server.written_at, timeout=120):
                        raise RuntimeError(f"metadata of {asset_id} was not written within 120 s")
                with lock:
                    latencies.append(server.written_at[asset_id] - started)
                    acknowledgements.append(acknowledged)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    values = np.array(latencies) * 1000
    return {
        "concurrency": concurrency, "events": len(latencies), "seconds": round(elapsed, 2),
        "events_per_second": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(values, 50)), 1), "p95_ms": round(float(np.percentile(values, 95)), 1),
        "p99_ms": round(float(np.percentile(values, 99)), 1),
        "p50_202_ms": round(float(np.percentile(np.array(acknowledgements) * 1000, 50)), 1),
    }


def model_time(models_dir: Path, repeats: int = 5) -> dict[int, float]:
    """Return the milliseconds per image of ``ModelVersion.predict`` (all folds) at batch 1 and 16."""
    from plugin.model_version import ModelVersion, current_version_dir

    version = ModelVersion.load(current_version_dir(models_dir), providers=["CPUExecutionProvider"])
    size = version.preprocessing.input_size
    pixels = np.random.default_rng(0).integers(0, 256, (16, size, size, 3), dtype=np.uint8)
    version.predict(pixels[:1], [None])
    result = {}
    for batch in (1, 16):
        started = time.perf_counter()
        for _ in range(repeats):
            version.predict(pixels[:batch], [None] * batch)
        result[batch] = (time.perf_counter() - started) * 1000 / repeats / batch
    return result


class ServeProcess:
    """`kili-label-errors serve` as a child process, started and stopped with ``with``."""

    def __init__(self, config_path: Path, environment: dict, log_path: Path) -> None:
        self.port = free_port()
        self.command = [sys.executable, "-m", "training.cli", "serve", "--config", str(config_path),
                        "--port", str(self.port)]
        self.environment = environment
        self.log_path = log_path

    def __enter__(self) -> str:
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command, cwd=REPO, env=self.environment,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).json()["model_version"]:
                    return url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"the service did not start; see {self.log_path}")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)
        self.log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, help="an existing models folder trained on the digits project")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary folder)")
    parser.add_argument("--events", default="60,400", help="events per run, one per concurrency (default: %(default)s)")
    parser.add_argument("--concurrency", default="1,16", help="concurrency of each run (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=5, help="events sent before measuring (default: %(default)s)")
    args = parser.parse_args()
    events = [int(value) for value in args.events.split(",")]
    concurrencies = [int(value) for value in args.concurrency.split(",")]
    if len(events) != len(concurrencies):
        parser.error("--events and --concurrency need the same number of values")

    work = args.work or Path(tempfile.mkdtemp(prefix="kle-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    home.mkdir(exist_ok=True)
    os.environ.update({"HOME": str(home), "KILI_SDK_SKIP_CHECKS": "1", "KILI_DISABLE_TQDM": "true"})
    server = TimedFakeKili(api_keys={API_KEY}).start()
    add_digits_project(server, PROJECT, count=150, noise=0.1, seed=0)
    models_dir = args.models_dir or train(server, work)
    asset_ids = add_bench_assets(server, args.warmup * len(events) + sum(events))

    config_path = work / "plugin_config.json"
    inbox = work / "inbox.sqlite"
    config_path.write_text(json.dumps({
        "project_id": PROJECT, "models_dir": str(models_dir.resolve()), "inbox_path": str(inbox),
        "providers": ["CPUExecutionProvider"], "secret_env": "KLE_BENCH_SECRET", "api_key_env": "KLE_BENCH_API_KEY",
        "api_endpoint": server.endpoint,
    }))
    environment = {**os.environ, "KLE_BENCH_SECRET": SECRET, "KLE_BENCH_API_KEY": API_KEY}
    model_ms = model_time(models_dir)
    rows, offset, health = [], 0, {}
    try:
        for count, concurrency in zip(events, concurrencies):
            # A fresh service per run: the SDK's limit of 500 calls a minute counts per process,
            # so calls of an earlier run would throttle the next one.
            inbox.unlink(missing_ok=True)
            with ServeProcess(config_path, environment, work / "serve.log") as url:
                run_load(server, url, asset_ids[offset : offset + args.warmup], 1)
                offset += args.warmup
                calls_before = len(server.requests)
                load_before = os.getloadavg()[0]
                row = run_load(server, url, asset_ids[offset : offset + count], concurrency)
                row["kili_calls_per_event"] = round((len(server.requests) - calls_before) / count, 2)
                row["load"] = f"{load_before:.1f} / {os.getloadavg()[0]:.1f}"
                rows.append(row)
                offset += count
                health = httpx.get(url + "/health", timeout=5).json()
    finally:
        server.stop()

    print(f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
          f"{os.cpu_count()} CPU cores, {platform.python_version()}; providers: {', '.join(health['providers'])}; "
          f"model version: {health['model_version']}")
    print(f"Model alone (backbone and every fold, ONNX Runtime CPU): {model_ms[1]:.1f} ms per image at batch 1, "
          f"{model_ms[16]:.1f} ms per image at batch 16")
    print()
    print("| concurrency | events | p50 ms | p95 ms | p99 ms | p50 ms to the 202 | events/s | Kili calls per event "
          "| load average before / after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['concurrency']} | {row['events']} | {row['p50_ms']} | {row['p95_ms']} | {row['p99_ms']} | "
              f"{row['p50_202_ms']} | {row['events_per_second']} | {row['kili_calls_per_event']} | {row['load']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
