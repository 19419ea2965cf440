"""The embedded demo: scikit-learn's digits with a seeded share of labels flipped.

The 1,797 handwritten digits (8x8 pixels) are written as PNG files into one
folder per class, a seeded fraction of them is moved into a wrong class
folder, and the trainer runs on that folder. Because the flips are known, the
demo prints the precision and recall of the flagged set.
"""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .pipeline import TrainConfig, train
from .report import render_report
from .sources.local import LocalProject
from .summary import print_summary

logger = logging.getLogger(__name__)


def build_digits_project(folder: Path, *, noise: float, seed: int) -> dict[str, tuple[str, str]]:
    """Write the digits as PNG files with flipped labels; return true and given label per asset id."""
    from sklearn.datasets import load_digits

    if not 0 <= noise < 1:
        raise ValueError(f"invalid noise {noise}: use a fraction in [0, 1)")
    digits = load_digits()
    rng = np.random.default_rng(seed)
    count = digits.target.shape[0]
    flipped = rng.choice(count, size=int(round(noise * count)), replace=False)
    given = digits.target.copy()
    # A flipped label moves to a different digit, chosen uniformly.
    given[flipped] = (digits.target[flipped] + rng.integers(1, 10, size=flipped.size)) % 10

    if folder.exists():
        shutil.rmtree(folder)
    truth = {}
    for index in range(count):
        # The 0..16 gray levels scaled to 0..255, white digit on black.
        pixels = (digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
        relative = f"{given[index]}/digit_{index:04d}.png"
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(path)
        truth[relative] = (str(digits.target[index]), str(given[index]))
    return truth


def run_demo(output: Path, *, noise: float = 0.10, seed: int = 0, progress: bool = True) -> int:
    """Build the digits project, train on it and print how well the flips were found."""
    output = Path(output)
    project_dir = output / "digits"
    truth = build_digits_project(project_dir, noise=noise, seed=seed)
    with open(output / "digits_truth.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["asset_id", "true_label", "given_label"])
        for asset_id, (true_label, given_label) in sorted(truth.items()):
            writer.writerow([asset_id, true_label, given_label])
    flips = {asset_id for asset_id, (true_label, given_label) in truth.items() if true_label != given_label}
    logger.info("Demo project: %d digits in %s, %d labels flipped", len(truth), project_dir, len(flips))

    source = LocalProject(project_dir, classes=[str(digit) for digit in range(10)])
    result = train(source, TrainConfig(models_dir=output / "models", progress=progress))
    print_summary(result)

    flagged = {row["asset_id"] for row in result.rows if row["is_issue"]}
    found = len(flagged & flips)
    precision = found / len(flagged) if flagged else 0.0
    recall = found / len(flips) if flips else 0.0
    print()
    print(f"Flipped labels:     {len(flips)} of {len(truth)} (seed {seed})")
    print(f"Flagged:            {len(flagged)}, of which {found} are flipped")
    print(f"Precision:          {precision:.3f}")
    print(f"Recall:             {recall:.3f}")
    print(f"Results database:   {source.results_db}")
    print(f"Ground truth:       {output / 'digits_truth.csv'}")
    print(f"Report:             {render_report(result.version_dir, source=source)}")
    return 0
