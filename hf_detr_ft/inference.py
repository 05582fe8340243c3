"""Run a fine-tuned detector on images: batched forward pass and DETR post-processing."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from transformers import PreTrainedModel
from transformers.image_processing_utils import BaseImageProcessor


@torch.inference_mode()
def detect(
    model: PreTrainedModel,
    image_processor: BaseImageProcessor,
    images: Sequence[Image.Image],
    *,
    threshold: float = 0.5,
) -> list[dict[str, torch.Tensor]]:
    """Detections per image: ``scores``, ``labels`` (class indices), ``boxes`` (xyxy pixels)."""
    model.eval()
    images = [image.convert("RGB") for image in images]
    inputs = image_processor(images=images, return_tensors="pt").to(model.device)
    outputs = model(**inputs)
    sizes = torch.tensor([image.size[::-1] for image in images], device=model.device)
    return image_processor.post_process_object_detection(
        outputs, threshold=threshold, target_sizes=sizes
    )
