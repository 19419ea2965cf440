"""Speed and scale benchmark (CPU).

Usage: python bench/speed.py [--data DIR] [--work DIR] [--only throughput,end_to_end,cleanlab,scaling]

Prints Markdown tables: backbone throughput with ONNX Runtime and eager
PyTorch at batch 1 and 32; plugin scoring throughput; cold and warm
end-to-end runs on the Intel scenes with peak memory; cleanlab and the
per-label decision on 1M synthetic rows; and run time at 1k to 8k images.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from plugin.preprocess import normalize, prepare_image  # noqa: E402


def _rate(function, items: int, repeats: int = 3) -> float:
    """Return the best of ``repeats`` rates in items per second."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return items / best


def throughput(data: Path, work: Path) -> list[str]:
    import torch

    from plugin.runtime import OnnxModel
    from training.backbone import create_backbone
    from training.onnx_export import export_onnx

    torch.set_num_threads(os.cpu_count() or 1)
    model, spec = create_backbone()
    path = export_onnx(model, torch.zeros(2, 3, 224, 224), work / "backbone.onnx", input_name="image", output_name="features")
    session = OnnxModel(path, providers=["CPUExecutionProvider"])
    files = sorted((data / "imagenette_subset" / "val").rglob("*.JPEG"))[:64]
    pixels = np.stack([prepare_image(f.read_bytes(), spec.preprocessing) for f in files])
    batch = normalize(pixels, spec.preprocessing)
    tensor = torch.from_numpy(batch)
    channels_last = model.to(memory_format=torch.channels_last)

    def run_in_batches(function, size):
        def call():
            for start in range(0, len(batch), size):
                function(start, size)
        return call

    lines = ["| engine | batch 1 (img/s) | batch 32 (img/s) |", "|---|---|---|"]
    rates = {}
    for name, function in {
        "ONNX Runtime CPU": lambda start, size: session.run(batch[start : start + size]),
        "PyTorch eager, channels_last": lambda start, size: channels_last(tensor[start : start + size].contiguous(memory_format=torch.channels_last)),
    }.items():
        with torch.no_grad():
            one = _rate(run_in_batches(function, 1), len(batch), repeats=2)
            many = _rate(run_in_batches(function, 32), len(batch), repeats=3)
        rates[name] = (one, many)
        lines.append(f"| {name} | {one:.0f} | {many:.0f} |")
    decode = _rate(lambda: [prepare_image(f.read_bytes(), spec.preprocessing) for f in files], len(files), repeats=2)
    lines.append(f"| JPEG decode + resize + crop (Pillow, one thread) | {decode:.0f} | |")
    return lines


def plugin_scoring(data: Path, work: Path) -> list[str]:
    from plugin.model_version import ModelVersion, current_version_dir

    models = work / "intel_models_cold"
    directory = current_version_dir(models)
    if directory is None:
        return ["(run the end_to_end benchmark first: it trains the version scored here)"]
    version = ModelVersion.load(directory, providers=["CPUExecutionProvider"])
    files = sorted((data / "intel_image_classification" / "test").rglob("*.jpg"))[:64]
    pixels = np.stack([prepare_image(f.read_bytes(), version.preprocessing) for f in files])
    lines = ["| plugin scoring (backbone + 4 fold heads + decision) | batch 1 (labels/s) | batch 32 (labels/s) |", "|---|---|---|"]

    def score(size):
        def call():
            for start in range(0, len(pixels), size):
                chunk = pixels[start : start + size]
                predictions = version.predict(chunk, [None] * len(chunk))
                probabilities = np.stack([p.probabilities for p in predictions])
                version.judge(probabilities, np.zeros(len(chunk), dtype=np.int64))
        return call

    lines.append(f"| new assets (fold mean) | {_rate(score(1), len(pixels), 2):.0f} | {_rate(score(32), len(pixels), 3):.0f} |")
    return lines


