"""Helpers for the plugin tests: a live service on 127.0.0.1, webhook bodies and polling."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import httpx
import uvicorn
from conftest import DIGITS_PROJECT
from fake_kili import FakeKili

from plugin.config import PluginConfig, parse_config
from plugin.service import Service, build_service, create_app

SECRET = "webhook-secret-for-tests"
PREFIX = "label_error_"


def plugin_config(tmp_path, models_dir, **overrides) -> PluginConfig:
    data = {
        "project_id": DIGITS_PROJECT,
        "models_dir": str(models_dir),
        "inbox_path": str(tmp_path / "inbox.sqlite"),
        "providers": ["CPUExecutionProvider"],
        "retry": {"attempts": 3, "initial_wait_seconds": 0.05, "max_wait_seconds": 0.2},
        **overrides,
    }
    return parse_config(data, tmp_path)


def webhook_body(server: FakeKili, asset_id: str, *, label=None, event_type: str = "onSubmit",
                 project_id: str = DIGITS_PROJECT) -> dict:
    """Build the body Kili sends for the latest label of an asset (or for ``label``)."""
    label = label or server.assets[asset_id].labels[-1]
    return {
        "eventType": event_type,
        "logPayload": {"runId": f"run-{label.id}", "projectId": project_id},
        "payload": {
            "label": {"id": label.id, "jsonResponse": label.json_response, "labelType": label.label_type,
                      "authorId": label.author_id, "createdAt": label.created_at},
            "asset_id": asset_id,
        },
    }


class LiveService:
    """The webhook service under uvicorn in a thread, on a free port of 127.0.0.1."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        config = uvicorn.Config(create_app(service), log_config=None, access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def __enter__(self) -> LiveService:
        self.thread.start()
        wait_for(lambda: self.server.started, 60, "the service to start")
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)

    def post(self, body, secret: str | None = SECRET, **kwargs) -> httpx.Response:
        headers = {"Authorization": secret} if secret is not None else {}
        return self.client.post("/webhook", json=body, headers=headers, **kwargs)

    def wait_idle(self, timeout: float = 60) -> None:
        """Wait until every stored event is finished."""
        wait_for(lambda: self.service.inbox.depth() == 0, timeout, "the inbox to drain")


def start_service(config: PluginConfig) -> LiveService:
    return LiveService(build_service(config, secret=SECRET))


def wait_for(condition: Callable[[], bool], timeout: float, description: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {description}")
        time.sleep(0.05)


def stable(metadata: dict) -> dict:
    """Drop the scoring time, which differs between any two writes."""
    return {key: value for key, value in metadata.items() if key != PREFIX + "scored_at"}
