"""Turn dataset examples into model inputs: albumentations augmentation, then DetrImageProcessor.

:class:`DetrTransform` is given to ``datasets.Dataset.with_transform``: it runs lazily on each
batch that the data loader reads, so nothing is precomputed or cached on disk. Per image:

1. (training only) albumentations, bbox-aware: by default a horizontal flip, a crop that keeps
   every box (``BBoxSafeRandomCrop``) and brightness/contrast jitter; ``--augmentation`` picks
   another preset or a saved pipeline (:mod:`.augmentation`);
2. the model's own image processor resizes by its size rule (DETR-style: shortest edge
   ``image_size``, longest at most ``max_image_size``; RT-DETR-style: a fixed square), in
   training at a size drawn by :func:`train_sizes` (the family's multi-scale jitter),
   normalises, and converts the COCO boxes into DETR's targets:
   ``class_labels`` and ``boxes`` as normalised ``(cx, cy, w, h)``, plus ``orig_size``, ``size``,
   ``image_id``, ``area`` and ``iscrowd``.

Images are not padded here; :func:`hf_detr_ft.pipeline.collate.collate_fn` pads each batch to its
largest image, so boxes stay normalised to the image itself as in the original DETR.

:meth:`DetrTransform.apply_to` hands the transform each image still encoded, and a JPEG much
larger than the resize target is decoded at 1/2, 1/4 or 1/8 scale
(:func:`hf_detr_ft.data.image_files.decode_for_resize`): the JPEG decoder then never decodes the
pixels that resizing would throw away, which matters most for phone photos (measured in
benchmarks/README.md). Boxes are scaled with it, and ``orig_size``
stays the full size that the annotations and the COCO evaluation use. (Resizing before the
random crop is also what the original DETR's augmentation does.) The training transform
keeps what it decoded for the next epochs (:mod:`hf_detr_ft.pipeline.image_cache`).

The random choices for an image (flip, crop, jitter, scale) depend only on the transform's
``seed``, the epoch (:meth:`DetrTransform.set_epoch`, called by :class:`AugmentationEpochCallback`)
and the image id, never on a global random state. A run resumed mid-epoch therefore augments
each remaining image exactly as the uninterrupted run did, although the data loader reads
batches ahead of the step whose random state a checkpoint saves, and the number of
DataLoader workers or processes does not change the augmentations.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import albumentations as A
import numpy as np
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from torch.utils.data import get_worker_info
from transformers import (
    DetrImageProcessor,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_transforms import get_size_with_aspect_ratio
from transformers.image_utils import SizeDict, get_image_size_for_max_height_width

from ..data.image_files import IMAGE_ERRORS, decode_for_resize
from ..errors import DatasetError
from ..models.families import resizes_with_antialias
from .augmentation import augment, build_augmentation, example_rng
from .image_cache import DecodedImageCache, default_cache_mb, image_key

logger = logging.getLogger(__name__)

#: DETR's multi-scale training draws the shortest edge from 60 % to 100 % of the eval size.
DEFAULT_MIN_SCALE = 0.6


def train_scales(image_size: int, min_scale: float = DEFAULT_MIN_SCALE) -> list[int]:
    """Shortest-edge sizes for multi-scale training, in steps of 10 % from ``min_scale`` to 1."""
    if not 0 < min_scale <= 1:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}.")
    factors = np.append(np.arange(1.0, min_scale - 1e-9, -0.1), min_scale)
    return sorted({max(16, round(image_size * f)) for f in factors})


def train_sizes(
    size: Mapping[str, int | None],
    min_scale: float = DEFAULT_MIN_SCALE,
    max_scale: float = 1.0,
    multiple: int = 1,
    min_side: int = 1,
) -> list[dict[str, int]]:
    """The sizes multi-scale training draws from, smallest first, as overrides of the
    processor's ``size`` rule; none with a side below ``min_side`` (the smallest the model
    runs on: :func:`~hf_detr_ft.models.input_sizes.smallest_input_side`).

    A shortest-edge rule (DETR) draws the shortest edge in steps of 10 % of it from
    ``min_scale`` to 1 (:func:`train_scales`). A fixed ``height`` x ``width`` rule (RT-DETR and
    the other fixed-size families) draws both sides from ``min_scale`` to ``max_scale`` of
    them, in steps of 32 pixels rounded up to a multiple of ``multiple`` (the model's stride or
    windows), as RT-DETR's recipe draws 480 to 800 for 640.
    """
    if size.get("height") and size.get("width"):
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"min_scale must be in (0, {max_scale}], got {min_scale}.")
        step = multiple * math.ceil(32 / multiple)
        sides = [
            range(
                max(step, math.ceil(side * min_scale / step) * step),
                max(step, math.floor(side * max_scale / step) * step) + 1,
                step,
            )
            for side in (size["height"], size["width"])
        ]
        drawn = [{"height": h, "width": w} for h, w in zip(*sides) if min(h, w) >= min_side]
        return drawn or [dict(size)]
    edges = [edge for edge in train_scales(size["shortest_edge"], min_scale) if edge >= min_side]
    return [{"shortest_edge": edge} for edge in edges or [size["shortest_edge"]]]


class DetrTransform:
    """For ``Dataset.with_transform``: examples in, ``pixel_values`` and ``labels`` out."""

    def __init__(
        self,
        image_processor: DetrImageProcessor,
        *,
        augmentation: A.BaseCompose | None = None,
        scales: Sequence[Mapping[str, int] | int] | None = None,
        seed: int = 0,
        image_cache: DecodedImageCache | None = None,
    ) -> None:
        self.image_processor = image_processor
        self.augmentation = augmentation
        # A plain number is a shortest edge, as DETR's multi-scale training draws them.
        self.scales = [
            dict(scale) if isinstance(scale, Mapping) else {"shortest_edge": scale}
            for scale in scales or ()
        ] or None
        self.seed = seed
        self.image_cache = image_cache
        self.epoch = 0

    @classmethod
    def for_training(
        cls,
        image_processor: DetrImageProcessor,
        seed: int = 0,
        min_scale: float = DEFAULT_MIN_SCALE,
        image_cache_mb: float | None = None,
        *,
        max_scale: float = 1.0,
        size_multiple: int = 1,
        min_side: int = 1,
        augmentation: str = "default",
    ) -> DetrTransform:
        """The training transform: ``augmentation`` (a preset or a file, see
        :func:`~.augmentation.build_augmentation`), then sizes drawn by :func:`train_sizes`
        (``min_scale`` to ``max_scale`` of the processor's size, each side a multiple of
        ``size_multiple``, none below ``min_side``); decoded images are kept between epochs up
        to ``image_cache_mb`` (``None``: :func:`~pipeline.image_cache.default_cache_mb`; 0:
        none).

        Evaluation keeps nothing: its memory stays flat in the number of images."""
        budget = default_cache_mb() if image_cache_mb is None else image_cache_mb
        return cls(
            image_processor,
            augmentation=build_augmentation(augmentation),
            scales=train_sizes(
                dict(image_processor.size), min_scale, max_scale, size_multiple, min_side
            ),
            seed=seed,
            image_cache=DecodedImageCache(budget) if budget > 0 else None,
        )

    @classmethod
    def for_evaluation(cls, image_processor: DetrImageProcessor) -> DetrTransform:
        return cls(image_processor)

    def set_epoch(self, epoch: int) -> None:
        """Draw new augmentations: each epoch sees every image augmented differently."""
        self.epoch = epoch

    def apply_to(self, dataset: Dataset) -> Dataset:
        """``dataset.with_transform(self)``, with the images left encoded for :meth:`__call__`
        to decode no larger than needed (see the module docstring)."""
        encoded = ImageFeature(mode="RGB", decode=False)
        return dataset.cast_column("image", encoded).with_transform(self)

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        pixel_values, labels = [], []
        decoded = self._decode_all(batch["image"])
        for (pixels, full_size), image_id, objects in zip(
            decoded, batch["image_id"], batch["objects"]
        ):
            encoded = self.encode(pixels, image_id, objects, full_size)
            pixel_values.append(encoded["pixel_values"][0])
            labels.append(encoded["labels"][0])
        return {"pixel_values": pixel_values, "labels": labels}

    def _decode_all(self, images: list[Any]) -> list[tuple[np.ndarray, tuple[int, int] | None]]:
        """Each image's pixels and full size (``None``: the pixels are at full size), from the
        image cache where it holds them (see :mod:`pipeline.image_cache`), the rest decoded
        side by side on torch's thread count when the batch is read in the training or
        evaluation loop's own process (no DataLoader workers, the CPU default).

        Decoding runs without the GIL and is most of what a PNG costs. Only decoding runs on
        the threads (:func:`decode_for_resize` runs no parallel torch operation), never the
        processor's tensor operations: a thread that has run those has its own OpenMP team,
        which slows the model's forward for as long as the thread lives (both measured in
        benchmarks/README.md).
        """
        in_worker = get_worker_info() is not None
        cache = None if in_worker else self.image_cache
        if cache is None:  # "is None": an empty cache is falsy (its len is 0)
            keys, decoded = [None] * len(images), [None] * len(images)
        else:
            keys = [image_key(image) for image in images]
            decoded = [cache.get(key) for key in keys]
        missing = [image for image, pixels in zip(images, decoded) if pixels is None]
        threads = torch.get_num_threads()
        if min(len(missing), threads) < 2 or in_worker:
            fresh = iter([self._decode(image) for image in missing])
        else:
            fresh = _decoding_threads(os.getpid(), threads).map(self._decode, missing)
        for i, key in enumerate(keys):
            if decoded[i] is None:
                decoded[i] = next(fresh)
                if cache is not None:
                    cache.put(key, decoded[i])
        return decoded

    def _decode(self, image: Any) -> tuple[np.ndarray, tuple[int, int] | None]:
        if not isinstance(image, dict):
            return np.array(image), None  # decoded by datasets: at its full size
        try:  # still encoded: see apply_to
            return decode_for_resize(image, self.resized_size)
        except IMAGE_ERRORS as err:  # checked before training: the file changed since
            where = image.get("path") or "an image embedded in the dataset"
            raise DatasetError(
                f"Cannot decode {where} any more ({err}); it was readable when the dataset was "
                f"checked, so it changed during the run. Fix or remove it and run again (a "
                f"training run resumes from its last checkpoint)."
            ) from err

    def resized_size(self, size: tuple[int, int]) -> tuple[int, int] | None:
        """The largest ``(width, height)`` the processor will resize an image of ``size`` to
        (training: at the largest scale), by the processor's own rules in its order; ``None``
        when it does not resize."""
        if not self.image_processor.do_resize:
            return None
        rule = {**dict(self.image_processor.size), **(self.scales[-1] if self.scales else {})}
        return resized_size(rule, size)

    def encode(
        self,
        image: np.ndarray,
        image_id: int,
        objects: dict[str, list],
        full_size: tuple[int, int] | None = None,
    ) -> Any:
        """Augment (if training) and process one RGB image with its objects; ``full_size``
        ``(width, height)``: the size the boxes refer to, when ``image`` was decoded smaller."""
        height, width = image.shape[:2]
        full_width, full_height = full_size or (width, height)
        if (full_width, full_height) != (width, height):
            scaled, areas = _scaled(
                objects["bbox"], objects["area"], width / full_width, height / full_height
            )
            objects = {**objects, "bbox": scaled, "area": areas}
        rng = example_rng(self.seed, self.epoch, image_id)
        if self.augmentation is not None:
            image, objects = augment(self.augmentation, rng, image, objects)
        boxes, categories, crowd = objects["bbox"], objects["category"], objects["iscrowd"]
        areas = objects["area"]
        scale = rng.choice(self.scales) if self.scales else None
        pixels = resize_for_model(self.image_processor, channels_last_view(image), scale)
        options: dict[str, Any] = {"do_resize": False}
        if pixels is None:  # a processor that resizes its own way: it scales the boxes itself
            pixels, options = (image if image.flags.writeable else image.copy()), {}
            if scale is not None:
                options["size"] = {**dict(self.image_processor.size), **scale}
        elif pixels.shape[-2:] != image.shape[:2]:  # as the processor's resize_annotation
            (height, width), (new_height, new_width) = image.shape[:2], pixels.shape[-2:]
            boxes, areas = _scaled(boxes, areas, new_width / width, new_height / height)
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
        encoded = self.image_processor(
            images=pixels, annotations=annotation, do_pad=False, return_tensors="pt", **options
        )
        labels = encoded["labels"][0]
        if "size" not in labels:  # set by the processor's resize_annotation, when it resizes
            labels["size"] = torch.tensor(encoded["pixel_values"].shape[-2:])
        labels["orig_size"] = torch.tensor([full_height, full_width])
        return encoded


def resized_size(rule: Mapping[str, int | None], size: tuple[int, int]) -> tuple[int, int] | None:
    """The ``(width, height)`` an image of ``size`` is resized to by an image processor's
    ``size`` rule (shortest/longest edge, max height/width, or exact height/width), in the
    processors' own order; ``None`` for a rule none of them uses."""
    width, height = size
    if rule.get("shortest_edge") and rule.get("longest_edge"):
        new_height, new_width = get_size_with_aspect_ratio(
            (height, width), rule["shortest_edge"], rule["longest_edge"]
        )
    elif rule.get("max_height") and rule.get("max_width"):
        new_height, new_width = get_image_size_for_max_height_width(
            (height, width), rule["max_height"], rule["max_width"]
        )
    elif rule.get("height") and rule.get("width"):
        new_height, new_width = rule["height"], rule["width"]
    else:
        return None
    return new_width, new_height


