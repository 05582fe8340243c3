"""COCO metrics of an exported ONNX model, run by ONNX Runtime (no torch forward).

:func:`onnx_coco_metrics` feeds the split exactly as the Trainer's evaluation does for the
PyTorch model: the evaluation transform (:class:`~hf_detr_ft.pipeline.transforms.DetrTransform`),
batches of similar aspect ratio in the same order
(:class:`~hf_detr_ft.pipeline.sampler.AspectRatioSortedSampler`), padded by the same
:func:`~hf_detr_ft.pipeline.collate.collate_fn`, post-processed by the same image processor at
threshold 0 and scored by the same :class:`~.coco_metrics.CocoEvaluator`; so the metrics of a
faithful export equal the PyTorch model's. DETR's loss terms need the PyTorch model and are not
computed.
"""

from __future__ import annotations

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers.image_processing_utils import BaseImageProcessor

from ..inference.onnx_runtime import OnnxDetector
from ..pipeline.collate import collate_fn
from ..pipeline.sampler import AspectRatioSortedSampler
from ..pipeline.transforms import DetrTransform
from .coco_metrics import CocoEvaluator


def onnx_coco_metrics(
    detector: OnnxDetector, processor: BaseImageProcessor, dataset: Dataset, batch_size: int
) -> tuple[dict[str, float], CocoEvaluator]:
    """The Trainer's evaluation metrics (``eval_`` keys) of ``detector`` on ``dataset``, and
    the evaluator holding its detections."""
    evaluator = CocoEvaluator.from_dataset(dataset)
    sizes = dataset.with_format(None).select_columns(["width", "height"])
    loader = DataLoader(
        DetrTransform.for_evaluation(processor).apply_to(dataset),
        batch_size=batch_size,
        sampler=AspectRatioSortedSampler(sizes["width"], sizes["height"], batch_size),
        collate_fn=collate_fn,
    )
    for batch in loader:
        labels = batch.pop("labels")
        outputs = detector(**batch)
        results = processor.post_process_object_detection(
            outputs,
            threshold=0.0,
            target_sizes=torch.stack([target["orig_size"] for target in labels]),
        )
        evaluator.update([int(target["image_id"]) for target in labels], results)
    metrics = evaluator.compute(gather=False)
    return {f"eval_{name}": value for name, value in metrics.items()}, evaluator
