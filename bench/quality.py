"""Detection-quality benchmark on the shared real data sets (CPU, linear mode).

Usage: python bench/quality.py [--data DIR] [--work DIR] [--only imagenette,intel,mnist]

Prints Markdown tables: Imagenette at each noise column (precision, recall,
F1 and average precision of flagged versus flipped labels, with baselines on
the same out-of-fold probabilities), the Intel scenes (flagged count and
cross-validated accuracy before and after removing them), and the MNIST test
set (how many of the 15 human-validated errors are flagged, and their ranks).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import logging
import platform
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from training.pipeline import TrainConfig, train  # noqa: E402
from training.sources.local import LocalProject  # noqa: E402

NOISE_COLUMNS = ("noisy_labels_1", "noisy_labels_5", "noisy_labels_25", "noisy_labels_50")


def precision_recall(flagged: set, truth: set) -> tuple[float, float, float]:
    found = len(flagged & truth)
    precision = found / len(flagged) if flagged else 0.0
    recall = found / len(truth) if truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def baselines(labels: np.ndarray, pred_probs: np.ndarray) -> dict[str, np.ndarray]:
    """Flag masks of simple rules and of cleanlab's other filters on the same probabilities."""
    from cleanlab.filter import find_label_issues

    masks = {"prediction differs from label": pred_probs.argmax(axis=1) != labels}
    # FiftyOne Brain's mistakenness: (m * confidence + 1) / 2 with m = +1 when
    # the prediction differs from the label, -1 otherwise; flag above 0.5.
    confidence = pred_probs.max(axis=1)
    sign = np.where(pred_probs.argmax(axis=1) != labels, 1.0, -1.0)
    mistakenness = (sign * confidence + 1) / 2
    masks["mistakenness > 0.5"] = mistakenness > 0.5
    masks["mistakenness > 0.9"] = mistakenness > 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for filter_by in ("confident_learning", "prune_by_class", "both", "low_normalized_margin", "low_self_confidence"):
            masks[f"cleanlab {filter_by}"] = find_label_issues(labels, pred_probs, filter_by=filter_by)
    return masks


def average_precision(scores: np.ndarray, truth_mask: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(truth_mask, 1.0 - scores)) if truth_mask.any() else float("nan")


def imagenette(data: Path, work: Path) -> list[str]:
    root = data / "imagenette_subset"
    rows = list(csv.DictReader(open(root / "noisy_labels.csv", newline="")))
    rows = [row for row in rows if row["is_valid"] == "False"]
    lines = [
        "| noise column | flipped | method | flagged | precision | recall | F1 | AP of ranking |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for column in NOISE_COLUMNS:
        manifest = work / f"imagenette_{column}.csv"
        with open(manifest, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "asset_id"])
            for row in rows:
                writer.writerow([str(root / row["path"]), row[column], row["path"]])
        flipped = {row["path"] for row in rows if row[column] != row["noisy_labels_0"]}
        config = TrainConfig(models_dir=work / f"models_{column}", cache_dir=work / "cache", progress=False, mode="linear", write_results=False)
        result = train(LocalProject(manifest, results_db=work / f"{column}.sqlite"), config)

        with np.load(result.version_dir / "out_of_fold.npz") as oof:
            asset_ids, labels, pred_probs = list(oof["asset_ids"]), oof["labels"], oof["pred_probs"]
        truth_mask = np.array([asset_id in flipped for asset_id in asset_ids])
        scores = pred_probs[np.arange(len(labels)), labels]
        flagged = {row["asset_id"] for row in result.rows if row["is_issue"]}
        p, r, f = precision_recall(flagged, flipped)
        ap = average_precision(scores, truth_mask)
        lines.append(f"| {column} | {len(flipped)} | **this tool (prune_by_noise_rate)** | {len(flagged)} | {p:.3f} | {r:.3f} | {f:.3f} | {ap:.3f} |")
        for name, mask in baselines(labels, pred_probs).items():
            chosen = {asset_ids[i] for i in np.flatnonzero(mask)}
            p, r, f = precision_recall(chosen, flipped)
            lines.append(f"| {column} | {len(flipped)} | {name} | {len(chosen)} | {p:.3f} | {r:.3f} | {f:.3f} | |")
        lines.extend(_plain_probe_rows(work, column, asset_ids, labels, flipped))
    return lines