def channels_last_view(image: np.ndarray) -> torch.Tensor:
    """An ``(H, W, C)`` array as a ``(C, H, W)`` tensor sharing its memory (channel-last)."""
    if image.strides[0] < 0 or image.strides[1] < 0:  # a flip as a view; torch refuses it
        image = np.ascontiguousarray(image)
    if image.flags.writeable:
        return torch.from_numpy(image).permute(2, 0, 1)
    with warnings.catch_warnings():  # a cached image (image_cache), only read from here on
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(image).permute(2, 0, 1)


def resize_for_model(
    image_processor: BaseImageProcessor,
    pixels: torch.Tensor,
    size: Mapping[str, int] | None = None,
) -> torch.Tensor | None:
    """``(C, H, W)`` uint8 pixels resized by the processor's own ``resize`` and size rule
    (``size``: a drawn training size overriding parts of it), for the processor to take with
    ``do_resize=False``; ``None`` where the processor does not resize, or resizes with a
    backend other than torchvision (it is then left to do so).

    The processor would first copy the pixels into channel-first memory, which torch's uint8
    resize kernel then repacks; resized from channel-last memory (an image as decoded or
    augmented), the pixels skip both passes and come out the same (measured in
    benchmarks/README.md).
    """
    if not (isinstance(image_processor, TorchvisionBackend) and image_processor.do_resize):
        return None
    rule = {**dict(image_processor.size), **(size or {})}
    return image_processor.resize(
        pixels,
        SizeDict(**rule),
        resample=image_processor.resample,
        antialias=resizes_with_antialias(image_processor),
    )


