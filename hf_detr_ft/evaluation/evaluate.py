"""Evaluate a fine-tuned detector on one split of a dataset folder: COCO metrics, per class.

:func:`evaluate` runs :class:`~hf_detr_ft.training.trainer.DetrTrainer`'s own evaluation (each batch
post-processed and fed to :class:`~evaluation.coco_metrics.CocoEvaluator`, i.e. pycocotools), so
the numbers are those of training's final evaluation, and under ``accelerate launch`` every
image is counted once and every process gets the same numbers as a single process would.

The result holds the 12 numbers of ``COCOeval.summarize()``, AP@[.5:.95] and AR@100 per class
by name and DETR's loss terms; :meth:`EvaluationResult.table` prints them. With
``save_predictions`` the detections are also kept as a COCO results list in the dataset's
*original* category and image ids, so ``COCO(annotation_file).loadRes(path)`` works on the
annotation file the dataset came from.

Each evaluation also analyses the errors (:mod:`.error_analysis`): the confusion matrix at a
score threshold (by default the one that maximises F1), the precision-recall curves per class
and F1 against the score threshold; the best-F1 thresholds go into ``evaluation_<split>.json``
and the files of :mod:`~hf_detr_ft.artifacts.error_report` beside it.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from accelerate import PartialState
from datasets import Dataset

from ..arguments import DetrTrainingArguments
from ..artifacts.error_report import error_analysis_files, write_error_analysis
from ..artifacts.output_files import claim_files, write_text_atomic
from ..data.dataset import load_detection_dataset
from ..data.splits import canonical_split
from ..errors import ArgumentError, DatasetError
from ..inference.onnx_runtime import OnnxDetector, is_onnx_model, load_onnx_detector
from ..models.input_sizes import default_batch_size
from ..models.loading import check_model_classes, load_detector, resolve_device
from ..pipeline.collate import collate_fn
from ..pipeline.transforms import DetrTransform
from ..training.trainer import DetrTrainer
from ..wording import plural
from .coco_metrics import SUMMARY_METRICS, CocoEvaluator
from .error_analysis import ErrorAnalysis, analyse_errors, check_iou_threshold
from .onnx_evaluation import onnx_coco_metrics

logger = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation_{split}.json"
PREDICTIONS_FILE = "predictions_{split}.json"

#: ``COCOeval.summarize()``'s description of each of its 12 numbers.
SUMMARY_LABELS = {
    "map": "AP  @[IoU=0.50:0.95 | area=   all | maxDets=100]",
    "map_50": "AP  @[IoU=0.50      | area=   all | maxDets=100]",
    "map_75": "AP  @[IoU=0.75      | area=   all | maxDets=100]",
    "map_small": "AP  @[IoU=0.50:0.95 | area= small | maxDets=100]",
    "map_medium": "AP  @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "map_large": "AP  @[IoU=0.50:0.95 | area= large | maxDets=100]",
    "mar_1": "AR  @[IoU=0.50:0.95 | area=   all | maxDets=  1]",
    "mar_10": "AR  @[IoU=0.50:0.95 | area=   all | maxDets= 10]",
    "mar_100": "AR  @[IoU=0.50:0.95 | area=   all | maxDets=100]",
    "mar_small": "AR  @[IoU=0.50:0.95 | area= small | maxDets=100]",
    "mar_medium": "AR  @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "mar_large": "AR  @[IoU=0.50:0.95 | area= large | maxDets=100]",
}
LOSS_TERMS = ("loss", "loss_ce", "loss_bbox", "loss_giou", "cardinality_error")


@dataclass
class EvaluationResult:
    """COCO metrics of one split. -1 means "no ground truth" (a class or an area range)."""

    model: str
    dataset_dir: str
    split: str
    images: int
    boxes: int
    class_names: list[str]
    metrics: dict[str, float]  # the 12 COCO numbers, named as in SUMMARY_METRICS
    per_class: dict[str, dict[str, float]]  # class name -> {"ap": AP@[.5:.95], "ar": AR@100}
    losses: dict[str, float]
    predictions: list[dict[str, Any]] | None = None  # COCO results, original ids
    #: The best-F1 score thresholds (``Thresholds.to_dict()``: overall and per class).
    thresholds: dict[str, Any] | None = None
    analysis: ErrorAnalysis | None = None  # the confusion matrix, PR and F1 curves

    def to_dict(self) -> dict[str, Any]:
        """Everything but the predictions and the analysis's arrays (their own files), for
        ``evaluation_<split>.json``."""
        skipped = {"predictions", "analysis"}
        return {k: v for k, v in asdict(self).items() if k not in skipped}

    def table(self) -> str:
        """The COCO summary and the per-class AP/AR as aligned text."""
        lines = [
            f"COCO box metrics of {self.model} on the {self.split} split of {self.dataset_dir} "
            f"({plural(self.images, 'image')}, {plural(self.boxes, 'box')})",
            *(f"  {SUMMARY_LABELS[name]} = {self.metrics[name]:6.3f}" for name in SUMMARY_METRICS),
            "",
        ]
        width = max(len("class"), *(len(name) for name in self.class_names))
        lines.append(f"  {'class':<{width}}  {'AP':>6}  {'AR':>6}")
        for name in self.class_names:
            ap, ar = self.per_class[name]["ap"], self.per_class[name]["ar"]
            lines.append(f"  {name:<{width}}  {ap:6.3f}  {ar:6.3f}")
        if any(v == -1 for pair in self.per_class.values() for v in pair.values()):
            lines.append("  (-1: no ground-truth boxes of that kind in this split)")
        if self.thresholds is not None and self.thresholds["score_threshold"] is not None:
            lines.append(
                f"\n  best-F1 score threshold {self.thresholds['score_threshold']:.3f} "
                f"(mean F1 over classes {self.thresholds['f1']:.3f})"
            )
        return "\n".join(lines)


def evaluate(
    model: str | Path,
    dataset_dir: str | Path,
    split: str = "test",
    *,
    output_dir: str | Path | None = None,
    save_predictions: bool = False,
    batch_size: int | None = None,
    device: str | None = None,
    validation_fraction: float = 0.1,
    seed: int = 42,
    threshold: float | str = "auto",
    iou_threshold: float = 0.5,
    num_worst: int = 4,
) -> EvaluationResult:
    """COCO metrics of ``model`` (a fine-tuned folder or Hub id, or an exported ``.onnx`` file,
    run by ONNX Runtime on the CPU: :mod:`.onnx_evaluation`) on a split of ``dataset_dir``.

    ``split`` is ``train``, ``validation`` (or ``val``/``valid``) or ``test``. A folder without
    a validation split gets the one training split off (``validation_fraction``, ``seed``: the
    defaults of training). With ``output_dir``, the main process writes
    ``evaluation_<split>.json`` and, with ``save_predictions``, ``predictions_<split>.json``.
    ``device="cpu"`` forces the CPU; by default the Trainer picks the accelerator.
    ``batch_size`` (images a step) defaults as in ``predict``: 8 on a GPU, up to a megapixel
    of model input on a CPU (:func:`~hf_detr_ft.models.input_sizes.default_batch_size`).

    The error analysis counts the confusion matrix at score ``threshold`` (``"auto"``: the
    best-F1 one) and IoU ``iou_threshold`` (one of COCO's 0.5, 0.55, ..., 0.95, also the IoU
    of the PR curves), and draws the ``num_worst`` images with most errors.
    """
    if batch_size is not None and batch_size < 1:
        raise ArgumentError(f"batch_size must be at least 1, got {batch_size}.")
    if threshold != "auto" and not (isinstance(threshold, float | int) and 0 <= threshold <= 1):
        raise ArgumentError(f"threshold must be 'auto' or between 0 and 1, got {threshold!r}.")
    if num_worst < 0:
        raise ArgumentError(f"num_worst must be at least 0, got {num_worst}.")
    iou_threshold = check_iou_threshold(iou_threshold)
    data = load_detection_dataset(dataset_dir, validation_fraction=validation_fraction, seed=seed)
    split = canonical_split(split) or split
    if split not in data.splits:
        raise DatasetError(f"{data.root} has no {split!r} split; it has {', '.join(data.splits)}.")
    if is_onnx_model(model):  # ONNX Runtime, fed and scored as the Trainer does (no losses)
        detector, processor = load_onnx_detector(model)
    else:
        detector, processor = load_detector(model, device="cpu")  # the Trainer places it
    check_model_classes(detector.config, data.class_names, model, data.root)
    batch_size = batch_size or default_batch_size(
        detector.device if isinstance(detector, OnnxDetector) else resolve_device(device),
        processor.size,
    )
    dataset = data.splits[split]
    if isinstance(detector, OnnxDetector):
        found, evaluator = onnx_coco_metrics(detector, processor, dataset, batch_size)
        main_process = PartialState().is_main_process
    else:
        found, evaluator, main_process = _trainer_metrics(
            detector, processor, dataset, batch_size, device
        )
    result = EvaluationResult(
        model=str(model),
        dataset_dir=str(data.root),
        split=split,
        images=len(dataset),
        boxes=sum(len(objects["category"]) for objects in dataset.with_format(None)["objects"]),
        class_names=data.class_names,
        metrics={name: found[f"eval_{name}"] for name in SUMMARY_METRICS},
        per_class={
            name: {"ap": found[f"eval_ap_{name}"], "ar": found[f"eval_ar_{name}"]}
            for name in data.class_names
        },
        losses={name: found[f"eval_{name}"] for name in LOSS_TERMS if f"eval_{name}" in found},
        predictions=(evaluator.results(data.label_map.source_ids) if save_predictions else None),
    )
    result.analysis = analyse_errors(
        evaluator, score_threshold=threshold, iou_threshold=iou_threshold
    )
    result.thresholds = result.analysis.thresholds.to_dict()
    if output_dir is not None and main_process:
        write_evaluation(result, output_dir, dataset=dataset, num_worst=num_worst)
    return result


def _trainer_metrics(
    detector: Any, processor: Any, dataset: Any, batch_size: int, device: str | None
) -> tuple[dict[str, float], CocoEvaluator, bool]:
    """The Trainer's evaluation of a PyTorch model: its metrics, its evaluator (every
    process's detections) and whether this is the main process."""
    with tempfile.TemporaryDirectory() as scratch:
        trainer = DetrTrainer(
            model=detector,
            args=DetrTrainingArguments(
                output_dir=scratch,
                eval_strategy="no",
                save_strategy="no",
                load_best_model_at_end=False,
                report_to="none",
                per_device_eval_batch_size=batch_size,
                use_cpu=device == "cpu",
            ),
            processing_class=processor,
            data_collator=collate_fn,
        )
        found = trainer.evaluate(DetrTransform.for_evaluation(processor).apply_to(dataset))
    return found, trainer.last_evaluator, trainer.is_world_process_zero()


def write_evaluation(
    result: EvaluationResult,
    output_dir: str | Path,
    *,
    dataset: Dataset | None = None,
    num_worst: int = 4,
) -> list[Path]:
    """Write ``evaluation_<split>.json``, ``predictions_<split>.json`` if kept, and the error
    analysis's files if analysed (the worst images need ``dataset``, the split with images)."""
    names = [EVALUATION_FILE.format(split=result.split)]
    if result.predictions is not None:
        names.append(PREDICTIONS_FILE.format(split=result.split))
    analysed = result.analysis is not None
    written = claim_files(
        output_dir, [*names, *(error_analysis_files(result.split) if analysed else [])]
    )[: len(names)]
    write_text_atomic(written[0], json.dumps(result.to_dict(), indent=2) + "\n")
    if result.predictions is not None:
        write_text_atomic(written[1], json.dumps(result.predictions) + "\n")
    if analysed:
        written += write_error_analysis(
            result.analysis,
            dataset,
            output_dir,
            result.split,
            num_worst=num_worst if dataset is not None else 0,
        )
    logger.info("Wrote %s", ", ".join(map(str, written)))
    return written