def _plain_probe_rows(work: Path, column: str, asset_ids, labels, flipped) -> list[str]:
    """cleanlab's defaults on a plain 4-fold logistic-regression probe of the same features."""
    import sqlite3

    from cleanlab.filter import find_label_issues
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    manifest = json.loads((sorted((work / f"models_{column}" / "versions").glob("v*"))[-1] / "manifest.json").read_text())
    sha_by_asset = {asset_id: entry["sha256"] for asset_id, entry in manifest["training_assets"].items()}
    connection = sqlite3.connect(work / "cache" / "features.sqlite")
    vectors = {key.rsplit("|", 1)[1]: np.frombuffer(blob, dtype=np.float32) for key, blob in connection.execute("SELECT key, vector FROM features")}
    features = np.stack([vectors[sha_by_asset[asset_id]] for asset_id in asset_ids])
    pred_probs = np.zeros((len(labels), int(labels.max()) + 1))
    for train_rows, test_rows in StratifiedKFold(4, shuffle=True, random_state=0).split(features, labels):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = LogisticRegression(max_iter=2000).fit(features[train_rows], labels[train_rows])
        pred_probs[test_rows] = model.predict_proba(features[test_rows])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mask = find_label_issues(labels, pred_probs)
    chosen = {asset_ids[i] for i in np.flatnonzero(mask)}
    p, r, f = precision_recall(chosen, flipped)
    neq = {asset_ids[i] for i in np.flatnonzero(pred_probs.argmax(axis=1) != labels)}
    p2, r2, f2 = precision_recall(neq, flipped)
    return [
        f"| {column} | {len(flipped)} | plain LR probe + cleanlab defaults | {len(chosen)} | {p:.3f} | {r:.3f} | {f:.3f} | |",
        f"| {column} | {len(flipped)} | plain LR probe, prediction differs | {len(neq)} | {p2:.3f} | {r2:.3f} | {f2:.3f} | |",
    ]


def intel(data: Path, work: Path) -> list[str]:
    root = data / "intel_image_classification" / "test"
    config = TrainConfig(models_dir=work / "models_intel", cache_dir=work / "cache", progress=False, mode="linear", evaluate_cleaning=True, write_results=False)
    started = time.monotonic()
    result = train(LocalProject(root, results_db=work / "intel.sqlite"), config)
    seconds = time.monotonic() - started
    cleaning = result.summary["cleaning"]
    pairs: dict[tuple[str, str], int] = {}
    for row in result.rows:
        if row["is_issue"]:
            key = (row["given_label"], row["suggested_label"])
            pairs[key] = pairs.get(key, 0) + 1
    top = ", ".join(f"{given}->{suggested} {count}" for (given, suggested), count in sorted(pairs.items(), key=lambda item: -item[1])[:5])
    return [
        "| run | images | flagged | CV accuracy before | CV accuracy after | most frequent pairs | time |",
        "|---|---|---|---|---|---|---|",
        f"| this tool, linear, 4 folds | {cleaning['assets_before']} | {result.summary['flagged']} | {cleaning['cv_accuracy_before']:.2%} | {cleaning['cv_accuracy_after']:.2%} | {top} | {seconds:.0f} s |",
        "| published Kili + cleanlab (3,000 images) | 3,000 | 124 | 88.76% | 94.88% | | |",
    ]


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    magic = int.from_bytes(data[:4], "big")
    count = int.from_bytes(data[4:8], "big")
    if magic == 0x00000803:
        rows, cols = int.from_bytes(data[8:12], "big"), int.from_bytes(data[12:16], "big")
        return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols)
    if magic == 0x00000801:
        return np.frombuffer(data, dtype=np.uint8, offset=8)
    raise ValueError(f"{path}: unknown IDX magic number {magic:#x}")


def mnist(data: Path, work: Path) -> list[str]:
    from PIL import Image

    root = data / "mnist_test"
    images = read_idx(root / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(root / "t10k-labels-idx1-ubyte.gz")
    folder = work / "mnist"
    if not folder.exists():
        for index, (pixels, label) in enumerate(zip(images, labels)):
            (folder / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, mode="L").save(folder / str(label) / f"{index:05d}.png")
    reviewed = json.load(open(root / "mnist_mturk.json"))
    validated = {f"{entry['given_original_label']}/{entry['id']:05d}.png" for entry in reviewed if entry["mturk"]["given"] < 3}
    candidates = {f"{entry['given_original_label']}/{entry['id']:05d}.png": entry for entry in reviewed}

    config = TrainConfig(models_dir=work / "models_mnist", cache_dir=work / "cache", progress=False, mode="linear", write_results=False)
    result = train(LocalProject(folder, classes=[str(d) for d in range(10)], results_db=work / "mnist.sqlite"), config)
    rank = {row["asset_id"]: row["rank"] for row in result.rows}
    flagged = {row["asset_id"] for row in result.rows if row["is_issue"]}
    found = sorted(rank[asset_id] for asset_id in validated)
    judged = flagged & set(candidates)
    judged_errors = judged & validated
    return [
        "| run | images | CV accuracy | flagged | validated errors flagged (of 15) | ranks of the 15 | flagged among the 100 reviewed: errors / reviewed |",
        "|---|---|---|---|---|---|---|",
        f"| this tool, linear, 4 folds | {result.summary['assets']} | {result.summary['cv_accuracy']:.2%} | {len(flagged)} | {len(flagged & validated)} | {', '.join(map(str, found))} | {len(judged_errors)} / {len(judged)} |",
        "| cleanlab 2.9 on the published MNIST pred_probs | 10,000 | | 15 | 7 | | |",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the shared data folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kle-bench"), help="scratch folder for manifests, models and caches")
    parser.add_argument("--only", default="imagenette,intel,mnist", help="comma-separated subset of benchmarks")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)

    print(f"Machine: {platform.processor() or platform.machine()}, CPU only; date {date.today()}\n")
    for name in args.only.split(","):
        started = time.monotonic()
        lines = {"imagenette": imagenette, "intel": intel, "mnist": mnist}[name](args.data, args.work)
        print(f"## {name} ({time.monotonic() - started:.0f} s)\n")
        print("\n".join(lines))
        print()
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
