"""The training run: features, cross-validated heads, cleanlab, export, write-back."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from plugin.metadata import DEFAULT_KEY_PREFIX, Verdict, build_metadata, review_priority
from plugin.model_version import MANIFEST, ModelVersionError, current_version_dir
from plugin.runtime import AUTO, OnnxModel

from .backbone import create_backbone
from .crossval import HeadCache, assign_folds, check_class_counts, out_of_fold_probabilities, train_fold_heads
from .detection import DEFAULT_FILTER_BY, DEFAULT_SCORE_METHOD, Detection, detect_label_issues
from .features import FeatureResult, FeatureStore, extract_features
from .heads import HEAD_C, SCREEN_C, as_torch_module
from .images import ImageCache, load_images
from .onnx_export import export_onnx
from .sources.base import AssetResult, ProjectSource, SourceError, WriteSummary
from .retrain import training_lock
from .versions import VersionWriter, prune_versions, remove_stale_temporaries

logger = logging.getLogger(__name__)

LINEAR = "linear"
FINETUNE = "finetune"
MODES = ("auto", LINEAR, FINETUNE)
ISSUES_CSV = "label_issues.csv"
OOF_FILE = "out_of_fold.npz"


@dataclass
class TrainConfig:
    """Settings of one training run; every field has a command-line option."""

    models_dir: Path
    cache_dir: Path | None = None
    model_name: str = "tf_efficientnet_lite0"
    weights: str | None = None
    mode: str = "auto"
    folds: int = 4
    seed: int = 0
    filter_by: str = DEFAULT_FILTER_BY
    score_method: str = DEFAULT_SCORE_METHOD
    drop_rare_classes: bool = False
    evaluate_cleaning: bool = False
    write_results: bool = True
    dry_run: bool = False
    key_prefix: str = DEFAULT_KEY_PREFIX
    workers: int = 8
    providers: tuple[str, ...] = AUTO
    progress: bool = True
    epochs: int = 10  # finetune mode only
    batch_size: int = 32  # finetune mode only
    keep_versions: int = 5

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.models_dir) / "cache"


@dataclass
class TrainResult:
    """Outputs of a run: the version folder, the table of verdicts and the summary."""

    version_dir: Path
    issues_csv: Path
    summary: dict
    rows: list[dict]
    write_summary: WriteSummary | None = None
    skipped: dict[str, int] = field(default_factory=dict)


def resolve_mode(mode: str) -> str:
    """Pick the training mode; ``auto`` fine-tunes only where CUDA is available."""
    if mode not in MODES:
        raise ValueError(f"invalid mode {mode!r}: use one of {', '.join(MODES)}")
    if mode != "auto":
        logger.info("Training mode: %s (requested)", mode)
        return mode
    import torch

    if torch.cuda.is_available():
        logger.info("Training mode: finetune (CUDA is available)")
        return FINETUNE
    logger.info("Training mode: linear (no CUDA device: frozen backbone features and one head per fold)")
    return LINEAR


@dataclass
class _Run:
    """Everything one training run has gathered, passed between its steps."""

    source: ProjectSource
    config: TrainConfig
    mode: str
    started: float
    classes: list[str]
    spec: object
    model: object
    backbone_path: Path
    image_cache: ImageCache
    extracted: FeatureResult
    assets: list
    sha256s: list[str]
    features: np.ndarray
    labels: np.ndarray
    folds: np.ndarray
    rare: set[str]
    settings: dict
    fingerprint: str = ""

    @property
    def models_dir(self) -> Path:
        return Path(self.config.models_dir)


def train(source: ProjectSource, config: TrainConfig) -> TrainResult:
    """Run cross-validated label-error detection on a project and export a version.

    Raises ``RetrainAlreadyRunning`` when another training run is writing
    into the same models folder.
    """
    Path(config.models_dir).mkdir(parents=True, exist_ok=True)
    with training_lock(Path(config.models_dir)):
        return _train_locked(source, config)


def _train_locked(source: ProjectSource, config: TrainConfig) -> TrainResult:
    run = _prepare(source, config)

    unchanged = _unchanged_version(run.models_dir, run.fingerprint)
    if unchanged is not None:
        logger.info("Nothing changed since model version %s: reusing it, nothing is trained", unchanged.name)
        with np.load(unchanged / OOF_FILE) as stored:
            order = {asset_id: row for row, asset_id in enumerate(stored["asset_ids"])}
            pred_probs = stored["pred_probs"][[order[asset.asset_id] for asset in run.assets]]
        detection = _detect(run, pred_probs)
        summary = _summary(run, detection)
        summary["reused_version"] = unchanged.name
        return _finish(run, unchanged, _issue_rows(run, detection), summary)

    writer = VersionWriter(run.models_dir)
    try:
        pred_probs, graph, details = _train_folds(run, writer)
        detection = _detect(run, pred_probs)
        rows = _issue_rows(run, detection)
        summary = _summary(run, detection)
        version_dir = _commit_version(run, writer, pred_probs, graph, details, detection, rows, summary)
    except BaseException:
        writer.abort()
        raise
    if config.dry_run:
        logger.info("Dry run: model version %s was written but not made current", version_dir.name)
    else:
        prune_versions(run.models_dir, config.keep_versions)
    return _finish(run, version_dir, rows, summary)


def _prepare(source: ProjectSource, config: TrainConfig) -> _Run:
    """Read the project, load the backbone, extract features and split the folds."""
    started = time.monotonic()
    mode = resolve_mode(config.mode)
    models_dir = Path(config.models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temporaries(models_dir)
    if removed:
        logger.info("Removed %d incomplete versions left by interrupted runs", removed)

    classes = source.classes()
    assets = sorted(source.list_assets(), key=lambda asset: asset.asset_id)
    if not assets:
        raise SourceError(f"project {source.name} has no labeled assets to train on")
    logger.info("Project %s: %d labeled assets, %d classes", source.name, len(assets), len(classes))

    model, spec = create_backbone(config.model_name, config.weights)
    backbone_key = f"{spec.model_name}|{spec.weights_sha256}|{spec.preprocessing.cache_key()}"
    backbone_path = _cached_backbone_onnx(model, spec, config.cache_root)
    image_cache = ImageCache(config.cache_root / "images", spec.preprocessing)
    if mode == LINEAR:
        backbone = OnnxModel(backbone_path, providers=config.providers)
        store = FeatureStore(config.cache_root / "features.sqlite", backbone_key)
        extracted = extract_features(
            source, assets, backbone, store, image_cache, spec.preprocessing,
            workers=config.workers, progress=config.progress,
        )
    else:
        extracted = _load_all_images(source, assets, image_cache, config)
    if not extracted.assets:
        raise SourceError(f"none of the {len(assets)} images of {source.name} could be read")

    # Classes with fewer images than folds are an error, or left out on request.
    kept_assets, features, sha256s = extracted.assets, extracted.features, extracted.sha256s
    rare = check_class_counts(
        [asset.label for asset in kept_assets], classes, config.folds, drop_rare=config.drop_rare_classes
    )
    if rare:
        keep = [index for index, asset in enumerate(kept_assets) if asset.label not in rare]
        kept_assets = [kept_assets[index] for index in keep]
        sha256s = [sha256s[index] for index in keep]
        if mode == LINEAR:
            features = features[keep]
    present = {asset.label for asset in kept_assets}
    if len(present) < 2:
        raise SourceError(
            f"project {source.name} has readable images of only {sorted(present)}: "
            "label-error detection needs at least two classes"
        )

    labels = np.array([classes.index(asset.label) for asset in kept_assets], dtype=np.int64)
    run = _Run(
        source=source, config=config, mode=mode, started=started, classes=classes, spec=spec, model=model,
        backbone_path=backbone_path, image_cache=image_cache, extracted=extracted, assets=kept_assets,
        sha256s=sha256s, features=features, labels=labels, folds=assign_folds(labels, config.folds, config.seed),
        rare=rare, settings={"backbone": backbone_key, "seed": config.seed, "mode": mode, "screen_c": SCREEN_C},
    )
    run.fingerprint = _run_fingerprint(run, backbone_key)
    return run


def _train_folds(run: _Run, writer: VersionWriter) -> tuple[np.ndarray, dict, dict]:
    """Train and export one model per fold; return out-of-fold probabilities, graph and details."""
    config = run.config
    if run.mode == LINEAR:
        fold_heads = train_fold_heads(
            run.features, run.labels, run.sha256s, run.folds, len(run.classes),
            cache=HeadCache(config.cache_root / "heads"), settings=run.settings, progress=config.progress,
        )
        fold_files = _export_heads(writer, fold_heads.heads, run.features.shape[1])
        shutil.copyfile(run.backbone_path, writer.path("backbone.onnx"))
        pred_probs = _onnx_out_of_fold(writer, fold_files, run.features, run.folds, config.providers)
        graph = {"backbone": "backbone.onnx", "folds": fold_files, "fold_input": "features"}
        details = {
            "screen_c": SCREEN_C, "head_c": HEAD_C,
            "screened_out": int(fold_heads.screened_out.sum()), "heads_trained": fold_heads.trained,
        }
        return pred_probs, graph, details

    from .finetune import finetune_folds

    outcome = finetune_folds(
        run.source, run.assets, run.labels, run.folds, run.classes, run.spec, run.image_cache, writer, config,
        sha256s=run.sha256s, backbone_state=run.model.state_dict(),
    )
    graph = {"backbone": None, "folds": outcome.fold_files, "fold_input": "image"}
    return outcome.pred_probs, graph, outcome.details


def _detect(run: _Run, pred_probs: np.ndarray) -> Detection:
    return detect_label_issues(
        run.labels, pred_probs, filter_by=run.config.filter_by, score_method=run.config.score_method
    )


def _commit_version(run: _Run, writer: VersionWriter, pred_probs, graph, details, detection, rows, summary) -> Path:
    """Write the version's files and manifest, then publish it."""
    _write_issues_csv(writer.path(ISSUES_CSV), rows)
    np.savez_compressed(
        writer.path(OOF_FILE),
        asset_ids=np.array([asset.asset_id for asset in run.assets]),
        labels=run.labels,
        pred_probs=pred_probs,
        folds=run.folds,
    )
    spec = run.spec
    manifest = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": run.source.name,
        "mode": run.mode,
        "classes": run.classes,
        "class_display_names": run.source.class_display_names(),
        "backbone": {
            "model_name": spec.model_name,
            "weights": spec.weights,
            "weights_sha256": spec.weights_sha256,
            "num_features": spec.num_features,
        },
        "preprocessing": spec.preprocessing.to_dict(),
        "graph": graph,
        "decision": {**detection.tables.to_dict(), "score_method": run.config.score_method},
        "training": {"folds": run.config.folds, "seed": run.config.seed, **details},
        "training_assets": {
            asset.asset_id: {"fold": int(fold), "sha256": sha}
            for asset, fold, sha in zip(run.assets, run.folds, run.sha256s)
        },
        "metrics": summary,
        "fingerprint": run.fingerprint,
    }
    checksummed = [*graph["folds"], OOF_FILE, ISSUES_CSV]
    if graph["backbone"]:
        checksummed.append(graph["backbone"])
    return writer.commit(manifest, checksummed=checksummed, make_current=not run.config.dry_run)


