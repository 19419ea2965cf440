"""Processing of stored events in micro-batches.

``BatchProcessor.process`` handles one batch of events with one asset query
(content and current metadata of every asset of the batch), parallel image
downloads, one model call and one write through ``KiliProject.write_results``,
the writer the trainer uses, so both produce the same metadata for the same
verdict. Kili and network errors are retried with exponential backoff
(tenacity); the SDK's own retries run inside each attempt.

``Worker`` is the loop of the self-hosted service: it claims whatever is
pending right now (up to ``max_batch_size``), processes it and records each
event's final status in the inbox. When the queue is idle it sleeps until the
webhook handler wakes it, so a lone event waits for no batching delay. Events
that arrive while a batch is processed form the next batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

import requests
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from training.sources.base import AssetResult
from training.sources.kili import KiliProject, _KnownAsset
from training.sources.kili_gateway import ImageDownloader, KiliApiError

from .config import PluginConfig
from .inbox import DONE, FAILED, SKIPPED, Event, Inbox
from .metadata import build_metadata, build_unscorable_metadata
from .metrics import ServiceMetrics
from .models import ModelHolder
from .scorer import ScoreItem, Scored, score_items

logger = logging.getLogger(__name__)

ASSET_FIELDS = ["id", "externalId", "content", "jsonMetadata"]
NO_MODEL_REASON = "no trained model version yet"
NO_MODEL_VERSION = "none"


class BatchError(RuntimeError):
    """A batch failed after all retries; the message names the call and the error."""


def is_retryable(error: BaseException) -> bool:
    """Tell whether an error may pass on a retry: Kili API errors, network errors and GraphQL transport errors."""
    if isinstance(error, (KiliApiError, requests.RequestException, ConnectionError, TimeoutError)):
        return True
    try:
        from gql.transport.exceptions import TransportError
    except ImportError:  # gql comes with kili; without it there is nothing more to match
        return False
    return isinstance(error, TransportError)


class PluginKiliProject(KiliProject):
    """``KiliProject`` whose writes read only the assets of the current batch.

    ``KiliProject.write_results`` reads the state of every asset of the
    project before planning a write. The plugin already read the batch's
    assets in one query, so ``prime`` hands that state to the writer and the
    write plan, metadata merge, priorities, review and issues stay the
    trainer's. The score key is declared as a number once per process.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._primed: dict[str, dict] | None = None
        self._score_property_declared = False

    def prime(self, state: Mapping[str, dict], known: Mapping[str, _KnownAsset]) -> None:
        """Set the batch's asset state (metadata and label id per asset) for the next write."""
        self._primed = dict(state)
        self._known = dict(known)

    def _current_state(self) -> dict[str, dict]:
        if self._primed is None:
            raise RuntimeError("PluginKiliProject.prime must be called before each write")
        return self._primed

    def _declare_score_property(self) -> None:
        if not self._score_property_declared:
            super()._declare_score_property()
            self._score_property_declared = True


@dataclass
class EventOutcome:
    """How one event ended: its inbox status, a short outcome and the error if it failed."""

    status: str
    outcome: str
    error: str | None = None


@dataclass
class BatchReport:
    """The outcome of each event of a batch, or ``waiting`` when no model version exists."""

    outcomes: dict[str, EventOutcome] = field(default_factory=dict)
    waiting: bool = False


