"""A fake Kili GraphQL server on 127.0.0.1 for tests that run the real ``kili`` SDK.

The server resolves the GraphQL operations that ``kili`` 26.2.4 sends for the
calls this project makes. It keeps every project, asset, label, issue and
metadata value in memory and serves image bytes behind the API-key header, so
a test can run the tool against it and then assert what was written.

Usage (the ``fake_kili`` pytest fixture in ``tests/conftest.py`` does the
environment part and stops the server afterwards)::

    server = FakeKili(api_keys={"test-key"})
    server.start()
    project = server.add_project("p1", json_interface=interface)
    server.add_asset("p1", "a1", image=png_bytes, labels=[server.label("JOB_0", "CAT")])
    kili = Kili(api_key="test-key", api_endpoint=server.endpoint)  # with KILI_SDK_SKIP_CHECKS=1
    ...
    server.assets["a1"].metadata      # what the tool wrote
    server.stop()

State (plain attributes, safe to read after the SDK call returned):
``projects`` (id -> ``FakeProject``), ``assets`` (id -> ``FakeAsset``, in
creation order), ``issues`` (list of dicts as ``createIssues`` received them),
``reviewed`` (asset ids sent by ``addAssetsToReview``), ``requests`` (one
``(root field, arguments)`` pair per GraphQL operation, in order; ``calls(field)``
filters it), ``queries`` (the same with the GraphQL document) and
``file_requests`` (``(method, file id, had a valid key)`` per file request).

Failure injection:
``fail_next(target, status=503, times=1)`` fails the next ``times``
requests to ``target`` (a GraphQL root field such as ``"assets"``, or
``"files"`` for image downloads) with that HTTP status;
``graphql_error_next(field, message, code=..., times=1)`` returns a
GraphQL error instead; ``declined`` and ``failed`` are sets of asset ids that
the asset actions (``setAssetsPriority``, ``addAssetsToReview``) report as
declined or failed. ``delay(target, seconds)`` delays every later request to
``target`` by that many seconds before resolving it (0 removes the delay).

Plugins and webhooks: ``createWebhook``, ``updateWebhook``, ``listPlugins``,
``activatePluginOnProject`` and the hosted-plugin upload (``createPlugin`` or
``generateUpdateUrl`` returning an upload URL on this server, ``PUT`` of the
zip, ``createPluginRunner`` / ``updatePluginRunner``,
``getPluginRunnerStatus`` returning ``ACTIVE`` once a zip arrived).
``plugins`` maps each name to a dict with ``kind`` ("webhook" or "hosted"),
``webhookUrl``, ``header``, ``handlerTypes``, ``projectIds`` and, for a hosted
plugin, the uploaded ``archive`` bytes. A second activation on the same
project returns Kili's "already exists" error.

Routes: ``POST /api/label/v2/graphql`` (GraphQL, also the raw ``viewer`` key
check), ``GET``/``HEAD /api/label/v2/files?id=<file id>`` (image bytes) and
``PUT /api/label/v2/uploads?plugin=<name>`` (a hosted plugin's zip, without a key).
Every route except the upload requires ``Authorization: X-API-Key: <key>``
with a key from ``api_keys``; anything else gets HTTP 401. Errors follow the shape that the
SDK expects: ``{"errors": [{"message": ..., "extensions": {"code": ...}}]}``.
"""

from __future__ import annotations

import gzip
import itertools
import json
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from graphql import OperationDefinitionNode, parse, value_from_ast_untyped
from graphql.language import FieldNode

API_PATH = "/api/label/v2"


class GraphQLFailure(Exception):
    """Raised by a resolver to return a GraphQL error."""

    def __init__(self, message: str, code: str = "OPERATION_RESOLUTION_FAILURE") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass
