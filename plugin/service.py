"""The self-hosted webhook service (FastAPI, run under uvicorn by ``kili-label-errors serve``).

Routes:

- ``POST /webhook`` (also ``POST /``): a Kili webhook call
  ``{eventType, logPayload{runId, projectId}, payload{label, asset_id}}``.
  The ``Authorization`` header must equal the secret (constant-time
  comparison), else 401. A body over ``max_body_bytes`` gets 413, a malformed
  one 422 with the reason. An accepted event is stored in the SQLite inbox
  before the response, 202 ``{"status": "queued"}`` (or ``"duplicate"`` for
  a label id already stored). Nothing is stored for a rejected request.
- ``GET /health``: the loaded model version, queue depth and last error, as JSON.
- ``GET /metrics``: counters and latency figures in the Prometheus text format.
- ``POST /retrain``: start a full retrain now (same secret as the webhook);
  202 with its start time, or 409 with the running one's start time.

The worker thread starts and stops with the application (lifespan).
"""

from __future__ import annotations

import copy
import hmac
import json
import logging
import time
from collections.abc import Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from training.retrain import RetrainAlreadyRunning

from .config import PluginConfig
from .inbox import Event, Inbox
from .metrics import CONTENT_TYPE, ServiceMetrics
from .models import ModelHolder
from .retraining import RetrainManager, RetrainScheduler, trainer_policy
from .worker import BatchProcessor, PluginKiliProject, Worker

logger = logging.getLogger(__name__)

EVENT_TYPES = ("onSubmit", "onReview")


class InvalidEvent(ValueError):
    """A webhook body that is not a valid Kili event; the message is the reason sent back with 422."""


def parse_event(body: object, project_id: str) -> Event:
    """Validate a decoded webhook body and return the event to store."""
    if not isinstance(body, Mapping):
        raise InvalidEvent(f"the body must be a JSON object, got {type(body).__name__}")

    event_type = body.get("eventType")
    if event_type not in EVENT_TYPES:
        raise InvalidEvent(f"eventType must be one of {', '.join(EVENT_TYPES)}, got {event_type!r}")
    log_payload = body.get("logPayload")
    if not isinstance(log_payload, Mapping):
        raise InvalidEvent("logPayload must be an object with runId and projectId")
    if log_payload.get("projectId") != project_id:
        raise InvalidEvent(
            f"logPayload.projectId is {log_payload.get('projectId')!r}, but this service scores project "
            f"{project_id!r}; point this project's webhook at its own service"
        )

    payload = body.get("payload")
    if not isinstance(payload, Mapping):
        raise InvalidEvent("payload must be an object with label and asset_id")
    asset_id = payload.get("asset_id")
    if not isinstance(asset_id, str) or not asset_id:
        raise InvalidEvent(f"payload.asset_id must be a non-empty string, got {asset_id!r}")
    label = payload.get("label")
    if not isinstance(label, Mapping):
        raise InvalidEvent(f"payload.label must be an object, got {type(label).__name__}")
    label_id = label.get("id")
    if not isinstance(label_id, str) or not label_id:
        raise InvalidEvent(f"payload.label.id must be a non-empty string, got {label_id!r}")
    response = label.get("jsonResponse")
    if response is not None and not isinstance(response, (Mapping, str)):
        raise InvalidEvent(f"payload.label.jsonResponse must be an object or a JSON string, got {type(response).__name__}")

    run_id = log_payload.get("runId")
    return Event(
        label_id=label_id, asset_id=asset_id, project_id=project_id, event_type=event_type,
        label=dict(label), received_at=time.time(), run_id=str(run_id) if run_id is not None else None,
    )


class BodyTooLarge(Exception):
    """A request body over the size limit."""


