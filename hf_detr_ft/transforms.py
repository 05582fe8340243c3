"""Turn dataset examples into model inputs: albumentations augmentation, then DetrImageProcessor.

:class:`DetrTransform` is given to ``datasets.Dataset.with_transform``: it runs lazily on each
batch that the data loader reads, so nothing is precomputed or cached on disk. Per image:

1. (training only) albumentations, bbox-aware: horizontal flip, a crop that keeps every box
   (``BBoxSafeRandomCrop``) and brightness/contrast jitter;
2. ``DetrImageProcessor`` resizes (shortest edge ``image_size``, longest edge at most
   ``max_image_size``; in training the shortest edge is drawn from ``train_scales`` — DETR's
   multi-scale jitter), normalises, and converts the COCO boxes into DETR's targets:
   ``class_labels`` and ``boxes`` as normalised ``(cx, cy, w, h)``, plus ``orig_size``, ``size``,
   ``image_id``, ``area`` and ``iscrowd``.

Images are not padded here; :func:`hf_detr_ft.collate.collate_fn` pads each batch to its
largest image, so boxes stay normalised to the image itself as in the original DETR.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import albumentations as A
import numpy as np
from transformers import DetrImageProcessor

TRAIN_SCALE_FACTORS = (0.6, 0.7, 0.8, 0.9, 1.0)


def train_augmentation() -> A.Compose:
    """The bbox-aware augmentation applied to training images (never to evaluation images)."""
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.BBoxSafeRandomCrop(erosion_rate=0.0, p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        ],
        bbox_params=A.BboxParams(
            format="coco", label_fields=["category", "iscrowd"], clip=True, min_area=1.0
        ),
    )


def train_scales(image_size: int) -> list[int]:
    """Shortest-edge sizes for multi-scale training: 60 % to 100 % of ``image_size``."""
    return sorted({max(16, round(image_size * f)) for f in TRAIN_SCALE_FACTORS})


class DetrTransform:
    """For ``Dataset.with_transform``: examples in, ``pixel_values`` and ``labels`` out."""

    def __init__(
        self,
        image_processor: DetrImageProcessor,
        *,
        augmentation: A.Compose | None = None,
        scales: Sequence[int] | None = None,
    ) -> None:
        self.image_processor = image_processor
        self.augmentation = augmentation
        self.scales = list(scales) if scales else None

    @classmethod
    def for_training(cls, image_processor: DetrImageProcessor) -> DetrTransform:
        shortest_edge = image_processor.size["shortest_edge"]
        return cls(
            image_processor, augmentation=train_augmentation(), scales=train_scales(shortest_edge)
        )

    @classmethod
    def for_evaluation(cls, image_processor: DetrImageProcessor) -> DetrTransform:
        return cls(image_processor)

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if self.augmentation is not None:
            # Draw albumentations' randomness from Python's `random`, which the Trainer seeds
            # and each DataLoader worker re-seeds differently: runs are reproducible and
            # workers do not repeat each other's augmentations.
            self.augmentation.set_random_seed(random.getrandbits(32))
        pixel_values, labels = [], []
        for image, image_id, objects in zip(batch["image"], batch["image_id"], batch["objects"]):
            encoded = self.encode(np.array(image), image_id, objects)
            pixel_values.append(encoded["pixel_values"][0])
            labels.append(encoded["labels"][0])
        return {"pixel_values": pixel_values, "labels": labels}

    def encode(self, image: np.ndarray, image_id: int, objects: dict[str, list]) -> Any:
        """Augment (if training) and process one RGB image with its objects."""
        boxes, categories, crowd = objects["bbox"], objects["category"], objects["iscrowd"]
        areas = objects["area"]
        if self.augmentation is not None:
            out = self.augmentation(image=image, bboxes=boxes, category=categories, iscrowd=crowd)
            image, boxes = out["image"], out["bboxes"]
            categories, crowd = out["category"], out["iscrowd"]
            areas = [float(w * h) for _, _, w, h in boxes]
        annotation = {
            "image_id": image_id,
            "annotations": [
                {
                    "bbox": list(map(float, b)),
                    "category_id": int(c),
                    "area": float(a),
                    "iscrowd": int(z),
                }
                for b, c, a, z in zip(boxes, categories, areas, crowd)
            ],
        }
        options = {}
        if self.scales:
            longest = self.image_processor.size["longest_edge"]
            options["size"] = {"shortest_edge": random.choice(self.scales), "longest_edge": longest}
        return self.image_processor(
            images=image, annotations=annotation, do_pad=False, return_tensors="pt", **options
        )
