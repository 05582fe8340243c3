"""Pictures of a dataset before training: ground-truth boxes drawn, and boxes per class.

``hf-detr-ft inspect DATASET --preview N`` writes N images, spread over the splits, with their
boxes and class names (drawn by :func:`visualize.draw_boxes`), and a bar chart of the boxes
per class and split, so mislabelled classes or misplaced boxes show before an hour of training.
``--augmented N`` draws N training images as the training's augmentation leaves them
(:func:`save_augmented_samples`), so an augmentation that cuts objects off or hides them
shows too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..artifacts.output_files import claim_files
from ..artifacts.pictures import Boxes, class_colors, draw_boxes, save_figure, subplots
from .dataset import DetectionDataset
from .dataset_report import DatasetReport

PREVIEW_FOLDER = "preview"
CHART_FILE = "boxes_per_class.png"
AUGMENTED_FILE = "augmented_samples.png"


def write_preview(data: DetectionDataset, output_dir: str | Path, count: int) -> list[Path]:
    """Draw ``count`` images (evenly spaced through each split) with their boxes; PNG paths."""
    per_split = math.ceil(count / len(data.splits)) if count > 0 else 0
    chosen: list[tuple[str, int]] = []
    for split, dataset in data.splits.items():
        take = min(per_split, len(dataset), count - len(chosen))
        spaced = np.linspace(0, len(dataset) - 1, num=take, dtype=int) if take else []
        chosen += [(split, int(index)) for index in spaced]
    examples = [data.splits[split][index] for split, index in chosen]
    names = [f"{split}_{ex['image_id']}.png" for (split, _), ex in zip(chosen, examples)]
    paths = claim_files(Path(output_dir) / PREVIEW_FOLDER, names)
    for path, example in zip(paths, examples):
        objects = example["objects"]
        boxes = Boxes.from_coco(objects["bbox"], objects["category"])
        Image.fromarray(draw_boxes(example["image"], boxes, data.class_names)).save(path)
    return paths


def save_class_chart(report: DatasetReport, path: str | Path) -> Path:
    """A bar chart of the boxes per class, one bar per split."""
    names, splits = report.class_names, list(report.splits)
    fig, ax = subplots(figsize=(max(6, 0.6 * len(names) * len(splits)), 4))
    width = 0.8 / len(splits)
    positions = np.arange(len(names))
    for i, (split, color) in enumerate(zip(splits, class_colors(len(splits)))):
        counts = [report.splits[split].boxes_per_class[n] for n in names]
        ax.bar(positions + i * width, counts, width, label=split, color=color)
    ax.set_xticks(positions + width * (len(splits) - 1) / 2, names, rotation=30, ha="right")
    ax.set_ylabel("boxes")
    ax.set_title(f"Boxes per class: {report.source}")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def save_augmented_samples(
    samples: Sequence[tuple[np.ndarray, dict[str, list], str]],
    class_names: list[str],
    path: str | Path,
    title: str,
) -> Path:
    """A grid of ``(pixels, objects, caption)`` samples with their boxes: training images as
    the augmentation leaves them (:func:`hf_detr_ft.pipeline.augmentation.augmented_samples`),
    before the model's resizing."""
    columns = min(4, len(samples))
    rows = math.ceil(len(samples) / columns)
    fig, axes = subplots(rows, columns, figsize=(4 * columns, 4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (pixels, objects, caption) in zip(axes.flat, samples):
        boxes = Boxes.from_coco(objects["bbox"], objects["category"])
        ax.imshow(draw_boxes(Image.fromarray(pixels), boxes, class_names))
        ax.set_title(f"{caption} ({len(boxes.labels)} boxes)", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
