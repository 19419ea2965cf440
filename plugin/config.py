"""The plugin's settings: loading and validating ``plugin_config.json``.

Every key is checked when the service starts, and each error names the key,
the expected value and the value found. Relative paths are resolved against
the folder of the configuration file. The webhook secret and the Kili API key
never appear in the file: it names the environment variables that hold them.
docs/plugin.md describes every key.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .metadata import DEFAULT_KEY_PREFIX, MAX_PRIORITY
from .retrain_policy import RetrainPolicy

PROVIDER_NAMES = ("CUDAExecutionProvider", "CPUExecutionProvider")
NO_MODEL_ACTIONS = ("wait", "skip")
THRESHOLD_SOURCES = ("model_version",)
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
KEY_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}")

KNOWN_KEYS = {
    "project_id", "job", "key_prefix", "thresholds", "priority", "review", "models_dir", "providers",
    "secret_env", "api_key_env", "api_endpoint", "inbox_path", "no_model", "max_batch_size",
    "max_body_bytes", "download_workers", "write_workers", "retry", "listen", "retrain",
}


class ConfigError(ValueError):
    """An invalid plugin configuration; the message names the key and the expected value."""


@dataclass(frozen=True)
class PriorityMapping:
    """Mapping from a verdict to a Kili review priority (higher is reviewed first).

    Flagged labels get ``flagged_min``..``flagged_max`` and unflagged ones
    0..``unflagged_max``. Within each range a lower score gets a higher
    priority. The defaults reproduce ``plugin.metadata.review_priority``,
    which the trainer uses.
    """

    def priority(self, score: float, flagged: bool) -> int:
        """Return the priority of a label with quality ``score`` (0 likely wrong, 1 likely right)."""
        likelihood = 1.0 - min(max(float(score), 0.0), 1.0)
        if flagged:
            return self.flagged_min + int(math.floor(likelihood * (self.flagged_max - self.flagged_min)))
        return int(math.floor(likelihood * self.unflagged_max))

    flagged_min: int = MAX_PRIORITY // 2 + 1
    flagged_max: int = MAX_PRIORITY
    unflagged_max: int = MAX_PRIORITY // 2


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of a batch on Kili and network errors (exponential backoff)."""

    attempts: int = 5
    initial_wait_seconds: float = 0.5
    max_wait_seconds: float = 30.0


@dataclass(frozen=True)
class PluginConfig:
    """Validated contents of ``plugin_config.json``."""

    project_id: str
    models_dir: Path
    inbox_path: Path
    job: str | None = None
    key_prefix: str = DEFAULT_KEY_PREFIX
    thresholds: str = "model_version"
    priority: PriorityMapping = field(default_factory=PriorityMapping)
    send_to_review: bool = False
    create_issues: bool = False
    providers: tuple[str, ...] = ("auto",)
    secret_env: str = "KILI_LABEL_ERRORS_SECRET"
    api_key_env: str = "KILI_API_KEY"
    api_endpoint: str | None = None
    no_model: str = "wait"
    max_batch_size: int = 32
    max_body_bytes: int = 1_000_000
    download_workers: int = 8
    write_workers: int = 32
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    host: str = "127.0.0.1"
    port: int = 8080
    retrain: RetrainPolicy | None = None  # None: retrain only when requested

    def secret(self) -> str:
        """Return the webhook secret from the environment variable that ``secret_env`` names."""
        value = os.environ.get(self.secret_env, "")
        if not value:
            raise ConfigError(
                f"the webhook secret is missing: environment variable {self.secret_env} (named by "
                f"\"secret_env\" in the plugin configuration) is unset or empty; set it to the secret "
                "you chose for the webhook (the value `kili-label-errors deploy` sends to Kili from the same variable)"
            )
        return value

    def api_key(self) -> str | None:
        """Return the Kili API key from the environment variable that ``api_key_env`` names, if set."""
        return os.environ.get(self.api_key_env) or None


def _expect(condition: bool, key: str, expected: str, value: object) -> None:
    if not condition:
        raise ConfigError(f"plugin configuration key \"{key}\" must be {expected}, got {value!r}")


def _integer(data: Mapping, key: str, default: int, minimum: int, maximum: int, path: str | None = None) -> int:
    name = path or key
    value = data.get(key, default)
    _expect(isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= maximum,
            name, f"an integer from {minimum} to {maximum}", value)
    return value


def _number(data: Mapping, key: str, default: float, minimum: float, maximum: float, path: str) -> float:
    value = data.get(key, default)
    _expect(isinstance(value, (int, float)) and not isinstance(value, bool) and minimum <= value <= maximum,
            path, f"a number from {minimum} to {maximum}", value)
    return float(value)