def _timed_run(arguments: list[str]) -> tuple[float, float]:
    """Run the CLI in a subprocess; return seconds and the peak RSS in MiB."""
    started = time.monotonic()
    process = subprocess.run(
        [sys.executable, "-m", "training.cli", *arguments], cwd=REPO, capture_output=True, text=True
    )
    seconds = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(f"run failed: {process.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return seconds, peak


def end_to_end(data: Path, work: Path) -> list[str]:
    models = work / "intel_models_cold"
    shutil.rmtree(models, ignore_errors=True)
    arguments = [
        "train", "--data", str(data / "intel_image_classification" / "test"), "--output", str(models),
        "--results-db", str(work / "intel_speed.sqlite"), "--no-progress", "--mode", "linear",
    ]
    cold, cold_peak = _timed_run(arguments)
    warm, warm_peak = _timed_run(arguments)
    return [
        "| Intel scenes, 1,800 images, linear, 4 folds | time | peak RSS so far (children) |",
        "|---|---|---|",
        f"| cold run (empty caches, includes ONNX export) | {cold:.1f} s | {cold_peak:.0f} MiB |",
        f"| warm rerun (nothing changed) | {warm:.1f} s | {warm_peak:.0f} MiB |",
    ]


def cleanlab_scale(data: Path, work: Path) -> list[str]:
    import warnings

    from cleanlab.filter import find_label_issues

    from plugin.decision import decide, fit_decision_tables

    lines = [
        "| rows x classes | find_label_issues (PBNR) | fit decision tables | decide, all rows | decide, one row |",
        "|---|---|---|---|---|",
    ]
    rng = np.random.default_rng(0)
    for classes in (10, 100):
        rows = 1_000_000
        true = rng.integers(0, classes, rows)
        logits = rng.normal(size=(rows, classes)).astype(np.float32) * 1.5
        logits[np.arange(rows), true] += 3.0
        pred_probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        pred_probs /= pred_probs.sum(axis=1, keepdims=True)
        pred_probs = pred_probs.astype(np.float64)
        labels = true.copy()
        flip = rng.random(rows) < 0.1
        labels[flip] = rng.integers(0, classes, int(flip.sum()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            started = time.perf_counter()
            find_label_issues(labels, pred_probs, n_jobs=1)
            cleanlab_seconds = time.perf_counter() - started
            started = time.perf_counter()
            tables = fit_decision_tables(labels, pred_probs)
            fit_seconds = time.perf_counter() - started
        started = time.perf_counter()
        decide(labels, pred_probs, tables)
        decide_seconds = time.perf_counter() - started
        started = time.perf_counter()
        for row in range(1000):
            decide(labels[row : row + 1], pred_probs[row : row + 1], tables)
        one_row = (time.perf_counter() - started) / 1000 * 1e6
        lines.append(f"| 1M x {classes} | {cleanlab_seconds:.1f} s | {fit_seconds:.1f} s | {decide_seconds:.1f} s | {one_row:.0f} µs |")
    return lines


def scaling(data: Path, work: Path) -> list[str]:
    from PIL import Image, ImageOps

    source_files = sorted((data / "intel_image_classification" / "test").rglob("*.jpg"))
    # Distinct contents: each copy is a mirrored or rotated variant, so the
    # content-hash caches cannot reuse one image's features for another.
    variants = [lambda im: im, ImageOps.mirror, lambda im: im.rotate(90), lambda im: ImageOps.mirror(im.rotate(90)), ImageOps.flip]
    lines = ["| images | cold run time | seconds per 1,000 images |", "|---|---|---|"]
    for size in (1000, 2000, 4000, 8000):
        folder = work / f"scale_{size}"
        if not folder.exists():
            for index in range(size):
                original = source_files[index % len(source_files)]
                variant = variants[index // len(source_files)]
                target = folder / original.parent.name / f"{index:05d}.jpg"
                target.parent.mkdir(parents=True, exist_ok=True)
                variant(Image.open(original)).save(target, quality=95)
        models = work / f"scale_models_{size}"
        shutil.rmtree(models, ignore_errors=True)
        seconds, _ = _timed_run(["train", "--data", str(folder), "--output", str(models), "--no-progress", "--mode", "linear", "--no-write"])
        lines.append(f"| {size} | {seconds:.0f} s | {seconds / size * 1000:.1f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the shared data folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kle-speed"), help="scratch folder")
    parser.add_argument("--only", default="throughput,end_to_end,plugin_scoring,cleanlab,scaling", help="comma-separated subset")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)
    benchmarks = {
        "throughput": throughput, "end_to_end": end_to_end, "plugin_scoring": plugin_scoring,
        "cleanlab": cleanlab_scale, "scaling": scaling,
    }
    print(f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), no GPU; date {date.today()}\n")
    for name in args.only.split(","):
        started = time.monotonic()
        lines = benchmarks[name](args.data, args.work)
        print(f"## {name} ({time.monotonic() - started:.0f} s)\n")
        print("\n".join(lines))
        print()
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