def _finish(run: _Run, version_dir: Path, rows: list[dict], summary: dict) -> TrainResult:
    """Build the result and write the verdicts to the project."""
    result = TrainResult(
        version_dir=version_dir,
        issues_csv=version_dir / ISSUES_CSV,
        summary=summary,
        rows=rows,
        skipped=dict(run.source.read_summary.skipped),
    )
    if run.config.write_results:
        result.write_summary = write_verdicts(run.source, result.rows, version_dir.name, run.config)
    return result


def _run_fingerprint(run: _Run, backbone_key: str) -> str:
    """Hash everything a version depends on: the labeled images and the settings."""
    config = run.config
    digest = hashlib.sha256()
    settings = {
        "backbone": backbone_key, "mode": run.mode, "classes": run.classes, "folds": config.folds,
        "seed": config.seed, "filter_by": config.filter_by, "score_method": config.score_method,
        "screen_c": SCREEN_C, "head_c": HEAD_C, "epochs": config.epochs, "batch_size": config.batch_size,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for asset, sha in sorted(zip(run.assets, run.sha256s), key=lambda pair: pair[0].asset_id):
        digest.update(f"{asset.asset_id}\t{sha}\t{asset.label}\n".encode())
    return digest.hexdigest()


def _unchanged_version(models_dir: Path, fingerprint: str) -> Path | None:
    """Return the current version when it was trained on exactly these inputs."""
    try:
        directory = current_version_dir(models_dir)
    except ModelVersionError:
        return None
    if directory is None:
        return None
    manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    return directory if manifest.get("fingerprint") == fingerprint else None


def _load_all_images(source, assets, image_cache, config) -> FeatureResult:
    """Decode and cache every image for fine-tuning; features stay empty."""
    result = FeatureResult(assets=[], sha256s=[], features=np.zeros((0, 0), dtype=np.float32))
    loaded = load_images(source, assets, image_cache, need_pixels=lambda sha256: True, workers=config.workers)
    for item in tqdm(loaded, total=len(assets), desc="Images", unit="img", disable=not config.progress):
        if item.error:
            logger.warning("Skipping asset %s: %s", item.asset.asset_id, item.error)
            result.failed.append((item.asset, item.error))
            continue
        result.assets.append(item.asset)
        result.sha256s.append(item.sha256)
    return result


def _evaluate_cleaning_finetuned(run: _Run, is_issue: np.ndarray) -> dict:
    """Fine-tuned cross-validated accuracy before and after removing the flagged assets."""
    from .finetune import finetune_folds

    def cross_validated_accuracy(rows: np.ndarray) -> float:
        subset_labels = run.labels[rows]
        folds = assign_folds(subset_labels, run.config.folds, run.config.seed)
        outcome = finetune_folds(
            run.source, [run.assets[i] for i in rows], subset_labels, folds, run.classes, run.spec,
            run.image_cache, None, run.config,
            sha256s=[run.sha256s[i] for i in rows], backbone_state=run.model.state_dict(),
        )
        return float(np.mean(outcome.pred_probs.argmax(axis=1) == subset_labels))

    kept_rows = np.flatnonzero(~is_issue)
    return {
        "assets_before": int(run.labels.size),
        "assets_after": int(kept_rows.size),
        "cv_accuracy_before": cross_validated_accuracy(np.arange(run.labels.size)),
        "cv_accuracy_after": cross_validated_accuracy(kept_rows),
    }


def _cached_backbone_onnx(model, spec, cache_root: Path) -> Path:
    import torch

    size = spec.preprocessing.input_size
    path = cache_root / "backbones" / f"{spec.model_name}-{spec.weights_sha256[:16]}-{size}.onnx"
    if not path.is_file():
        logger.info("Exporting the %s backbone to ONNX", spec.model_name)
        temporary = path.with_suffix(".tmp.onnx")
        export_onnx(model, torch.zeros(2, 3, size, size), temporary, input_name="image", output_name="features")
        temporary.replace(path)
    return path


def _export_heads(writer: VersionWriter, heads, num_features: int) -> list[str]:
    import torch

    names = []
    for fold, head in enumerate(heads):
        example = torch.zeros(2, num_features)
        name = f"fold_{fold}.onnx"
        export_onnx(as_torch_module(head), example, writer.path(name), input_name="features", output_name="probabilities")
        names.append(name)
    return names


def _onnx_out_of_fold(writer, fold_files, features, folds, providers) -> np.ndarray:
    """Compute out-of-fold probabilities with the exported heads, as the plugin will."""
    pred_probs = None
    for fold, name in enumerate(fold_files):
        rows = folds == fold
        output = OnnxModel(writer.path(name), providers=providers).run(features[rows]).astype(np.float64)
        if pred_probs is None:
            pred_probs = np.zeros((features.shape[0], output.shape[1]))
        pred_probs[rows] = output
    return pred_probs


def evaluate_cleaning(features, labels, sha256s, is_issue, num_classes, config, settings) -> dict:
    """Cross-validated accuracy before and after removing the flagged assets.

    Both accuracies are measured against the given labels, on all assets
    before and on the kept assets after, as Kili's published evaluation did.
    """
    def cross_validated_accuracy(rows: np.ndarray) -> float:
        subset_labels = labels[rows]
        folds = assign_folds(subset_labels, config.folds, config.seed)
        heads = train_fold_heads(
            features[rows], subset_labels, [sha256s[i] for i in rows], folds, num_classes,
            cache=HeadCache(config.cache_root / "heads"), settings={**settings, "evaluation": True},
            screen=False, progress=config.progress,
        )
        probabilities = out_of_fold_probabilities(heads.heads, features[rows], folds)
        return float(np.mean(probabilities.argmax(axis=1) == subset_labels))

    all_rows = np.arange(labels.shape[0])
    kept_rows = np.flatnonzero(~is_issue)
    before = cross_validated_accuracy(all_rows)
    after = cross_validated_accuracy(kept_rows)
    return {
        "assets_before": int(all_rows.size),
        "assets_after": int(kept_rows.size),
        "cv_accuracy_before": before,
        "cv_accuracy_after": after,
    }


def _issue_rows(run: _Run, detection: Detection) -> list[dict]:
    """Return one row per asset, flagged first, then by quality score (lowest first)."""
    assets, classes = run.assets, run.classes
    order = sorted(
        range(len(assets)), key=lambda i: (not detection.is_issue[i], detection.scores[i], assets[i].asset_id)
    )
    rows = []
    for rank, index in enumerate(order, start=1):
        rows.append({
            "asset_id": assets[index].asset_id,
            "given_label": classes[run.labels[index]],
            "suggested_label": classes[detection.suggested_labels[index]],
            "score": float(detection.scores[index]),
            "is_issue": bool(detection.is_issue[index]),
            "rank": rank,
            "location": assets[index].location,
        })
    return rows


def _write_issues_csv(path: Path, rows: list[dict]) -> None:
    columns = ["asset_id", "given_label", "suggested_label", "score", "is_issue", "rank"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "score": f"{row['score']:.6g}"})


