"""Batch processed examples: pad to the largest image of the batch and build the pixel mask.

Padding to the batch's own largest image, not to a fixed square, is what the original DETR
does; it wastes far fewer pixels when images have different shapes. Padding goes to the
bottom and right, so boxes (normalised to each image's own size) need no change.

The mask is uint8, not the image processor's int64: DETR only interpolates it as floats, and
at DETR's 800x1333 a batch of 8 int64 masks is 68 MB to allocate, pin and copy to the GPU,
eight times the uint8 mask (measured in benchmarks/README.md).
"""

from __future__ import annotations

from typing import Any

import torch


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Zero-pad ``pixel_values`` to one size, add ``pixel_mask`` (1 = real pixel), keep labels."""
    images = [example["pixel_values"] for example in examples]
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    # Written once: each image, then zeros only where it does not reach, instead of zeroing
    # the whole batch first and then writing most of it again.
    pixel_values = images[0].new_empty((len(images), images[0].shape[0], height, width))
    pixel_mask = torch.zeros((len(images), height, width), dtype=torch.uint8)
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        pixel_values[i, :, :h, :w] = image
        pixel_values[i, :, h:, :] = 0
        pixel_values[i, :, :h, w:] = 0
        pixel_mask[i, :h, :w] = 1
    batch = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
    if "labels" in examples[0]:
        batch["labels"] = [example["labels"] for example in examples]
    return batch
