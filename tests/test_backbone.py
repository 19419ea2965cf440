"""The packaged EfficientNet-Lite0 weights load into timm and export to ONNX faithfully."""

import numpy as np
import pytest
import torch

from plugin.preprocess import normalize, prepare_image
from plugin.runtime import OnnxModel
from projects import shared_data
from training.backbone import BackboneError, _packaged_weights_path, create_backbone, rename_lukemelas_keys
from training.heads import as_torch_module, fit_head
from training.onnx_export import export_onnx

# ImageNet-1k indices of two Imagenette classes.
TENCH, GOLF_BALL = 0, 574


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("tf_efficientnet_lite0")


def test_packaged_weights_map_to_every_timm_key(lite0):
    import timm

    state = torch.load(_packaged_weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)

    missing, unexpected = full.load_state_dict(rename_lukemelas_keys(state, full), strict=True)

    assert missing == []
    assert unexpected == []


def test_packaged_weights_classify_real_photos():
    import timm

    state = torch.load(_packaged_weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    full.load_state_dict(rename_lukemelas_keys(state, full))
    _, spec = create_backbone("tf_efficientnet_lite0")
    folder = shared_data("imagenette_subset") / "val"
    expectations = {"n01440764": TENCH, "n03445777": GOLF_BALL}

    for wnid, imagenet_index in expectations.items():
        files = sorted((folder / wnid).iterdir())[:8]
        batch = normalize(np.stack([prepare_image(f.read_bytes(), spec.preprocessing) for f in files]), spec.preprocessing)
        with torch.no_grad():
            predicted = full(torch.from_numpy(batch)).argmax(dim=1).numpy()
        assert np.mean(predicted == imagenet_index) >= 0.75, (wnid, predicted)


def test_spec_carries_preprocessing_and_checksum(lite0):
    _, spec = lite0

    assert spec.preprocessing.input_size == 224
    assert spec.preprocessing.mean == (0.5, 0.5, 0.5)
    assert spec.weights_sha256 == "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
    assert spec.num_features == 1280


def test_backbone_onnx_matches_torch(lite0, tmp_path):
    model, _ = lite0
    path = export_onnx(model, torch.zeros(2, 3, 224, 224), tmp_path / "backbone.onnx", input_name="image", output_name="features")
    session = OnnxModel(path, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)

    for batch_size in (1, 5):
        images = torch.randn(batch_size, 3, 224, 224, generator=generator)
        with torch.no_grad():
            expected = model(images).numpy()
        assert np.abs(session.run(images.numpy()) - expected).max() < 1e-4


def test_head_onnx_matches_torch(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(120, 16)).astype(np.float32)
    labels = rng.integers(0, 3, 120)
    head = fit_head(features, labels, 4, c=1.0)
    module = as_torch_module(head)
    path = export_onnx(module, torch.zeros(2, 16), tmp_path / "head.onnx", input_name="features", output_name="probabilities")

    with torch.no_grad():
        expected = module(torch.from_numpy(features)).numpy()
    actual = OnnxModel(path, providers=["CPUExecutionProvider"]).run(features)

    assert np.abs(actual - expected).max() < 1e-4
    assert np.allclose(head.predict_proba(features), expected, atol=1e-4)
    assert expected[:, 3].max() < 1e-6  # a class absent from training gets no probability


def test_unknown_model_name_lists_similar():
    with pytest.raises(BackboneError, match="unknown timm model 'tf_efficientnet_lite9'"):
        create_backbone("tf_efficientnet_lite9")


def test_missing_checkpoint_names_path(tmp_path):
    with pytest.raises(BackboneError, match="weights file not found: .*missing.pth"):
        create_backbone("tf_efficientnet_lite0", weights=str(tmp_path / "missing.pth"))


def test_checkpoint_of_other_architecture_is_rejected(tmp_path):
    import timm

    other = timm.create_model("resnet18", pretrained=False, num_classes=0)
    torch.save(other.state_dict(), tmp_path / "resnet.pth")

    with pytest.raises(BackboneError, match="does not fit tf_efficientnet_lite0"):
        create_backbone("tf_efficientnet_lite0", weights=str(tmp_path / "resnet.pth"))