def _summary(run: _Run, detection: Detection) -> dict:
    """Return the run's figures, with the cleaning evaluation when requested."""
    labels = {asset.label for asset in run.assets}
    summary = {
        "source": run.source.name,
        "mode": run.mode,
        "assets": len(run.assets),
        "flagged": int(detection.is_issue.sum()),
        "failed_images": len(run.extracted.failed),
        "skipped_labels": dict(run.source.read_summary.skipped),
        "excluded_classes": sorted(run.rare),
        "features_computed": run.extracted.computed,
        "features_reused": run.extracted.reused,
        "cv_accuracy": detection.cv_accuracy,
        "filter_by": detection.tables.filter_by,
        "estimated_noise_per_class": {
            name: round(float(detection.noise_per_class[index]), 4)
            for index, name in enumerate(run.classes)
            if name in labels
        },
    }
    if run.config.evaluate_cleaning and run.mode == LINEAR:
        summary["cleaning"] = evaluate_cleaning(
            run.features, run.labels, run.sha256s, detection.is_issue, len(run.classes), run.config, run.settings
        )
    elif run.config.evaluate_cleaning:
        summary["cleaning"] = _evaluate_cleaning_finetuned(run, detection.is_issue)
    summary["seconds"] = round(time.monotonic() - run.started, 1)
    return summary


def write_verdicts(source: ProjectSource, rows: list[dict], version: str, config: TrainConfig) -> WriteSummary:
    """Write each asset's verdict to the source as metadata and priority."""
    scored_at = datetime.now(timezone.utc)
    results = []
    for row in rows:
        verdict = Verdict(
            score=row["score"], flagged=row["is_issue"],
            suggested_label=row["suggested_label"], model_version=version,
        )
        results.append(AssetResult(
            asset_id=row["asset_id"],
            metadata=build_metadata(verdict, prefix=config.key_prefix, scored_at=scored_at),
            priority=review_priority(verdict),
        ))
    summary = source.write_results(results, dry_run=config.dry_run)
    verb = "would write" if config.dry_run else "wrote"
    logger.info(
        "Results: %s %d assets, %d unchanged, %d failed", verb, summary.written, summary.unchanged, summary.failed
    )
    return summary

