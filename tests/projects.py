"""Small labeled image projects for tests, built from real images.

scikit-learn's digits are real handwritten digits (8x8 pixels); the shared
data folder contains real photos. Tests that need the photos skip when the
folder is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("KLE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_data(name: str) -> Path:
    """Return a folder of the shared data, or skip the test when it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"shared data {path} is absent (set KLE_SHARED_DATA to its folder)")
    return path


def write_digits_project(
    folder: Path, *, per_class: int, classes=(0, 1, 2, 3), flip_fraction: float = 0.1, seed: int = 0
) -> dict[str, tuple[str, str]]:
    """Write digits as PNGs into one folder per given label; return (true, given) per asset id."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    chosen = np.concatenate(
        [np.flatnonzero(digits.target == digit)[:per_class] for digit in classes]
    )
    given = digits.target[chosen].copy()
    flipped = rng.choice(chosen.size, size=int(round(flip_fraction * chosen.size)), replace=False)
    for row in flipped:
        others = [digit for digit in classes if digit != given[row]]
        given[row] = rng.choice(others)

    truth = {}
    for row, index in enumerate(chosen):
        pixels = (digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
        relative = f"{given[row]}/digit_{index:04d}.png"
        (folder / str(given[row])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(folder / relative)
        truth[relative] = (str(digits.target[index]), str(given[row]))
    return truth