class BatchProcessor:
    """Score a batch of events and write the results to Kili."""

    def __init__(
        self,
        config: PluginConfig,
        project: PluginKiliProject,
        models: ModelHolder,
        *,
        downloader: ImageDownloader | None = None,
        metrics: ServiceMetrics | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.project = project
        self.models = models
        self.downloader = downloader or project.downloader
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(max_workers=config.download_workers, thread_name_prefix="kle-download")
        self._sleep = sleep

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _retrying(self, what: str, function, *args):
        """Call ``function`` with the configured retries on Kili and network errors."""
        policy = self.config.retry

        def log_retry(state) -> None:
            if self.metrics is not None:
                self.metrics.retries.inc()
            logger.warning("%s failed (attempt %d of %d), retrying: %s",
                           what, state.attempt_number, policy.attempts, state.outcome.exception())

        retrying = Retrying(
            retry=retry_if_exception(is_retryable),
            stop=stop_after_attempt(policy.attempts),
            wait=wait_exponential(multiplier=policy.initial_wait_seconds, max=policy.max_wait_seconds),
            before_sleep=log_retry,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            return retrying(function, *args)
        except Exception as error:
            if is_retryable(error):
                raise BatchError(f"{what} failed after {policy.attempts} attempts: {error}") from error
            raise

    def process(self, events: Sequence[Event]) -> BatchReport:
        """Process one batch; raise ``BatchError`` when Kili stays unreachable."""
        report = BatchReport()
        version = self.models.current()
        if version is None and self.config.no_model == "wait":
            report.waiting = True
            return report

        latest = _latest_per_asset(events)
        for event in events:
            if latest[event.asset_id] is not event:
                report.outcomes[event.label_id] = EventOutcome(
                    DONE, f"superseded by label {latest[event.asset_id].label_id} in the same batch")
        current = list(latest.values())
        asset_ids = [event.asset_id for event in current]

        records = self._retrying(f"the asset query of {len(asset_ids)} assets", self._read_assets, asset_ids)
        found = [event for event in current if event.asset_id in records]
        for event in current:
            if event.asset_id not in records:
                report.outcomes[event.label_id] = EventOutcome(
                    FAILED, "asset not found",
                    f"asset {event.asset_id} is not in project {self.project.project_id} or this API key cannot read it")

        if version is None:
            scored = [Scored(event.asset_id, reason=NO_MODEL_REASON) for event in found]
            version_name = NO_MODEL_VERSION
        else:
            images = self._download([records[event.asset_id].get("content") or "" for event in found])
            items = [ScoreItem(event.asset_id, event.label, image=data, image_error=error)
                     for event, (data, error) in zip(found, images)]
            scored = score_items(version, self.project.job, items, executor=self.executor)
            version_name = version.name

        results = self._results(scored, version_name)
        state = {event.asset_id: {"metadata": dict(records[event.asset_id].get("jsonMetadata") or {}),
                                  "label_id": event.label_id} for event in found}
        known = {result.asset_id: _KnownAsset(content=records[result.asset_id].get("content") or "",
                                              metadata=state[result.asset_id]["metadata"],
                                              label_id=state[result.asset_id]["label_id"],
                                              category=result.category or "")
                 for result in scored if result.category}
        self._retrying(f"the write of {len(results)} results", self._write, results, state, known)

        for event, result in zip(found, scored):
            report.outcomes[event.label_id] = _event_outcome(result, version is None)
        return report

    def _read_assets(self, asset_ids: Sequence[str]) -> dict[str, dict]:
        gateway = self.project.gateway
        return {record["id"]: record for record in gateway.iter_assets(self.project.project_id, ASSET_FIELDS, asset_ids)}

    def _download(self, urls: Sequence[str]) -> list[tuple[bytes | None, str | None]]:
        def fetch(url: str) -> tuple[bytes | None, str | None]:
            if not url:
                return None, "the asset has no content URL"
            try:
                return self.downloader.download(url), None
            except OSError as error:
                return None, str(error)

        return list(self.executor.map(fetch, urls))

    def _results(self, scored: Iterable[Scored], version_name: str) -> list[AssetResult]:
        scored_at = datetime.now(timezone.utc)
        prefix = self.config.key_prefix
        results = []
        for result in scored:
            if result.verdict is not None:
                metadata = build_metadata(result.verdict, prefix=prefix, scored_at=scored_at)
                priority = self.config.priority.priority(result.verdict.score, result.verdict.flagged)
            else:
                metadata = build_unscorable_metadata(result.reason or "unknown reason", version_name,
                                                     prefix=prefix, scored_at=scored_at)
                priority = 0
            results.append(AssetResult(asset_id=result.asset_id, metadata=metadata, priority=priority))
        return results

    def _write(self, results: Sequence[AssetResult], state: Mapping[str, dict], known: Mapping[str, _KnownAsset]) -> None:
        if not results:
            return
        self.project.prime(state, known)
        summary = self.project.write_results(results)
        if summary.failed:
            raise KiliApiError(f"the metadata write of {summary.failed} assets failed: {'; '.join(summary.errors)}")


def _latest_per_asset(events: Sequence[Event]) -> dict[str, Event]:
    """Return the last received event of each asset: an asset's newest label is the one that counts."""
    latest: dict[str, Event] = {}
    for event in sorted(events, key=lambda event: event.received_at):
        latest[event.asset_id] = event
    return latest


def _event_outcome(result: Scored, no_model: bool) -> EventOutcome:
    if result.verdict is not None:
        return EventOutcome(DONE, "flagged" if result.verdict.flagged else "not flagged")
    if no_model:
        return EventOutcome(SKIPPED, f"not scorable: {result.reason}")
    if result.reason and result.reason.startswith("image download failed"):
        return EventOutcome(FAILED, f"not scorable: {result.reason}", result.reason)
    return EventOutcome(DONE, f"not scorable: {result.reason}")


def _kind(outcome: EventOutcome) -> str:
    """Return the short name of an outcome for the batch log line."""
    if outcome.status != DONE:
        return outcome.status
    if outcome.outcome.startswith("not scorable"):
        return "not scorable"
    if outcome.outcome.startswith("superseded"):
        return "superseded"
    return outcome.outcome


class Worker(threading.Thread):
    """The service's processing loop over the inbox."""

    def __init__(
        self,
        inbox: Inbox,
        processor: BatchProcessor,
        *,
        max_batch_size: int,
        metrics: ServiceMetrics | None = None,
        idle_poll_seconds: float = 1.0,
        no_model_poll_seconds: float = 2.0,
    ) -> None:
        super().__init__(name="kle-worker", daemon=True)
        self.inbox = inbox
        self.processor = processor
        self.max_batch_size = max_batch_size
        self.metrics = metrics
        self.idle_poll_seconds = idle_poll_seconds
        self.no_model_poll_seconds = no_model_poll_seconds
        self.last_error: str | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._waiting_logged = False

    def notify(self) -> None:
        """Wake the loop: an event was stored."""
        self._wake.set()

    def stop(self, timeout: float | None = 30.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        recovered = self.inbox.recover()
        if recovered:
            logger.info("Recovered %d events left in processing by a previous run; they are processed again", recovered)
        logger.info("Worker started: batches of up to %d events", self.max_batch_size)
        while not self._stopping.is_set():
            self._wake.clear()
            batch = self.inbox.claim_batch(self.max_batch_size)
            if not batch:
                self._wake.wait(self.idle_poll_seconds)
                continue
            self.run_batch(batch)
        logger.info("Worker stopped")

    def run_batch(self, batch: Sequence[Event]) -> None:
        started = time.monotonic()
        label_ids = [event.label_id for event in batch]
        try:
            report = self.processor.process(batch)
        except Exception as error:  # noqa: BLE001  (any failure must end the batch's events, never the loop)
            self.last_error = f"{type(error).__name__}: {error}"
            logger.error("Batch of %d events (labels %s) failed: %s", len(batch), ", ".join(label_ids[:5]), error,
                         exc_info=not isinstance(error, BatchError))
            self.inbox.finish(label_ids, FAILED, outcome="failed", error=str(error))
            if self.metrics is not None:
                self.metrics.failed.inc(len(batch))
            return
        if report.waiting:
            self.inbox.release(label_ids)
            if not self._waiting_logged:
                logger.warning("No model version in %s yet: %d events wait in the inbox until one is trained",
                               self.processor.models.models_dir, len(batch))
                self._waiting_logged = True
            self._stopping.wait(self.no_model_poll_seconds)
            return
        self._waiting_logged = False
        self._record(batch, report, started)

    def _record(self, batch: Sequence[Event], report: BatchReport, started: float) -> None:
        by_status: dict[tuple[str, str, str | None], list[str]] = {}
        for event in batch:
            outcome = report.outcomes[event.label_id]
            by_status.setdefault((outcome.status, outcome.outcome, outcome.error), []).append(event.label_id)
            if outcome.error:
                self.last_error = f"label {event.label_id}: {outcome.error}"
        for (status, outcome, error), label_ids in by_status.items():
            self.inbox.finish(label_ids, status, outcome=outcome, error=error)

        now = time.time()
        counts: dict[str, int] = {}
        for event in batch:
            outcome = report.outcomes[event.label_id]
            kind = _kind(outcome)
            counts[kind] = counts.get(kind, 0) + 1
            if self.metrics is None:
                continue
            self._count(outcome)
            if outcome.status != FAILED:
                self.metrics.observe_latency(now - event.received_at)
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(batch))
        logger.info("Processed a batch of %d events in %.0f ms: %s", len(batch),
                    (time.monotonic() - started) * 1000, ", ".join(f"{key} {value}" for key, value in sorted(counts.items())))

    def _count(self, outcome: EventOutcome) -> None:
        if outcome.status == FAILED:
            self.metrics.failed.inc()
        elif outcome.status == SKIPPED:
            self.metrics.skipped.inc()
        elif outcome.outcome.startswith("not scorable"):
            self.metrics.unscorable.inc()
        elif outcome.outcome in ("flagged", "not flagged"):
            self.metrics.scored.labels(verdict=outcome.outcome.replace(" ", "_")).inc()
