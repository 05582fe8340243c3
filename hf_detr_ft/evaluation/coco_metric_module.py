"""hf-detr-ft's COCO box metric as an ``evaluate`` module.

Why it exists: code written for the ``evaluate`` ecosystem (``add_batch`` in a loop,
``compute`` at the end, ``evaluate.load``) should get the numbers ``hf-detr-ft evaluate`` and
training's evaluation print. So this module has no COCO logic of its own: it turns its inputs
into a pycocotools ``COCO`` index with :func:`~hf_detr_ft.evaluation.coco_metrics.coco_index`
and the detections into :class:`~hf_detr_ft.evaluation.coco_metrics.CocoEvaluator`, whose
``COCOeval`` run and summary keys give the result.

It is not imported by ``import hf_detr_ft``. Either way gives the same metric (a copy of
this file works too, with hf-detr-ft installed)::

    metric = evaluate.load(coco_metric_module.__file__)
    metric = coco_metric_module.CocoDetectionMetric()

Inputs, one item per image (lists, numpy arrays or tensors):

* ``predictions``: ``{"boxes": [[x0, y0, x1, y1], ...], "scores": [...], "labels": [...]}``,
  boxes in absolute pixels (what ``post_process_object_detection(..., target_sizes=...)``
  returns), labels the class indices ``0 .. num_classes - 1``. Keep every detection: COCO
  evaluation expects no score threshold.
* ``references``: ``{"image_id": int, "boxes": [[x0, y0, x1, y1], ...], "labels": [...]}``, the
  same box format, plus optionally ``"area"`` (default: the box's width x height) and
  ``"iscrowd"`` (default 0), one value a box.
* ``compute(..., class_names=[...])`` (optional) names the classes in order; by default
  ``"0"``, ``"1"``, ... up to the largest label seen.

An image id given twice is counted once if both times are the same (e.g. a padded last
batch), else it is an error. Output: the 12 numbers of ``COCOeval.summarize()`` (``map``,
``map_50``, ..., ``mar_large``) and ``ap_<class>`` / ``ar_<class>`` (AP@[.5:.95], AR@100) per
class; -1 means no ground truth of that kind. With ``num_process > 1`` only process 0 computes,
on what ``evaluate`` gathered from all processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import evaluate
import torch

from hf_detr_ft.evaluation.coco_metrics import CocoEvaluator, coco_index

_BOXES = datasets.List(datasets.List(datasets.Value("float64"), length=4))
_FEATURES = datasets.Features(
    {
        "predictions": {
            "boxes": _BOXES,
            "scores": datasets.List(datasets.Value("float64")),
            "labels": datasets.List(datasets.Value("int64")),
        },
        "references": {
            "image_id": datasets.Value("int64"),
            "boxes": _BOXES,
            "labels": datasets.List(datasets.Value("int64")),
            "area": datasets.List(datasets.Value("float64")),
            "iscrowd": datasets.List(datasets.Value("int64")),
        },
    }
)
_INPUTS = """
Args:
    predictions: one dict per image: "boxes" (absolute xyxy pixels), "scores", "labels".
    references: one dict per image: "image_id", "boxes" (absolute xyxy pixels), "labels",
        optionally "area" and "iscrowd".
    class_names: optional names of the classes, index = label.
Returns:
    map, map_50, map_75, map_small, map_medium, map_large, mar_1, mar_10, mar_100, mar_small,
    mar_medium, mar_large (COCOeval.summarize()), ap_<class> and ar_<class> per class.
