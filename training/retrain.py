"""Periodic full retraining: when it is due, one run at a time, in its own process.

The policy retrains after N new labels since the version in use, or after T
hours when at least one label is new, whichever comes first. A retrain runs
as a child process (the local trainer, or a command the policy names for a
GPU node or a batch cluster) so the scoring service stays responsive. A file
lock in the models folder allows one retrain per project at a time, and the
last run's status is kept in ``retrain_status.json`` beside it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from plugin.model_version import CURRENT
from plugin.retrain_policy import RetrainPolicy

logger = logging.getLogger(__name__)

LOCK_FILE = "retrain.lock"
STATUS_FILE = "retrain_status.json"
LOG_FILE = "retrain.log"
TRAIN_LOCK_FILE = "train.lock"


class RetrainAlreadyRunning(RuntimeError):
    """Another retrain (or training run) of the same models folder is running."""

    def __init__(self, started_at: str, pid: int | None, what: str = "a retrain"):
        super().__init__(f"{what} is already running on this models folder (started {started_at}, pid {pid})")
        self.started_at = started_at
        self.pid = pid


@dataclass
class RetrainStatus:
    """The last retrain's state, as ``GET /health`` and ``retrain`` report it."""

    state: str = "idle"  # idle, running, succeeded, failed
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    version_before: str | None = None
    version_after: str | None = None
    error: str | None = None
    log: str | None = None
    pid: int | None = None


def read_status(models_dir: Path) -> RetrainStatus:
    path = Path(models_dir) / STATUS_FILE
    if not path.is_file():
        return RetrainStatus()
    try:
        return RetrainStatus(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, TypeError) as error:
        logger.warning("Ignoring an unreadable retrain status at %s (%s)", path, error)
        return RetrainStatus()


def write_status(models_dir: Path, status: RetrainStatus) -> None:
    path = Path(models_dir) / STATUS_FILE
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(asdict(status), indent=1), encoding="utf-8")
    os.replace(temporary, path)


def _current_name(models_dir: Path) -> str | None:
    pointer = Path(models_dir) / CURRENT
    return pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RetrainLock:
    """An exclusive, non-blocking lock on a models folder, released by the OS if the holder dies."""

    def __init__(self, models_dir: Path, filename: str = LOCK_FILE, what: str = "a retrain"):
        self.path = Path(models_dir) / filename
        self.what = what
        self.handle = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            try:
                holder = json.loads(handle.read() or "{}")
            except json.JSONDecodeError:
                holder = {}
            handle.close()
            raise RetrainAlreadyRunning(holder.get("started_at", "unknown"), holder.get("pid"), self.what) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "started_at": _now()}))
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None

    def __enter__(self) -> "RetrainLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def training_lock(models_dir: Path) -> RetrainLock:
    """Return the lock that one training run holds while it writes into a models folder.

    It keeps a run started by hand or by cron from writing beside the
    service's retrain, whose start-up would otherwise delete the other run's
    unfinished version as left over.
    """
    return RetrainLock(models_dir, TRAIN_LOCK_FILE, "a training run")


def is_running(models_dir: Path) -> bool:
    """Tell whether some process holds the retrain lock of a models folder."""
    probe = RetrainLock(models_dir)
    try:
        probe.acquire()
    except RetrainAlreadyRunning:
        return True
    probe.release()
    return False


def local_train_command(train_arguments: Sequence[str], models_dir: Path) -> list[str]:
    """Return the command that runs this package's trainer in a child process."""
    return [sys.executable, "-m", "training.cli", "train", "--output", str(models_dir), "--no-progress", *train_arguments]


def run_retrain(
    models_dir: Path,
    policy: RetrainPolicy,
    *,
    reason: str = "requested",
    on_start: Callable[[RetrainStatus], None] | None = None,
    poll_seconds: float = 2.0,
    environment: dict[str, str] | None = None,
) -> RetrainStatus:
    """Run one retrain to completion under the lock and record its status.

    ``environment`` adds variables to the child's environment (for example
    the API key, so it never appears on a command line). Raises
    ``RetrainAlreadyRunning`` when another retrain holds the lock. A
    failed or interrupted run leaves the current version in place: the
    trainer only switches ``CURRENT`` after a complete version is written.
    """
    models_dir = Path(models_dir)
    with RetrainLock(models_dir):
        before = _current_name(models_dir)
        external = policy.command is not None
        command = list(policy.command) if external else local_train_command(policy.train_arguments, models_dir)
        log_path = models_dir / LOG_FILE
        status = RetrainStatus(state="running", started_at=_now(), reason=reason, version_before=before, log=str(log_path))
        with open(log_path, "w", encoding="utf-8") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd(),
                env={**os.environ, **(environment or {})},
            )
            status.pid = process.pid
            write_status(models_dir, status)
            logger.info("Retrain started (pid %d, reason: %s), log in %s", process.pid, reason, log_path)
            if on_start is not None:
                on_start(status)
            exit_code = process.wait()

        status.exit_code = exit_code
        if external and exit_code == 0:
            exit_code = _wait_for_new_version(models_dir, before, policy.wait_for_version_seconds, poll_seconds)
        status.finished_at = _now()
        status.version_after = _current_name(models_dir)
        if exit_code == 0:
            status.state = "succeeded"
        else:
            status.state = "failed"
            status.error = _failure_reason(status, log_path, external)
            logger.error("Retrain failed: %s; version %s stays in use", status.error, before)
        write_status(models_dir, status)
        logger.info("Retrain finished: %s (version %s -> %s)", status.state, before, status.version_after)
        return status


def _wait_for_new_version(models_dir: Path, before: str | None, timeout: float, poll_seconds: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _current_name(models_dir) != before:
            return 0
        time.sleep(poll_seconds)
    return 124


def _failure_reason(status: RetrainStatus, log_path: Path, external: bool) -> str:
    if status.exit_code not in (0, None):
        tail = []
        if log_path.is_file():
            tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        return f"exit code {status.exit_code}" + (f": {tail[0]}" if tail else "")
    if external:
        return "the command finished but no new model version appeared in time"
    return "unknown failure"
