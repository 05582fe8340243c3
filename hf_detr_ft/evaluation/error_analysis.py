"""Error analysis of a detector's detections on one split: what mAP alone does not say.

Three views, all computed from what :class:`~.coco_metrics.CocoEvaluator` already holds after
:meth:`~.coco_metrics.CocoEvaluator.compute` (its detections, its ground truth and its
pycocotools accumulation), so nothing is run twice and no second AP implementation can
disagree with the mAP:

* **Precision-recall curves per class** (:class:`PrCurves`): pycocotools' own arrays
  ``eval["precision"]`` (interpolated precision at its 101 recall points) and
  ``eval["scores"]`` (the score of the detection at which each recall point is reached), at
  one IoU of COCO's grid, all object sizes, 100 detections per image.
* **F1 against the score threshold** (:class:`F1Curve`): keeping detections scoring at least
  ``t`` reaches, for each class, the highest recall point whose score is ``>= t``, at its
  precision; F1 = 2PR/(P+R). The overall curve is the mean over the classes that have ground
  truth (macro F1). The best threshold overall and per class (:class:`Thresholds`) is the
  highest ``t`` where that F1 is largest; ``None`` where no detection is ever right.
* **A confusion matrix** (:func:`confusion_matrix`), by the rule documented there, and the
  images with the most errors (:attr:`ConfusionMatrix.errors_per_image`).
* **Boxes per object** (:func:`boxes_per_object`): how many detections above a threshold land
  on each ground-truth object. One-to-one matching hides duplicates among the false
  detections; this count is what a reader of a predictions picture sees: one clean box, a
  stack of near-duplicates, or nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torchvision.ops import box_convert, box_iou

from ..errors import ArgumentError
from .coco_metrics import CocoEvaluator

logger = logging.getLogger(__name__)

#: The IoU thresholds COCOeval accumulates (0.50, 0.55, ..., 0.95); PR curves exist only there.
COCO_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
#: The score threshold of the confusion matrix when no best-F1 threshold exists.
FALLBACK_SCORE_THRESHOLD = 0.5

MATCHING_RULE = (
    "Detections scoring at least score_threshold are matched one-to-one to ground-truth boxes "
    "of the same image, whatever their classes: every (ground truth, detection) pair with IoU "
    ">= iou_threshold, highest IoU first (ties: ground truth in annotation order, then "
    "detections by descending score), is matched when neither is matched yet. A match adds 1 "
    "to matrix[true class][predicted class]; an unmatched ground-truth box adds 1 to "
    "matrix[its class][background] (missed); an unmatched detection adds 1 to "
    "matrix[background][its class] (false detection). Rows: ground truth; columns: prediction."
)


def check_iou_threshold(iou_threshold: float) -> float:
    """``iou_threshold`` if pycocotools accumulates precision there, else an ArgumentError."""
    for allowed in COCO_IOU_THRESHOLDS:
        if abs(iou_threshold - allowed) < 1e-9:
            return allowed
    raise ArgumentError(
        f"iou_threshold must be one of COCO's IoU thresholds "
        f"{', '.join(map(str, COCO_IOU_THRESHOLDS))}, got {iou_threshold}."
    )


@dataclass
class PrCurves:
    """pycocotools' precision and score per class at COCO's recall points, at one IoU.

    ``precision[k, i]`` is -1 for a class without ground truth and 0 past the highest recall
    the class reaches; ``scores[k, i]`` is then 0 too.
    """

    class_names: list[str]
    iou_threshold: float
    recall: np.ndarray  # (R,) COCO's recall points 0, 0.01, ..., 1
    precision: np.ndarray  # (K, R)
    scores: np.ndarray  # (K, R)

    @classmethod
    def from_accumulation(
        cls, accumulation: Mapping[str, Any], class_names: Sequence[str], iou_threshold: float
    ) -> PrCurves:
        """The curves in ``COCOeval.eval`` after ``accumulate()`` (all areas, the largest
        maxDets)."""
        params = accumulation["params"]
        t = int(np.argmin(np.abs(np.asarray(params.iouThrs) - iou_threshold)))
        area_all = list(params.areaRngLbl).index("all")
        precision = np.full((len(class_names), len(params.recThrs)), -1.0)
        scores = np.zeros_like(precision)
        for k, category in enumerate(params.catIds):
            precision[category] = accumulation["precision"][t, :, k, area_all, -1]
            scores[category] = accumulation["scores"][t, :, k, area_all, -1]
        return cls(list(class_names), iou_threshold, np.asarray(params.recThrs), precision, scores)

    @property
    def has_ground_truth(self) -> np.ndarray:
        """(K,) whether each class has ground-truth boxes in the split."""
        return (self.precision > -1).any(axis=1)

    def reached(self) -> np.ndarray:
        """(K, R) whether each recall point is reached (a prefix of each row: pycocotools
        stops at the highest recall a class reaches)."""
        return self.precision > 0


@dataclass
class F1Curve:
    """F1 of each class and their mean (classes with ground truth) at each score threshold."""

    thresholds: np.ndarray  # (T,) every score at which a PR curve steps, descending
    per_class: np.ndarray  # (K, T); nan for classes without ground truth
    mean: np.ndarray  # (T,)
    precision: np.ndarray  # (K, T) at each threshold (0 where nothing is kept)
    recall: np.ndarray  # (K, T)

    @classmethod
    def from_pr(cls, curves: PrCurves) -> F1Curve:
        reached = curves.reached()
        thresholds = np.unique(curves.scores[reached])[::-1]
        shape = (len(curves.class_names), len(thresholds))
        precision, recall = np.zeros(shape), np.zeros(shape)
        for k in range(len(curves.class_names)):
            points = np.flatnonzero(reached[k])
            steps = curves.scores[k, points]  # non-increasing along recall
            last = np.searchsorted(-steps, -thresholds, side="right") - 1  # -1: nothing kept
            kept = last >= 0
            precision[k, kept] = curves.precision[k, points[last[kept]]]
            recall[k, kept] = curves.recall[points[last[kept]]]
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0)
        f1[~curves.has_ground_truth] = np.nan
        with_boxes = f1[curves.has_ground_truth]
        mean = with_boxes.mean(axis=0) if len(with_boxes) else np.zeros(len(thresholds))
        return cls(thresholds, f1, mean, precision, recall)


@dataclass
class Thresholds:
    """The score threshold that maximises F1, overall (mean F1) and per class."""

    score_threshold: float | None
    f1: float
    per_class: dict[str, dict[str, float | None]]  # name -> score_threshold, f1, precision, recall

    @classmethod
    def from_f1(cls, curve: F1Curve, class_names: Sequence[str]) -> Thresholds:
        per_class = {}
        for k, name in enumerate(class_names):
            best = _best(curve.per_class[k])
            per_class[name] = {
                "score_threshold": None if best is None else float(curve.thresholds[best]),
                "f1": 0.0 if best is None else float(curve.per_class[k, best]),
                "precision": 0.0 if best is None else float(curve.precision[k, best]),
                "recall": 0.0 if best is None else float(curve.recall[k, best]),
            }
        best = _best(curve.mean)
        if best is None:
            return cls(None, 0.0, per_class)
        return cls(float(curve.thresholds[best]), float(curve.mean[best]), per_class)

    def to_dict(self) -> dict[str, Any]:
        return {"score_threshold": self.score_threshold, "f1": self.f1, "per_class": self.per_class}


def _best(f1: np.ndarray) -> int | None:
    """Index of the largest F1 (the first, i.e. highest threshold, on a tie); None if all 0."""
    f1 = np.nan_to_num(f1)
    if f1.size == 0 or f1.max() <= 0:
        return None
    return int(f1.argmax())


@dataclass
class ConfusionMatrix:
    """Counts by :data:`MATCHING_RULE`; index ``len(class_names)`` is the background."""

    class_names: list[str]
    score_threshold: float
    iou_threshold: float
    matrix: np.ndarray  # (K+1, K+1) int: rows ground truth, columns prediction
    errors_per_image: dict[int, dict[str, int]]  # image id -> missed, false, wrong_class

    def worst_images(self, count: int) -> list[int]:
        """Ids of the ``count`` images with most errors (missed + false + wrong class), ties by
        id; images without errors are left out."""
        totals = {i: sum(e.values()) for i, e in self.errors_per_image.items()}
        ranked = sorted((i for i, n in totals.items() if n), key=lambda i: (-totals[i], i))
        return ranked[:count]

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": [*self.class_names, "background"],
            "score_threshold": self.score_threshold,
            "iou_threshold": self.iou_threshold,
            "matrix": self.matrix.tolist(),
            "matching": MATCHING_RULE,
        }


def confusion_matrix(
    ground_truth: COCO,
    detections: Mapping[int, np.ndarray],
    *,
    score_threshold: float,
    iou_threshold: float = 0.5,
) -> ConfusionMatrix:
    """The confusion matrix of ``detections`` (per image id, rows of xywh, score, class index,
    as :attr:`CocoEvaluator.detections`) against ``ground_truth`` (category ids = class
    indices), by :data:`MATCHING_RULE`."""
    class_names = [c["name"] for c in ground_truth.dataset["categories"]]
    background = len(class_names)
    matrix = np.zeros((background + 1, background + 1), dtype=np.int64)
    errors = {}
    for image_id in ground_truth.getImgIds():
        annotations = ground_truth.imgToAnns.get(image_id, [])
        true_classes = [a["category_id"] for a in annotations]
        rows = np.asarray(detections.get(image_id, np.zeros((0, 6))), dtype=np.float64)
        rows = rows[rows[:, 4] >= score_threshold]
        rows = rows[np.argsort(-rows[:, 4], kind="stable")]
        predicted = rows[:, 5].astype(int).tolist()
        pairs = _match([a["bbox"] for a in annotations], rows[:, :4], iou_threshold)
        for g, p in pairs:
            matrix[true_classes[g], predicted[p]] += 1
        missed = set(range(len(annotations))) - {g for g, _ in pairs}
        false = set(range(len(predicted))) - {p for _, p in pairs}
        for g in missed:
            matrix[true_classes[g], background] += 1
        for p in false:
            matrix[background, predicted[p]] += 1
        wrong = sum(true_classes[g] != predicted[p] for g, p in pairs)
        errors[image_id] = {"missed": len(missed), "false": len(false), "wrong_class": wrong}
    return ConfusionMatrix(class_names, score_threshold, iou_threshold, matrix, errors)


def _match(
    truth_xywh: Sequence[Sequence[float]], predicted_xywh: np.ndarray, iou_threshold: float
) -> list[tuple[int, int]]:
    """Greedy one-to-one (ground truth, detection) pairs, highest IoU first."""
    if not len(truth_xywh) or not len(predicted_xywh):
        return []
    truth = box_convert(torch.tensor(truth_xywh, dtype=torch.float64), "xywh", "xyxy")
    predicted = box_convert(torch.from_numpy(predicted_xywh), "xywh", "xyxy")
    iou = box_iou(truth, predicted)
    g, p = torch.nonzero(iou >= iou_threshold, as_tuple=True)  # row-major: the tie order
    order = torch.argsort(iou[g, p], descending=True, stable=True)
    pairs, used_truth, used_predicted = [], set(), set()
    for gi, pi in zip(g[order].tolist(), p[order].tolist()):
        if gi not in used_truth and pi not in used_predicted:
            pairs.append((gi, pi))
            used_truth.add(gi)
            used_predicted.add(pi)
    return pairs


@dataclass
class BoxesPerObject:
    """Per ground-truth object, the number of detections assigned to it (see
    :func:`boxes_per_object`)."""

    counts: list[int]
    iou_threshold: float

    @property
    def single(self) -> int:
        """Objects with exactly one box."""
        return sum(n == 1 for n in self.counts)

    @property
    def duplicated(self) -> int:
        """Objects with two boxes or more."""
        return sum(n > 1 for n in self.counts)

    @property
    def missed(self) -> int:
        return sum(n == 0 for n in self.counts)

    @property
    def at_most_one_share(self) -> float:
        """Share of objects drawn with at most one box (1.0 without objects)."""
        return 1.0 - self.duplicated / len(self.counts) if self.counts else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "objects": len(self.counts),
            "one_box": self.single,
            "several_boxes": self.duplicated,
            "missed": self.missed,
            "iou_threshold": self.iou_threshold,
            "rule": BOXES_PER_OBJECT_RULE,
        }


BOXES_PER_OBJECT_RULE = (
    "Each detection (already filtered by the score threshold) is assigned to the ground-truth "
    "box of its image it overlaps most, whatever the classes, if that IoU is >= iou_threshold; "
    "an object's count is the number of detections assigned to it (0: missed)."
)


def boxes_per_object(
    truth: Sequence[torch.Tensor], detected: Sequence[torch.Tensor], iou_threshold: float = 0.5
) -> BoxesPerObject:
    """Detections per ground-truth object by :data:`BOXES_PER_OBJECT_RULE`; ``truth`` and
    ``detected`` hold one (N, 4) ``xyxy`` tensor per image, in the same coordinates."""
    counts: list[int] = []
    for true_boxes, boxes in zip(truth, detected, strict=True):
        per_object = torch.zeros(len(true_boxes), dtype=torch.int64)
        if len(true_boxes) and len(boxes):
            iou = box_iou(boxes.double(), true_boxes.double())  # (detections, objects)
            best_iou, best = iou.max(dim=1)
            per_object += torch.bincount(best[best_iou >= iou_threshold], minlength=len(true_boxes))
        counts.extend(per_object.tolist())
    return BoxesPerObject(counts, iou_threshold)


@dataclass
class ErrorAnalysis:
    """Everything above for one split, and the detections it was computed from."""

    pr_curves: PrCurves
    f1_curve: F1Curve
    thresholds: Thresholds
    confusion: ConfusionMatrix
    detections: Mapping[int, np.ndarray]  # image id -> rows of xywh, score, class index


def analyse_errors(
    evaluator: CocoEvaluator,
    *,
    score_threshold: float | str = "auto",
    iou_threshold: float = 0.5,
) -> ErrorAnalysis:
    """The error analysis of an evaluator after :meth:`~CocoEvaluator.compute`.

    ``score_threshold`` is the confusion matrix's: a number, or ``"auto"`` for the best-F1 one
    (:data:`FALLBACK_SCORE_THRESHOLD`, with a warning, when no detection is ever right).
    """
    iou_threshold = check_iou_threshold(iou_threshold)
    class_names = evaluator.class_names
    if evaluator.accumulation is not None:
        curves = PrCurves.from_accumulation(evaluator.accumulation, class_names, iou_threshold)
    else:  # no detections or no ground truth: flat curves
        recall = np.linspace(0.0, 1.0, 101)
        precision = np.full((len(class_names), recall.size), -1.0)
        for k in range(len(class_names)):
            if evaluator.ground_truth.getAnnIds(catIds=[k]):
                precision[k] = 0.0
        curves = PrCurves(class_names, iou_threshold, recall, precision, np.zeros_like(precision))
    f1_curve = F1Curve.from_pr(curves)
    thresholds = Thresholds.from_f1(f1_curve, class_names)
    if score_threshold == "auto":
        score_threshold = thresholds.score_threshold
        if score_threshold is None:
            logger.warning(
                "No detection matches a ground-truth box: no best-F1 score threshold; the "
                "confusion matrix uses %s.",
                FALLBACK_SCORE_THRESHOLD,
            )
            score_threshold = FALLBACK_SCORE_THRESHOLD
    confusion = confusion_matrix(
        evaluator.ground_truth,
        evaluator.detections,
        score_threshold=float(score_threshold),
        iou_threshold=iou_threshold,
    )
    return ErrorAnalysis(curves, f1_curve, thresholds, confusion, evaluator.detections)
