"""Processing of stored events in micro-batches.

``BatchProcessor.process`` handles one batch of events with one asset query
(content and current metadata of every asset of the batch), parallel image
downloads and one model call. It writes once through
``KiliProject.write_results``, the writer the trainer uses, so both produce
the same metadata for the same verdict. Kili and network errors are retried with exponential backoff
(tenacity); the SDK's own retries run inside each attempt.

``Worker`` is the loop of the self-hosted service: it claims whatever is
pending right now (up to ``max_batch_size``), processes it and records each
event's final status in the inbox. When the queue is idle it sleeps until the
webhook handler wakes it, so a lone event waits for no batching delay. Events
that arrive while a batch is processed form the next batch.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
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

ASSET_PAGE_SIZE = 100  # Kili's page size for queries (kili.core.constants.QUERY_BATCH_SIZE)
ASSETS_QUERY = """
query assets($where: AssetWhere!, $first: PageSize!, $skip: Int!) {
  data: assets(where: $where, skip: $skip, first: $first) { id externalId content jsonMetadata }
}
"""
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
    trainer's. The score key is declared as a number once per process: shallow copies (one
    per writer thread) share the ``threading.Event`` that records it.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._primed: dict[str, dict] | None = None
        self._score_property_declared = threading.Event()

    def prime(self, state: Mapping[str, dict], known: Mapping[str, _KnownAsset]) -> None:
        """Set the batch's asset state (metadata and label id per asset) for the next write."""
        self._primed = dict(state)
        self._known = dict(known)

    def _current_state(self) -> dict[str, dict]:
        if self._primed is None:
            raise RuntimeError("PluginKiliProject.prime must be called before each write")
        return self._primed

    def _declare_score_property(self) -> None:
        if not self._score_property_declared.is_set():
            super()._declare_score_property()
            self._score_property_declared.set()

    def declare_score_property(self) -> None:
        """Declare the score key as a number in the project unless this process already did."""
        self._declare_score_property()


@dataclass
class EventOutcome:
    """Final state of one event: its inbox status, a short outcome and the error if it failed."""

    status: str
    outcome: str
    error: str | None = None


@dataclass
class BatchReport:
    """The outcome of each event of a batch, or ``waiting`` when no model version exists."""

    outcomes: dict[str, EventOutcome] = field(default_factory=dict)
    waiting: bool = False
    milliseconds: dict[str, float] = field(default_factory=dict)  # time per step, for the log


