"""Full fine-tuning of the backbone per fold, with augmentation and early stopping.

Each fold fine-tunes a fresh copy of the pretrained network on the other
folds' assets, keeps 10% of them aside to stop early on validation loss, and
is exported as one ONNX model from image to probabilities. Fold models are
cached by their training set and settings, so an unchanged rerun trains
nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from plugin.preprocess import normalize
from plugin.runtime import OnnxModel

from .onnx_export import export_onnx

logger = logging.getLogger(__name__)

# NOTE: these settings run end to end in the tests (1 epoch on CPU) but have
# not been tuned or benchmarked on a GPU; detection quality in finetune mode
# is unmeasured.
VALIDATION_FRACTION = 0.1
PATIENCE = 2
LEARNING_RATE = 3e-4
WEIGHT_DECAY = 1e-4
LABEL_SMOOTHING = 0.1


@dataclass
class FinetuneOutcome:
    """Out-of-fold probabilities and the exported fold files."""

    pred_probs: np.ndarray
    fold_files: list[str]
    details: dict


def _training_key(sha256s, labels, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for sha, label in sorted(zip(sha256s, labels)):
        digest.update(f"{sha}:{label};".encode())
    return digest.hexdigest()


class _Images:
    """Cached pixels of a list of assets, augmented on the fly for training."""

    def __init__(self, image_cache, sha256s, labels, preprocessing, *, augment: bool):
        import torch
        from torchvision.transforms import v2

        self.image_cache, self.sha256s, self.labels = image_cache, list(sha256s), np.asarray(labels)
        self.preprocessing = preprocessing
        size = preprocessing.input_size
        self.augment = (
            v2.Compose([v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip()])
            if augment
            else None
        )
        self.torch = torch

    def __len__(self) -> int:
        return len(self.sha256s)

    def __getitem__(self, index: int):
        pixels = self.image_cache.get(self.sha256s[index])
        if pixels is None:
            raise FileNotFoundError(f"cached image {self.sha256s[index]} disappeared from the image cache")
        batch = self.torch.from_numpy(normalize(pixels, self.preprocessing)[0])
        if self.augment is not None:
            batch = self.augment(batch)
        return batch, int(self.labels[index])


def _build_model(spec, num_classes: int, backbone_state: dict):
    import timm

    model = timm.create_model(spec.model_name, pretrained=False, num_classes=num_classes)
    missing, _ = model.load_state_dict(backbone_state, strict=False)
    unexpected_missing = [name for name in missing if not name.startswith("classifier.")]
    if unexpected_missing:
        raise RuntimeError(f"backbone weights do not fit {spec.model_name}: missing {unexpected_missing[:3]}")
    return model


def _train_one_fold(spec, backbone_state, image_cache, sha256s, labels, num_classes, config, seed):
    import torch
    from sklearn.model_selection import train_test_split
    from torch.utils.data import DataLoader

    torch.manual_seed(seed)
    indices = np.arange(len(sha256s))
    stratify = labels if np.min(np.bincount(labels)[np.unique(labels)]) >= 2 else None
    train_rows, validation_rows = train_test_split(
        indices, test_size=max(VALIDATION_FRACTION, num_classes / max(len(indices), 1)),
        random_state=seed, stratify=stratify,
    )
    preprocessing = spec.preprocessing
    train_data = _Images(image_cache, [sha256s[i] for i in train_rows], labels[train_rows], preprocessing, augment=True)
    validation_data = _Images(image_cache, [sha256s[i] for i in validation_rows], labels[validation_rows], preprocessing, augment=False)
    train_loader = DataLoader(train_data, batch_size=config.batch_size, shuffle=True, num_workers=0)
    validation_loader = DataLoader(validation_data, batch_size=config.batch_size, num_workers=0)

    model = _build_model(spec, num_classes, backbone_state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    loss_function = torch.nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
    best_loss, best_state, stale_epochs, epochs_run = float("inf"), None, 0, 0

    for epoch in range(config.epochs):
        model.train()
        for images, targets in tqdm(train_loader, desc=f"Epoch {epoch + 1}", unit="batch", leave=False, disable=not config.progress):
            optimizer.zero_grad()
            loss_function(model(images), targets).backward()
            optimizer.step()
        epochs_run += 1

        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for images, targets in validation_loader:
                total += float(loss_function(model(images), targets)) * len(targets)
                count += len(targets)
        validation_loss = total / max(count, 1)
        logger.debug("Epoch %d: validation loss %.4f", epoch + 1, validation_loss)
        if validation_loss < best_loss - 1e-4:
            best_loss, stale_epochs = validation_loss, 0
            best_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        else:
            stale_epochs += 1
            if stale_epochs >= PATIENCE:
                logger.info("Early stop after epoch %d (validation loss %.4f)", epoch + 1, best_loss)
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, {"epochs": epochs_run, "validation_loss": best_loss}


def finetune_folds(source, assets, labels, folds, classes, spec, image_cache, writer, config, *, sha256s, backbone_state):
    """Fine-tune one model per fold and return out-of-fold probabilities.

    With a ``writer``, each fold is exported to ``fold_<k>.onnx`` in the new
    version and the out-of-fold probabilities come from those ONNX files, as
    the plugin will compute them; without one (for ``--evaluate-cleaning``)
    they come from the torch models.
    """
    import torch

    num_classes = len(classes)
    n_folds = int(folds.max()) + 1
    cache_root = Path(config.cache_root) / "finetune"
    cache_root.mkdir(parents=True, exist_ok=True)
    settings = {
        "model": spec.model_name, "weights": spec.weights_sha256, "preprocessing": spec.preprocessing.cache_key(),
        "epochs": config.epochs, "batch_size": config.batch_size, "seed": config.seed, "classes": num_classes,
        "lr": LEARNING_RATE, "weight_decay": WEIGHT_DECAY, "label_smoothing": LABEL_SMOOTHING,
    }
    pred_probs = np.zeros((len(sha256s), num_classes))
    fold_files, trained, details = [], 0, []
    size = spec.preprocessing.input_size

    for fold in range(n_folds):
        train_rows = np.flatnonzero(folds != fold)
        held_out = np.flatnonzero(folds == fold)
        key = _training_key([sha256s[i] for i in train_rows], labels[train_rows].tolist(), settings)
        cached = cache_root / f"{key}.pt"
        model = _build_model(spec, num_classes, backbone_state)
        if cached.is_file():
            model.load_state_dict(torch.load(cached, map_location="cpu", weights_only=True))
            model.eval()
            fold_details = {"cached": True}
        else:
            logger.info("Fine-tuning fold %d of %d on %d images", fold + 1, n_folds, train_rows.size)
            model, fold_details = _train_one_fold(
                spec, backbone_state, image_cache, [sha256s[i] for i in train_rows], labels[train_rows],
                num_classes, config, config.seed + fold,
            )
            torch.save(model.state_dict(), cached)
            trained += 1
        details.append(fold_details)

        pixels = np.stack([image_cache.get(sha256s[i]) for i in held_out])
        if writer is not None:
            name = f"fold_{fold}.onnx"
            export_onnx(
                torch.nn.Sequential(model, torch.nn.Softmax(dim=1)), torch.zeros(2, 3, size, size),
                writer.path(name), input_name="image", output_name="probabilities",
            )
            fold_files.append(name)
            session = OnnxModel(writer.path(name), providers=config.providers)
            for start in range(0, len(held_out), 32):
                batch = normalize(pixels[start : start + 32], spec.preprocessing)
                pred_probs[held_out[start : start + 32]] = session.run(batch)
        else:
            with torch.no_grad():
                for start in range(0, len(held_out), 32):
                    batch = torch.from_numpy(normalize(pixels[start : start + 32], spec.preprocessing))
                    pred_probs[held_out[start : start + 32]] = torch.softmax(model(batch), dim=1).numpy()

    logger.info("Fine-tuned folds: %d trained, %d reused from the cache", trained, n_folds - trained)
    return FinetuneOutcome(pred_probs=pred_probs, fold_files=fold_files, details={"folds_trained": trained, "per_fold": details})