class FakeLabel:
    id: str
    json_response: dict
    label_type: str = "DEFAULT"
    created_at: str = ""
    author_id: str = "user-1"

    def to_graphql(self) -> dict:
        return {
            "id": self.id,
            "jsonResponse": json.dumps(self.json_response),
            "jsonResponseUrl": None,
            "labelType": self.label_type,
            "createdAt": self.created_at,
            "isLatestLabelForUser": True,
            "isLatestDefaultLabelForUser": self.label_type == "DEFAULT",
            "modelName": None,
            "author": {"id": self.author_id, "email": f"{self.author_id}@example.com"},
        }


@dataclass
class FakeAsset:
    id: str
    project_id: str
    external_id: str
    content: str
    labels: list[FakeLabel] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    priority: int = 0
    status: str = "LABELED"
    step: dict | None = None  # {"name": ..., "status": ...} in workflow V2/V3 projects

    def to_graphql(self) -> dict:
        return {
            "id": self.id,
            "externalId": self.external_id,
            "content": self.content,
            "jsonContent": "",
            "jsonMetadata": json.dumps(self.metadata),
            "priority": self.priority,
            "status": self.status,
            "currentStep": self.step,
            "skipped": False,
            "isHoneypot": False,
            "createdAt": "2026-01-01T00:00:00.000Z",
            "resolution": {"width": 8, "height": 8},
            "labels": [label.to_graphql() for label in self.labels],
        }


@dataclass
class FakeProject:
    id: str
    json_interface: dict
    title: str = ""
    input_type: str = "IMAGE"
    workflow_version: str = "V1"
    metadata_properties: dict = field(default_factory=dict)

    def to_graphql(self) -> dict:
        steps = [] if self.workflow_version == "V1" else [{"id": "step-1", "name": "Default"}, {"id": "step-2", "name": "Review"}]
        return {
            "id": self.id,
            "title": self.title or self.id,
            "inputType": self.input_type,
            "jsonInterface": json.dumps(self.json_interface),
            "workflowVersion": self.workflow_version,
            "steps": steps,
            "dataConnections": [],
            "metadataProperties": self.metadata_properties,
        }


def project_fields(value: Any, selections) -> Any:
    """Keep only the selected fields of a resolver's result, as a GraphQL server does."""
    if selections is None or value is None:
        return value
    if isinstance(value, list):
        return [project_fields(item, selections) for item in value]
    result = {}
    for selection in selections:
        if not isinstance(selection, FieldNode):
            continue
        name = selection.name.value
        key = selection.alias.value if selection.alias else name
        sub = selection.selection_set.selections if selection.selection_set else None
        result[key] = project_fields(value.get(name), sub)
    return result


