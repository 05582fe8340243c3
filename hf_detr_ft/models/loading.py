"""Load a DETR-family checkpoint with a new label map, and its image processor.

Everything in the checkpoint is transferred except the tensors whose shape depends on the
number of classes (for DETR only ``class_labels_classifier``), which are re-initialised
(``ignore_mismatched_sizes``) and logged by name, so users can see what is learned from scratch.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from transformers import AutoImageProcessor, AutoModelForObjectDetection, PreTrainedModel
from transformers.image_processing_utils import BaseImageProcessor

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "facebook/detr-resnet-50"

#: The ResNet stages DETR trains (``train_backbone`` in the original code): all but the stem and
#: the first stage. Names as in timm (``layer2``-``layer4``) and transformers (``stages.1``-).
_TRAINED_RESNET_STAGE = re.compile(r"\.(layer[2-9]|stages\.[1-9])\.")


def load_model(
    model_name_or_path: str | Path,
    class_names: list[str],
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    num_queries: int | None = None,
    ignore_mismatched_sizes: bool = True,
) -> PreTrainedModel:
    """Load an object-detection checkpoint (local folder or Hub id) for ``class_names``.

    ``num_queries`` (default: the checkpoint's) caps how many objects one image can get; a
    different value re-initialises the query embeddings, which are then learned from scratch.
    ``ignore_mismatched_sizes=False`` refuses to re-initialise anything the checkpoint has
    (e.g. to be sure a model is trained further on the label map it already has).
    """
    id2label = dict(enumerate(class_names))
    label2id = {name: i for i, name in id2label.items()}
    if num_queries is not None and num_queries < 1:
        raise ModelLoadError(f"num_queries must be at least 1, got {num_queries}.")
    overrides = {} if num_queries is None else {"num_queries": num_queries}
    try:
        model, info = AutoModelForObjectDetection.from_pretrained(
            str(model_name_or_path),
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            output_loading_info=True,
            revision=revision,
            trust_remote_code=trust_remote_code,
            use_safetensors=None,
            **overrides,
        )
    except OSError as err:
        raise ModelLoadError(_cannot_load_message(model_name_or_path, err)) from err
    except RuntimeError as err:  # transformers' answer to a shape mismatch it may not ignore
        if ignore_mismatched_sizes or "ignore_mismatched_sizes" not in str(err):
            raise
        raise ModelLoadError(
            f"Cannot load {model_name_or_path} for {len(class_names)} classes with "
            "ignore_mismatched_sizes off: some of its tensors have another shape (the class "
            "head, when it was trained for another number of classes; transformers' load "
            "report names them). Leave ignore_mismatched_sizes on (the default) to "
            "re-initialise them."
        ) from err

    reinitialised = sorted(key for key, *_ in info["mismatched_keys"]) + sorted(
        info["missing_keys"]
    )
    if reinitialised:
        logger.info(
            "Re-initialised for %d classes (not transferred from %s): %s",
            len(class_names),
            model_name_or_path,
            ", ".join(reinitialised),
        )
    freeze_backbone_stem(model)
    return model


def freeze_backbone_stem(model: PreTrainedModel) -> None:
    """Freeze a ResNet backbone's stem and first stage and train the rest, as DETR does.

    Why explicit: transformers 5 applies DETR's own freezing inconsistently (a model built from
    a config freezes the whole transformers ResNet, ``from_pretrained`` freezes nothing), so the
    choice is made here once for every way a model is loaded. Backbones that are not ResNets
    (no ``layerN`` / ``stages.N`` names) are left as they are.
    """
    backbone = [(n, p) for n, p in model.named_parameters() if "backbone" in n]
    if not any(_TRAINED_RESNET_STAGE.search(name) for name, _ in backbone):
        return
    for name, param in backbone:
        param.requires_grad_(bool(_TRAINED_RESNET_STAGE.search(name)))
    frozen = sum(p.numel() for _, p in backbone if not p.requires_grad)
    logger.info("Backbone stem and first stage frozen (%d parameters), as in DETR.", frozen)


def load_image_processor(
    model_name_or_path: str | Path,
    *,
    image_size: int = 800,
    max_image_size: int = 1333,
    revision: str | None = None,
) -> BaseImageProcessor:
    """The checkpoint's image processor, resizing to ``image_size`` / ``max_image_size``.

    The shortest edge becomes ``image_size`` unless the longest would then exceed
    ``max_image_size``, which wins: ``max_image_size=600`` alone caps every image's longest
    edge at 600, as the transformers example's ``image_square_size`` does (without padding to
    a square). A checkpoint without a ``preprocessor_config.json`` (e.g. one saved with only
    ``model.save_pretrained``) gets DETR's standard processor.
    """
    if min(image_size, max_image_size) < 1:
        raise ValueError(
            f"image_size and max_image_size must be positive, got {image_size}, {max_image_size}."
        )
    size = {"shortest_edge": image_size, "longest_edge": max_image_size}
    try:
        return AutoImageProcessor.from_pretrained(
            str(model_name_or_path), size=size, revision=revision
        )
    except OSError:
        from transformers import DetrImageProcessor

        logger.info("No image processor saved with %s; using DETR's default.", model_name_or_path)
        return DetrImageProcessor(size=size)


def _cannot_load_message(model_name_or_path: str | Path, err: OSError) -> str:
    path = Path(str(model_name_or_path)).expanduser()
    if path.exists():
        return (
            f"Cannot load a model from the folder {path}: {err}\n"
            "It should hold config.json and model.safetensors, as written by save_pretrained()."
        )
    return (
        f"Cannot load the model {str(model_name_or_path)!r}: it is not a local folder and the "
        f"Hugging Face Hub could not provide it ({str(err).splitlines()[0]}).\n"
        "If you are offline, download the checkpoint once where you have network access "
        "(e.g. `hf download facebook/detr-resnet-50 --local-dir detr-resnet-50`) and pass the "
        "folder instead: finetune(..., model='detr-resnet-50') or "
        "--model_name_or_path detr-resnet-50."
    )
