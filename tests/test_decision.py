"""The stored decision tables reproduce cleanlab's find_label_issues row by row."""

import numpy as np
import pytest
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores

from plugin.decision import (
    FILTER_BY_CHOICES,
    DecisionTables,
    decide,
    fit_decision_tables,
    label_quality_scores,
)


def noisy_problem(num_classes: int, rows: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, num_classes, rows)
    logits = rng.normal(size=(rows, num_classes)) * 1.5
    logits[np.arange(rows), true] += 2.5
    pred_probs = np.exp(logits)
    pred_probs /= pred_probs.sum(axis=1, keepdims=True)
    given = true.copy()
    flip = rng.random(rows) < noise
    given[flip] = rng.integers(0, num_classes, int(flip.sum()))
    return given, pred_probs


@pytest.mark.parametrize("filter_by", FILTER_BY_CHOICES)
@pytest.mark.parametrize("num_classes,rows,noise", [(3, 300, 0.2), (10, 4000, 0.3), (25, 3000, 0.1)])
def test_tables_match_cleanlab(filter_by, num_classes, rows, noise):
    labels, pred_probs = noisy_problem(num_classes, rows, noise, seed=num_classes)
    expected = find_label_issues(labels, pred_probs, filter_by=filter_by)
    tables = fit_decision_tables(labels, pred_probs, filter_by=filter_by)

    verdicts = decide(labels, pred_probs, tables)

    assert expected.sum() > 0
    assert np.array_equal(verdicts.is_issue, expected)


def test_tables_match_cleanlab_one_row_at_a_time():
    labels, pred_probs = noisy_problem(5, 600, 0.25, seed=7)
    expected = find_label_issues(labels, pred_probs)
    tables = fit_decision_tables(labels, pred_probs)

    one_by_one = [decide(labels[i : i + 1], pred_probs[i : i + 1], tables).is_issue[0] for i in range(600)]

    assert np.array_equal(np.array(one_by_one), expected)


def test_tables_match_with_min_examples_per_class():
    labels, pred_probs = noisy_problem(4, 400, 0.3, seed=3)
    expected = find_label_issues(labels, pred_probs, min_examples_per_class=80)
    tables = fit_decision_tables(labels, pred_probs, min_examples_per_class=80)

    assert np.array_equal(decide(labels, pred_probs, tables).is_issue, expected)


def test_tables_survive_json_round_trip():
    labels, pred_probs = noisy_problem(6, 800, 0.2, seed=1)
    tables = fit_decision_tables(labels, pred_probs, filter_by="both")

    restored = DecisionTables.from_dict(tables.to_dict())

    assert np.array_equal(restored.noise_rate_cutoffs, tables.noise_rate_cutoffs)
    assert np.array_equal(restored.class_cutoffs, tables.class_cutoffs)
    assert np.array_equal(decide(labels, pred_probs, restored).is_issue, decide(labels, pred_probs, tables).is_issue)


@pytest.mark.parametrize("method", ["self_confidence", "normalized_margin"])
def test_scores_match_cleanlab(method):
    labels, pred_probs = noisy_problem(5, 500, 0.2, seed=2)

    ours = label_quality_scores(labels, pred_probs, method=method)

    assert np.allclose(ours, get_label_quality_scores(labels, pred_probs, method=method))


def test_given_arg_max_is_never_flagged():
    labels, pred_probs = noisy_problem(4, 1000, 0.4, seed=5)
    tables = fit_decision_tables(labels, pred_probs)

    verdicts = decide(labels, pred_probs, tables)

    assert not np.any(verdicts.is_issue & (pred_probs.argmax(axis=1) == labels))


def test_decide_rejects_wrong_shape():
    labels, pred_probs = noisy_problem(4, 100, 0.1, seed=0)
    tables = fit_decision_tables(labels, pred_probs)

    with pytest.raises(ValueError, match=r"expected \(N, 4\)"):
        decide(labels, pred_probs[:, :3], tables)


def test_unknown_filter_by_is_rejected():
    labels, pred_probs = noisy_problem(3, 90, 0.1, seed=0)

    with pytest.raises(ValueError, match="invalid filter_by 'prune'"):
        fit_decision_tables(labels, pred_probs, filter_by="prune")
