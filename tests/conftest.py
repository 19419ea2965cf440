"""Shared pytest fixtures."""

from __future__ import annotations

import pytest

from fake_kili import FakeKili

FAKE_API_KEY = "test-key"


@pytest.fixture
def fake_kili(tmp_path_factory, monkeypatch):
    """Start a fake Kili server on 127.0.0.1 and point the SDK's environment at it.

    The SDK skips its connection checks (``KILI_SDK_SKIP_CHECKS``), reads no
    config file or key of the user running the tests (HOME and CWD are
    temporary folders) and gets the server's endpoint and a valid API key
    through ``KILI_API_ENDPOINT`` and ``KILI_API_KEY``.
    """
    home = tmp_path_factory.mktemp("kili-home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    monkeypatch.setenv("KILI_SDK_SKIP_CHECKS", "1")
    monkeypatch.setenv("KILI_DISABLE_TQDM", "true")
    server = FakeKili(api_keys={FAKE_API_KEY}).start()
    monkeypatch.setenv("KILI_API_ENDPOINT", server.endpoint)
    monkeypatch.setenv("KILI_API_KEY", FAKE_API_KEY)
    try:
        yield server
    finally:
        server.stop()
    assert server.handler_errors == [], "the fake Kili server failed:\n" + "\n".join(server.handler_errors)
