"""Retraining from the running service: trigger checks, requests and status.

The service counts labels durably in its inbox. This manager compares that
count and the age of the version in use with the policy. It starts at most
one retrain at a time, in a background thread that waits on the trainer's
child process, so scoring goes on meanwhile. When the retrain makes a new
version current, the service's model holder loads it on its next batch.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from training.retrain import (
    RetrainAlreadyRunning,
    RetrainLock,
    RetrainStatus,
    is_running,
    read_status,
    run_retrain,
    write_status,
)

from .model_version import MANIFEST, ModelVersionError, current_version_dir
from .retrain_policy import RetrainPolicy

logger = logging.getLogger(__name__)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class RetrainManager:
    """Starts a retrain when the policy makes one due or a caller requests one."""

    def __init__(
        self,
        models_dir: Path,
        policy: RetrainPolicy,
        count_new_labels: Callable[[datetime | None], int],
        *,
        clock: Callable[[], datetime] = utc_now,
        environment: dict[str, str] | None = None,
    ) -> None:
        self.models_dir = Path(models_dir)
        self.policy = policy
        self.count_new_labels = count_new_labels
        self.clock = clock
        self.environment = environment or {}
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()
        self._mark_interrupted()

    def _mark_interrupted(self) -> None:
        """Record as failed a retrain that a stopped service left marked as running."""
        status = read_status(self.models_dir)
        if status.state == "running" and not is_running(self.models_dir):
            status.state = "failed"
            status.error = "interrupted: the service stopped before the retrain finished"
            status.finished_at = status.finished_at or utc_now().isoformat(timespec="seconds")
            write_status(self.models_dir, status)
            logger.warning("The last retrain (started %s) was interrupted; marked as failed", status.started_at)

    def counted_since(self) -> datetime | None:
        """Return the time new labels and the version's age are counted from.

        That is the later of the version's creation and the last retrain's
        start, so a retrain that finds nothing to change, fails, or is
        followed by a rollback does not trigger another one at once.
        """
        created_at = self.version_created_at()
        started = read_status(self.models_dir).started_at
        last_start = datetime.fromisoformat(started) if started else None
        moments = [moment for moment in (created_at, last_start) if moment is not None]
        return max(moments) if moments else None

    def version_created_at(self) -> datetime | None:
        """Return when the version in use was written, or None when there is none."""
        try:
            directory = current_version_dir(self.models_dir)
        except ModelVersionError:
            return None
        if directory is None:
            return None
        try:
            manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
            return datetime.fromisoformat(manifest["created_at"])
        except (OSError, KeyError, ValueError) as error:
            logger.warning("Cannot read the creation time of version %s (%s)", directory.name, error)
            return None

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict:
        """Return the last retrain's status, with the new-label count and whether one runs now."""
        status = asdict(read_status(self.models_dir))
        status["running"] = self.running()
        status["new_labels"] = self.count_new_labels(self.counted_since())
        return status

    def request(self, reason: str = "requested") -> RetrainStatus:
        """Start a retrain in the background; raise ``RetrainAlreadyRunning`` while one runs."""
        with self._guard:
            if self.running():
                current = read_status(self.models_dir)
                raise RetrainAlreadyRunning(current.started_at or "unknown", current.pid)
            # A retrain started by another process (cron, `retrain`) holds the file lock.
            probe = RetrainLock(self.models_dir)
            probe.acquire()
            probe.release()
            started = threading.Event()
            self._thread = threading.Thread(
                target=self._run, args=(reason, started), name="retrain", daemon=True
            )
            self._thread.start()
        started.wait(timeout=30)
        return read_status(self.models_dir)

    def _run(self, reason: str, started: threading.Event) -> None:
        try:
            run_retrain(
                self.models_dir, self.policy, reason=reason,
                on_start=lambda status: started.set(), environment=self.environment,
            )
        except RetrainAlreadyRunning as error:
            logger.warning("Retrain not started: %s", error)
        except Exception:
            logger.exception("Retrain failed to start")
        finally:
            started.set()

    def has_triggers(self) -> bool:
        return self.policy.after_labels is not None or self.policy.after_hours is not None

    def check(self) -> str | None:
        """Start a retrain when the policy makes one due; return the reason, or None."""
        if self.running() or not self.has_triggers():
            return None
        since = self.counted_since()
        reason = self.policy.due(self.count_new_labels(since), since, self.clock())
        if reason is None:
            return None
        try:
            self.request(reason)
        except RetrainAlreadyRunning:
            return None
        logger.info("Retrain triggered: %s", reason)
        return reason


def trainer_policy(config) -> RetrainPolicy:
    """Return the configured policy, with the trainer options that retrain the configured project.

    The local trainer gets the project id, job, endpoint, key prefix and
    review options of the plugin configuration, then the policy's own
    ``train_arguments``. An external ``command`` is left as configured.
    """
    from dataclasses import replace

    policy = config.retrain or RetrainPolicy()
    if policy.command is not None:
        return policy
    arguments = ["--project-id", config.project_id, "--key-prefix", config.key_prefix]
    if config.job:
        arguments += ["--job", config.job]
    if config.api_endpoint:
        arguments += ["--api-endpoint", config.api_endpoint]
    if config.send_to_review:
        arguments.append("--review")
    if config.create_issues:
        arguments.append("--create-issues")
    return replace(policy, train_arguments=arguments + list(policy.train_arguments))


class RetrainScheduler:
    """A thread that runs the manager's check every ``check_seconds``."""

    def __init__(self, manager: RetrainManager) -> None:
        self.manager = manager
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="retrain-scheduler", daemon=True)

    def start(self) -> None:
        if self.manager.has_triggers():
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.manager.policy.check_seconds):
            try:
                self.manager.check()
            except Exception:
                logger.exception("Retrain check failed; trying again in %.0f s", self.manager.policy.check_seconds)