async def read_limited(request: Request, limit: int) -> bytes:
    """Read the body, stopping as soon as it passes ``limit`` bytes (chunked bodies have no Content-Length)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class Service:
    """Dependencies of the application: the inbox, the worker, the models and the metrics."""

    config: PluginConfig
    secret: str
    inbox: Inbox
    worker: Worker
    models: ModelHolder
    metrics: ServiceMetrics
    retrain: RetrainManager | None = None


def create_app(service: Service) -> FastAPI:
    """Build the FastAPI application around a ``Service``."""
    config, metrics = service.config, service.metrics
    secret = service.secret.encode("utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(service.models.current)
        try:
            # Declared now, so that the first event's write does not wait for it (the SDK pauses 1 s after a mutation).
            await run_in_threadpool(service.worker.processor.project.declare_score_property)
        except Exception as error:  # noqa: BLE001  (the first write declares it again)
            logger.warning("Cannot declare the score key as a number in project %s yet: %s", config.project_id, error)
        service.worker.start()
        scheduler = RetrainScheduler(service.retrain) if service.retrain is not None else None
        if scheduler is not None:
            scheduler.start()
        logger.info("Webhook service for project %s ready (inbox %s)", config.project_id, service.inbox.path)
        try:
            yield
        finally:
            if scheduler is not None:
                await run_in_threadpool(scheduler.stop)
            await run_in_threadpool(service.worker.stop)
            service.worker.processor.close()
            service.inbox.close()

    app = FastAPI(title="kili-label-errors webhook", lifespan=lifespan)

    def reject(status: int, reason: str) -> JSONResponse:
        metrics.rejected.labels(status=str(status)).inc()
        return JSONResponse({"error": reason}, status_code=status)

    async def receive(request: Request) -> Response:
        received_secret = request.headers.get("authorization", "").encode("utf-8")
        if not hmac.compare_digest(received_secret, secret):
            logger.warning("Rejected a webhook call from %s: missing or wrong Authorization header",
                           request.client.host if request.client else "?")
            return reject(401, "missing or wrong Authorization header: send the secret configured with the webhook")
        try:
            raw = await read_limited(request, config.max_body_bytes)
        except BodyTooLarge:
            logger.warning("Rejected a webhook call over %d bytes with 413", config.max_body_bytes)
            return reject(413, f"body larger than {config.max_body_bytes} bytes (max_body_bytes in the plugin configuration)")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            logger.warning("Rejected a webhook call whose body is not valid JSON: %s", error)
            return reject(422, f"the body is not valid JSON: {error}")
        try:
            event = parse_event(body, config.project_id)
        except InvalidEvent as error:
            logger.warning("Rejected a webhook call: %s", error)
            return reject(422, str(error))
        stored = await run_in_threadpool(service.inbox.add, event)
        if not stored:
            metrics.duplicates.inc()
            logger.info("Label %s of asset %s is already in the inbox; not queued again", event.label_id, event.asset_id)
            return JSONResponse({"status": "duplicate", "label_id": event.label_id}, status_code=202)
        metrics.received.inc()
        service.worker.notify()
        return JSONResponse({"status": "queued", "label_id": event.label_id}, status_code=202)

    async def request_retrain(request: Request) -> Response:
        received_secret = request.headers.get("authorization", "").encode("utf-8")
        if not hmac.compare_digest(received_secret, secret):
            return reject(401, "missing or wrong Authorization header: send the webhook secret")
        if service.retrain is None:
            return reject(404, "retraining is not set up in this service")
        try:
            status = await run_in_threadpool(service.retrain.request, "requested over HTTP")
        except RetrainAlreadyRunning as error:
            return JSONResponse({"status": "already running", "started_at": error.started_at}, status_code=409)
        return JSONResponse({"status": status.state, "started_at": status.started_at, "log": status.log}, status_code=202)

    app.add_api_route("/retrain", request_retrain, methods=["POST"])
    app.add_api_route("/webhook", receive, methods=["POST"])
    app.add_api_route("/", receive, methods=["POST"])

    @app.get("/health")
    def health() -> JSONResponse:
        # Loads a version that became current since the last batch, so the response is up to date.
        version = service.models.current()
        last_error = service.worker.last_error or service.models.last_error
        return JSONResponse({
            "status": "ok" if version is not None and service.worker.is_alive() else "degraded",
            "model_version": version.name if version else None,
            "providers": list(version.folds[0].providers) if version and version.folds else [],
            "queue_depth": service.inbox.depth(),
            "events": service.inbox.counts(),
            "worker_alive": service.worker.is_alive(),
            "last_error": last_error,
            "retrain": service.retrain.status() if service.retrain is not None else None,
        })

    @app.get("/metrics")
    def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


def build_service(config: PluginConfig, *, secret: str | None = None, gateway=None) -> Service:
    """Connect to Kili and build the inbox, models, processor and worker for ``config``."""
    from training.sources.kili_gateway import KiliGateway

    secret = secret if secret is not None else config.secret()
    if gateway is None:
        gateway = KiliGateway(api_key=config.api_key(), api_endpoint=config.api_endpoint)
    project = PluginKiliProject(
        gateway, config.project_id, job=config.job, key_prefix=config.key_prefix,
        send_to_review=config.send_to_review, create_issues=config.create_issues,
    )
    # One project object per writer thread, because a write keeps per-batch state on it. The copies
    # share the gateway and the job; prime() and write_results() rebind the per-batch attributes.
    projects = [project] + [copy.copy(project) for _ in range(config.write_workers - 1)]
    inbox = Inbox(config.inbox_path)
    models = ModelHolder(config.models_dir, providers=config.providers)
    metrics = ServiceMetrics(queue_depth=inbox.depth)
    processor = BatchProcessor(config, projects[0], models, metrics=metrics)
    worker = Worker(inbox, processor, max_batch_size=config.max_batch_size, projects=projects, metrics=metrics)
    api_key = config.api_key()
    retrain = RetrainManager(
        config.models_dir,
        trainer_policy(config),
        lambda since: inbox.count_received_since(since.timestamp() if since else None),
        environment={"KILI_API_KEY": api_key} if api_key else None,
    )
    return Service(
        config=config, secret=secret, inbox=inbox, worker=worker, models=models, metrics=metrics, retrain=retrain
    )
