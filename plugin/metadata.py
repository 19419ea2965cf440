"""Per-asset metadata and review priority built from one verdict.

The trainer and the plugin both build what they write with these functions,
so the same verdict gives the same metadata whichever half produced it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

DEFAULT_KEY_PREFIX = "label_error_"
# Kili's asset priority is an integer; higher means reviewed first.
MAX_PRIORITY = 100

# Keys under the prefix, in the order they are written.
SCORE = "score"
FLAGGED = "flagged"
SUGGESTED_LABEL = "suggested_label"
MODEL_VERSION = "model_version"
SCORED_AT = "scored_at"
STATUS = "status"
OWNED_KEYS = (SCORE, FLAGGED, SUGGESTED_LABEL, MODEL_VERSION, SCORED_AT, STATUS)
# A smaller change of the score alone does not rewrite an asset.
SCORE_TOLERANCE = 0.01
# Keys that do not change the verdict. A rewrite is skipped when only these
# differ, so a retrain writes only the assets whose verdict changed. The
# stored version and time are then those of the run that gave the verdict.
VOLATILE_KEYS = (SCORED_AT, MODEL_VERSION)


@dataclass(frozen=True)
class Verdict:
    """The decision on one label: how likely it is right and what to suggest."""

    score: float  # label quality from 0 (likely wrong) to 1 (likely right)
    flagged: bool
    suggested_label: str
    model_version: str


def build_metadata(
    verdict: Verdict, *, prefix: str = DEFAULT_KEY_PREFIX, scored_at: datetime | None = None
) -> dict[str, object]:
    """Return the tool's metadata keys for one verdict."""
    scored_at = scored_at or datetime.now(timezone.utc)
    return {
        prefix + SCORE: round(float(verdict.score), 6),
        prefix + FLAGGED: bool(verdict.flagged),
        prefix + SUGGESTED_LABEL: verdict.suggested_label,
        prefix + MODEL_VERSION: verdict.model_version,
        prefix + SCORED_AT: scored_at.isoformat(timespec="seconds"),
        prefix + STATUS: "scored",
    }


def build_unscorable_metadata(
    reason: str, model_version: str, *, prefix: str = DEFAULT_KEY_PREFIX, scored_at: datetime | None = None
) -> dict[str, object]:
    """Return metadata that records why a label could not be scored."""
    scored_at = scored_at or datetime.now(timezone.utc)
    return {
        prefix + MODEL_VERSION: model_version,
        prefix + SCORED_AT: scored_at.isoformat(timespec="seconds"),
        prefix + STATUS: f"not scorable: {reason}",
    }


def review_priority(verdict: Verdict) -> int:
    """Map a verdict to a review priority in 0..MAX_PRIORITY.

    Flagged labels rank above every unflagged one, and within each group a
    lower quality score ranks higher, so reviewers meet likely errors first.
    """
    likelihood = 1.0 - min(max(float(verdict.score), 0.0), 1.0)
    half = MAX_PRIORITY // 2
    if verdict.flagged:
        return half + 1 + int(math.floor(likelihood * (MAX_PRIORITY - half - 1)))
    return int(math.floor(likelihood * half))


def owned_keys(prefix: str = DEFAULT_KEY_PREFIX) -> list[str]:
    return [prefix + key for key in OWNED_KEYS]


def merge_metadata(
    current: Mapping[str, object] | None, ours: Mapping[str, object], *, prefix: str = DEFAULT_KEY_PREFIX
) -> dict[str, object]:
    """Merge the tool's keys into an asset's metadata, keeping every foreign key.

    Keys the tool owns but did not set this time (for example a score when the
    label is now not scorable) are removed, so stale values never remain.
    """
    merged = {key: value for key, value in (current or {}).items() if key not in owned_keys(prefix)}
    merged.update(ours)
    return merged


def clear_metadata(current: Mapping[str, object] | None, *, prefix: str = DEFAULT_KEY_PREFIX) -> dict:
    """Return the metadata without the tool's own keys."""
    return {key: value for key, value in (current or {}).items() if key not in owned_keys(prefix)}


def metadata_changed(
    current: Mapping[str, object] | None, merged: Mapping[str, object], *, prefix: str = DEFAULT_KEY_PREFIX
) -> bool:
    """Tell whether writing ``merged`` would change the verdict stored in ``current``.

    The volatile keys are ignored, and a score that moved by less than
    ``SCORE_TOLERANCE`` counts as unchanged. Every retrain shifts most scores
    slightly, and rewriting every asset of a large project for that would
    cost many Kili calls for no change of verdict.
    """
    volatile = {prefix + key for key in VOLATILE_KEYS}
    score_key = prefix + SCORE

    def stable(data: Mapping[str, object] | None) -> dict:
        return {key: value for key, value in (data or {}).items() if key not in volatile and key != score_key}

    if stable(current) != stable(merged):
        return True
    before, after = (current or {}).get(score_key), merged.get(score_key)
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):
        return abs(float(before) - float(after)) >= SCORE_TOLERANCE
    return before != after