class FakeKili:
    """In-memory Kili projects behind a GraphQL endpoint on 127.0.0.1."""

    def __init__(self, api_keys: set[str] | None = None) -> None:
        self.api_keys = set(api_keys or {"test-key"})
        self.projects: dict[str, FakeProject] = {}
        self.assets: dict[str, FakeAsset] = {}
        self.files: dict[str, tuple[bytes, str]] = {}
        self.issues: list[dict] = []
        self.reviewed: list[str] = []
        self.requests: list[tuple[str, dict]] = []
        self.queries: list[tuple[str, str]] = []  # (root field, GraphQL document) per operation
        self.file_requests: list[tuple[str, str, bool]] = []  # (method, file id, had the key)
        self.handler_errors: list[str] = []  # tracebacks of errors inside request handlers
        self.declined: set[str] = set()
        self.failed: set[str] = set()
        self._failures: dict[str, list[int]] = {}
        self._graphql_errors: dict[str, list[tuple[str, str]]] = {}
        self._delays: dict[str, float] = {}
        self.plugins: dict[str, dict] = {}
        self._ids = itertools.count(1)
        self._clock = datetime(2026, 1, 1, tzinfo=timezone.utc)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # Lifecycle -------------------------------------------------------------

    def start(self) -> FakeKili:
        fake = self

        class Handler(_Handler):
            server_state = fake

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.state = self
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-kili", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "call start() first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def endpoint(self) -> str:
        """The GraphQL endpoint to pass to ``Kili(api_endpoint=...)``."""
        return f"{self.base_url}{API_PATH}/graphql"

    # Building state ----------------------------------------------------------

    def add_project(self, project_id: str, json_interface: dict, **kwargs) -> FakeProject:
        project = FakeProject(id=project_id, json_interface=json_interface, **kwargs)
        self.projects[project_id] = project
        return project

    def label(self, job: str | None, category: str | None, *, label_type: str = "DEFAULT", minutes: int = 0) -> FakeLabel:
        """Build a label: ``job=None`` gives an empty ``jsonResponse``; ``minutes`` orders creation."""
        response = {} if job is None else {job: {"categories": [{"name": category, "confidence": 100}]}}
        created = (self._clock + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        return FakeLabel(id=f"label-{next(self._ids)}", json_response=response, label_type=label_type, created_at=created)

    def add_asset(
        self,
        project_id: str,
        asset_id: str,
        *,
        image: bytes | None = None,
        content: str | None = None,
        labels: list[FakeLabel] | None = None,
        metadata: dict | None = None,
        external_id: str | None = None,
        content_type: str = "image/png",
        **kwargs,
    ) -> FakeAsset:
        """Add an asset; ``image`` is served at this server's own file URL unless ``content`` is given."""
        if content is None:
            file_id = f"file-{asset_id}"
            if image is not None:
                self.files[file_id] = (image, content_type)
            content = f"{self.base_url}{API_PATH}/files?id={file_id}"
        asset = FakeAsset(
            id=asset_id,
            project_id=project_id,
            external_id=external_id or asset_id,
            content=content,
            labels=list(labels or []),
            metadata=dict(metadata or {}),
            **kwargs,
        )
        self.assets[asset_id] = asset
        return asset

    # Failure injection -------------------------------------------------------

    def fail_next(self, target: str, status: int = 503, times: int = 1) -> None:
        """Fail the next ``times`` requests to ``target`` (root field or "files") with HTTP ``status``."""
        with self._lock:
            self._failures.setdefault(target, []).extend([status] * times)

    def graphql_error_next(self, target: str, message: str, code: str = "OPERATION_RESOLUTION_FAILURE", times: int = 1) -> None:
        with self._lock:
            self._graphql_errors.setdefault(target, []).extend([(message, code)] * times)

    def delay(self, target: str, seconds: float) -> None:
        """Delay every later request to ``target`` (a GraphQL root field) by ``seconds`` before responding."""
        with self._lock:
            self._delays[target] = seconds

    def _delay_of(self, target: str) -> float:
        with self._lock:
            return self._delays.get(target, 0.0)

    def _take_failure(self, target: str) -> int | None:
        with self._lock:
            pending = self._failures.get(target)
            return pending.pop(0) if pending else None

    def _take_graphql_error(self, target: str) -> tuple[str, str] | None:
        with self._lock:
            pending = self._graphql_errors.get(target)
            return pending.pop(0) if pending else None

    def pending_failures(self) -> int:
        """Return how many injected failures have not been served yet."""
        with self._lock:
            return sum(len(items) for items in (*self._failures.values(), *self._graphql_errors.values()))

    def calls(self, root_field: str) -> list[dict]:
        """Return the variables of every operation on ``root_field``, in order."""
        return [variables for name, variables in self.requests if name == root_field]

    # Resolvers ---------------------------------------------------------------

    def _project_assets(self, where: dict) -> list[FakeAsset]:
        project_id = (where.get("project") or {}).get("id")
        id_in = where.get("idIn")
        assets = [asset for asset in self.assets.values() if project_id is None or asset.project_id == project_id]
        if where.get("id"):
            assets = [asset for asset in assets if asset.id == where["id"]]
        if id_in is not None:
            assets = [asset for asset in assets if asset.id in set(id_in)]
        return assets

    def _projects(self, where: dict) -> list[FakeProject]:
        if where.get("id"):
            project = self.projects.get(where["id"])
            return [project] if project else []
        return list(self.projects.values())

    def _asset_action(self, where: dict, apply) -> dict:
        outcome = {"succeeded": [], "declined": [], "failed": []}
        for asset_id in where.get("idIn") or []:
            asset = self.assets.get(asset_id)
            entry = {"assetId": asset_id, "externalId": asset.external_id if asset else None}
            if asset is None or asset_id in self.declined:
                outcome["declined"].append(entry)
            elif asset_id in self.failed:
                outcome["failed"].append({**entry, "details": "injected failure"})
            else:
                apply(asset)
                outcome["succeeded"].append(entry)
        return outcome

    def resolve(self, name: str, args: dict) -> Any:
        where = args.get("where") or {}
        first, skip = args.get("first"), args.get("skip") or 0

        def page(items: list) -> list:
            return items[skip : skip + first] if first is not None else items[skip:]

        if name == "projects":
            return page([project.to_graphql() for project in self._projects(where)])
        if name == "countProjects":
            return len(self._projects(where))
        if name == "assets":
            return page([asset.to_graphql() for asset in self._project_assets(where)])
        if name == "countAssets":
            return len(self._project_assets(where))
        if name == "updatePropertiesInAssets":
            return self._update_assets(args["where"], args["data"])
        if name == "setAssetsPriority":
            def set_priority(asset: FakeAsset) -> None:
                asset.priority = args["priority"]

            return self._asset_action(where, set_priority)
        if name == "addAssetsToReview":
            def to_review(asset: FakeAsset) -> None:
                asset.status = "TO_REVIEW"
                self.reviewed.append(asset.id)

            return self._asset_action(where, to_review)
        if name == "createIssues":
            created = []
            for issue in args["issues"]:
                issue_id = f"issue-{next(self._ids)}"
                self.issues.append({"id": issue_id, **issue})
                created.append({"id": issue_id})
            return created
        if name == "updatePropertiesInProject":
            project = self.projects.get(where.get("id"))
            if project is None:
                raise GraphQLFailure(f"project {where.get('id')} not found", "NOT_FOUND")
            properties = args["data"].get("metadataProperties")
            if properties is not None:
                project.metadata_properties = dict(properties)
            return project.to_graphql()
        if name in ("createWebhook", "updateWebhook", "createPlugin", "generateUpdateUrl", "createPluginRunner",
                    "updatePluginRunner", "getPluginRunnerStatus", "listPlugins", "activatePluginOnProject"):
            return self._resolve_plugin(name, args)
        if name in ("labels", "countLabels"):
            labels = []
            for asset in self._project_assets(where.get("asset") or {"project": where.get("project") or {}}):
                for label in asset.labels:
                    if where.get("id") in (None, label.id):
                        labels.append({**label.to_graphql(), "assetId": asset.id})
            return len(labels) if name == "countLabels" else page(labels)
        raise GraphQLFailure(f'Cannot query field "{name}": the fake Kili server does not implement it', "GRAPHQL_VALIDATION_FAILED")

    def _resolve_plugin(self, name: str, args: dict) -> Any:
        data = args.get("data") or {}
        if name in ("createWebhook", "createPlugin"):
            plugin_name = data["pluginName"]
            if plugin_name in self.plugins:
                raise GraphQLFailure(f"an entity Plugin already exists with value {plugin_name}", "ALREADY_EXISTS")
            self.plugins[plugin_name] = {"name": plugin_name, "projectIds": [], "handlerTypes": None}
        if name in ("createWebhook", "updateWebhook"):
            plugin = self._plugin(data["pluginName"])
            plugin.update(kind="webhook", webhookUrl=data["webhookUrl"], header=data.get("header"),
                          handlerTypes=data.get("handlerTypes"))
            return "OK"
        if name in ("createPlugin", "generateUpdateUrl"):
            plugin = self._plugin(data["pluginName"])
            plugin["kind"] = "hosted"
            return f"{self.base_url}{API_PATH}/uploads?plugin={plugin['name']}&id=upload-{next(self._ids)}"
        if name in ("createPluginRunner", "updatePluginRunner"):
            self._plugin(data["pluginName"])["handlerTypes"] = data.get("handlerTypes")
            return "OK"
        if name == "getPluginRunnerStatus":
            return "ACTIVE" if self._plugin(args["name"]).get("archive") else "FAILED"
        if name == "listPlugins":
            return [{"id": plugin_name, "createdAt": "2026-01-01T00:00:00.000Z", "updatedAt": "2026-01-01T00:00:00.000Z",
                     **plugin} for plugin_name, plugin in self.plugins.items()]
        where = args.get("where") or {}
        plugin = self._plugin(where["pluginName"])
        if where["projectId"] in plugin["projectIds"]:
            raise GraphQLFailure(f"an entity Project already exists with value {where['projectId']}", "ALREADY_EXISTS")
        plugin["projectIds"].append(where["projectId"])
        return "OK"

    def _plugin(self, plugin_name: str) -> dict:
        if plugin_name not in self.plugins:
            raise GraphQLFailure(f"plugin {plugin_name} not found", "NOT_FOUND")
        return self.plugins[plugin_name]

    def _update_assets(self, where_array: list[dict], data_array: list[dict]) -> list[dict]:
        updated = []
        for where, data in zip(where_array, data_array):
            asset = self.assets.get(where.get("id"))
            if asset is None:
                raise GraphQLFailure(f"asset {where.get('id')} not found", "NOT_FOUND")
            if "jsonMetadata" in data:
                metadata = data["jsonMetadata"]
                asset.metadata = json.loads(metadata) if isinstance(metadata, str) else dict(metadata)
            if data.get("priority") is not None:
                asset.priority = data["priority"]
            updated.append({"id": asset.id})
        return updated


class _Server(ThreadingHTTPServer):
    state: FakeKili

    def handle_error(self, request, client_address) -> None:
        """Record a handler error instead of printing it; a client that hung up is not one."""
        error = sys.exc_info()[1]
        if isinstance(error, (BrokenPipeError, ConnectionResetError)):
            return
        self.state.handler_errors.append(traceback.format_exc())


class _Handler(BaseHTTPRequestHandler):
    server_state: FakeKili
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes. With Nagle's algorithm on, a kept-alive
    # client's delayed ACK would hold each body back by about 40 ms.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args) -> None:  # noqa: A002  (silence the default stderr log)
        return

    def _send(self, status: int, body: bytes, content_type: str = "application/json", head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode())

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        return any(header == f"X-API-Key: {key}" for key in self.server_state.api_keys)

    # Files -------------------------------------------------------------------

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve_file(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._serve_file(head=False)

    def _serve_file(self, head: bool) -> None:
        state = self.server_state
        url = urlparse(self.path)
        file_id = (parse_qs(url.query).get("id") or [""])[0]
        authorized = self._authorized()
        state.file_requests.append((self.command, file_id, authorized))
        if url.path != f"{API_PATH}/files":
            self._send(404, b"not found", "text/plain", head)
            return
        if not authorized:
            self._send(401, b"missing or invalid API key", "text/plain", head)
            return
        status = state._take_failure("files")
        if status is not None:
            self._send(status, b"injected failure", "text/plain", head)
            return
        if file_id not in state.files:
            self._send(404, b"file not found", "text/plain", head)
            return
        data, content_type = state.files[file_id]
        self._send(200, data, content_type, head)

    def do_PUT(self) -> None:  # noqa: N802
        """Receive a hosted plugin's zip at its upload URL (no API key, as with a signed bucket URL)."""
        state = self.server_state
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlparse(self.path)
        plugin_name = (parse_qs(url.query).get("plugin") or [""])[0]
        if url.path != f"{API_PATH}/uploads" or plugin_name not in state.plugins:
            self._send(404, b"unknown upload URL", "text/plain")
            return
        with state._lock:
            state.plugins[plugin_name]["archive"] = body
        self._send(200, b"", "text/plain")

    # GraphQL -----------------------------------------------------------------

    def do_POST(self) -> None:  # noqa: N802
        state = self.server_state
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if urlparse(self.path).path != f"{API_PATH}/graphql":
            self._send(404, b"not found", "text/plain")
            return
        if not self._authorized():
            self._send_json(401, {"errors": [{"message": "Invalid API key", "extensions": {"code": "UNAUTHENTICATED"}}]})
            return
        request = json.loads(body or b"{}")
        document = parse(request.get("query", ""))
        variables = request.get("variables") or {}
        operation = next(node for node in document.definitions if isinstance(node, OperationDefinitionNode))
        root = operation.selection_set.selections[0]
        assert isinstance(root, FieldNode)
        name = root.name.value
        key = root.alias.value if root.alias else name
        if name == "viewer":
            self._send_json(200, {"data": {key: {"id": "user-1", "email": "user-1@example.com"}}})
            return
        args = {argument.name.value: value_from_ast_untyped(argument.value, variables) for argument in root.arguments}
        with state._lock:
            state.requests.append((name, args))
            state.queries.append((name, request.get("query", "")))
        delay = state._delay_of(name)
        if delay:
            time.sleep(delay)
        status = state._take_failure(name)
        if status is not None:
            self._send(status, b"injected failure", "text/plain")
            return
        error = state._take_graphql_error(name)
        if error is not None:
            self._send_json(200, {"data": None, "errors": [{"message": error[0], "extensions": {"code": error[1]}}]})
            return
        try:
            with state._lock:
                value = state.resolve(name, args)
        except GraphQLFailure as failure:
            self._send_json(200, {"data": None, "errors": [{"message": failure.message, "extensions": {"code": failure.code}}]})
            return
        sub = root.selection_set.selections if root.selection_set else None
        self._send_json(200, {"data": {key: project_fields(value, sub)}})


DIGITS_JOB = "DIGIT"


def digits_interface() -> dict:
    """Return a one-job radio interface with the categories ``D0`` .. ``D9`` (display names "0" .. "9")."""
    categories = {f"D{digit}": {"name": str(digit), "children": []} for digit in range(10)}
    return {"jobs": {DIGITS_JOB: {"mlTask": "CLASSIFICATION", "isChild": False, "required": 1,
                                  "instruction": "Digit", "content": {"input": "radio", "categories": categories}}}}


def add_digits_project(
    server: FakeKili, project_id: str = "digits", *, count: int = 200, noise: float = 0.1, seed: int = 0
) -> dict[str, tuple[str, str]]:
    """Add scikit-learn's first ``count`` digits as PNG assets with a seeded share of labels flipped.

    Return ``{asset_id: (true category, given category)}``. Every asset also
    carries a foreign metadata key, ``source``, that the tool must keep.
    """
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    flipped = set(rng.choice(count, size=int(round(noise * count)), replace=False).tolist())
    server.add_project(project_id, digits_interface(), title="Digits")
    truth = {}
    for index in range(count):
        true_digit = int(digits.target[index])
        given = (true_digit + int(rng.integers(1, 10))) % 10 if index in flipped else true_digit
        pixels = (digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, "PNG")
        asset_id = f"digit-{index:04d}"
        server.add_asset(project_id, asset_id, image=buffer.getvalue(),
                         labels=[server.label(DIGITS_JOB, f"D{given}")], metadata={"source": "sklearn-digits"})
        truth[asset_id] = (f"D{true_digit}", f"D{given}")
    return truth
