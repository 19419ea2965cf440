"""Export torch modules to ONNX files with a dynamic batch dimension."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

logger = logging.getLogger(__name__)

ONNX_OPSET = 18


def export_onnx(module, example_input, path: Path, *, input_name: str, output_name: str) -> Path:
    """Export ``module`` in eval mode to one self-contained ONNX file.

    The first input dimension is dynamic, so one file serves any batch size.
    The TorchScript exporter is used: it needs no ``onnxscript`` and exports
    the EfficientNet-Lite0 backbone in about a second (torch 2.14.1).
    """
    import torch

    module.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module,
            (example_input,),
            str(path),
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    logger.debug("Exported %s to %s", type(module).__name__, path)
    return path
