"""Training augmentation: a named preset, or an albumentations pipeline saved to a file.

``--augmentation`` takes ``none``, ``default``, ``strong`` (:data:`PRESETS`) or the path of a
``.json``/``.yaml`` file written by ``A.save(pipeline, path)`` (albumentations' ``A.to_dict``
format). :func:`build_augmentation` checks a file completely when the arguments are parsed,
before any data or model is loaded, because a mistake found in the first batch would cost the
data loading and the model download first. Each problem is one :class:`ArgumentError` that
names the transform:

* a transform albumentations does not know;
* a bad argument: albumentations' own validation of the transform's arguments, and an argument
  the transform does not take (albumentations only warns, and the value would be ignored);
* a transform that cannot carry boxes: one that moves pixels (not an ``ImageOnlyTransform``)
  and has no ``bboxes`` among its ``targets``, so the boxes would no longer cover the objects;
* a transform that fails on a probe image with boxes (one that needs a mask or other inputs),
  or turns the image into something other than uint8 RGB pixels (``Normalize``, ``ToFloat``,
  ``ToTensorV2``): the model's image processor rescales and normalises the pixels itself.

Boxes are the project's, whatever the file says: COCO ``[x, y, w, h]`` (the format the
dataset's boxes are in), ``category`` and ``iscrowd`` carried with each box, clipped to the
image. The file's own box filters (``min_area``, ``min_visibility``, ``min_width``,
``min_height``, ``max_accept_ratio``, ``check_each_transform``) are kept.

The augmentation runs before the model's resizing and multi-scale sizes
(:class:`~.transforms.DetrTransform`), which are separate from it.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import albumentations as A
import numpy as np
import yaml
from albumentations.core.serialization import (
    SERIALIZABLE_REGISTRY,
    register_additional_transforms,
    shorten_class_name,
)
from albumentations.core.transforms_interface import ImageOnlyTransform
from datasets import Dataset
from pydantic import ValidationError

from ..errors import ArgumentError

#: The boxes' format (the dataset's COCO boxes) and the fields carried with each box.
BBOX_FORMAT = "coco"
LABEL_FIELDS = ["category", "iscrowd"]
#: The box filters a file may set; what it leaves unset is as here.
FILE_BOX_FILTERS = {"min_area": 1.0, "check_each_transform": True}
_FILTER_KEYS = (
    "min_area",
    "min_visibility",
    "min_width",
    "min_height",
    "max_accept_ratio",
    "check_each_transform",
)


def bbox_params(**filters: Any) -> A.BboxParams:
    """The project's box handling (see the module docstring) with ``filters``."""
    return A.BboxParams(format=BBOX_FORMAT, label_fields=list(LABEL_FIELDS), clip=True, **filters)


def default_augmentation() -> A.Compose:
    """The bbox-aware augmentation applied to training images (never to evaluation images).

    Boxes are clipped and filtered once, at the end (``check_each_transform=False``; measured
    in benchmarks/README.md): the flip and the box-safe crop keep every box and the
    brightness moves none, so filtering after each of them finds nothing more."""
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.BBoxSafeRandomCrop(erosion_rate=0.0, p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        ],
        bbox_params=bbox_params(min_area=1.0, check_each_transform=False),
    )


def strong_augmentation() -> A.Compose:
    """``default`` plus scale, shift and rotation, colour jitter and blur, for small datasets
    that overfit. The affine moves boxes partly out of the image: a box is clipped to it and
    dropped when less than a third of it stays visible, as a crop that cuts an object off
    would (``min_visibility``); rotated boxes are the rotated ellipse's box, not the larger
    rotated corners' box (``rotate_method="ellipse"``)."""
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.BBoxSafeRandomCrop(erosion_rate=0.0, p=0.5),
            A.Affine(
                scale=(0.75, 1.25),
                translate_percent=(-0.1, 0.1),
                rotate=(-10, 10),
                rotate_method="ellipse",
                p=0.5,
            ),
            A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03, p=0.8),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=(3, 5))], p=0.2),
        ],
        bbox_params=bbox_params(min_area=1.0, min_visibility=0.33, check_each_transform=True),
    )


#: ``--augmentation`` names; ``none`` trains on the images as they are.
PRESETS: dict[str, Callable[[], A.Compose | None]] = {
    "none": lambda: None,
    "default": default_augmentation,
    "strong": strong_augmentation,
}
FILE_SUFFIXES = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}


def build_augmentation(spec: str) -> A.Compose | None:
    """The training augmentation that ``spec`` (a preset name or a file) names, checked;
    ``None`` for ``none``. Raises :class:`ArgumentError` (see the module docstring)."""
    if spec in PRESETS:
        return PRESETS[spec]()
    path = Path(spec).expanduser()
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise ArgumentError(
            f"augmentation must be {', '.join(PRESETS)} or a .json/.yaml file saved with "
            f"albumentations' A.save, got {spec!r}."
        )
    if not path.is_file():
        raise ArgumentError(f"augmentation file {spec} does not exist.")
    return load_augmentation_file(path)


