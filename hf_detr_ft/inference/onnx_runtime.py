"""An exported ONNX detector run by ONNX Runtime, in place of the PyTorch model.

:func:`load_onnx_detector` reads ``model.onnx`` (or a quantized variant) and the files
:mod:`hf_detr_ft.artifacts.onnx_export` writes beside it (``config.json`` with the label map,
``preprocessor_config.json``), and returns an :class:`OnnxDetector` and the image processor.
The detector is called as the PyTorch model is (``detector(pixel_values=..., pixel_mask=...)``)
and returns the two outputs post-processing reads (``logits``, ``pred_boxes``), so
:func:`~hf_detr_ft.inference.detect.detect`, ``predict`` and ``evaluate`` run it unchanged:
the same image processor prepares the inputs and post-processes the outputs, and only the
forward pass is ONNX Runtime's (no torch forward). ``onnxruntime`` is imported when a model
is loaded, never with the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoImageProcessor, PretrainedConfig
from transformers.image_processing_utils import BaseImageProcessor

from ..errors import ModelLoadError

ONNX_SUFFIX = ".onnx"
#: ONNX tensor element types of the inputs this package feeds, as numpy types.
_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,
}


def is_onnx_model(model: str | Path | Any) -> bool:
    """Whether ``model`` names an ONNX file (``.onnx``) rather than a PyTorch model."""
    return isinstance(model, str | Path) and str(model).lower().endswith(ONNX_SUFFIX)


@dataclass
class OnnxOutput:
    """What post-processing reads of a detector's output, as torch tensors (on the CPU)."""

    logits: torch.Tensor
    pred_boxes: torch.Tensor
    loss: None = None


class OnnxDetector:
    """An ONNX Runtime session behind the interface of a transformers detector.

    ``config`` is the exported model's config (label map, model type); :attr:`device` is the
    CPU, where inputs are expected and outputs are returned. ``threads``: ONNX Runtime's
    intra-op threads (default: torch's thread count). A model exported with a fixed batch of 1
    runs a batch one image at a time.
    """

    def __init__(
        self,
        path: str | Path,
        config: PretrainedConfig,
        *,
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.config = config
        options = ort.SessionOptions()
        # As many threads as torch runs with (OMP_NUM_THREADS, torch.set_num_threads), so that
        # both runtimes use the same cores; ONNX Runtime's own default counts physical cores.
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # Between runs torch's threads decode and prepare the next batch on the same cores;
        # ONNX Runtime's threads spinning there, waiting for work, would slow them down
        # (measured in benchmarks/README.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: shape-inference notes are not for users
        self.session = ort.InferenceSession(
            str(self.path), options, providers=providers or ["CPUExecutionProvider"]
        )
        self.inputs = {
            i.name: _NUMPY_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()
        }
        batch = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) else None

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)

    def eval(self) -> OnnxDetector:
        return self

    def to(self, *args: Any, **kwargs: Any) -> OnnxDetector:
        return self

    def run(self, **inputs: Any) -> tuple[np.ndarray, np.ndarray]:
        """``logits`` and ``pred_boxes`` as numpy arrays for a batch of model inputs (tensors or
        arrays; inputs the model does not take, such as labels, are ignored)."""
        feeds = {
            name: _as_array(inputs[name]).astype(dtype, copy=False)
            for name, dtype in self.inputs.items()
        }
        count = len(next(iter(feeds.values())))
        if self.fixed_batch is None or self.fixed_batch == count:
            logits, boxes = self.session.run(None, feeds)[:2]
            return logits, boxes
        if self.fixed_batch != 1:
            raise ModelLoadError(
                f"{self.path} was exported for batches of {self.fixed_batch} images; got "
                f"{count}. Export with --dynamic_batch to run other batch sizes."
            )
        parts = [
            self.session.run(None, {k: v[i : i + 1] for k, v in feeds.items()})[:2]
            for i in range(count)
        ]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def __call__(self, **inputs: Any) -> OnnxOutput:
        logits, boxes = self.run(**inputs)
        return OnnxOutput(torch.from_numpy(logits).float(), torch.from_numpy(boxes).float())


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def load_onnx_detector(
    path: str | Path, *, threads: int | None = None
) -> tuple[OnnxDetector, BaseImageProcessor]:
    """The ONNX model at ``path`` and the image processor saved beside it.

    Raises :class:`~hf_detr_ft.errors.ModelLoadError` (one line) when the file is missing or
    is not a model ONNX Runtime can load, or when its folder lacks ``config.json`` or
    ``preprocessor_config.json`` (an export by ``hf-detr-ft export`` has both).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist (expected an ONNX file written by export).")
    folder = path.parent
    try:
        config = AutoConfig.from_pretrained(str(folder))
        processor = AutoImageProcessor.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"{folder} lacks the config.json and preprocessor_config.json that "
            f"`hf-detr-ft export` writes beside {path.name} ({_first_line(err)})."
        ) from err
    try:
        detector = OnnxDetector(path, config, threads=threads)
    except ImportError as err:
        raise ModelLoadError(
            f"Running {path.name} needs onnxruntime: pip install onnxruntime ({err})."
        ) from err
    except Exception as err:  # onnxruntime's own errors (InvalidProtobuf, Fail, ...)
        raise ModelLoadError(
            f"{path} is not an ONNX model ONNX Runtime can load: {_first_line(err)}"
        ) from err
    if len(detector.input_names) < 1 or len(detector.session.get_outputs()) < 2:
        raise ModelLoadError(
            f"{path} is not a detector exported by hf-detr-ft (inputs pixel_values[, "
            "pixel_mask]; outputs logits, pred_boxes)."
        )
    return detector, processor


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
