"""Batch scoring of submitted labels, with no network access.

Given each label's ``jsonResponse`` and its image bytes, return a ``Verdict``
per scorable label and a "not scorable" reason for the others. Images are
decoded and preprocessed exactly as in training (``plugin.preprocess``), and
all scorable images of a batch go through the model in one call. The
decision uses the thresholds stored with the model version, so a training
asset gets the same verdict as in the offline run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from training.sources.base import SourceError
from training.sources.kili import ClassificationJob, label_category

from .metadata import Verdict
from .model_version import ModelVersion
from .preprocess import ImageDecodeError, prepare_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreItem:
    """One label to score: its asset, its ``jsonResponse`` and the image bytes (None if not fetched)."""

    asset_id: str
    label: Mapping
    image: bytes | None = None
    image_error: str | None = None  # why ``image`` is None


@dataclass(frozen=True)
class Scored:
    """The result for one label: a verdict, or the reason it could not be scored."""

    asset_id: str
    verdict: Verdict | None = None
    reason: str | None = None
    category: str | None = None


def json_response(label: Mapping) -> dict:
    """Return a label's ``jsonResponse`` as a dict; webhooks may carry it as a JSON string."""
    response = label.get("jsonResponse")
    if isinstance(response, str):
        try:
            response = json.loads(response) if response.strip() else {}
        except json.JSONDecodeError:
            return {}
    return response if isinstance(response, dict) else {}


def label_class(label: Mapping, job: ClassificationJob, version: ModelVersion) -> tuple[str | None, int | None, str | None]:
    """Return ``(category, class index, None)`` for a scorable label, or ``(category, None, reason)``."""
    parsed = {**label, "jsonResponse": json_response(label)}
    try:
        category, reason = label_category(parsed, job)
    except SourceError:
        category = _chosen(parsed, job)
        return category, None, f"category {category} is not defined in job {job.name}"
    if category is None:
        return None, None, reason
    index = version.class_index(category)
    if index is None:
        return category, None, f"class {category} not in model version {version.name}"
    return category, index, None


def _chosen(label: Mapping, job: ClassificationJob) -> str:
    answer = label["jsonResponse"].get(job.name) or {}
    names = [item.get("name") for item in answer.get("categories") or [] if isinstance(item, Mapping)]
    return str(names[0]) if names else "?"


def score_items(
    version: ModelVersion, job: ClassificationJob, items: Sequence[ScoreItem], *, executor: Executor | None = None
) -> list[Scored]:
    """Score a batch: one model call for every label whose class and image are usable."""
    results: list[Scored | None] = [None] * len(items)
    ready: list[tuple[int, str, int]] = []  # (row, category, class index)
    for row, item in enumerate(items):
        category, index, reason = label_class(item.label, job, version)
        if reason is not None:
            results[row] = Scored(item.asset_id, reason=reason, category=category)
        elif item.image is None:
            reason = f"image download failed ({item.image_error})" if item.image_error else "image download failed"
            results[row] = Scored(item.asset_id, reason=reason, category=category)
        else:
            ready.append((row, category, index))

    def prepare(row: int) -> np.ndarray | str:
        try:
            return prepare_image(items[row].image, version.preprocessing)
        except ImageDecodeError as error:
            return f"image could not be decoded ({error})"

    rows = [row for row, _, _ in ready]
    prepared = list(executor.map(prepare, rows)) if executor is not None else [prepare(row) for row in rows]
    usable = []
    for (row, category, index), pixels in zip(ready, prepared):
        if isinstance(pixels, str):
            results[row] = Scored(items[row].asset_id, reason=pixels, category=category)
        else:
            usable.append((row, category, index, pixels))

    if usable:
        batch = np.stack([pixels for _, _, _, pixels in usable])
        predictions = version.predict(batch, [items[row].asset_id for row, _, _, _ in usable])
        probabilities = np.stack([prediction.probabilities for prediction in predictions])
        verdicts = version.judge(probabilities, np.array([index for _, _, index, _ in usable]))
        for (row, category, _, _), verdict in zip(usable, verdicts):
            results[row] = Scored(items[row].asset_id, verdict=verdict, category=category)
    return [result for result in results if result is not None]