@dataclass
class PreparedBatch:
    """A scored batch waiting to be written: results, the assets' state and each event's outcome."""

    results: list[AssetResult] = field(default_factory=list)
    state: dict[str, dict] = field(default_factory=dict)
    known: dict[str, _KnownAsset] = field(default_factory=dict)
    outcomes: dict[str, EventOutcome] = field(default_factory=dict)  # final before the write (superseded, not found)
    final: dict[str, EventOutcome] = field(default_factory=dict)  # final once the write succeeded
    milliseconds: dict[str, float] = field(default_factory=dict)  # time per step: read, images, model

    @property
    def asset_ids(self) -> set[str]:
        return set(self.state)


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

    def _retrying(self, description: str, function, *args):
        """Call ``function`` with the configured retries on Kili and network errors."""
        policy = self.config.retry

        def log_retry(state) -> None:
            if self.metrics is not None:
                self.metrics.retries.inc()
            logger.warning("%s failed (attempt %d of %d), retrying: %s",
                           description, state.attempt_number, policy.attempts, state.outcome.exception())

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
                raise BatchError(f"{description} failed after {policy.attempts} attempts: {error}") from error
            raise

    def process(self, events: Sequence[Event]) -> BatchReport:
        """Process one batch with this processor's project; raise ``BatchError`` when Kili stays unreachable."""
        prepared = self.prepare(events)
        if isinstance(prepared, BatchReport):
            return prepared
        return self.write(prepared, self.project)

    def prepare(self, events: Sequence[Event]) -> PreparedBatch | BatchReport:
        """Read the batch's assets in one query and score them; return a waiting report when no model exists."""
        version = self.models.current()
        if version is None and self.config.no_model == "wait":
            return BatchReport(waiting=True)

        prepared = PreparedBatch()
        latest = _latest_per_asset(events)
        for event in events:
            if latest[event.asset_id] is not event:
                prepared.outcomes[event.label_id] = EventOutcome(
                    DONE, f"superseded by label {latest[event.asset_id].label_id} in the same batch")
        current = list(latest.values())
        asset_ids = [event.asset_id for event in current]

        started = time.monotonic()
        records = self._retrying(f"the asset query of {len(asset_ids)} assets", self._read_assets, asset_ids)
        prepared.milliseconds["read"] = (time.monotonic() - started) * 1000
        found = [event for event in current if event.asset_id in records]
        for event in current:
            if event.asset_id not in records:
                prepared.outcomes[event.label_id] = EventOutcome(
                    FAILED, "asset not found",
                    f"asset {event.asset_id} is not in project {self.project.project_id} or this API key cannot read it")

        if version is None:
            scored = [Scored(event.asset_id, reason=NO_MODEL_REASON) for event in found]
            version_name = NO_MODEL_VERSION
        else:
            started = time.monotonic()
            images = self._download([records[event.asset_id].get("content") or "" for event in found])
            prepared.milliseconds["download"] = (time.monotonic() - started) * 1000
            started = time.monotonic()
            items = [ScoreItem(event.asset_id, event.label, image=data, image_error=error)
                     for event, (data, error) in zip(found, images)]
            scored = score_items(version, self.project.job, items, executor=self.executor)
            prepared.milliseconds["decode and model"] = (time.monotonic() - started) * 1000
            version_name = version.name

        prepared.results = self._results(scored, version_name)
        prepared.state = {event.asset_id: {"metadata": dict(records[event.asset_id].get("jsonMetadata") or {}),
                                           "label_id": event.label_id} for event in found}
        prepared.known = {
            result.asset_id: _KnownAsset(content=records[result.asset_id].get("content") or "",
                                         metadata=prepared.state[result.asset_id]["metadata"],
                                         label_id=prepared.state[result.asset_id]["label_id"],
                                         category=result.category or "")
            for result in scored if result.category
        }
        for event, result in zip(found, scored):
            prepared.final[event.label_id] = _event_outcome(result, version is None)
        return prepared

    def write(self, prepared: PreparedBatch, project: PluginKiliProject) -> BatchReport:
        """Write a prepared batch through ``project`` (one per thread); return each event's outcome."""
        started = time.monotonic()
        self._retrying(f"the write of {len(prepared.results)} results", self._write,
                       project, prepared.results, prepared.state, prepared.known)
        milliseconds = {**prepared.milliseconds, "write": (time.monotonic() - started) * 1000}
        return BatchReport(outcomes={**prepared.outcomes, **prepared.final}, milliseconds=milliseconds)

    def _read_assets(self, asset_ids: Sequence[str]) -> dict[str, dict]:
        """Return the content URL and current metadata of each asset, one GraphQL call per 100 assets.

        ``kili.assets()`` (kili 26.2.4) sends three calls for any read: the workflow version, a
        count and the page. The page query alone has the shape of the SDK's own
        (``kili/adapters/kili_api_gateway/asset/operations.py``) and goes through the same client,
        so it gets the SDK's retries and rate limit.
        """
        gateway = self.project.gateway
        records: dict[str, dict] = {}
        for start in range(0, len(asset_ids), ASSET_PAGE_SIZE):
            page = list(asset_ids[start : start + ASSET_PAGE_SIZE])
            variables = {"where": {"project": {"id": self.project.project_id}, "idIn": page},
                         "first": len(page), "skip": 0}
            result = gateway._call(f"the asset query of project {self.project.project_id!r}",
                                   gateway.kili.graphql_client.execute, ASSETS_QUERY, variables)
            for record in result["data"]:
                records[record["id"]] = {**record, "jsonMetadata": _metadata_dict(record.get("jsonMetadata"))}
        return records

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

    def _write(self, project: PluginKiliProject, results: Sequence[AssetResult], state: Mapping[str, dict],
               known: Mapping[str, _KnownAsset]) -> None:
        if not results:
            return
        project.prime(state, known)
        summary = project.write_results(results)
        if summary.failed:
            raise KiliApiError(f"the metadata write of {summary.failed} assets failed: {'; '.join(summary.errors)}")