def _boolean(data: Mapping, key: str, default: bool, path: str) -> bool:
    value = data.get(key, default)
    _expect(isinstance(value, bool), path, "true or false", value)
    return value


def _env_name(data: Mapping, key: str, default: str) -> str:
    value = data.get(key, default)
    _expect(isinstance(value, str) and ENV_NAME.fullmatch(value) is not None, key,
            "the name of an environment variable (letters, digits and _), never the value itself", value)
    return value


def _priority(value: object) -> PriorityMapping:
    if value is None:
        return PriorityMapping()
    _expect(isinstance(value, Mapping), "priority",
            "an object with flagged_min, flagged_max and unflagged_max", value)
    unknown = set(value) - {"flagged_min", "flagged_max", "unflagged_max"}
    _expect(not unknown, "priority", "an object with only flagged_min, flagged_max and unflagged_max",
            sorted(unknown))
    defaults = PriorityMapping()
    mapping = PriorityMapping(
        flagged_min=_integer(value, "flagged_min", defaults.flagged_min, 0, 1_000_000, "priority.flagged_min"),
        flagged_max=_integer(value, "flagged_max", defaults.flagged_max, 0, 1_000_000, "priority.flagged_max"),
        unflagged_max=_integer(value, "unflagged_max", defaults.unflagged_max, 0, 1_000_000, "priority.unflagged_max"),
    )
    _expect(mapping.flagged_min <= mapping.flagged_max, "priority.flagged_max",
            f"at least priority.flagged_min ({mapping.flagged_min})", mapping.flagged_max)
    _expect(mapping.unflagged_max < mapping.flagged_min, "priority.unflagged_max",
            f"below priority.flagged_min ({mapping.flagged_min}), so flagged labels rank first", mapping.unflagged_max)
    return mapping


def _providers(value: object) -> tuple[str, ...]:
    if value in (None, "auto"):
        return ("auto",)
    _expect(isinstance(value, list) and value and all(item in PROVIDER_NAMES for item in value), "providers",
            f"\"auto\" or a non-empty list of {', '.join(PROVIDER_NAMES)}", value)
    return tuple(value)


def _path(value: object, key: str, base: Path) -> Path:
    _expect(isinstance(value, str) and value.strip() != "", key, "a non-empty path", value)
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)