"""
_CITATION = """@inproceedings{lin2014microsoft,
  title={Microsoft COCO: Common Objects in Context},
  author={Lin, Tsung-Yi and others},
  booktitle={ECCV},
  year={2014}
}
"""

Example = Mapping[str, Any]
_OPTIONAL = {"area": None, "iscrowd": None}  # reference keys with a default


class CocoDetectionMetric(evaluate.Metric):
    """COCO box mAP/mAR (pycocotools) through hf-detr-ft's ``CocoEvaluator``."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=_FEATURES,
            reference_urls=["https://cocodataset.org/#detection-eval"],
        )

    def add_batch(self, *, predictions: Any = None, references: Any = None, **kwargs: Any) -> None:
        """``evaluate``'s ``add_batch``; a reference may leave out ``area`` and ``iscrowd``."""
        super().add_batch(predictions=predictions, references=_complete(references), **kwargs)

    def add(self, *, prediction: Any = None, reference: Any = None, **kwargs: Any) -> None:
        """``evaluate``'s ``add``; a reference may leave out ``area`` and ``iscrowd``."""
        reference = reference if reference is None else _complete([reference])[0]
        super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(
        self,
        predictions: Sequence[Example],
        references: Sequence[Example],
        class_names: Sequence[str] | None = None,
    ) -> dict[str, float]:
        images = _by_image(predictions, references)
        names = list(class_names) if class_names is not None else _default_names(images)
        for image_id, (prediction, reference) in images.items():
            _check_labels(image_id, [*prediction["labels"], *reference["labels"]], len(names))
        ground_truth = coco_index(
            [{"id": image_id} for image_id in images],
            [_objects(reference) for _, reference in images.values()],
            names,
        )
        evaluator = CocoEvaluator(ground_truth)
        evaluator.update(list(images), [_detections(p) for p, _ in images.values()])
        return evaluator.compute(gather=False)  # evaluate gathered the processes' inputs


def _complete(references: Sequence[Any] | None) -> list[Any] | None:
    """The references with ``area``/``iscrowd`` set to None (-> the defaults) where absent;
    ``evaluate`` wants every feature key."""
    if references is None:
        return None
    return [{**_OPTIONAL, **r} if isinstance(r, Mapping) else r for r in references]


def _by_image(
    predictions: Sequence[Example], references: Sequence[Example]
) -> dict[int, tuple[Example, Example]]:
    """Checked (prediction, reference) pairs by image id; a repeated identical pair once."""
    images: dict[int, tuple[Example, Example]] = {}
    for prediction, reference in zip(predictions, references, strict=True):
        image_id = int(reference["image_id"])
        _check_lengths(image_id, "prediction", prediction, ("boxes", "scores", "labels"))
        _check_lengths(image_id, "reference", reference, ("boxes", "labels", "area", "iscrowd"))
        if images.setdefault(image_id, (prediction, reference)) != (prediction, reference):
            raise ValueError(f"image_id {image_id} is given twice with different inputs")
    return images


def _check_lengths(image_id: int, kind: str, example: Example, keys: Sequence[str]) -> None:
    counts = {key: len(example[key]) for key in keys if example.get(key) is not None}
    if len(set(counts.values())) > 1:
        found = ", ".join(f"{n} {key}" for key, n in counts.items())
        raise ValueError(f"The {kind} of image_id {image_id} has {found}; one per box expected")


def _check_labels(image_id: int, labels: Sequence[int], num_classes: int) -> None:
    bad = sorted({label for label in labels if not 0 <= label < num_classes})
    if bad:
        raise ValueError(
            f"image_id {image_id} has labels {bad} outside 0..{num_classes - 1} (class_names)"
        )


def _default_names(images: Mapping[int, tuple[Example, Example]]) -> list[str]:
    """``"0"``, ``"1"``, ... up to the largest label of any prediction or reference."""
    labels = [label for pair in images.values() for example in pair for label in example["labels"]]
    return [str(k) for k in range(max(labels, default=-1) + 1)]


def _objects(reference: Example) -> dict[str, list[Any]]:
    """A reference as ``coco_index`` objects: xywh boxes, class, area, crowd flag."""
    xywh = [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in reference["boxes"]]
    area = reference.get("area")
    iscrowd = reference.get("iscrowd")
    return {
        "bbox": xywh,
        "category": list(reference["labels"]),
        "area": list(area) if area is not None else [w * h for _, _, w, h in xywh],
        "iscrowd": list(iscrowd) if iscrowd is not None else [0] * len(xywh),
    }


def _detections(prediction: Example) -> dict[str, torch.Tensor]:
    """A prediction as ``CocoEvaluator.update`` takes it (absolute xyxy tensors)."""
    return {
        "boxes": torch.tensor(prediction["boxes"], dtype=torch.float64).reshape(-1, 4),
        "scores": torch.tensor(prediction["scores"], dtype=torch.float64),
        "labels": torch.tensor(prediction["labels"], dtype=torch.int64),
    }
