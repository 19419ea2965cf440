"""The retraining policy: when a full retrain is due.

Kept apart from the runner, with only the standard library, so the plugin
configuration can validate it wherever the plugin runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

POLICY_KEYS = ("after_labels", "after_hours", "command", "wait_for_version_seconds", "train_arguments", "check_seconds")


@dataclass(frozen=True)
class RetrainPolicy:
    """When to retrain; both triggers are optional."""

    after_labels: int | None = None
    after_hours: float | None = None
    command: list[str] | None = None  # run instead of the local trainer
    wait_for_version_seconds: float = 6 * 3600.0  # how long to wait for an external command's version
    train_arguments: list[str] = field(default_factory=list)  # extra `train` options for the local trainer
    check_seconds: float = 60.0  # how often the service compares the counts with the policy

    @classmethod
    def from_dict(cls, data: dict | None, *, key: str = "retrain") -> "RetrainPolicy":
        """Build a policy from the configuration; errors name the key and the expected value."""
        data = dict(data or {})
        unknown = set(data) - set(POLICY_KEYS)
        if unknown:
            raise ValueError(f"{key}: unknown keys {sorted(unknown)}; expected {', '.join(POLICY_KEYS)}")
        after_labels = data.get("after_labels")
        if after_labels is not None and (not isinstance(after_labels, int) or isinstance(after_labels, bool) or after_labels < 1):
            raise ValueError(f"{key}.after_labels is {after_labels!r}; expected a positive integer or null")
        after_hours = data.get("after_hours")
        if after_hours is not None and (not isinstance(after_hours, (int, float)) or isinstance(after_hours, bool) or after_hours <= 0):
            raise ValueError(f"{key}.after_hours is {after_hours!r}; expected a positive number of hours or null")
        command = data.get("command")
        if command is not None and (not isinstance(command, list) or not command or not all(isinstance(part, str) for part in command)):
            raise ValueError(f"{key}.command is {command!r}; expected a list of strings such as [\"ssh\", \"gpu-node\", \"./train.sh\"] or null")
        arguments = data.get("train_arguments", [])
        if not isinstance(arguments, list) or not all(isinstance(part, str) for part in arguments):
            raise ValueError(f"{key}.train_arguments is {arguments!r}; expected a list of strings such as [\"--folds\", \"4\"]")
        wait = data.get("wait_for_version_seconds", 6 * 3600.0)
        if not isinstance(wait, (int, float)) or wait <= 0:
            raise ValueError(f"{key}.wait_for_version_seconds is {wait!r}; expected a positive number of seconds")
        check = data.get("check_seconds", 60.0)
        if not isinstance(check, (int, float)) or isinstance(check, bool) or check <= 0:
            raise ValueError(f"{key}.check_seconds is {check!r}; expected a positive number of seconds")
        return cls(
            after_labels=after_labels,
            after_hours=float(after_hours) if after_hours is not None else None,
            command=command,
            wait_for_version_seconds=float(wait),
            train_arguments=arguments,
            check_seconds=float(check),
        )

    def to_dict(self) -> dict:
        return {
            "after_labels": self.after_labels,
            "after_hours": self.after_hours,
            "command": self.command,
            "wait_for_version_seconds": self.wait_for_version_seconds,
            "train_arguments": list(self.train_arguments),
            "check_seconds": self.check_seconds,
        }

    def due(self, new_labels: int, version_created_at: datetime | None, now: datetime) -> str | None:
        """Return why a retrain is due now, or None when it is not."""
        if new_labels < 1:
            return None
        if self.after_labels is not None and new_labels >= self.after_labels:
            return f"{new_labels} new labels (threshold {self.after_labels})"
        if self.after_hours is not None:
            if version_created_at is None:
                return "no model version yet"
            age = now - version_created_at
            if age >= timedelta(hours=self.after_hours):
                return f"{new_labels} new labels and the version is {age.total_seconds() / 3600:.1f} h old (threshold {self.after_hours} h)"
        return None