def parse_config(data: object, base_dir: str | Path = ".") -> PluginConfig:
    """Validate the decoded JSON of a plugin configuration; raise ``ConfigError`` on the first bad key."""
    base = Path(base_dir)
    _expect(isinstance(data, Mapping), "(top level)", "a JSON object", type(data).__name__)
    unknown = sorted(set(data) - KNOWN_KEYS)
    _expect(not unknown, "(top level)", f"one of the known keys ({', '.join(sorted(KNOWN_KEYS))})", unknown)

    project_id = data.get("project_id")
    _expect(isinstance(project_id, str) and project_id.strip() != "", "project_id",
            "the Kili project id (a non-empty string, from the project's URL)", project_id)
    job = data.get("job")
    _expect(job is None or (isinstance(job, str) and job != ""), "job",
            "the name of a single-choice classification job, or null to use the only one", job)
    key_prefix = data.get("key_prefix", DEFAULT_KEY_PREFIX)
    _expect(isinstance(key_prefix, str) and KEY_PREFIX.fullmatch(key_prefix) is not None, "key_prefix",
            "1 to 64 letters, digits, '_', '.' or '-' (the same prefix the trainer writes)", key_prefix)
    thresholds = data.get("thresholds", "model_version")
    _expect(thresholds in THRESHOLD_SOURCES, "thresholds",
            "\"model_version\" (the per-class thresholds stored with the model version, as the trainer used)",
            thresholds)

    review = data.get("review", {})
    _expect(isinstance(review, Mapping), "review", "an object with send_to_review and create_issues", review)
    unknown_review = set(review) - {"send_to_review", "create_issues"}
    _expect(not unknown_review, "review", "an object with only send_to_review and create_issues",
            sorted(unknown_review))

    models_dir = _path(data.get("models_dir"), "models_dir", base)
    inbox_path = _path(data.get("inbox_path", str(models_dir / "inbox.sqlite")), "inbox_path", base)

    api_endpoint = data.get("api_endpoint")
    _expect(api_endpoint is None or (isinstance(api_endpoint, str) and api_endpoint.startswith(("http://", "https://"))),
            "api_endpoint", "null (the KILI_API_ENDPOINT variable or Kili's cloud) or an http(s) GraphQL URL",
            api_endpoint)
    no_model = data.get("no_model", "wait")
    _expect(no_model in NO_MODEL_ACTIONS, "no_model",
            "\"wait\" (keep events in the inbox until a model version exists) or \"skip\" (mark them and move on)",
            no_model)

    retry = data.get("retry", {})
    _expect(isinstance(retry, Mapping), "retry", "an object with attempts, initial_wait_seconds, max_wait_seconds", retry)
    retry_policy = RetryPolicy(
        attempts=_integer(retry, "attempts", RetryPolicy.attempts, 1, 100, "retry.attempts"),
        initial_wait_seconds=_number(retry, "initial_wait_seconds", RetryPolicy.initial_wait_seconds, 0.0, 60.0,
                                     "retry.initial_wait_seconds"),
        max_wait_seconds=_number(retry, "max_wait_seconds", RetryPolicy.max_wait_seconds, 0.0, 600.0,
                                 "retry.max_wait_seconds"),
    )

    listen = data.get("listen", {})
    _expect(isinstance(listen, Mapping), "listen", "an object with host and port", listen)
    host = listen.get("host", "127.0.0.1")
    _expect(isinstance(host, str) and host != "", "listen.host", "an interface address such as \"127.0.0.1\"", host)

    return PluginConfig(
        project_id=project_id,
        job=job,
        key_prefix=key_prefix,
        thresholds=thresholds,
        priority=_priority(data.get("priority")),
        send_to_review=_boolean(review, "send_to_review", False, "review.send_to_review"),
        create_issues=_boolean(review, "create_issues", False, "review.create_issues"),
        models_dir=models_dir,
        inbox_path=inbox_path,
        providers=_providers(data.get("providers", "auto")),
        secret_env=_env_name(data, "secret_env", "KILI_LABEL_ERRORS_SECRET"),
        api_key_env=_env_name(data, "api_key_env", "KILI_API_KEY"),
        api_endpoint=api_endpoint,
        no_model=no_model,
        max_batch_size=_integer(data, "max_batch_size", 32, 1, 1024),
        max_body_bytes=_integer(data, "max_body_bytes", 1_000_000, 1024, 100_000_000),
        download_workers=_integer(data, "download_workers", 8, 1, 64),
        write_workers=_integer(data, "write_workers", 32, 1, 64),
        retry=retry_policy,
        host=host,
        port=_integer(listen, "port", 8080, 0, 65535, "listen.port"),
        retrain=_retrain_policy(data.get("retrain")),
    )


def _retrain_policy(value: object) -> RetrainPolicy | None:
    if value is None:
        return None
    _expect(isinstance(value, Mapping), "retrain", "an object with after_labels, after_hours and command, or null", value)
    try:
        return RetrainPolicy.from_dict(value)
    except ValueError as error:
        raise ConfigError(f"plugin configuration key {error}") from error


def load_config(path: str | Path) -> PluginConfig:
    """Read and validate a plugin configuration file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"plugin configuration {path} not found: pass --config PATH, or copy plugin_config.json "
            "from the repository and edit it"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"plugin configuration {path} is not valid JSON: {error}") from None
    try:
        return parse_config(data, path.resolve().parent)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def config_to_dict(config: PluginConfig) -> dict:
    """Return ``config`` in the JSON layout of ``plugin_config.json`` (``parse_config`` reads it back)."""
    return {
        "project_id": config.project_id,
        "job": config.job,
        "key_prefix": config.key_prefix,
        "thresholds": config.thresholds,
        "priority": {"flagged_min": config.priority.flagged_min, "flagged_max": config.priority.flagged_max,
                     "unflagged_max": config.priority.unflagged_max},
        "review": {"send_to_review": config.send_to_review, "create_issues": config.create_issues},
        "models_dir": str(config.models_dir),
        "inbox_path": str(config.inbox_path),
        "providers": "auto" if config.providers == ("auto",) else list(config.providers),
        "secret_env": config.secret_env,
        "api_key_env": config.api_key_env,
        "api_endpoint": config.api_endpoint,
        "no_model": config.no_model,
        "max_batch_size": config.max_batch_size,
        "max_body_bytes": config.max_body_bytes,
        "download_workers": config.download_workers,
        "write_workers": config.write_workers,
        "retry": {"attempts": config.retry.attempts, "initial_wait_seconds": config.retry.initial_wait_seconds,
                  "max_wait_seconds": config.retry.max_wait_seconds},
        "listen": {"host": config.host, "port": config.port},
        "retrain": config.retrain.to_dict() if config.retrain else None,
    }
