"""ONNX Runtime sessions with quiet provider selection.

The CUDA provider is used when ONNX Runtime lists it and a session can
actually be created with it; otherwise the CPU provider is used. The choice
is logged once per process.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
AUTO = ("auto",)

_logged_choice: set[tuple[str, ...]] = set()
_lock = threading.Lock()


def cuda_usable() -> bool:
    """Tell whether ONNX Runtime has a CUDA provider and the CUDA driver loads."""
    import ctypes

    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _session_options(threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or min(os.cpu_count() or 1, 8)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: a missing CUDA library is not an error here
    return options


class OnnxModel:
    """One ONNX model file with a single input and a single output."""

    def __init__(self, path: str | Path, *, providers: Sequence[str] = AUTO, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        requested = list(providers)
        if requested == list(AUTO):
            requested = [CUDA, CPU] if cuda_usable() else [CPU]
        try:
            self.session = ort.InferenceSession(
                str(self.path), _session_options(threads), providers=requested
            )
        except Exception:
            if requested == [CPU]:
                raise
            self.session = ort.InferenceSession(str(self.path), _session_options(threads), providers=[CPU])
        self.providers = tuple(self.session.get_providers())
        self.input_name = self.session.get_inputs()[0].name
        with _lock:
            if self.providers not in _logged_choice:
                _logged_choice.add(self.providers)
                logger.info("ONNX Runtime providers in use: %s", ", ".join(self.providers))

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