def _metadata_dict(value: object) -> dict:
    """Decode an asset's ``jsonMetadata``, which Kili returns as a JSON string; invalid JSON gives {} as in the SDK."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str) or not value.strip():
        return {}
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError:
        return {}
    return decoded if isinstance(decoded, dict) else {}


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
    """The service's processing loop over the inbox.

    The loop thread claims and scores batches; writes run on up to
    ``write_workers`` writer threads, each with its own ``PluginKiliProject``.
    The SDK pauses about 1 s after each mutation batch (kili 26.2.4,
    ``mutate_from_paginated_call``), so the next batch is read and scored
    while earlier writes finish. A batch never takes an event of an asset
    that an unfinished batch is writing, so the writes of one asset stay in
    order and each reads the metadata that the previous one wrote.
    """

    def __init__(
        self,
        inbox: Inbox,
        processor: BatchProcessor,
        *,
        max_batch_size: int,
        projects: Sequence[PluginKiliProject] | None = None,
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
        writer_projects = list(projects or [processor.project])
        self._projects: queue.SimpleQueue[PluginKiliProject] = queue.SimpleQueue()
        for project in writer_projects:
            self._projects.put(project)
        self._slots = threading.Semaphore(len(writer_projects))
        self._writers = ThreadPoolExecutor(max_workers=len(writer_projects), thread_name_prefix="kle-writer")
        self._in_flight: set[str] = set()  # asset ids of batches being written
        self._in_flight_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._waiting_logged = False

    def notify(self) -> None:
        """Wake the loop: an event was stored."""
        self._wake.set()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop claiming batches and wait for the running writes to finish."""
        self._stopping.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout)
        self._writers.shutdown(wait=True)

    def run(self) -> None:
        recovered = self.inbox.recover()
        if recovered:
            logger.info("Recovered %d events left in processing by a previous run; they are processed again", recovered)
        logger.info("Worker started: batches of up to %d events", self.max_batch_size)
        while not self._stopping.is_set():
            self._wake.clear()
            if not self._slots.acquire(timeout=self.idle_poll_seconds):
                continue
            with self._in_flight_lock:
                busy = set(self._in_flight)
            try:
                batch = self.inbox.claim_batch(self.max_batch_size, exclude_asset_ids=busy)
            except sqlite3.Error as error:
                self._slots.release()
                self.last_error = f"inbox {self.inbox.path}: {error}"
                logger.error("Claiming events from the inbox %s failed, retrying in 1 s: %s", self.inbox.path, error)
                self._stopping.wait(1.0)
                continue
            if not batch:
                self._slots.release()
                self._wake.wait(self.idle_poll_seconds)
                continue
            self.run_batch(batch)
        logger.info("Worker stopped")

    def run_batch(self, batch: Sequence[Event]) -> None:
        """Score a claimed batch and hand it to a writer thread; the caller has acquired one writer slot."""
        started = time.monotonic()
        label_ids = [event.label_id for event in batch]
        try:
            prepared = self.processor.prepare(batch)
        except Exception as error:  # noqa: BLE001  (any failure must end the batch's events, never the loop)
            self._fail(batch, error)
            self._slots.release()
            return
        if isinstance(prepared, BatchReport):  # no model version yet: the events wait
            self._slots.release()
            self.inbox.release(label_ids)
            if not self._waiting_logged:
                logger.warning("No model version in %s yet: %d events wait in the inbox until one is trained",
                               self.processor.models.models_dir, len(batch))
                self._waiting_logged = True
            self._stopping.wait(self.no_model_poll_seconds)
            return
        self._waiting_logged = False
        assets = {event.asset_id for event in batch}
        with self._in_flight_lock:
            self._in_flight |= assets
        self._writers.submit(self._write, batch, prepared, assets, started)

    def _write(self, batch: Sequence[Event], prepared: PreparedBatch, assets: set[str], started: float) -> None:
        project = self._projects.get()
        try:
            report = self.processor.write(prepared, project)
        except Exception as error:  # noqa: BLE001  (a writer thread must record the failure, never die)
            self._fail(batch, error)
        else:
            self._record(batch, report, started)
        finally:
            self._projects.put(project)
            with self._in_flight_lock:
                self._in_flight -= assets
            self._slots.release()
            self._wake.set()  # events of these assets may have been left for later

    def _fail(self, batch: Sequence[Event], error: Exception) -> None:
        label_ids = [event.label_id for event in batch]
        self.last_error = f"{type(error).__name__}: {error}"
        logger.error("Batch of %d events (labels %s) failed: %s", len(batch), ", ".join(label_ids[:5]), error,
                     exc_info=not isinstance(error, BatchError))
        self.inbox.finish(label_ids, FAILED, outcome="failed", error=str(error))
        if self.metrics is not None:
            self.metrics.failed.inc(len(batch))

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
        steps = ", ".join(f"{step} {value:.0f}" for step, value in report.milliseconds.items())
        logger.info("Processed a batch of %d events in %.0f ms (%s ms): %s", len(batch),
                    (time.monotonic() - started) * 1000, steps,
                    ", ".join(f"{key} {value}" for key, value in sorted(counts.items())))

    def _count(self, outcome: EventOutcome) -> None:
        if outcome.status == FAILED:
            self.metrics.failed.inc()
        elif outcome.status == SKIPPED:
            self.metrics.skipped.inc()
        elif outcome.outcome.startswith("not scorable"):
            self.metrics.unscorable.inc()
        elif outcome.outcome in ("flagged", "not flagged"):
            self.metrics.scored.labels(verdict=outcome.outcome.replace(" ", "_")).inc()
