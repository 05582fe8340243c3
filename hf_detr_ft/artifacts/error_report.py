"""The files of an error analysis (:mod:`hf_detr_ft.evaluation.error_analysis`) of one split.

``hf-detr-ft evaluate`` writes them beside ``evaluation_<split>.json``, and a training run into
its output folder for the final evaluation's split::

    confusion_matrix_<split>.json  counts, labels, thresholds and the matching rule
    confusion_matrix_<split>.png   the same as a heat map
    pr_curves_<split>.json         pycocotools' precision and scores per class, F1 vs threshold
    pr_curves_<split>.png          precision-recall curve of each class
    f1_threshold_<split>.png       F1 against the score threshold, per class and mean; best marked
    worst_images_<split>.png       the images with most errors: ground truth | predictions

The callers claim the names (:func:`error_analysis_files`) with the rest of their files first.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from ..evaluation.error_analysis import ConfusionMatrix, ErrorAnalysis, F1Curve, PrCurves
from .output_files import write_text_atomic
from .pictures import Boxes, class_colors, save_comparison_grid, save_figure, subplots

CONFUSION_JSON = "confusion_matrix_{split}.json"
CONFUSION_PLOT = "confusion_matrix_{split}.png"
PR_JSON = "pr_curves_{split}.json"
PR_PLOT = "pr_curves_{split}.png"
F1_PLOT = "f1_threshold_{split}.png"
WORST_PLOT = "worst_images_{split}.png"
ERROR_ANALYSIS_FILES = (CONFUSION_JSON, CONFUSION_PLOT, PR_JSON, PR_PLOT, F1_PLOT, WORST_PLOT)


def error_analysis_files(split: str) -> list[str]:
    """The names :func:`write_error_analysis` may write for ``split``."""
    return [name.format(split=split) for name in ERROR_ANALYSIS_FILES]


def write_error_analysis(
    analysis: ErrorAnalysis,
    dataset: Dataset | None,
    output_dir: str | Path,
    split: str,
    *,
    num_worst: int = 4,
) -> list[Path]:
    """Write the files of the module docstring (worst images only with ``num_worst`` > 0 and
    an image with an error) for ``dataset``, the split analysed (with its images)."""
    out = Path(output_dir)
    confusion, curves = analysis.confusion, analysis.pr_curves
    written = [
        write_text_atomic(
            out / CONFUSION_JSON.format(split=split),
            json.dumps(confusion.to_dict(), indent=1) + "\n",
        ),
        write_text_atomic(
            out / PR_JSON.format(split=split),
            json.dumps(_curves_dict(curves, analysis.f1_curve)) + "\n",
        ),
        plot_confusion_matrix(confusion, out / CONFUSION_PLOT.format(split=split)),
        plot_pr_curves(curves, out / PR_PLOT.format(split=split)),
        plot_f1_curve(analysis, out / F1_PLOT.format(split=split)),
    ]
    worst = confusion.worst_images(num_worst) if dataset is not None else []
    if worst:
        written.append(
            save_worst_images(analysis, worst, dataset, out / WORST_PLOT.format(split=split))
        )
    return written


def _curves_dict(curves: PrCurves, f1: F1Curve) -> dict[str, Any]:
    """The curves as JSON: precision -1 means "no ground truth of that class"."""
    return {
        "iou_threshold": curves.iou_threshold,
        "recall": curves.recall.tolist(),
        "precision": dict(zip(curves.class_names, curves.precision.tolist())),
        "scores": dict(zip(curves.class_names, curves.scores.tolist())),
        "f1_vs_threshold": {
            "thresholds": f1.thresholds.tolist(),
            "mean": f1.mean.tolist(),
            "per_class": {
                name: np.nan_to_num(row, nan=-1.0).tolist()
                for name, row in zip(curves.class_names, f1.per_class)
            },
        },
    }


def plot_confusion_matrix(confusion: ConfusionMatrix, path: str | Path) -> Path:
    """A heat map of the counts, each cell labelled; rows ground truth, columns prediction."""
    labels = [*confusion.class_names, "background"]
    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = subplots(figsize=(size + 1, size))
    image = ax.imshow(confusion.matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="ground truth")
    ax.set_title(
        f"confusion matrix (score >= {confusion.score_threshold:.3g}, "
        f"IoU >= {confusion.iou_threshold:.2f})"
    )
    darkest = confusion.matrix.max() or 1
    for (row, column), count in np.ndenumerate(confusion.matrix):
        color = "white" if count > darkest / 2 else "black"
        ax.text(column, row, str(count), ha="center", va="center", color=color, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_pr_curves(curves: PrCurves, path: str | Path) -> Path:
    """Each class's interpolated precision against recall up to the highest recall it reaches,
    labelled with its AP at that IoU (the mean over the 101 points, as pycocotools takes it);
    classes without boxes are left out."""
    fig, ax = subplots(figsize=(6, 5))
    colors = class_colors(len(curves.class_names))
    reached = curves.reached()
    for k, name in enumerate(curves.class_names):
        if curves.has_ground_truth[k]:
            label = f"{name} (AP {curves.precision[k].mean():.3f})"
            points = reached[k]  # none for a class never found: only its legend entry
            ax.plot(
                curves.recall[points], curves.precision[k, points], color=colors[k], label=label
            )
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title(f"precision-recall per class (IoU {curves.iou_threshold:.2f}, pycocotools)")
    ax.grid(alpha=0.3)
    if curves.has_ground_truth.any():
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_f1_curve(analysis: ErrorAnalysis, path: str | Path) -> Path:
    """F1 against the score threshold: each class thin, the mean thick, the best one marked.

    A step curve: F1 changes only at the thresholds where a PR curve steps; above the highest
    nothing is kept (F1 0), below the lowest the curves no longer change."""
    curve, curves = analysis.f1_curve, analysis.pr_curves
    fig, ax = subplots(figsize=(6, 5))
    colors = class_colors(len(curves.class_names))
    if curve.thresholds.size:
        x = np.concatenate([[1.0], curve.thresholds, [0.0]])

        def steps(f1: np.ndarray, **style: Any) -> None:
            ax.step(x, np.concatenate([[0.0], f1, f1[-1:]]), where="post", **style)

        for k, name in enumerate(curves.class_names):
            if curves.has_ground_truth[k]:
                steps(curve.per_class[k], color=colors[k], linewidth=1, alpha=0.7, label=name)
        steps(curve.mean, color="black", linewidth=2, label="mean")
        ax.legend(fontsize=8)
    best = analysis.thresholds
    if best.score_threshold is not None:
        ax.axvline(best.score_threshold, color="black", linestyle="--", linewidth=1)
        ax.set_title(f"F1 vs score threshold (best {best.score_threshold:.3f}: F1 {best.f1:.3f})")
    else:
        ax.set_title("F1 vs score threshold (no detection is ever right)")
    ax.set(xlabel="score threshold", ylabel="F1", xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def save_worst_images(
    analysis: ErrorAnalysis, image_ids: Sequence[int], dataset: Dataset, path: str | Path
) -> Path:
    """Ground truth next to the detections the confusion matrix counted, for ``image_ids``."""
    confusion = analysis.confusion
    rows = {image_id: i for i, image_id in enumerate(dataset.with_format(None)["image_id"])}
    samples = dataset.select([rows[image_id] for image_id in image_ids])
    truth = [Boxes.from_coco(o["bbox"], o["category"]) for o in samples["objects"]]
    predicted = []
    for image_id in image_ids:
        found = analysis.detections[image_id]
        kept = found[found[:, 4] >= confusion.score_threshold]
        boxes = Boxes.from_coco(kept[:, :4].tolist(), kept[:, 5].astype(int).tolist())
        boxes.scores = kept[:, 4].tolist()
        predicted.append(boxes)
    counts = ", ".join(str(sum(confusion.errors_per_image[i].values())) for i in image_ids)
    return save_comparison_grid(
        list(samples["image"]),
        truth,
        predicted,
        confusion.class_names,
        path,
        title=f"most errors (missed + false + wrong class: {counts}; "
        f"score >= {confusion.score_threshold:.3g})",
    )
