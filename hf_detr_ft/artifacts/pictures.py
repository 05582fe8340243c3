"""Pictures of detections: boxes drawn with torchvision, laid out with matplotlib.

Figures are made with ``matplotlib.figure.Figure``, not ``pyplot``: they are only ever saved
to files, so no GUI backend is needed, and the package never calls ``matplotlib.use``, which
would change the backend for the user's own plots (inline plots in a notebook).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib import font_manager
from matplotlib.figure import Figure
from PIL import Image
from torchvision.ops import box_convert
from torchvision.transforms.functional import pil_to_tensor
from torchvision.utils import draw_bounding_boxes

from ..wording import plural

_LABEL_FONT = font_manager.findfont("DejaVu Sans")


@dataclass
class Boxes:
    """Boxes of one image: absolute ``xyxy`` pixels, class indices, optional scores."""

    xyxy: torch.Tensor
    labels: list[int]
    scores: list[float] | None = None

    @classmethod
    def from_coco(cls, bboxes: Sequence[Sequence[float]], labels: Sequence[int]) -> Boxes:
        xywh = torch.tensor(bboxes, dtype=torch.float32).reshape(-1, 4)
        return cls(box_convert(xywh, "xywh", "xyxy"), list(labels))


def class_colors(num_classes: int) -> list[str]:
    """One distinct colour per class (matplotlib's tab10/tab20), as hex strings."""
    cmap = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"]
    return [matplotlib.colors.to_hex(cmap(i % cmap.N)) for i in range(num_classes)]


def draw_boxes(
    image: Image.Image | torch.Tensor, boxes: Boxes, class_names: Sequence[str]
) -> np.ndarray:
    """The image (PIL, or uint8 RGB pixels (3, H, W)) with its boxes and "name score" labels
    drawn, as an HxWx3 array.

    Labels are white text on a box of the class colour, in matplotlib's DejaVu Sans sized to
    the image, so they stay readable on any background and at any resolution (torchvision's
    default bitmap font is a few pixels high), but no taller than a third of the median box
    side, so that many small objects in a large image (tiled inference) are not buried under
    their labels.
    """
    pixels = image if isinstance(image, torch.Tensor) else pil_to_tensor(image.convert("RGB"))
    if not boxes.labels:
        return pixels.permute(1, 2, 0).numpy()
    colors = class_colors(len(class_names))
    captions = [class_names[label] for label in boxes.labels]
    if boxes.scores is not None:
        captions = [f"{c} {s:.2f}" for c, s in zip(captions, boxes.scores)]
    longest_edge = max(pixels.shape[-2:])
    sides = (boxes.xyxy[:, 2:] - boxes.xyxy[:, :2]).min(dim=1).values
    font_size = min(longest_edge / 40, float(sides.median()) / 3)
    drawn = draw_bounding_boxes(
        pixels,
        boxes.xyxy,
        labels=captions,
        colors=[colors[label] for label in boxes.labels],
        width=max(1, round(longest_edge / 250)),
        font=_LABEL_FONT,
        font_size=max(8, round(font_size)),
        label_colors="white",
        fill_labels=True,
    )
    return drawn.permute(1, 2, 0).numpy()


def save_comparison_grid(
    images: Sequence[Image.Image],
    ground_truth: Sequence[Boxes],
    predictions: Sequence[Boxes],
    class_names: Sequence[str],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """One row per image: ground truth on the left, predictions on the right."""
    rows = len(images)
    fig, axes = subplots(rows, 2, figsize=(8, 4 * rows), squeeze=False)
    for row, (image, truth, predicted) in enumerate(zip(images, ground_truth, predictions)):
        for ax, boxes, name in (
            (axes[row, 0], truth, "ground truth"),
            (axes[row, 1], predicted, "prediction"),
        ):
            ax.imshow(draw_boxes(image, boxes, class_names))
            ax.set_title(f"{name} ({plural(len(boxes.labels), 'box')})")
            ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def subplots(
    nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None, **kwargs: Any
) -> tuple[Figure, Any]:
    """``pyplot.subplots`` without pyplot: a figure that no backend or figure manager holds."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a figure as a PNG, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
