"""Tiled inference: a large image seen whole and in overlapping tiles, detections merged.

Why: the image processor shrinks every image to the model's input size (800 px for most
checkpoints, 128 for the demo model), so objects a few dozen pixels wide in a 4000-px photo
end up a few pixels wide and are missed. A tile of ``size`` pixels is resized as an image is,
so objects in it keep (input size / ``size``) of their size, and the model sees them at the
scale it was trained at.

The rules (docs/evaluate-predict.md, "Tiled inference"):

* **Grid** (:func:`tile_grid`): tiles of ``size`` x ``size`` pixels (the image's side where it
  is shorter), spread evenly from edge to edge, so that the last tile ends at the image's edge
  and neighbours overlap by at least ``overlap`` x ``size`` pixels. The tiles of an image are
  run through the model in batches (they all have the same shape: no padding).
* **Cut objects**: a tile detection within :data:`EDGE_MARGIN` x ``size`` of an edge the tile
  shares with a neighbour (not an edge of the image) is dropped: the object is probably cut
  there. The neighbour, which overlaps by ``overlap`` x ``size``, sees it whole if it is
  smaller than the overlap; larger objects are left to the whole-image pass.
* **Merge**: the whole image's detections and the tiles' are merged by class-wise
  non-maximum suppression (``torchvision.ops.batched_nms``): of two boxes of one class whose
  IoU exceeds ``nms_iou``, the lower-scoring one is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms
from transformers import PreTrainedModel
from transformers.image_processing_utils import BaseImageProcessor

from ..errors import ArgumentError
from .detect import PreparedBatch, detect_prepared, prepare_batch

#: Smallest tile side: a DETR backbone has a stride of 32, a smaller tile is one feature cell.
MIN_TILE = 32
#: Largest overlap: at 0.9 an image is already run ten times over in each direction.
MAX_OVERLAP = 0.9
#: Distance from a shared tile edge, as a fraction of the tile side, within which a tile
#: detection counts as cut by that edge (a predicted box of a cut object ends near it).
EDGE_MARGIN = 0.02

Detections = dict[str, torch.Tensor]  # scores, labels, boxes (xyxy pixels), as detect returns


@dataclass(frozen=True)
class Tiling:
    """How to tile: the tile side in the image's pixels, the overlap of neighbouring tiles as
    a fraction of the side, and the IoU above which merged boxes of one class are one."""

    size: int
    overlap: float = 0.2
    nms_iou: float = 0.5

    def __post_init__(self) -> None:
        if not MIN_TILE <= self.size:
            raise ArgumentError(f"tile must be at least {MIN_TILE} pixels, got {self.size}.")
        if not 0.0 <= self.overlap <= MAX_OVERLAP:
            raise ArgumentError(
                f"overlap must be between 0 and {MAX_OVERLAP} (a fraction of the tile), "
                f"got {self.overlap}."
            )
        if not 0.0 <= self.nms_iou <= 1.0:
            raise ArgumentError(f"tile_nms_iou must be between 0 and 1, got {self.nms_iou}.")


def tile_grid(
    width: int, height: int, size: int, overlap: float
) -> list[tuple[int, int, int, int]]:
    """The tiles of a ``width`` x ``height`` image as ``(x0, y0, x1, y1)`` pixel boxes, row by
    row; together they cover the image (see the module docstring)."""
    xs, ys = _starts(width, size, overlap), _starts(height, size, overlap)
    return [(x, y, min(x + size, width), min(y + size, height)) for y in ys for x in xs]


def _starts(length: int, size: int, overlap: float) -> list[int]:
    """Where tiles start along one side: evenly spread, the first at 0 and the last ending at
    ``length``, no further apart than ``size * (1 - overlap)``."""
    if length <= size:
        return [0]
    count = math.ceil((length - size) / (size * (1.0 - overlap))) + 1
    return [round(i * (length - size) / (count - 1)) for i in range(count)]


def detect_images(
    model: PreTrainedModel,
    image_processor: BaseImageProcessor,
    batch: PreparedBatch,
    pixels: Sequence[torch.Tensor | None],
    tiling: Tiling | None,
    *,
    threshold: float,
    batch_size: int,
) -> list[Detections]:
    """Detections of each image of ``batch``: of the whole image, and with ``tiling`` also of
    its tiles, cut from ``pixels`` (each image's uint8 RGB pixels (3, H, W) at the size its
    boxes refer to) and run ``batch_size`` at a time, merged."""
    whole = detect_prepared(model, image_processor, batch, threshold=threshold)
    if tiling is None:
        return whole
    return [
        _with_tiles(model, image_processor, image, detected, tiling, threshold, batch_size)
        for image, detected in zip(pixels, whole, strict=True)
    ]


def _with_tiles(
    model: PreTrainedModel,
    image_processor: BaseImageProcessor,
    pixels: torch.Tensor,
    whole: Detections,
    tiling: Tiling,
    threshold: float,
    batch_size: int,
) -> Detections:
    height, width = pixels.shape[-2:]
    grid = tile_grid(width, height, tiling.size, tiling.overlap)
    if len(grid) == 1:  # the image fits in one tile: the whole-image pass has seen it
        return whole
    parts = [whole]
    for start in range(0, len(grid), batch_size):
        tiles = grid[start : start + batch_size]
        crops = [pixels[:, y0:y1, x0:x1] for x0, y0, x1, y1 in tiles]
        found = detect_prepared(
            model, image_processor, prepare_batch(image_processor, crops), threshold=threshold
        )
        parts += [
            shift_uncut(detected, tile, (width, height), tiling.size * EDGE_MARGIN)
            for detected, tile in zip(found, tiles)
        ]
    return merge_detections(parts, tiling.nms_iou)


def shift_uncut(
    detected: Detections,
    tile: tuple[int, int, int, int],
    image_size: tuple[int, int],
    margin: float,
) -> Detections:
    """A tile's detections in the image's pixels, without those within ``margin`` pixels of
    an edge the tile shares with a neighbour (``image_size``: the image's width, height)."""
    x0, y0, x1, y1 = tile
    width, height = image_size
    boxes = detected["boxes"] + torch.tensor(
        [x0, y0, x0, y0], dtype=detected["boxes"].dtype, device=detected["boxes"].device
    )
    cut = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    if x0 > 0:
        cut |= boxes[:, 0] < x0 + margin
    if y0 > 0:
        cut |= boxes[:, 1] < y0 + margin
    if x1 < width:
        cut |= boxes[:, 2] > x1 - margin
    if y1 < height:
        cut |= boxes[:, 3] > y1 - margin
    kept = ~cut
    return {
        "scores": detected["scores"][kept],
        "labels": detected["labels"][kept],
        "boxes": boxes[kept],
    }


def merge_detections(parts: Sequence[Detections], iou: float) -> Detections:
    """Detections of one image from several passes as one set: class-wise non-maximum
    suppression at ``iou`` (``torchvision.ops.batched_nms``), highest score first."""
    merged = {
        key: torch.cat([part[key] for part in parts]) for key in ("scores", "labels", "boxes")
    }
    keep = batched_nms(merged["boxes"].float(), merged["scores"].float(), merged["labels"], iou)
    return {key: value[keep] for key, value in merged.items()}
