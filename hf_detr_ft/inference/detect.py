"""Run a fine-tuned detector on images: batched forward pass and DETR post-processing.

:func:`detect` does both steps for a list of images. :func:`prepare_batch` and
:func:`detect_prepared` split it, so that a caller (:func:`inference.predict.predict`) can
decode and prepare the next batch in a background thread while the model runs on this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, PreTrainedModel
from transformers.image_processing_utils import BaseImageProcessor

from ..pipeline.transforms import channels_last_view, resize_for_model


@dataclass
class PreparedBatch:
    """Model inputs for some images and each image's (height, width), to scale boxes back."""

    inputs: BatchFeature
    sizes: list[tuple[int, int]]


def prepare_batch(
    image_processor: BaseImageProcessor,
    images: Sequence[Image.Image | torch.Tensor],
    sizes: Sequence[tuple[int, int]] | None = None,
) -> PreparedBatch:
    """Resize, normalise and pad ``images`` to one batch, as the processor was saved.

    ``images`` are PIL images (converted to RGB) or uint8 RGB tensors (3, H, W), as
    :func:`inference.predict.read_pixels` decodes them; the processor gets tensors either way
    (the same numbers as from PIL), each resized first by
    :func:`~pipeline.transforms.resize_for_model` (the processor's own resize, done on the
    channel-last memory that PIL images and ``read_pixels`` have, so that nothing is
    repacked). ``sizes``: the
    ``(height, width)`` the boxes are for, when an image was decoded at a reduced scale
    (default: the images' own).
    """
    pixels = [
        image
        if isinstance(image, torch.Tensor)
        else channels_last_view(np.array(image.convert("RGB")))
        for image in images
    ]
    sizes = list(sizes) if sizes is not None else [(p.shape[-2], p.shape[-1]) for p in pixels]
    resized = [resize_for_model(image_processor, p) for p in pixels]
    options = {}
    if all(r is not None for r in resized):  # else: the processor resizes them itself
        pixels, options = resized, {"do_resize": False}
    inputs = image_processor(
        images=pixels, input_data_format="channels_first", return_tensors="pt", **options
    )
    return PreparedBatch(inputs, sizes)


@torch.inference_mode()
def detect_prepared(
    model: PreTrainedModel,
    image_processor: BaseImageProcessor,
    batch: PreparedBatch,
    *,
    threshold: float = 0.5,
) -> list[dict[str, torch.Tensor]]:
    """Detections per image: ``scores``, ``labels`` (class indices), ``boxes`` (xyxy pixels)."""
    model.eval()
    outputs = model(**batch.inputs.to(model.device))
    sizes = torch.tensor(batch.sizes, device=model.device)
    return image_processor.post_process_object_detection(
        outputs, threshold=threshold, target_sizes=sizes
    )


def detect(
    model: PreTrainedModel,
    image_processor: BaseImageProcessor,
    images: Sequence[Image.Image | torch.Tensor],
    *,
    threshold: float = 0.5,
) -> list[dict[str, torch.Tensor]]:
    """Detections per image of ``images``, as :func:`detect_prepared` returns them."""
    batch = prepare_batch(image_processor, images)
    return detect_prepared(model, image_processor, batch, threshold=threshold)
