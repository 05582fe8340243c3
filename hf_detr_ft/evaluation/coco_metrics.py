"""COCO box metrics with pycocotools, fed one batch at a time.

:class:`CocoEvaluator` keeps only the post-processed detections of each image (at most one
per object query: score, label, box), never the raw logits of the evaluation set. Ground truth
comes straight from the evaluation ``datasets.Dataset`` (its annotations, not its images).
With several processes each one collects the images it saw; :meth:`CocoEvaluator.compute`
gathers them and keys them by image id, so an image duplicated to even out the last batch
is counted once, and every process gets the same numbers.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object
from datasets import Dataset
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

#: COCOeval.stats in order, under the names torchmetrics and the HF examples use.
SUMMARY_METRICS = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)


def coco_ground_truth(dataset: Dataset) -> COCO:
    """A pycocotools ``COCO`` index of a detection split (see :mod:`hf_detr_ft.data.dataset`).

    Category ids are the contiguous class indices the model predicts.
    """
    raw = dataset.with_format(None).select_columns(["image_id", "width", "height", "objects"])
    images = [
        {"id": image_id, "width": width, "height": height}
        for image_id, width, height in zip(raw["image_id"], raw["width"], raw["height"])
    ]
    return coco_index(images, raw["objects"], raw.features["objects"]["category"].feature.names)


def coco_index(
    images: Sequence[dict[str, Any]],
    objects_per_image: Iterable[Mapping[str, Sequence[Any]]],
    class_names: Sequence[str],
) -> COCO:
    """A pycocotools ``COCO`` index: ``images[i]`` (``id``, ...) holds the boxes
    ``objects_per_image[i]`` (lists, one item a box: ``bbox`` as xywh pixels, ``category``, the
    class index, ``area``, ``iscrowd``)."""
    annotations = []
    for image, objects in zip(images, objects_per_image):
        image_id = image["id"]
        for bbox, category, area, crowd in zip(
            objects["bbox"], objects["category"], objects["area"], objects["iscrowd"]
        ):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": list(bbox),
                    "area": area,
                    "iscrowd": int(crowd),
                }
            )
    coco = COCO()
    coco.dataset = {
        "images": list(images),
        "annotations": annotations,
        "categories": [{"id": i, "name": name} for i, name in enumerate(class_names)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoEvaluator:
    """Accumulate detections batch by batch; compute COCO mAP/mAR overall and per class."""

    def __init__(self, ground_truth: COCO) -> None:
        self.ground_truth = ground_truth
        self.class_names = [c["name"] for c in ground_truth.dataset["categories"]]
        self.detections: dict[int, np.ndarray] = {}
        #: ``COCOeval.eval`` of the last :meth:`compute` (``params``, ``precision``, ``recall``,
        #: ``scores``; None without detections or ground truth), for ``evaluation.error_analysis``
        #: (the arrays only: COCOeval's per-image records can be large).
        self.accumulation: dict[str, Any] | None = None

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> CocoEvaluator:
        return cls(coco_ground_truth(dataset))

    def update(
        self, image_ids: Sequence[int], results: Sequence[Mapping[str, torch.Tensor]]
    ) -> None:
        """Add post-processed detections (``scores``, ``labels``, ``boxes`` as absolute xyxy)."""
        for image_id, result in zip(image_ids, results):
            boxes = result["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
            rows = np.column_stack(
                [
                    boxes[:, :2],
                    boxes[:, 2:] - boxes[:, :2],  # xyxy -> xywh
                    result["scores"].detach().float().cpu().numpy(),
                    result["labels"].detach().cpu().numpy(),
                ]
            )
            self.detections[int(image_id)] = rows.astype(np.float32)

    def compute(self, *, gather: bool = True) -> dict[str, float]:
        """Gather detections from all processes and run COCOeval (same result on each).

        Afterwards every process holds the detections of all images, for :meth:`results`.
        ``gather=False``: only this process's detections, no collective call (for callers that
        gathered them already, e.g. the ``evaluate`` module in ``coco_metric_module``).
        """
        merged: dict[int, np.ndarray] = {}
        for part in gather_object([self.detections]) if gather else [self.detections]:
            merged.update(part)
        missing = set(self.ground_truth.getImgIds()) - merged.keys()
        if missing:
            raise RuntimeError(
                f"{len(missing)} evaluation images got no prediction: {sorted(missing)[:5]}"
            )
        self.detections = merged
        return self._evaluate()

    def results(self, category_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """The detections as a COCO results list (``image_id``, ``category_id``, xywh ``bbox``,
        ``score``), sorted by image id.

        ``category_ids[i]`` is written for class ``i`` (default: ``i``); pass the dataset's
        source ids (``LabelMap.source_ids``) so that ``COCO.loadRes`` works on the original
        annotation file. After :meth:`compute` this covers the images of every process.
        """
        return [
            {
                "image_id": image_id,
                "category_id": int(row[5]) if category_ids is None else category_ids[int(row[5])],
                "bbox": [float(v) for v in row[:4]],
                "score": float(row[4]),
            }
            for image_id, rows in sorted(self.detections.items())
            for row in rows
        ]

    def _evaluate(self) -> dict[str, float]:
        results = self.results()
        self.accumulation = None
        if not results or not self.ground_truth.getAnnIds():
            return self._empty_metrics()
        with contextlib.redirect_stdout(io.StringIO()):
            predictions = self.ground_truth.loadRes(results)
            coco_eval = COCOeval(self.ground_truth, predictions, iouType="bbox")
            coco_eval.params.imgIds = self.ground_truth.getImgIds()
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        self.accumulation = coco_eval.eval
        metrics = dict(zip(SUMMARY_METRICS, map(float, coco_eval.stats)))
        metrics.update(self._per_class(coco_eval))
        return metrics

    def _per_class(self, coco_eval: COCOeval) -> dict[str, float]:
        """AP@[.5:.95] and AR@100 per class, all areas; -1 for a class with no ground truth."""
        precision = coco_eval.eval["precision"][:, :, :, 0, -1]  # [iou, recall, class]
        recall = coco_eval.eval["recall"][:, :, 0, -1]  # [iou, class]
        metrics = {}
        for k, cat_id in enumerate(coco_eval.params.catIds):
            name = self.class_names[cat_id]
            p, r = precision[:, :, k], recall[:, k]
            metrics[f"ap_{name}"] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
            metrics[f"ar_{name}"] = float(r[r > -1].mean()) if (r > -1).any() else -1.0
        return metrics

    def _empty_metrics(self) -> dict[str, float]:
        """No detections (or no boxes at all): every metric is 0, per class -1 without boxes."""
        metrics = dict.fromkeys(SUMMARY_METRICS, 0.0)
        for cat_id, name in enumerate(self.class_names):
            has_boxes = bool(self.ground_truth.getAnnIds(catIds=[cat_id]))
            metrics[f"ap_{name}"] = metrics[f"ar_{name}"] = 0.0 if has_boxes else -1.0
        return metrics
