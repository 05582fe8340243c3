"""Export a fine-tuned detector to ONNX, check it against PyTorch, optionally quantize it.

:func:`export` writes a folder that runs without this package (nor torch, nor transformers)::

    model.onnx                 inputs pixel_values (+ pixel_mask); outputs logits, pred_boxes
    model_int8.onnx            with quantize="dynamic-int8" (int8 matmul weights; CPUs)
    model_static_int8.onnx     with quantize="static-int8" (int8 weights and activations,
                               calibrated on the check images; CPUs with int8 instructions)
    model_fp16.onnx            with quantize="fp16" (fp16 weights and compute; GPUs)
    config.json                the model's config: the label map (id2label), the model type
    preprocessor_config.json   the image processor (resize, rescale, normalize)
    README.md                  inputs, outputs and a numpy + onnxruntime usage snippet
    export_check.json          the check below, per file

The graph is traced by ``torch.onnx.export(..., dynamo=False)`` (TorchScript; the dynamo
exporter fails on transformers' DETR) from the model wrapped to return
``(logits, pred_boxes)``. Height and width stay dynamic for the families that take images of any
shape (DETR, Conditional/DAB/Deformable DETR, YOLOS) and are fixed at the processor's square
for the others; the batch is 1 unless ``dynamic_batch``. Two things make traces of these models
right, both only while :func:`_export_graph` traces (:func:`_traceable`): ``torch.linspace``
and ``torch.as_tensor`` given a traced size (Deformable DETR's reference points and spatial
shapes) are built from ``torch.arange`` / ``torch.stack`` so that the size stays a graph value
instead of the traced image's constant, and the antialiased bicubic resize of a ViT's position
embeddings (RF-DETR) is written as ONNX ``Resize`` with antialiasing, which exists from opset 18
on (so that opset is used for such models; every other type exports at opset 17).

**Every export is checked** (:func:`check_export`): ONNX Runtime and PyTorch run the same
inputs (real images: given, the dataset's evaluation split, or the model folder's ``example.jpg``,
plus a copy of the first one turned by 90 degrees so that a graph that kept the traced shape is
caught); the largest score difference (the family's class probabilities) and the largest box
difference (a fraction of the image side, and pixels), and whether each image's top detections
agree (same class, IoU >= 0.5), are printed and saved; the fp32 model above the tolerances
raises :class:`~hf_detr_ft.errors.ExportCheckError`. Quantized files are lossy by design: their
differences are reported (and their mAP cost measured by ``evaluate`` on them), not failed. The
README's snippet itself is run on the same images and compared with the PyTorch model. Queries
are compared in pairs found by an optimal assignment, not by position; where the PyTorch run
chose its queries among (nearly) tied scores (``torch.topk`` in the two-stage models), which of
them become queries is each runtime's own choice, and such images are held to their top
detections only (:func:`_compare`); the check says on how many images that happened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.image_processing_utils import BaseImageProcessor

from ..errors import (
    ArgumentError,
    ExportCheckError,
    ExportError,
    HfDetrFtError,
    ModelLoadError,
)
from ..inference.detect import prepare_batch
from ..inference.onnx_runtime import OnnxDetector
from ..models.families import Family, family_of
from ..models.loading import load_config, load_detector, load_image_processor
from .onnx_usage import (
    CHECK_FILE,
    ONNX_FILE,
    TOP_DETECTIONS,
    USAGE_FILE,
    SnippetSpec,
    check_snippet,
    model_input_names,
    write_usage,
)
from .output_files import claim_files

logger = logging.getLogger(__name__)

FORMATS = ("onnx",)
#: Quantization -> the file it writes beside ``model.onnx`` (``none``: that file only).
QUANTIZED_FILES = {
    "none": None,
    "dynamic-int8": "model_int8.onnx",
    "static-int8": "model_static_int8.onnx",
    "fp16": "model_fp16.onnx",
}
QUANTIZATIONS = tuple(QUANTIZED_FILES)
#: The folder of a training run's output_dir that ``--export onnx`` writes.
EXPORT_DIR = "onnx"
DEFAULT_OPSET = 17
#: Operators with no ONNX form before some opset -> that opset (and its symbolic below).
OPSET_NEEDED = {"aten::_upsample_bicubic2d_aa": 18}
#: Default tolerances of the fp32 check: class probability, box coordinate (image fraction).
SCORE_TOLERANCE = 1e-3
BOX_TOLERANCE = 1e-3
DEFAULT_CHECK_IMAGES = 8


@dataclass
class VariantCheck:
    """ONNX Runtime vs PyTorch for one exported file, over the check images."""

    file: str
    size_mb: float
    max_score_diff: float
    max_box_diff: float  # fraction of the image side
    max_box_diff_px: float
    images_agreeing: int  # images whose top detections agree
    images: int
    seconds_per_image: float
    passed: bool | None  # None: reported only (quantized files)
    #: Images held to their top detections only (queries chosen among tied scores: _compare).
    images_with_tied_queries: int = 0

    @property
    def top_detections_agree(self) -> bool:
        return self.images_agreeing == self.images

    def line(self) -> str:
        status = {True: "passed", False: "FAILED", None: "reported"}[self.passed]
        return (
            f"{self.file} ({self.size_mb:.1f} MB): largest score difference "
            f"{self.max_score_diff:.2e}, largest box difference {self.max_box_diff:.2e} of the "
            f"image side ({self.max_box_diff_px:.3f} px); top {TOP_DETECTIONS} detections agree "
            f"on {self.images_agreeing}/{self.images} images [{status}]"
            + (
                f"; {self.images_with_tied_queries} images held to their top detections only "
                "(the model chose its queries among (nearly) tied scores there)"
                if self.images_with_tied_queries
                else ""
            )
        )


@dataclass
class ExportCheck:
    """The check of an export (``export_check.json``)."""

    model: str
    model_type: str
    opset: int
    images: list[str]
    score_tolerance: float
    box_tolerance: float
    variants: dict[str, VariantCheck]
    snippet: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(v.passed is not False for v in self.variants.values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name, variant in self.variants.items():
            data["variants"][name]["top_detections_agree"] = variant.top_detections_agree
        data["passed"] = self.passed
        if data["snippet"].get("max_pixel_diff") == float("inf"):  # another input shape
            data["snippet"]["max_pixel_diff"] = None
        return data

    def table(self) -> str:
        lines = [
            f"ONNX Runtime vs PyTorch on {len(self.images)} images ({self.model_type}, opset "
            f"{self.opset}; tolerances: score {self.score_tolerance:g}, box "
            f"{self.box_tolerance:g} of the image side):"
        ]
        lines += [f"  {variant.line()}" for variant in self.variants.values()]
        if self.snippet:
            lines.append(
                f"  README snippet (numpy + onnxruntime): largest input difference "
                f"{self.snippet['max_pixel_diff']:.2e}, detections agree on "
                f"{self.snippet['images_agreeing']}/{self.snippet['images']} images"
            )
        return "\n".join(lines)


@dataclass
class ExportResult:
    """What :func:`export` wrote and how the check went."""

    output_dir: Path
    files: dict[str, Path]  # "fp32", and the quantization asked for
    check: ExportCheck
    seconds: float


# ---------------------------------------------------------------------------------------------
# The export


def export(
    model: str | Path,
    output_dir: str | Path | None = None,
    *,
    format: str = "onnx",
    opset: int | None = None,
    dynamic_batch: bool = False,
    image_size: int | None = None,
    max_image_size: int | None = None,
    quantize: str | Sequence[str] = "none",
    images: str | Path | Image.Image | Iterable[str | Path | Image.Image] | None = None,
    dataset_dir: str | Path | None = None,
    num_check_images: int = DEFAULT_CHECK_IMAGES,
    score_tolerance: float = SCORE_TOLERANCE,
    box_tolerance: float = BOX_TOLERANCE,
) -> ExportResult:
    """Export the fine-tuned model in the folder ``model`` to ONNX in ``output_dir`` (default:
    ``<model>/onnx``) and check it; see the module docstring for what is written.

    ``opset``: default 17 (18 for a model that needs it). ``image_size`` / ``max_image_size``:
    the input size as in training (the shortest and longest edge, or the square's side), else
    the model's saved processor's. ``images`` (files, folders, globs or PIL images) or
    ``dataset_dir`` (its evaluation split) give the check images, ``num_check_images`` of them
    (default: the dataset the model folder's ``dataset_report.json`` names, else its
    ``example.jpg``, else synthetic images, with a warning). Raises
    :class:`~hf_detr_ft.errors.ExportError` for a model that cannot be exported (naming the
    operator and the model type) and :class:`~hf_detr_ft.errors.ExportCheckError` when ONNX
    Runtime does not reproduce the PyTorch model within the tolerances.
    """
    started = time.perf_counter()
    if format not in FORMATS:
        raise ArgumentError(f"format must be one of {', '.join(FORMATS)}, got {format!r}.")
    variants = [quantize] if isinstance(quantize, str) else list(quantize)
    for variant in variants:
        if variant not in QUANTIZED_FILES:
            raise ArgumentError(
                f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {variant!r}."
            )
    if opset is not None and not 14 <= opset <= 20:
        raise ArgumentError(f"opset must be between 14 and 20, got {opset}.")
    if num_check_images < 1:
        raise ArgumentError(f"num_check_images must be at least 1, got {num_check_images}.")
    _require_onnx()
    try:
        config = load_config(model)
    except ModelLoadError as err:  # its advice on downloading, on one line
        raise ModelLoadError(" ".join(str(err).split())) from err
    family = family_of(config)  # an unsupported type: one line naming the supported ones
    out = Path(output_dir) if output_dir is not None else Path(model) / EXPORT_DIR
    if out.expanduser().resolve() == Path(model).expanduser().resolve():
        raise ArgumentError(
            f"output_dir is the model folder {model}: its README.md and config files would be "
            f"replaced; export into another folder (default: {Path(model) / EXPORT_DIR})."
        )
    detector, processor = _load_pytorch(model, image_size, max_image_size)
    quantized = [QUANTIZED_FILES[v] for v in variants if QUANTIZED_FILES[v]]
    names = [ONNX_FILE, *quantized, "config.json", "preprocessor_config.json"]
    claim_files(out, [*names, USAGE_FILE, CHECK_FILE])  # never over files of the user's own
    check_images = resolve_check_images(model, images, dataset_dir, num_check_images)

    sample = prepare_batch(processor, [check_images[0][1]]).inputs
    inputs = model_input_names(detector, sample)
    path = out / ONNX_FILE
    used_opset = _export_graph(
        detector, sample, path, family, config, opset=opset, dynamic_batch=dynamic_batch
    )
    files = {"fp32": path}
    calibration = [
        _feeds(prepare_batch(processor, [image]).inputs, inputs) for _, image in check_images
    ]
    for variant in dict.fromkeys(v for v in variants if v != "none"):
        files[variant] = quantize_model(path, variant, calibration)
    config.save_pretrained(out)
    processor.save_pretrained(out)
    spec = SnippetSpec.for_model(processor, family, config, detector)
    write_usage(out, spec, detector, files, used_opset, dynamic_batch)

    check = check_export(
        files,
        detector,
        processor,
        check_images,
        model_name=str(model),
        opset=used_opset,
        score_tolerance=score_tolerance,
        box_tolerance=box_tolerance,
        spec=spec,
        output_dir=out,
    )
    if out.expanduser().resolve() == (Path(model) / EXPORT_DIR).expanduser().resolve():
        from .model_card import refresh_onnx_section  # the card imports this module

        refresh_onnx_section(model)  # a training run's card lists the exported files
    seconds = time.perf_counter() - started
    logger.info("Exported %s to %s in %.1f s.", model, out, seconds)
    return ExportResult(out, files, check, seconds)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise ExportError(
            f"Exporting needs onnx and onnxruntime: pip install onnx onnxruntime ({err})."
        ) from err


def _load_pytorch(
    model: str | Path, image_size: int | None, max_image_size: int | None
) -> tuple[PreTrainedModel, BaseImageProcessor]:
    detector, processor = load_detector(model, device="cpu")
    if image_size is not None or max_image_size is not None:
        processor = load_image_processor(
            model, image_size=image_size, max_image_size=max_image_size
        )
    return detector.float().eval(), processor


class _Outputs(nn.Module):
    """The detector as a graph of tensors: ``(logits, pred_boxes)`` from the pixel inputs."""

    def __init__(self, model: PreTrainedModel, takes_mask: bool) -> None:
        super().__init__()
        self.model = model
        self.takes_mask = takes_mask

    def forward(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        masks = {"pixel_mask": pixel_mask} if self.takes_mask else {}
        outputs = self.model(pixel_values=pixel_values, **masks)
        return outputs.logits, outputs.pred_boxes


def _export_graph(
    model: PreTrainedModel,
    sample: Any,
    path: Path,
    family: Family,
    config: PretrainedConfig,
    *,
    opset: int | None,
    dynamic_batch: bool,
) -> int:
    """Trace ``model`` on ``sample`` into ``path``; returns the opset used."""
    names = model_input_names(model, sample)
    args = tuple(sample[name].cpu() for name in names)
    if "pixel_mask" in names:
        args = (args[0], args[1].to(torch.int64))
    axes: dict[str, dict[int, str]] = {name: {} for name in [*names, "logits", "pred_boxes"]}
    if dynamic_batch:
        for name in axes:
            axes[name][0] = "batch"
    if not family.square_input:  # any image shape: height and width stay graph values
        axes["pixel_values"].update({2: "height", 3: "width"})
        if "pixel_mask" in axes:
            axes["pixel_mask"].update({1: "height", 2: "width"})
    wrapper = _Outputs(model, "pixel_mask" in names).eval()
    chosen = opset or DEFAULT_OPSET
    while True:
        try:
            with _traceable(chosen), warnings_quiet():
                torch.onnx.export(
                    wrapper,
                    args,
                    str(path),
                    input_names=names,
                    output_names=["logits", "pred_boxes"],
                    dynamic_axes={k: v for k, v in axes.items() if v},
                    opset_version=chosen,
                    dynamo=False,
                )
            break
        except OSError:  # a full disk or an unwritable folder: the machine's fault, not the model's
            raise
        except Exception as err:
            op = _unsupported_op(err)
            needed = OPSET_NEEDED.get(op or "")
            if opset is None and needed and needed > chosen:
                logger.info("%s has an ONNX form from opset %d on: exporting at it.", op, needed)
                chosen = needed
                continue
            raise ExportError(_export_failure(config.model_type, op, chosen, needed, err)) from err
        finally:
            model.eval()  # the exporter restores the wrapper's mode, and with it the model's
    return chosen


def _feeds(inputs: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The ONNX inputs ``names`` of one prepared image, as the exported graph takes them."""
    types = {"pixel_values": np.float32, "pixel_mask": np.int64}
    return {name: inputs[name].numpy().astype(types[name]) for name in names}


def _unsupported_op(err: BaseException) -> str | None:
    found = re.search(r"operator '([\w:.]+)'", str(err))
    return found.group(1) if found else None


def _export_failure(
    model_type: str, op: str | None, opset: int, needed: int | None, err: BaseException
) -> str:
    if op and needed:
        return (
            f"Cannot export {model_type} at opset {opset}: the operator {op} has an ONNX form "
            f"from opset {needed} on; export with --opset {needed} (or without --opset)."
        )
    if op:
        return (
            f"Cannot export {model_type} to ONNX: the exporter has no ONNX form of the operator "
            f"{op} at opset {opset} (docs/export.md lists the status of each model type)."
        )
    text = " ".join(str(err).split())[:300]
    return f"Cannot export {model_type} to ONNX (opset {opset}): {type(err).__name__}: {text}"


@contextlib.contextmanager
def warnings_quiet() -> Iterator[None]:
    """The tracer's and the quantizer's warnings (Python values in the model's code, weights
    without a channel axis to quantize per channel, logged to the root logger) are expected
    here: the check finds what would matter."""
    import warnings

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def _traceable(opset: int) -> Iterator[None]:
    """Within, the trace keeps image sizes as graph values and knows the operators of
    :data:`OPSET_NEEDED` from their opset on (see the module docstring). Undone on exit."""
    linspace, as_tensor = torch.linspace, torch.as_tensor

    def traced_linspace(start: Any, end: Any, steps: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(steps, torch.Tensor) or args:
            return linspace(start, end, steps, *args, **kwargs)
        dtype = kwargs.get("dtype") or torch.get_default_dtype()
        index = torch.arange(steps, dtype=dtype, device=kwargs.get("device"))
        step = (end - start) / (steps - 1).clamp(min=1)
        return start + index * torch.as_tensor(step).to(dtype)

    def traced_as_tensor(data: Any, dtype: Any = None, device: Any = None) -> Any:
        if (
            isinstance(data, list | tuple)
            and data
            and all(isinstance(row, list | tuple) for row in data)
            and any(isinstance(v, torch.Tensor) for row in data for v in row)
        ):
            rows = [torch.stack([as_tensor(v) for v in row]) for row in data]
            return torch.stack(rows).to(dtype=dtype, device=device)
        return as_tensor(data, dtype=dtype, device=device)

    registered = []
    for op, needed in OPSET_NEEDED.items():
        if opset >= needed:
            torch.onnx.register_custom_op_symbolic(op, _SYMBOLICS[op], opset)
            registered.append(op)
    try:
        with (
            mock.patch.object(torch, "linspace", traced_linspace),
            mock.patch.object(torch, "as_tensor", traced_as_tensor),
        ):
            yield
    finally:
        for op in registered:
            torch.onnx.unregister_custom_op_symbolic(op, opset)


def _antialiased_bicubic(g: Any, input: Any, output_size: Any, *args: Any) -> Any:
    """``aten::_upsample_bicubic2d_aa`` as ONNX ``Resize`` (opset 18): cubic a = -0.5 with
    the weights outside the image excluded and renormalised, as torch and Pillow compute it."""
    shape = g.op("Shape", input)
    leading = g.op(
        "Slice",
        shape,
        g.op("Constant", value_t=torch.tensor([0])),
        g.op("Constant", value_t=torch.tensor([2])),
    )
    sizes = g.op("Concat", leading, g.op("Cast", output_size, to_i=7), axis_i=0)  # int64
    empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    return g.op(
        "Resize",
        input,
        empty,
        empty,
        sizes,
        mode_s="cubic",
        cubic_coeff_a_f=-0.5,
        coordinate_transformation_mode_s="half_pixel",
        exclude_outside_i=1,
        antialias_i=1,
    )


_SYMBOLICS = {"aten::_upsample_bicubic2d_aa": _antialiased_bicubic}


def quantize_model(
    path: Path, quantize: str, calibration: Sequence[dict[str, np.ndarray]] = ()
) -> Path:
    """Write the quantized variant of the fp32 model at ``path`` beside it; returns its path.

    * ``dynamic-int8``: int8 weights of the matrix multiplications (the transformer, the
      heads), activations quantized at run time (ONNX Runtime's ``quantize_dynamic``; no
      calibration). Convolutions stay fp32: dynamically quantized convolutions
      (``ConvInteger``) run slower than fp32 ones on ONNX Runtime's CPU (benchmarks/README.md).
    * ``static-int8``: int8 weights (per channel) and uint8 activations everywhere, as QDQ
      pairs, with the activations' ranges calibrated on ``calibration`` (the check images'
      model inputs); the fastest on CPUs with int8 instructions (VNNI, AMX).
    * ``fp16``: weights and compute in float16, inputs and outputs kept float32
      (``onnxruntime.transformers.float16``), for GPUs: ONNX Runtime's CPU has few fp16 kernels.
    """
    import onnx

    target = path.with_name(QUANTIZED_FILES[quantize])
    if quantize in ("dynamic-int8", "static-int8"):
        from onnxruntime import quantization as q

        with tempfile.TemporaryDirectory() as scratch, warnings_quiet():
            prepared = Path(scratch) / "prepared.onnx"
            _prepare_for_quantization(path, prepared)
            if quantize == "dynamic-int8":
                q.quantize_dynamic(
                    prepared,
                    target,
                    weight_type=q.QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm"],
                )
            else:
                if not calibration:
                    raise ArgumentError("static-int8 needs calibration images.")
                q.quantize_static(
                    prepared,
                    target,
                    _Calibration(calibration),
                    quant_format=q.QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=q.QuantType.QUInt8,
                    weight_type=q.QuantType.QInt8,
                )
    elif quantize == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        with warnings_quiet():
            half = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
        onnx.save(half, str(target))
    else:
        raise ArgumentError(
            f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}."
        )
    return target


class _Calibration:
    """ONNX Runtime's calibration data reader over a list of model inputs."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _prepare_for_quantization(source: Path, target: Path) -> None:
    """ONNX Runtime's recommended pre-processing (shape inference, graph optimisation); the
    model as it is where that fails."""
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
    except Exception as err:  # the pre-processing is an optimisation, not a requirement
        logger.info("Quantizing without ONNX Runtime's pre-processing (%s).", err)
        shutil.copy(source, target)


# ---------------------------------------------------------------------------------------------
# The check


def resolve_check_images(
    model: str | Path,
    images: str | Path | Image.Image | Iterable[str | Path | Image.Image] | None,
    dataset_dir: str | Path | None,
    count: int,
) -> list[tuple[str, Image.Image]]:
    """The check images as ``(name, RGB image)``: see :func:`export` for where they come from."""
    from ..inference.predict import find_images, open_image

    if images is not None:
        given = [images] if isinstance(images, str | Path | Image.Image) else list(images)
        paths = (
            find_images([p for p in given if not isinstance(p, Image.Image)])
            if any(not isinstance(p, Image.Image) for p in given)
            else []
        )
        found = [
            (f"image {i}", im.convert("RGB"))
            for i, im in enumerate(given)
            if isinstance(im, Image.Image)
        ]
        found += [(str(p), open_image(p)) for p in paths]
        if not found:
            raise ArgumentError("No check images given.")
        return found[:count]
    source = dataset_dir or _recorded_dataset(model)
    if source is not None:
        try:
            return _dataset_images(source, count)
        except (HfDetrFtError, OSError) as err:
            if dataset_dir is not None:
                raise
            logger.info("Not checking on %s (%s).", source, err)
    example = Path(model) / "example.jpg"
    if example.is_file():
        return [(str(example), open_image(example))]
    logger.warning(
        "No images to check the export on (pass images or a dataset_dir): checking on %d "
        "synthetic images.",
        count,
    )
    return _synthetic_images(count)


def _recorded_dataset(model: str | Path) -> str | None:
    from ..data.dataset_report import REPORT_JSON

    report = Path(model) / REPORT_JSON
    try:
        source = json.loads(report.read_text()).get("source")
    except (OSError, ValueError):
        return None
    return source if source and Path(source).exists() else None


def _dataset_images(dataset_dir: str | Path, count: int) -> list[tuple[str, Image.Image]]:
    from ..data.dataset import load_detection_dataset

    data = load_detection_dataset(dataset_dir, validation_fraction=0)
    split = data.splits[data.eval_split]
    return [
        (f"{data.eval_split}[{i}]", split[i]["image"].convert("RGB"))
        for i in range(min(count, len(split)))
    ]


def _synthetic_images(count: int) -> list[tuple[str, Image.Image]]:
    rng = np.random.default_rng(0)
    sizes = [(480, 640), (640, 480), (512, 512)]
    return [
        (f"synthetic {i}", Image.fromarray(rng.integers(0, 256, (*sizes[i % 3], 3), np.uint8)))
        for i in range(count)
    ]


def check_export(
    files: dict[str, Path],
    model: PreTrainedModel,
    processor: BaseImageProcessor,
    images: Sequence[tuple[str, Image.Image]],
    *,
    model_name: str = "",
    opset: int = DEFAULT_OPSET,
    score_tolerance: float = SCORE_TOLERANCE,
    box_tolerance: float = BOX_TOLERANCE,
    spec: SnippetSpec | None = None,
    output_dir: Path | None = None,
) -> ExportCheck:
    """Run every file of ``files`` (variant -> ONNX path; ``fp32`` is held to the tolerances)
    and ``model`` on ``images`` (plus the first turned by 90 degrees); print and save
    ``export_check.json`` in ``output_dir``; raise :class:`ExportCheckError` if fp32 fails."""
    images = [
        *images,
        (f"{images[0][0]} (turned 90 degrees)", images[0][1].transpose(Image.Transpose.ROTATE_90)),
    ]
    family = family_of(model.config)
    batches = [prepare_batch(processor, [image]) for _, image in images]
    reference, tied = [], []
    with torch.inference_mode():
        for batch in batches:
            ties: list[int] = []
            with _recording_topk_ties(ties, score_tolerance):
                reference.append(model(**batch.inputs))
            tied.append(sum(ties))
    variants = {}
    for name, path in files.items():
        try:
            detector = OnnxDetector(path, model.config)
        except Exception as err:
            raise ExportCheckError(
                f"ONNX Runtime cannot load the exported {path.name}: "
                f"{' '.join(str(err).split())[:300]}"
            ) from err
        variants[name] = _compare(
            name, path, detector, batches, reference, tied, family, score_tolerance, box_tolerance
        )
    check = ExportCheck(
        model=model_name,
        model_type=model.config.model_type,
        opset=opset,
        images=[name for name, _ in images],
        score_tolerance=score_tolerance,
        box_tolerance=box_tolerance,
        variants=variants,
    )
    if spec is not None and output_dir is not None:
        check.snippet = check_snippet(
            spec,
            output_dir,
            model,
            processor,
            images,
            [(batch.inputs, outputs) for batch, outputs in zip(batches, reference)],
        )
    logger.info("%s", check.table())
    if output_dir is not None:
        (output_dir / CHECK_FILE).write_text(json.dumps(check.to_dict(), indent=2) + "\n")
    fp32 = variants.get("fp32")
    if fp32 is not None and not fp32.passed:
        raise ExportCheckError(
            f"{fp32.file} does not reproduce the PyTorch model: largest score difference "
            f"{fp32.max_score_diff:.3g} (tolerance {score_tolerance:g}), largest box difference "
            f"{fp32.max_box_diff:.3g} of the image side (tolerance {box_tolerance:g}), top "
            f"detections agree on {fp32.images_agreeing}/{fp32.images} images"
            + (f"; details in {output_dir / CHECK_FILE}." if output_dir is not None else ".")
        )
    for variant in variants.values():
        if variant.passed is None and not variant.top_detections_agree:
            logger.warning(
                "%s: top detections differ from the PyTorch model's on %d of %d images "
                "(quantization); measure its mAP with `hf-detr-ft evaluate --model %s`.",
                variant.file,
                variant.images - variant.images_agreeing,
                variant.images,
                variant.file,
            )
    return check


def _compare(
    name: str,
    path: Path,
    detector: OnnxDetector,
    batches: Sequence[Any],
    reference: Sequence[Any],
    tied: Sequence[int],
    family: Family,
    score_tolerance: float,
    box_tolerance: float,
) -> VariantCheck:
    """ONNX Runtime's outputs on ``batches`` against PyTorch's ``reference``, query by query.

    Queries are paired by an optimal assignment (box and score distance), not by position:
    two-stage models order their queries by the encoder's scores, and two scores closer than
    the runtimes' rounding swap places. Where the PyTorch run also left out a position that
    scored within ``score_tolerance`` of one it chose (``tied``: how many, per image), the
    other runtime may choose another set of queries, which the decoder's self-attention passes
    on to all of them: those images are held to their top detections only."""
    score_diff = box_diff = box_px = 0.0
    agreeing = tied_images = 0
    started = time.perf_counter()
    outputs = [detector(**batch.inputs) for batch in batches]
    seconds = (time.perf_counter() - started) / len(batches)
    for batch, ours, theirs, choices in zip(batches, outputs, reference, tied):
        p_ours, p_theirs = class_scores(ours.logits, family), class_scores(theirs.logits, family)
        agreeing += top_detections_agree(
            p_theirs[0], theirs.pred_boxes[0], p_ours[0], ours.pred_boxes[0]
        )
        if choices:
            tied_images += 1
            continue
        scores, boxes = _paired_differences(
            p_theirs[0], theirs.pred_boxes[0].float(), p_ours[0], ours.pred_boxes[0]
        )
        score_diff = max(score_diff, float(scores.max()))
        box_diff = max(box_diff, float(boxes.max()))
        box_px = max(box_px, float(boxes.max()) * max(batch.sizes[0]))
    passed = None
    if name == "fp32":
        passed = (
            score_diff <= score_tolerance and box_diff <= box_tolerance and agreeing == len(batches)
        )
    return VariantCheck(
        file=path.name,
        size_mb=path.stat().st_size / 1e6,
        max_score_diff=score_diff,
        max_box_diff=box_diff,
        max_box_diff_px=box_px,
        images_agreeing=agreeing,
        images=len(batches),
        seconds_per_image=seconds,
        passed=passed,
        images_with_tied_queries=tied_images,
    )


def _paired_differences(
    scores: torch.Tensor, boxes: torch.Tensor, other_scores: torch.Tensor, other_boxes: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Per query of one output, the largest score and box difference to the query of the
    other paired with it by the assignment of least total (L1) distance."""
    cost = torch.cdist(boxes, other_boxes, p=1) + torch.cdist(scores, other_scores, p=1)
    rows, cols = linear_sum_assignment(cost.numpy())
    score_diff = (scores[rows] - other_scores[cols]).abs().amax(-1)
    box_diff = (boxes[rows] - other_boxes[cols]).abs().amax(-1)
    return score_diff.numpy(), box_diff.numpy()


@contextlib.contextmanager
def _recording_topk_ties(found: list[int], tolerance: float) -> Iterator[None]:
    """Within, every ``torch.topk`` call appends how many elements it left out that are within
    ``tolerance`` of one it chose (the most in any row): choices the other runtime's rounding
    may make otherwise (two-stage models pick their queries so)."""
    topk = torch.topk

    def recording(
        input: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True
    ) -> Any:
        chosen = topk(input, k, dim=dim, largest=largest, sorted=sorted)
        if 0 < k < input.size(dim):
            edge = (
                chosen.values.amin(dim, keepdim=True)
                if largest
                else chosen.values.amax(dim, keepdim=True)
            )
            near = (input - edge).abs() <= tolerance
            left_out = near.sum(dim) - ((chosen.values - edge).abs() <= tolerance).sum(dim)
            found.append(int(left_out.max()))
        return chosen

    with mock.patch.object(torch, "topk", recording):
        yield


def class_scores(logits: torch.Tensor, family: Family) -> torch.Tensor:
    """Per query and class, the probability the family's post-processing scores with."""
    logits = logits.float()
    if family.sigmoid_classes:
        return logits.sigmoid()
    return logits.softmax(-1)[..., :-1]


def top_detections_agree(
    scores: torch.Tensor,
    boxes: torch.Tensor,
    other_scores: torch.Tensor,
    other_boxes: torch.Tensor,
    k: int = TOP_DETECTIONS,
    min_iou: float = 0.5,
) -> bool:
    """Whether each of the ``k`` best (query, class) detections of one image has a
    detection of the same class among the other's ``2k`` best that overlaps it (IoU)."""
    mine = _top(scores, boxes, k)
    theirs = _top(other_scores, other_boxes, 2 * k)
    for label, box in mine:
        if not any(
            label == other and _iou(box, other_box) >= min_iou for other, other_box in theirs
        ):
            return False
    return True


def _top(scores: torch.Tensor, boxes: torch.Tensor, k: int) -> list[tuple[int, list[float]]]:
    flat = scores.flatten()
    best = torch.topk(flat, min(k, flat.numel())).indices
    classes = scores.shape[-1]
    return [(int(i % classes), boxes[int(i // classes)].tolist()) for i in best]


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (cx, cy, w, h) boxes."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    w = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    h = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = w * h
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else float(a == b)


def exported_files(folder: str | Path) -> list[Path]:
    """The ONNX files of an export folder (``model.onnx`` first), for the model card."""
    folder = Path(folder)
    names = [ONNX_FILE, *(name for name in QUANTIZED_FILES.values() if name)]
    return [folder / name for name in names if (folder / name).is_file()]


def describe(result: ExportResult) -> str:
    """Two lines for the command line: the files, and where the check and usage went."""
    files = ", ".join(f"{p.name} ({p.stat().st_size / 1e6:.1f} MB)" for p in result.files.values())
    return (
        f"Exported to {result.output_dir} in {result.seconds:.1f} s: {files}\n"
        f"Check: {result.output_dir / CHECK_FILE}; use without hf-detr-ft: "
        f"{result.output_dir / USAGE_FILE}"
    )
