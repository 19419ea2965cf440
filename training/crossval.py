"""Stratified K-fold assignment and out-of-fold training of linear heads."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .heads import HEAD_C, SCREEN_C, LinearHead, fit_head

logger = logging.getLogger(__name__)


class FoldError(ValueError):
    """The labels cannot be split into the requested folds."""


def check_class_counts(
    labels: Sequence[str], classes: Sequence[str], n_folds: int, *, drop_rare: bool
) -> set[str]:
    """Return the classes to leave out because they have fewer examples than folds.

    Raises ``FoldError`` naming those classes unless ``drop_rare`` is set, in
    which case they are returned with a warning.
    """
    counts = Counter(labels)
    rare = {name: counts.get(name, 0) for name in classes if 0 < counts.get(name, 0) < n_folds}
    if not rare:
        return set()
    described = ", ".join(f"{name!r} ({count})" for name, count in sorted(rare.items()))
    if not drop_rare:
        raise FoldError(
            f"classes with fewer labeled images than the {n_folds} folds: {described}. "
            "Label more images of these classes, lower --folds, or pass --drop-rare-classes "
            "to leave them out of this run."
        )
    logger.warning("Leaving out classes with fewer images than folds: %s", described)
    return set(rare)


def assign_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Return a fold index per row from a seeded stratified split."""
    from sklearn.model_selection import StratifiedKFold

    if n_folds < 2:
        raise FoldError(f"--folds must be at least 2, got {n_folds}")
    folds = np.full(labels.shape[0], -1, dtype=np.int64)
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(labels.shape[0]), labels)):
        folds[held_out] = fold
    return folds


@dataclass
class FoldHeads:
    """The final head of each fold and the screening predictions behind them."""

    heads: list[LinearHead]
    screened_out: np.ndarray  # rows left out of the final heads' training
    trained: int  # heads fitted in this call; the rest came from the cache


class HeadCache:
    """Fitted heads on disk, keyed by their training rows and settings."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def key(self, sha256s: Sequence[str], labels: np.ndarray, settings: dict) -> str:
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for sha, label in sorted(zip(sha256s, labels.tolist())):
            digest.update(f"{sha}:{label};".encode())
        return digest.hexdigest()

    def get(self, key: str) -> LinearHead | None:
        path = self.root / f"{key}.npz"
        if not path.is_file():
            return None
        with np.load(path) as data:
            return LinearHead(weight=data["weight"], bias=data["bias"])

    def put(self, key: str, head: LinearHead) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        temporary = self.root / f"{key}.tmp.npz"
        np.savez(temporary, weight=head.weight, bias=head.bias)
        temporary.replace(self.root / f"{key}.npz")


def train_fold_heads(
    features: np.ndarray,
    labels: np.ndarray,
    sha256s: Sequence[str],
    folds: np.ndarray,
    num_classes: int,
    *,
    cache: HeadCache,
    settings: dict,
    screen: bool = True,
    progress: bool = True,
) -> FoldHeads:
    """Fit one head per fold on the other folds' rows, reusing cached heads."""
    n_folds = int(folds.max()) + 1
    trained = 0
    sha_array = np.asarray(sha256s)

    def fitted(rows: np.ndarray, c: float, stage: str) -> LinearHead:
        nonlocal trained
        key = cache.key(sha_array[rows], labels[rows], {**settings, "c": c, "stage": stage})
        head = cache.get(key)
        if head is None:
            head = fit_head(features[rows], labels[rows], num_classes, c=c, seed=settings.get("seed", 0))
            cache.put(key, head)
            trained += 1
        return head

    screened_out = np.zeros(labels.shape[0], dtype=bool)
    steps = n_folds * (2 if screen else 1)
    bar = tqdm(total=steps, desc="Heads", unit="fold", disable=not progress)
    if screen:
        for fold in range(n_folds):
            train_rows = np.flatnonzero(folds != fold)
            held_out = np.flatnonzero(folds == fold)
            screening = fitted(train_rows, SCREEN_C, "screen")
            predicted = screening.predict_proba(features[held_out]).argmax(axis=1)
            screened_out[held_out] = predicted != labels[held_out]
            bar.update()

    heads = []
    for fold in range(n_folds):
        train_rows = np.flatnonzero((folds != fold) & ~screened_out)
        heads.append(fitted(train_rows, HEAD_C, "final"))
        bar.update()
    bar.close()
    logger.info("Heads: %d trained, %d reused from the cache", trained, steps - trained)
    return FoldHeads(heads=heads, screened_out=screened_out, trained=trained)


def out_of_fold_probabilities(
    heads: Sequence[LinearHead], features: np.ndarray, folds: np.ndarray
) -> np.ndarray:
    """Return each row's probabilities from the head that did not train on it."""
    probabilities = np.zeros((features.shape[0], heads[0].weight.shape[0]))
    for fold, head in enumerate(heads):
        rows = folds == fold
        probabilities[rows] = head.predict_proba(features[rows])
    return probabilities