def load_augmentation_file(path: Path) -> A.Compose:
    """A pipeline saved with ``A.save``, with the project's box handling, checked."""
    where = f"augmentation file {path}"
    try:
        text = path.read_text()
        saved = (
            json.loads(text)
            if FILE_SUFFIXES[path.suffix.lower()] == "json"
            else yaml.safe_load(text)
        )
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ArgumentError(f"{where} cannot be read: {_one_line(err)}") from err
    if not isinstance(saved, dict) or not isinstance(saved.get("transform"), dict):
        raise ArgumentError(
            f"{where} is not an albumentations pipeline: it has no 'transform' mapping (write "
            f"it with A.save(pipeline, path))."
        )
    top = _with_project_boxes(saved["transform"], where)
    _check_node(top, where)
    pipeline = _from_dict(top, where)
    _probe(pipeline, where, "the pipeline")
    return pipeline


def describe_augmentation(spec: str) -> str:
    """``spec`` and its transforms, for the model card: ``"strong: HorizontalFlip, ..."``
    (a file by its name)."""
    pipeline = build_augmentation(spec)
    name = spec if spec in PRESETS else Path(spec).name
    return f"{name}: {', '.join(transform_names(pipeline))}" if pipeline else name


def transform_names(pipeline: A.BaseCompose) -> list[str]:
    """The transforms of ``pipeline`` in order, groups as ``OneOf(GaussianBlur, MotionBlur)``."""
    return [
        f"{type(t).__name__}({', '.join(transform_names(t))})"
        if isinstance(t, A.BaseCompose)
        else type(t).__name__
        for t in pipeline.transforms
    ]


def example_rng(seed: int, epoch: int, image_id: int) -> random.Random:
    """The random choices for one image in one epoch (augmentation, training size): the same
    in every process and DataLoader worker (see :mod:`.transforms`). A ``str`` seed is hashed
    with SHA-512, whatever ``PYTHONHASHSEED``."""
    return random.Random(f"{seed}-{epoch}-{image_id}")


def augment(
    pipeline: A.Compose, rng: random.Random, image: np.ndarray, objects: dict[str, list]
) -> tuple[np.ndarray, dict[str, list]]:
    """``image`` and its ``objects`` (COCO ``bbox``, ``category``, ``iscrowd``) augmented, with
    the augmentation's random state drawn from ``rng``; areas are those of the new boxes.
    (albumentations returns the label fields as floats: they are made ints again.)"""
    pipeline.set_random_seed(rng.getrandbits(32))
    out = pipeline(
        image=image,
        bboxes=objects["bbox"],
        category=objects["category"],
        iscrowd=objects["iscrowd"],
    )
    boxes = out["bboxes"]
    return out["image"], {
        "bbox": boxes,
        "category": [int(c) for c in out["category"]],
        "iscrowd": [int(z) for z in out["iscrowd"]],
        "area": [float(w * h) for _, _, w, h in boxes],
    }


class AugmentedSample(NamedTuple):
    """One training image as the augmentation leaves it, with its objects, for a preview."""

    image: np.ndarray
    objects: dict[str, list]
    caption: str


def augmented_samples(dataset: Dataset, spec: str, count: int, seed: int) -> list[AugmentedSample]:
    """``count`` training samples as the training with ``seed`` augments them: images evenly
    spaced through ``dataset``, each again in the next epochs when ``count`` exceeds them."""
    pipeline = build_augmentation(spec)
    shown = min(count, len(dataset))
    indices = np.linspace(0, len(dataset) - 1, num=shown, dtype=int) if shown else []
    samples = []
    for i in range(count if shown else 0):
        example, epoch = dataset[int(indices[i % shown])], i // shown
        image = np.array(example["image"].convert("RGB"))
        objects = example["objects"]
        if pipeline is not None:
            image, objects = augment(
                pipeline, example_rng(seed, epoch, example["image_id"]), image, objects
            )
        samples.append(
            AugmentedSample(image, objects, f"image {example['image_id']}, epoch {epoch}")
        )
    return samples


# The probe: an image whose boxes touch its edges, where a transform most easily breaks them.
_PROBE_SIZE = (96, 128)  # height, width
_PROBE_OBJECTS = {
    "bbox": [[0.0, 0.0, 20.0, 15.0], [108.0, 81.0, 20.0, 15.0], [40.0, 30.0, 30.0, 25.0]],
    "category": [0, 1, 2],
    "iscrowd": [0, 0, 0],
}


