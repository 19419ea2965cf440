"""Confident Learning on out-of-fold probabilities: flags, scores, summaries."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

from plugin.decision import DecisionTables, decide, fit_decision_tables

logger = logging.getLogger(__name__)

DEFAULT_FILTER_BY = "prune_by_noise_rate"
DEFAULT_SCORE_METHOD = "self_confidence"


@dataclass
class Detection:
    """cleanlab's verdicts on every training row, and the tables that reproduce them."""

    tables: DecisionTables
    is_issue: np.ndarray
    scores: np.ndarray
    suggested_labels: np.ndarray
    noise_per_class: np.ndarray  # estimated fraction of wrong labels per given class
    cv_accuracy: float  # out-of-fold arg max against the given labels


def detect_label_issues(
    labels: np.ndarray,
    pred_probs: np.ndarray,
    *,
    filter_by: str = DEFAULT_FILTER_BY,
    score_method: str = DEFAULT_SCORE_METHOD,
    min_examples_per_class: int = 1,
) -> Detection:
    """Run ``cleanlab.filter.find_label_issues`` and fit the plugin's tables.

    The tables let the plugin judge a new label by the same rule; a
    disagreement with cleanlab on the training rows is logged as a warning.
    """
    from cleanlab.count import compute_confident_joint
    from cleanlab.filter import find_label_issues

    labels = np.asarray(labels, dtype=np.int64)
    pred_probs = np.asarray(pred_probs, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cleanlab's small-class notices; rare classes are checked earlier
        flags = find_label_issues(
            labels,
            pred_probs,
            filter_by=filter_by,
            min_examples_per_class=min_examples_per_class,
            n_jobs=1,
        )
        tables = fit_decision_tables(
            labels, pred_probs, filter_by=filter_by, min_examples_per_class=min_examples_per_class
        )
        confident_joint = compute_confident_joint(labels, pred_probs)

    verdicts = decide(labels, pred_probs, tables, score_method=score_method)
    mismatched = int(np.sum(verdicts.is_issue != flags))
    if mismatched:
        # Rows tied exactly at a cut-off can be flagged by the tables and not
        # by cleanlab's sort; the run keeps cleanlab's flags.
        logger.warning(
            "The plugin's decision tables disagree with cleanlab on %d of %d rows "
            "(ties at a cut-off, or a cleanlab version other than 2.9.0)",
            mismatched,
            labels.size,
        )
    return Detection(
        tables=tables,
        is_issue=flags,
        scores=verdicts.scores,
        suggested_labels=verdicts.suggested_labels,
        noise_per_class=1.0 - np.diagonal(confident_joint) / np.maximum(confident_joint.sum(axis=1), 1),
        cv_accuracy=float(np.mean(pred_probs.argmax(axis=1) == labels)) if labels.size else 0.0,
    )