@functools.cache
def _decoding_threads(pid: int, count: int) -> ThreadPoolExecutor:
    """One pool per process and thread count, kept for the life of the process (started when
    first needed), so that its threads start once, not for every batch (measured in
    benchmarks/README.md). Keyed by
    ``pid``: a forked child inherits the pool object but none of its threads."""
    return ThreadPoolExecutor(count, thread_name_prefix="hf-detr-ft-decode")


def _scaled(
    boxes: Sequence[Sequence[float]], areas: Sequence[float], sx: float, sy: float
) -> tuple[list[list[float]], list[float]]:
    """COCO ``[x, y, w, h]`` boxes and their areas on an image scaled by ``sx``, ``sy``."""
    return [[x * sx, y * sy, w * sx, h * sy] for x, y, w, h in boxes], [
        area * sx * sy for area in areas
    ]


class AugmentationEpochCallback(TrainerCallback):
    """Tell the training transform which epoch starts (also the resumed one), before any batch.

    The data loader's workers receive a copy of the transform when an epoch's iteration begins,
    which is after ``on_epoch_begin``; persistent workers keep their first copy, so with
    ``dataloader_persistent_workers`` every epoch would repeat the first one's augmentations.
    """

    def __init__(self, transform: DetrTransform) -> None:
        self.transform = transform

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if args.dataloader_persistent_workers and args.dataloader_num_workers > 0:
            logger.warning(
                "dataloader_persistent_workers: the workers keep the first epoch's transform, "
                "so every epoch repeats its augmentations; turn it off for new ones each epoch."
            )

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.transform.set_epoch(int(state.epoch or 0))