def _with_project_boxes(top: dict[str, Any], where: str) -> dict[str, Any]:
    """The saved top-level transform as a ``Compose`` with the project's box handling and the
    file's own box filters (see the module docstring)."""
    if top.get("__class_fullname__") != "Compose":
        top = {"__class_fullname__": "Compose", "p": 1.0, "transforms": [top]}
    saved = top.get("bbox_params") or {}
    replaced = [
        key
        for key, ours in (("format", BBOX_FORMAT), ("label_fields", LABEL_FIELDS), ("clip", True))
        if key in saved and saved[key] != ours
    ]
    if replaced:
        warnings.warn(  # a warning, not a log line: shown once, though the file is read thrice
            f"{where}: its bbox_params {', '.join(replaced)} are replaced by hf-detr-ft's (COCO "
            f"boxes, labels {' and '.join(LABEL_FIELDS)}, clipped to the image); its box "
            f"filters are kept.",
            stacklevel=2,
        )
    filters = {key: saved[key] for key in _FILTER_KEYS if saved.get(key) is not None}
    params = A.to_dict(bbox_params(**{**FILE_BOX_FILTERS, **filters}))["transform"]
    params.pop("__class_fullname__", None)
    return {**top, "bbox_params": params}


def _check_node(node: Any, where: str) -> None:
    """Check one saved transform and those it groups (see the module docstring)."""
    if not isinstance(node, dict) or "__class_fullname__" not in node:
        raise ArgumentError(f"{where}: {node!r} is not a saved transform (no __class_fullname__).")
    register_additional_transforms()
    name = str(node["__class_fullname__"])
    if shorten_class_name(name) not in SERIALIZABLE_REGISTRY:
        raise ArgumentError(
            f"{where}: unknown transform {name!r} (not in albumentations {A.__version__})."
        )
    if "transforms" in node:  # a group: Compose, OneOf, SomeOf, Sequential, ...
        for child in node["transforms"] or []:
            _check_node(child, where)
        return
    transform = _from_dict(node, where)
    transform.p = 1.0  # the probe applies it for sure
    if not (isinstance(transform, ImageOnlyTransform) or "bboxes" in transform.targets):
        raise ArgumentError(
            f"{where}: {name} cannot carry boxes (albumentations applies it to "
            f"{', '.join(transform.targets)} only), so the boxes would no longer match the "
            f"objects; leave it out or use a bbox-aware transform."
        )
    with warnings.catch_warnings():  # an image-only transform: the boxes pass through
        warnings.filterwarnings("ignore", _EXPECTED_WARNINGS[1])
        alone = A.Compose([transform], bbox_params=bbox_params(**FILE_BOX_FILTERS))
    _probe(alone, where, name)


#: What albumentations warns about a saved pipeline that is fine here: a transform saved
#: without ``p`` (0.5, as documented) and image-only transforms (the boxes pass through).
_EXPECTED_WARNINGS = ("parameter in serialized data", "Got processor for bboxes, but no transform")


def _from_dict(node: dict[str, Any], where: str) -> Any:
    """``A.from_dict`` of one saved transform, its argument errors and unknown arguments as
    one line naming it."""
    name = node.get("__class_fullname__")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            transform = A.from_dict({"transform": node})
        except (ValueError, TypeError, KeyError) as err:
            raise ArgumentError(f"{where}: {name}: bad argument: {_one_line(err)}") from err
    for warning in caught:
        message = str(warning.message)
        if "not valid for transform" in message:
            raise ArgumentError(f"{where}: {message}.")
        if not any(expected in message for expected in _EXPECTED_WARNINGS):
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    return transform


def _probe(pipeline: A.Compose, where: str, name: str) -> None:
    """Run ``pipeline`` on the probe image; refuse what fails or leaves no uint8 RGB image."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*_PROBE_SIZE, 3), dtype=np.uint8)
    try:
        out, objects = augment(pipeline, random.Random(0), image, _PROBE_OBJECTS)
    except Exception as err:  # any failure of a user's transform: named, one line
        raise ArgumentError(
            f"{where}: {name} cannot be applied to a training image with boxes: {_one_line(err)}"
        ) from err
    if not (isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.ndim == 3):
        kind = f"{type(out).__name__} of {getattr(out, 'dtype', '?')}"
        raise ArgumentError(
            f"{where}: {name} turns the image into a {kind}; the training needs uint8 RGB "
            f"pixels (the model's image processor rescales and normalises them itself)."
        )
    if out.shape[2] != 3:
        raise ArgumentError(f"{where}: {name} leaves {out.shape[2]} channels; the model needs RGB.")
    height, width = out.shape[:2]
    if not _boxes_inside(objects["bbox"], width, height):
        raise ArgumentError(f"{where}: {name} leaves boxes outside the image.")


def _boxes_inside(boxes: Sequence[Sequence[float]], width: int, height: int) -> bool:
    return all(
        w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width + 1e-3 and y + h <= height + 1e-3
        for x, y, w, h in boxes
    )


def _one_line(err: Exception) -> str:
    """An exception as one short line: pydantic's list of errors by its first one."""
    cause = err if isinstance(err, ValidationError) else err.__cause__  # albumentations wraps it
    if isinstance(cause, ValidationError):
        first = cause.errors()[0]
        field = ".".join(str(part) for part in first["loc"][:1]) or "value"
        if first["type"] == "missing":
            return f"missing argument {field}"
        return f"{field}={first.get('input')!r}: {first['msg']}"
    if isinstance(err, KeyError):
        return f"missing or unknown key {err}"
    return " ".join(str(err).split())
