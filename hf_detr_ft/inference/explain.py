"""Where does DETR look? Decoder cross-attention of the top detections, as in DETR's paper.

Each DETR detection comes from one object query; in the last decoder layer that query attends
over the backbone's feature map (``H/32 x W/32`` of the resized image). DETR's attention
notebook shows, per detection, that attention map next to the box. :func:`explain` does the
same with the Hugging Face model: it runs it with ``output_attentions=True``, averages the last
decoder layer's cross-attention over the heads, reshapes each top query's row to the feature
map (captured from the backbone, whose downsampled pixel mask says which cells are image and
which are padding), crops the padding, and draws the map over the image above the detection.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..artifacts.pictures import Boxes, draw_boxes, save_figure, subplots
from ..errors import ArgumentError
from .predict import load_detector, open_image


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
    features: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = model.model.backbone.register_forward_hook(lambda _m, _i, out: features.extend(out))
    try:
        outputs = model(**inputs, output_attentions=True)
    finally:
        hook.remove()
    if not outputs.cross_attentions:
        raise RuntimeError("The model returned no cross-attention; load it with eager attention.")
    feature_map, mask = features[-1]  # the last backbone stage feeds the transformer
    height, width = feature_map.shape[-2:]
    rows, cols = int(mask[0].any(1).sum()), int(mask[0].any(0).sum())  # unpadded cells

    # One detection per query, in query order (threshold -1 keeps every query).
    detections = image_processor.post_process_object_detection(
        outputs, threshold=-1.0, target_sizes=torch.tensor([image.size[::-1]])
    )[0]
    queries = detections["scores"].topk(min(top_k, len(detections["scores"]))).indices
    attention = outputs.cross_attentions[-1][0].mean(0)  # [queries, height * width]
    maps = [attention[q].reshape(height, width)[:rows, :cols].cpu() for q in queries]
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
    detector, processor = load_detector(model, device=device, attn_implementation="eager")
    picture = open_image(Path(image))
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
    return save_figure(fig, output if output is not None else f"{Path(image).stem}_attention.png")
