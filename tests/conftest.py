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


DIGITS_PROJECT = "digits"
DIGITS_COUNT = 150


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory, request):
    """Train one model version on a fake Kili project of digits, once per test session.

    Return a dict with ``models_dir``, ``version_dir``, ``truth`` (asset id ->
    (true, given) category), ``rows`` (the trainer's verdict rows) and
    ``metadata`` / ``priority`` (what the trainer wrote per asset). Tests
    rebuild the same project in their own ``fake_kili`` server with
    ``fake_kili.add_digits_project(server, DIGITS_PROJECT, count=DIGITS_COUNT)``.
    """
    from fake_kili import add_digits_project

    from training.pipeline import TrainConfig, train
    from training.sources.kili import KiliProject
    from training.sources.kili_gateway import KiliGateway

    root = tmp_path_factory.mktemp("trained-digits")
    # The backbone's ONNX export and the image features are cached across test runs.
    cache = request.config.cache.mkdir("plugin-digits-cache")
    server = FakeKili(api_keys={FAKE_API_KEY}).start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("HOME", str(root))
            patch.setenv("KILI_SDK_SKIP_CHECKS", "1")
            patch.setenv("KILI_DISABLE_TQDM", "true")
            truth = add_digits_project(server, DIGITS_PROJECT, count=DIGITS_COUNT, noise=0.1, seed=0)
            source = KiliProject(KiliGateway(api_key=FAKE_API_KEY, api_endpoint=server.endpoint), DIGITS_PROJECT)
            config = TrainConfig(models_dir=root / "models", cache_dir=cache, folds=3, progress=False,
                                 drop_rare_classes=True)
            result = train(source, config)
    finally:
        server.stop()
    return {
        "models_dir": root / "models",
        "version_dir": result.version_dir,
        "truth": truth,
        "rows": result.rows,
        "metadata": {asset_id: dict(asset.metadata) for asset_id, asset in server.assets.items()},
        "priority": {asset_id: asset.priority for asset_id, asset in server.assets.items()},
    }
