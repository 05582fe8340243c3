"""The "stock recipe": what the transformers object-detection example and task guide do.

Rebuilt here so that it runs side by side with hf-detr-ft on the same data and model:
``DetrImageProcessor`` resizing the longest edge to ``cap`` and padding every image to a fixed
``cap x cap`` square, called per batch by ``datasets.with_transform``; a plain
``transformers.Trainer`` with one learning rate and ``dataloader_num_workers=0``; evaluation
that gathers the raw outputs of the whole evaluation set (``eval_do_concat_batches=False``)
and computes mAP at the end with torchmetrics' ``MeanAveragePrecision`` (pycocotools through
:class:`hf_detr_ft.evaluation.coco_metrics.CocoEvaluator` when torchmetrics is not installed).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import DetrImageProcessor, EvalPrediction, Trainer, TrainingArguments
from transformers.image_transforms import center_to_corners_format

from hf_detr_ft.evaluation.coco_metrics import CocoEvaluator

try:
    from torchmetrics.detection import MeanAveragePrecision
except ImportError:  # the `bench` extra is not installed
    MeanAveragePrecision = None


def stock_processor(cap: int) -> DetrImageProcessor:
    """Longest edge at most ``cap``, every image padded to ``cap x cap`` (as the example)."""
    return DetrImageProcessor(
        size={"max_height": cap, "max_width": cap},
        do_pad=True,
        pad_size={"height": cap, "width": cap},
    )


class StockTransform:
    """For ``Dataset.with_transform``: the processor on the whole batch, as in the example."""

    def __init__(self, processor: DetrImageProcessor) -> None:
        self.processor = processor

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, Any]:
        annotations = [
            {
                "image_id": image_id,
                "annotations": [
                    {"bbox": list(b), "category_id": c, "area": a, "iscrowd": int(z)}
                    for b, c, a, z in zip(o["bbox"], o["category"], o["area"], o["iscrowd"])
                ],
            }
            for image_id, o in zip(batch["image_id"], batch["objects"])
        ]
        images = [np.array(image) for image in batch["image"]]
        return self.processor(images=images, annotations=annotations, return_tensors="pt")


def stock_collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the fixed-size squares (the example's ``collate_fn``)."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "pixel_mask": torch.stack([e["pixel_mask"] for e in examples]),
        "labels": [e["labels"] for e in examples],
    }


def stock_arguments(output_dir: str, **overrides: Any) -> TrainingArguments:
    """The example's settings: one learning rate, no workers, batches of raw outputs kept."""
    settings = dict(
        output_dir=output_dir,
        learning_rate=5e-5,
        weight_decay=1e-4,
        max_grad_norm=0.01,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        eval_do_concat_batches=False,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        eval_strategy="no",
        use_cpu=not torch.cuda.is_available(),
    )
    return TrainingArguments(**{**settings, **overrides})


def stock_compute_metrics(processor: DetrImageProcessor, dataset: Dataset):
    """``compute_metrics`` over everything gathered: post-process all outputs, then mAP."""

    def compute(results: EvalPrediction) -> dict[str, float]:
        predictions, targets, image_ids = [], [], []
        for outputs, labels in zip(results.predictions, results.label_ids):
            logits, boxes = _logits_and_boxes(outputs)
            sizes = torch.tensor(np.array([t["orig_size"] for t in labels]))
            found = processor.post_process_object_detection(
                _Outputs(torch.as_tensor(logits), torch.as_tensor(boxes)), 0.0, sizes
            )
            predictions += found
            targets += [_target(t) for t in labels]
            image_ids += [int(np.ravel(t["image_id"])[0]) for t in labels]
        if MeanAveragePrecision is None:
            evaluator = CocoEvaluator.from_dataset(dataset)
            evaluator.update(image_ids, predictions)
            return evaluator.compute()
        metric = MeanAveragePrecision(box_format="xyxy", class_metrics=True)
        metric.update(predictions, targets)
        return {k: float(v) for k, v in metric.compute().items() if v.numel() == 1}

    return compute


def stock_trainer(model: Any, args: TrainingArguments, train=None, evaluation=None, **kw: Any):
    """A plain ``transformers.Trainer`` as the example builds it."""
    return Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=stock_collate,
        **kw,
    )


class _Outputs:
    def __init__(self, logits: torch.Tensor, pred_boxes: torch.Tensor) -> None:
        self.logits, self.pred_boxes = logits, pred_boxes


def _logits_and_boxes(outputs: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The model's output tuple (minus the loss) holds the loss dict, logits and boxes."""
    arrays = [o for o in outputs if isinstance(o, np.ndarray) and o.ndim == 3]
    boxes = next(a for a in arrays if a.shape[-1] == 4)
    logits = next(a for a in arrays if a is not boxes)
    return logits, boxes


def _target(label: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Absolute xyxy boxes of a processed label, scaled by ``orig_size`` as the example does."""
    height, width = label["orig_size"]
    boxes = center_to_corners_format(torch.as_tensor(label["boxes"]))
    boxes = boxes * torch.tensor([width, height, width, height])
    return {"boxes": boxes, "labels": torch.as_tensor(label["class_labels"])}
