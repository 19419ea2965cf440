"""Fine-tuning mode on a few real photos: exported fold models score like the run."""

import csv
import json

import numpy as np
import pytest

from plugin.model_version import ModelVersion
from plugin.preprocess import prepare_image
from projects import shared_data
from training.pipeline import TrainConfig, train
from training.sources.local import LocalProject


@pytest.mark.slow
def test_finetune_exports_image_models(tmp_path):
    root = shared_data("imagenette_subset") / "val"
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for wnid in ("n01440764", "n02102040", "n03445777"):
            for file in sorted((root / wnid).iterdir())[:8]:
                writer.writerow([str(file), wnid])
    source = LocalProject(manifest)
    config = TrainConfig(models_dir=tmp_path / "models", mode="finetune", folds=2, epochs=1, batch_size=8, progress=False)

    result = train(source, config)

    manifest_data = json.loads((result.version_dir / "manifest.json").read_text())
    assert manifest_data["mode"] == "finetune"
    assert manifest_data["graph"] == {"backbone": None, "folds": ["fold_0.onnx", "fold_1.onnx"], "fold_input": "image"}
    version = ModelVersion.load(result.version_dir, providers=["CPUExecutionProvider"])
    assets = list(source.list_assets())
    pixels = np.stack([prepare_image(source.read_image(asset), version.preprocessing) for asset in assets])
    predictions = version.predict(pixels, [asset.asset_id for asset in assets])
    oof = np.load(result.version_dir / "out_of_fold.npz")
    rows = {asset_id: row for row, asset_id in enumerate(oof["asset_ids"])}
    expected = oof["pred_probs"][[rows[asset.asset_id] for asset in assets]]
    assert np.abs(np.stack([p.probabilities for p in predictions]) - expected).max() < 1e-4
