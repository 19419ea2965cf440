"""Label-issue decisions from stored Confident Learning tables.

The trainer fits ``DecisionTables`` on the out-of-fold probabilities of a run.
``decide`` then flags any (probabilities, given label) pair exactly as
``cleanlab.filter.find_label_issues`` (cleanlab 2.9.0) flags the training rows
with the same ``filter_by``, one row at a time, so a label submitted after
training is judged by the same rule as the labels that trained the model.

N is the number of rows and K the number of classes throughout. Labels are
integers in ``0..K-1``; ``pred_probs`` are ``(N, K)`` out-of-sample
probabilities whose rows sum to 1.

How each rule becomes a per-row test:

- ``confident_learning``: a row is an issue when its confident class (the only
  class above its per-class threshold, or the arg max among several) differs
  from the given label. The K thresholds make this a pure per-row rule.
- ``prune_by_noise_rate``: cleanlab flags, within given class k, the
  ``prune[j, k]`` rows with the largest margin ``p_j - p_k`` for each j != k.
  The table stores the smallest margin that was flagged, so a new row is an
  issue when it would have ranked inside that pruned set.
- ``prune_by_class``: the ``n_k - prune[k, k]`` rows with the smallest ``p_k``;
  the table stores the largest ``p_k`` flagged.
- ``both``: ``prune_by_class`` and ``prune_by_noise_rate`` together.

Every rule ends with cleanlab's guard: a row whose given label is the arg max
(ties favour the given label by 1e-6) is never an issue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FILTER_BY_CHOICES = ("prune_by_noise_rate", "confident_learning", "prune_by_class", "both")
SCORE_METHODS = ("self_confidence", "normalized_margin")

# cleanlab.internal.constants.FLOATING_POINT_COMPARISON in cleanlab 2.9.0.
_TIE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class DecisionTables:
    """Per-class cut-offs that reproduce one ``find_label_issues`` run.

    ``thresholds`` has shape (K,). ``noise_rate_cutoffs[k, j]`` is the smallest
    margin ``p_j - p_k`` flagged among rows given class k (``+inf`` where none
    was flagged). ``class_cutoffs[k]`` is the largest ``p_k`` flagged among rows
    given class k (``-inf`` where none was).
    """

    filter_by: str
    thresholds: np.ndarray
    noise_rate_cutoffs: np.ndarray
    class_cutoffs: np.ndarray
    min_examples_per_class: int = 1
    frac_noise: float = 1.0

    @property
    def num_classes(self) -> int:
        return int(self.thresholds.shape[0])

    def to_dict(self) -> dict:
        return {
            "filter_by": self.filter_by,
            "thresholds": _floats_to_json(self.thresholds),
            "noise_rate_cutoffs": _floats_to_json(self.noise_rate_cutoffs),
            "class_cutoffs": _floats_to_json(self.class_cutoffs),
            "min_examples_per_class": self.min_examples_per_class,
            "frac_noise": self.frac_noise,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "DecisionTables":
        filter_by = data["filter_by"]
        if filter_by not in FILTER_BY_CHOICES:
            raise ValueError(
                f"invalid filter_by {filter_by!r} in decision tables: "
                f"use one of {', '.join(FILTER_BY_CHOICES)}"
            )
        return cls(
            filter_by=filter_by,
            thresholds=_floats_from_json(data["thresholds"]),
            noise_rate_cutoffs=_floats_from_json(data["noise_rate_cutoffs"]),
            class_cutoffs=_floats_from_json(data["class_cutoffs"]),
            min_examples_per_class=int(data.get("min_examples_per_class", 1)),
            frac_noise=float(data.get("frac_noise", 1.0)),
        )


@dataclass(frozen=True)
class Verdicts:
    """Decisions for N rows: issue flags, quality scores and suggested labels."""

    is_issue: np.ndarray
    scores: np.ndarray
    suggested_labels: np.ndarray


def fit_decision_tables(
    labels: np.ndarray,
    pred_probs: np.ndarray,
    *,
    filter_by: str = "prune_by_noise_rate",
    min_examples_per_class: int = 1,
    frac_noise: float = 1.0,
) -> DecisionTables:
    """Fit the per-class cut-offs from out-of-fold probabilities.

    The result makes ``decide(labels, pred_probs, tables)`` equal to
    ``cleanlab.filter.find_label_issues(labels, pred_probs, filter_by=...,
    min_examples_per_class=..., frac_noise=...)`` on the same rows.
    """
    from cleanlab import count
    from cleanlab.filter import _keep_at_least_n_per_class  # pinned: cleanlab==2.9.0

    if filter_by not in FILTER_BY_CHOICES:
        raise ValueError(
            f"invalid filter_by {filter_by!r}: use one of {', '.join(FILTER_BY_CHOICES)}"
        )
    labels = np.asarray(labels, dtype=np.int64)
    pred_probs = np.asarray(pred_probs, dtype=np.float64)
    num_classes = pred_probs.shape[1]

    thresholds = np.asarray(count.get_confident_thresholds(labels, pred_probs), dtype=np.float64)
    noise_rate_cutoffs = np.full((num_classes, num_classes), np.inf)
    class_cutoffs = np.full(num_classes, -np.inf)

    if filter_by != "confident_learning":
        confident_joint = count.compute_confident_joint(labels, pred_probs)
        # Transposed relative to the confident joint: prune[true j, given k].
        prune = _keep_at_least_n_per_class(
            confident_joint.T, n=min_examples_per_class, frac_noise=frac_noise
        )
        for given in range(num_classes):
            rows = pred_probs[labels == given]
            if rows.shape[0] <= min_examples_per_class:
                continue  # cleanlab prunes nothing in such a class
            class_cutoffs[given] = _class_cutoff(rows[:, given], rows.shape[0] - prune[given, given])
            for other in range(num_classes):
                num_to_prune = int(prune[other, given])
                if other != given and num_to_prune > 0:
                    margins = rows[:, other] - rows[:, given]
                    noise_rate_cutoffs[given, other] = _noise_rate_cutoff(margins, num_to_prune)

    return DecisionTables(
        filter_by=filter_by,
        thresholds=thresholds,
        noise_rate_cutoffs=noise_rate_cutoffs,
        class_cutoffs=class_cutoffs,
        min_examples_per_class=min_examples_per_class,
        frac_noise=frac_noise,
    )


def _noise_rate_cutoff(margins: np.ndarray, num_to_prune: int) -> float:
    if num_to_prune >= margins.shape[0]:
        return -np.inf  # cleanlab flags every row of the class
    return float(np.sort(margins)[::-1][num_to_prune - 1])


def _class_cutoff(class_probs: np.ndarray, num_to_prune: int) -> float:
    if num_to_prune < 1:
        return -np.inf
    return float(np.sort(class_probs)[min(num_to_prune, class_probs.shape[0]) - 1])


def decide(
    labels: np.ndarray,
    pred_probs: np.ndarray,
    tables: DecisionTables,
    *,
    score_method: str = "self_confidence",
) -> Verdicts:
    """Flag label issues row by row with the stored tables.

    Each row's verdict depends only on that row and the tables, so the same
    function serves a batch of training rows and one freshly submitted label.
    """
    labels = np.asarray(labels, dtype=np.int64)
    pred_probs = np.asarray(pred_probs, dtype=np.float64)
    _check_inputs(labels, pred_probs, tables.num_classes)

    rows = np.arange(labels.shape[0])
    given_probs = pred_probs[rows, labels]

    if tables.filter_by == "confident_learning":
        is_issue = _confident_learning_issues(labels, pred_probs, tables.thresholds)
    else:
        by_noise_rate = np.any(
            (pred_probs - given_probs[:, None]) >= tables.noise_rate_cutoffs[labels], axis=1
        )
        by_class = given_probs <= tables.class_cutoffs[labels]
        if tables.filter_by == "prune_by_noise_rate":
            is_issue = by_noise_rate
        elif tables.filter_by == "prune_by_class":
            is_issue = by_class
        else:
            is_issue = by_noise_rate & by_class

    guarded = pred_probs.copy()
    guarded[rows, labels] += _TIE_TOLERANCE
    predicted = guarded.argmax(axis=1)
    is_issue = is_issue & (predicted != labels)

    return Verdicts(
        is_issue=is_issue,
        scores=label_quality_scores(labels, pred_probs, method=score_method),
        suggested_labels=pred_probs.argmax(axis=1),
    )


def _confident_learning_issues(
    labels: np.ndarray, pred_probs: np.ndarray, thresholds: np.ndarray
) -> np.ndarray:
    confident = pred_probs >= thresholds - _TIE_TOLERANCE
    num_confident = confident.sum(axis=1)
    guess = np.where(num_confident > 1, pred_probs.argmax(axis=1), confident.argmax(axis=1))
    return (num_confident > 0) & (guess != labels)


def label_quality_scores(
    labels: np.ndarray, pred_probs: np.ndarray, *, method: str = "self_confidence"
) -> np.ndarray:
    """Score each label from 0 (likely wrong) to 1 (likely right).

    Equal to ``cleanlab.rank.get_label_quality_scores(labels, pred_probs,
    method=method)`` for the two methods supported here.
    """
    labels = np.asarray(labels, dtype=np.int64)
    pred_probs = np.asarray(pred_probs, dtype=np.float64)
    rows = np.arange(labels.shape[0])
    given_probs = pred_probs[rows, labels]
    if method == "self_confidence":
        return given_probs
    if method == "normalized_margin":
        others = pred_probs.copy()
        others[rows, labels] = -np.inf
        return (given_probs - others.max(axis=1) + 1.0) / 2.0
    raise ValueError(f"invalid score method {method!r}: use one of {', '.join(SCORE_METHODS)}")


def _check_inputs(labels: np.ndarray, pred_probs: np.ndarray, num_classes: int) -> None:
    if pred_probs.ndim != 2 or pred_probs.shape[1] != num_classes:
        raise ValueError(
            f"pred_probs has shape {pred_probs.shape}, expected (N, {num_classes}) "
            "to match the decision tables"
        )
    if labels.shape != (pred_probs.shape[0],):
        raise ValueError(
            f"labels has shape {labels.shape}, expected ({pred_probs.shape[0]},) "
            "to match pred_probs"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")


def _floats_to_json(array: np.ndarray) -> list:
    # JSON has no infinity: store the infinities as strings.
    def encode(value: float):
        if np.isposinf(value):
            return "inf"
        if np.isneginf(value):
            return "-inf"
        return float(value)

    if array.ndim == 1:
        return [encode(v) for v in array]
    return [_floats_to_json(row) for row in array]


def _floats_from_json(data: list) -> np.ndarray:
    return np.asarray(data, dtype=object).astype(np.float64)
