"""Load a DETR-family checkpoint with a new label map, and its image processor.

Everything in the checkpoint is transferred except the tensors whose shape depends on the
number of classes (for DETR only ``class_labels_classifier``; RT-DETR also has its encoder's
score head and denoising class embedding), which are re-initialised
(``ignore_mismatched_sizes``) and logged by name, so users can see what is learned from scratch.
What differs per model type (query count, frozen backbone parts, input sizes) comes from
:mod:`.families`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForObjectDetection,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.image_processing_utils import BaseImageProcessor

from ..errors import ArgumentError, DatasetError, ModelLoadError
from .families import Family, family_of
from .input_sizes import detr_longest_edge
from .speedups import apply_speedups

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "facebook/detr-resnet-50"


def load_model(
    model_name_or_path: str | Path,
    class_names: list[str],
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    num_queries: int | None = None,
    ignore_mismatched_sizes: bool = True,
    freeze_backbone: bool = False,
) -> PreTrainedModel:
    """Load an object-detection checkpoint (local folder or Hub id) for ``class_names``.

    ``num_queries`` (default: the checkpoint's) caps how many objects one image can get; a
    different value re-initialises the query embeddings, which are then learned from scratch.
    ``ignore_mismatched_sizes=False`` refuses to re-initialise anything the checkpoint has
    (e.g. to be sure a model is trained further on the label map it already has).
    ``freeze_backbone`` keeps the whole backbone frozen (see :func:`freeze_backbone_parts`).
    """
    id2label = dict(enumerate(class_names))
    label2id = {name: i for i, name in id2label.items()}
    if num_queries is not None and num_queries < 1:
        raise ModelLoadError(f"num_queries must be at least 1, got {num_queries}.")
    config = load_config(model_name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    family = family_of(config)
    settings = dict(id2label=id2label, label2id=label2id)
    if num_queries is not None:
        settings[family.query_count] = num_queries
    repaired = family.repair_config(config)
    if repaired is not None:  # transformers' default config of the type builds no working model
        config, change = repaired
        logger.warning("%s: config repaired, %s.", model_name_or_path, change)
        for name, value in settings.items():
            setattr(config, name, value)
        settings = {"config": config}
    try:
        model, info = AutoModelForObjectDetection.from_pretrained(
            str(model_name_or_path),
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            output_loading_info=True,
            revision=revision,
            trust_remote_code=trust_remote_code,
            use_safetensors=None,
            **settings,
        )
    except (OSError, SafetensorError) as err:
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
    freeze_backbone_parts(model, whole=freeze_backbone)
    return model


def load_config(
    model_name_or_path: str | Path, *, revision: str | None = None, trust_remote_code: bool = False
) -> PretrainedConfig:
    """The checkpoint's config (read before the weights, to know its family)."""
    try:
        return AutoConfig.from_pretrained(
            str(model_name_or_path), revision=revision, trust_remote_code=trust_remote_code
        )
    except OSError as err:
        raise ModelLoadError(_cannot_load_message(model_name_or_path, err)) from err
    except ValueError as err:  # a config.json of no model type transformers knows
        raise ModelLoadError(
            f"Cannot read the model config of {model_name_or_path}: {err}"
        ) from err


def freeze_backbone_parts(model: PreTrainedModel, *, whole: bool = False) -> None:
    """Freeze what the family's recipe keeps frozen (:attr:`~.families.Family.frozen`: DETR's
    ResNet stem and first stage, RT-DETR's and D-FINE's stem) and train the rest of the backbone;
    with ``whole``, freeze the entire backbone.

    Why explicit: transformers 5 applies the families' own freezing inconsistently (a DETR built
    from a config freezes the whole transformers ResNet, ``from_pretrained`` freezes nothing),
    so the choice is made here once for every way a model is loaded. Only backbone parameters
    are touched (other frozen parameters, such as D-FINE's constants, stay frozen), and a
    pattern that would freeze the whole backbone (a backbone of another naming) freezes nothing.
    A wholly frozen backbone (``--freeze_backbone``) skips its backward pass (the demo's model:
    about a third less CPU per step, docs/demo.md), for data close to what the checkpoint saw.
    """
    family = family_of(model.config)
    backbone = [(n, p) for n, p in model.named_parameters() if family.is_backbone(n)]
    if whole and not backbone:
        logger.warning(
            "freeze_backbone: %s names no backbone parameters of this model; nothing frozen.",
            family.name,
        )
    frozen = [whole or family.is_frozen(name) for name, _ in backbone]
    if not any(frozen) or (all(frozen) and not whole):
        return
    for (_, param), freeze in zip(backbone, frozen):
        param.requires_grad_(not freeze)
    count = sum(p.numel() for (_, p), freeze in zip(backbone, frozen) if freeze)
    what = "Backbone" if whole else f"Backbone stem, as in {family.name}'s recipe,"
    logger.info("%s frozen (%d parameters).", what, count)


def load_image_processor(
    model_name_or_path: str | Path,
    *,
    image_size: int | None = None,
    max_image_size: int | None = None,
    revision: str | None = None,
) -> BaseImageProcessor:
    """The checkpoint's image processor, resizing the way its family's models take images.

    * Families with variable input sizes (DETR, Conditional/DAB/Deformable DETR, YOLOS): the
      shortest edge becomes ``image_size`` unless the longest would then exceed
      ``max_image_size``, which wins: ``max_image_size=600`` alone caps every image's longest
      edge at 600, as the transformers example's ``image_square_size`` does.
    * Families with fixed square inputs (RT-DETR, D-FINE, DEIMv2, LW-DETR, RF-DETR): every
      image becomes ``S x S``, ``S = min(image_size, max_image_size)`` rounded to the multiple
      of the model's stride or windows (:attr:`~.families.Family.size_multiple`).

    ``None`` keeps the checkpoint's own size (else the family's default). A checkpoint without
    a ``preprocessor_config.json`` gets its family's processor class (DETR's when the folder
    holds no model config either).
    """
    for name, value in (("image_size", image_size), ("max_image_size", max_image_size)):
        if value is not None and value < 1:
            raise ArgumentError(f"{name} must be positive, got {value}.")
    try:
        config = load_config(model_name_or_path, revision=revision)
    except ModelLoadError:
        config = None  # a folder with only a processor, or nothing: DETR's defaults
    family = family_of(config or "detr")
    processor = _saved_or_default_processor(model_name_or_path, family, revision)
    processor.size = _size_rule(family, config, dict(processor.size), image_size, max_image_size)
    return processor


def at_least(size: dict[str, int], min_side: int) -> dict[str, int]:
    """The processor ``size`` rule ``size`` with no side below ``min_side``, the smallest the
    model runs on (:func:`~.input_sizes.smallest_input_side`); a warning says when that
    changes it."""
    sides = ("height", "width") if "height" in size else ("shortest_edge", "longest_edge")
    raised = {**size, **{name: max(size[name], min_side) for name in sides}}
    if raised != size:
        logger.warning(
            "Image size %s raised to %s: this model runs on no image smaller than %d x %d px "
            "(it picks its queries among the positions of its feature maps).",
            _describe(size),
            _describe(raised),
            min_side,
            min_side,
        )
    return raised


def _describe(size: dict[str, int]) -> str:
    if "height" in size:
        return f"{size['height']}x{size['width']}"
    return f"shortest edge {size['shortest_edge']} / longest {size['longest_edge']}"


def _saved_or_default_processor(
    model_name_or_path: str | Path, family: Family, revision: str | None
) -> BaseImageProcessor:
    try:
        return AutoImageProcessor.from_pretrained(str(model_name_or_path), revision=revision)
    except (OSError, ValueError):  # none saved, or a type without an Auto entry (D-FINE, ...)
        logger.info(
            "No image processor saved with %s; using %s's default (%s).",
            model_name_or_path,
            family.name,
            family.processor,
        )
        return getattr(transformers, family.processor)()


def _size_rule(
    family: Family,
    config: PretrainedConfig | None,
    saved: dict[str, int | None],
    image_size: int | None,
    max_image_size: int | None,
) -> dict[str, int]:
    """The processor's ``size`` for the family's input contract (see load_image_processor)."""
    saved_side = saved.get("shortest_edge") or saved.get("height")
    side = image_size or saved_side or family.default_image_size
    if family.square_input:
        side = min(side, max_image_size or side)
        multiple = family.size_multiple(config) if config is not None else 1
        side = max(multiple, round(side / multiple) * multiple)
        return {"height": side, "width": side}
    longest = max_image_size or saved.get("longest_edge") or detr_longest_edge(side)
    return {"shortest_edge": side, "longest_edge": longest}


def check_model_classes(
    config: PretrainedConfig, class_names: list[str], model: object, data: object
) -> None:
    """Refuse to score or draw ``data`` with a model trained on other classes (its numbers
    and pictures would name the wrong classes)."""
    model_classes = [config.id2label[i] for i in range(len(config.id2label))]
    if model_classes != list(class_names):
        raise DatasetError(
            f"The model {model} predicts the classes {model_classes}, but {data} has the "
            f"classes {list(class_names)}; use the kind of dataset the model was trained on."
        )


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as given, else CUDA when it is available, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def load_detector(
    model: str | Path, *, device: str | torch.device | None = None, **model_kwargs: Any
) -> tuple[PreTrainedModel, BaseImageProcessor]:
    """A fine-tuned detector (folder or Hub id) in eval mode on ``device``, and its processor.

    The processor saved with the model is used as it is (the image size it was trained at);
    a model saved without one gets DETR's default processor. The model runs with
    :func:`~hf_detr_ft.models.speedups.apply_speedups` (same outputs, faster).
    """
    try:
        detector = AutoModelForObjectDetection.from_pretrained(str(model), **model_kwargs)
    except (OSError, SafetensorError) as err:
        raise ModelLoadError(_cannot_load_message(model, err)) from err
    try:
        processor = AutoImageProcessor.from_pretrained(str(model))
    except OSError:
        processor = load_image_processor(model)
    detector = detector.to(resolve_device(device)).eval()
    apply_speedups(detector)
    return detector, processor


def _cannot_load_message(model_name_or_path: str | Path, err: Exception) -> str:
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
