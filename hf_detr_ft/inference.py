"""Run a fine-tuned detector on images: batched forward pass and DETR post-processing.

:func:`detect` does both steps for a list of images. :func:`prepare_batch` and
:func:`detect_prepared` split it, so that a caller (:func:`hf_detr_ft.predict.predict`) can
decode and prepare the next batch in a background thread while the model runs on this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor
from transformers import BatchFeature, PreTrainedModel
from transformers.image_processing_utils import BaseImageProcessor


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
    :func:`hf_detr_ft.predict.read_pixels` decodes them; the processor gets tensors either way
    (the same numbers as from PIL, without its copy through NumPy). ``sizes``: the
    ``(height, width)`` the boxes are for, when an image was decoded at a reduced scale
    (default: the images' own).
    """
    pixels = [
        image if isinstance(image, torch.Tensor) else pil_to_tensor(image.convert("RGB"))
        for image in images
    ]
    inputs = image_processor(images=pixels, input_data_format="channels_first", return_tensors="pt")
    sizes = list(sizes) if sizes is not None else [(p.shape[-2], p.shape[-1]) for p in pixels]
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
