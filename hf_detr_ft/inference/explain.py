"""Where does DETR look? Decoder cross-attention of the top detections, as in DETR's paper.

Each DETR detection comes from one object query; in the last decoder layer that query attends
over the backbone's feature map (``H/32 x W/32`` of the resized image). DETR's attention
notebook shows, per detection, that attention map next to the box. :func:`explain` does the
same with the Hugging Face model: it runs it with ``output_attentions=True``, averages the last
decoder layer's cross-attention over the heads, reshapes each top query's row to the feature
map (``H/32 x W/32`` of the single, unpadded input image), and draws the map over the image
above the detection.

Only families whose decoder cross-attention is such a dense map can be explained this way
(DETR, Conditional DETR, DAB-DETR, Table Transformer: :attr:`~hf_detr_ft.models.families.
Family.dense_cross_attention`). Deformable attention (Deformable DETR, RT-DETR, D-FINE,
DEIMv2, LW-DETR, RF-DETR) samples a few points per query instead, and YOLOS has no decoder:
for those, :func:`explain` says so in one error.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from ..artifacts.output_files import claim_files
from ..artifacts.pictures import Boxes, draw_boxes, save_figure, subplots
from ..data.image_files import IMAGE_ERRORS
from ..errors import ArgumentError, InputError
from ..models.families import FAMILIES, family_of
from ..models.loading import load_config, load_detector
from .predict import open_image


@torch.no_grad()
def attention_maps(
    model: torch.nn.Module, image_processor: object, image: Image.Image, top_k: int = 4
) -> tuple[Boxes, list[torch.Tensor]]:
    """The ``top_k`` highest-scoring detections of ``image`` and, for each, its query's
    last-layer decoder cross-attention over the feature map (heads averaged, padding cropped).

    The model must use eager attention (``attn_implementation="eager"``): the fused kernels
    return no attention weights.
    """
    inputs = image_processor(images=image, return_tensors="pt").to(model.device)
    outputs = model(**inputs, output_attentions=True)
    if not outputs.cross_attentions:
        raise RuntimeError("The model returned no cross-attention; load it with eager attention.")
    attention = outputs.cross_attentions[-1][0].mean(0)  # [queries, height * width]
    height, width = _feature_grid(inputs["pixel_values"].shape[-2:], attention.shape[-1])

    # One detection per query, in query order (threshold -1 keeps every query).
    detections = image_processor.post_process_object_detection(
        outputs, threshold=-1.0, target_sizes=torch.tensor([image.size[::-1]])
    )[0]
    queries = detections["scores"].topk(min(top_k, len(detections["scores"]))).indices
    maps = [attention[q].reshape(height, width).cpu() for q in queries]
    boxes = Boxes(
        detections["boxes"][queries].cpu(),
        detections["labels"][queries].tolist(),
        detections["scores"][queries].tolist(),
    )
    return boxes, maps


def explain(
    model: str | Path,
    image: str | Path,
    output: str | Path | None = None,
    *,
    top_k: int = 4,
    device: str | None = None,
) -> Path:
    """Save a figure of the ``top_k`` detections of ``image``: attention above, box below.

    ``output`` defaults to ``<image stem>_attention.png`` in the current folder.
    """
    if top_k < 1:
        raise ArgumentError(f"top_k must be at least 1, got {top_k}.")
    family = family_of(load_config(model))
    if not family.dense_cross_attention:
        raise ArgumentError(
            f"explain draws the decoder's cross-attention over the image, which {model} "
            f"({family.name}) does not have as a map: deformable attention samples a few "
            f"points per query, and YOLOS has no decoder. It works with "
            f"{', '.join(f.name for f in FAMILIES if f.dense_cross_attention)} models."
        )
    try:
        picture = open_image(Path(image))
    except IMAGE_ERRORS as err:  # missing, a folder, not an image, truncated
        raise InputError(f"Cannot read the image {image}: {err}") from err
    target = Path(output if output is not None else f"{Path(image).stem}_attention.png")
    [target] = claim_files(target.parent, [target.name])  # before the model is loaded
    detector, processor = load_detector(model, device=device, attn_implementation="eager")
    boxes, maps = attention_maps(detector, processor, picture, top_k)
    class_names = [detector.config.id2label[i] for i in range(len(detector.config.id2label))]

    columns = len(maps)
    panel = 4.0  # inches per panel, so labels stay readable whatever the image size
    aspect = picture.height / picture.width
    fig, axes = subplots(
        2, columns, figsize=(panel * columns, 2 * panel * aspect + 0.8), squeeze=False
    )
    extent = (0, picture.width, picture.height, 0)  # stretch each map over the whole image
    for k, attention in enumerate(maps):
        name, score = class_names[boxes.labels[k]], boxes.scores[k]
        top, bottom = axes[0, k], axes[1, k]
        top.imshow(picture)
        top.imshow(attention.numpy(), cmap="inferno", alpha=0.6, extent=extent)
        top.set_title(f"attention of detection {k + 1}")
        one = Boxes(boxes.xyxy[k : k + 1], [boxes.labels[k]], [score])
        bottom.imshow(draw_boxes(picture, one, class_names))
        bottom.set_title(f"{name} {score:.2f}")
        for ax in (top, bottom):
            ax.axis("off")
    fig.suptitle(
        f"{Path(image).name}: last decoder layer's cross-attention (heads averaged) "
        f"of the top {columns} detections"
    )
    fig.tight_layout()
    return save_figure(fig, target)


def _feature_grid(input_size: torch.Size, cells: int) -> tuple[int, int]:
    """The ``(height, width)`` of the stride-32 feature map of an input, from its cell count
    (convolutions round the size up or down depending on the backbone)."""
    height, width = input_size
    for rows in (math.ceil(height / 32), height // 32):
        for cols in (math.ceil(width / 32), width // 32):
            if rows * cols == cells:
                return rows, cols
    raise RuntimeError(f"No stride-32 grid of {cells} cells fits a {height}x{width} input.")
