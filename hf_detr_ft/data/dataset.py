"""Build a ``datasets.DatasetDict`` from a dataset folder (COCO, Pascal VOC, YOLO) or a
Hugging Face dataset (:mod:`data.formats` reads them; :mod:`.records` checks them).

Schema of every split (the same as the Hub's ``cppe-5`` detection datasets)::

    image     Image(mode="RGB")   decoded lazily; EXIF orientation applied, converted to RGB
    image_id  int64               the image id of the source annotation file
    width     int32               image width in pixels, as annotated
    height    int32               image height in pixels, as annotated
    objects   {
      id        list[int64]       source annotation ids
      bbox      list[[x, y, w, h]] float32, pixels, top-left corner + size (COCO convention)
      category  list[ClassLabel]  contiguous class index 0..N-1; names in the ClassLabel
      area      list[float32]     object area in pixels (COCO's, at most the box area)
      iscrowd   list[bool]
    }

Split names are ``train``, ``validation`` and ``test``. When the folder has no validation split,
``validation_fraction`` of the training images (at least one) is split off with ``seed``
(``datasets.Dataset.train_test_split``), so the same seed always gives the same split;
``validation_fraction=0`` keeps the splits as they are (for inspecting and converting).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from datasets import Image as ImageFeature

from ..errors import DatasetError
from .formats import read_annotations
from .records import LabelMap, SkipReport, build_label_map, to_records

logger = logging.getLogger(__name__)

SPLIT_ORDER = ("train", "validation", "test")


@dataclass
class DetectionDataset:
    """A loaded dataset folder: the splits, the label map and what was skipped while reading."""

    splits: DatasetDict
    label_map: LabelMap
    layout: str
    root: Path
    skipped: dict[str, SkipReport]
    format: str = "coco"

    @property
    def class_names(self) -> list[str]:
        return self.label_map.names

    @property
    def eval_split(self) -> str:
        """The split used for the final evaluation: ``test`` when there is one."""
        return "test" if "test" in self.splits else "validation"


def detection_features(class_names: list[str]) -> Features:
    """The ``datasets`` features of a detection split (see the module docstring)."""
    return Features(
        {
            "image": ImageFeature(mode="RGB"),
            "image_id": Value("int64"),
            "width": Value("int32"),
            "height": Value("int32"),
            "objects": {
                "id": List(Value("int64")),
                "bbox": List(List(Value("float32"), length=4)),
                "category": List(ClassLabel(names=class_names)),
                "area": List(Value("float32")),
                "iscrowd": List(Value("bool")),
            },
        }
    )


def load_detection_dataset(
    dataset_dir: str | Path,
    num_classes: int | None = None,
    *,
    layout: str = "auto",
    dataset_format: str = "auto",
    validation_fraction: float = 0.1,
    seed: int = 42,
    strict: bool = False,
) -> DetectionDataset:
    """Read a dataset folder or Hub dataset (format detected or forced) and check all of it.

    ``num_classes``, when given, must equal the number of classes in the annotations; a
    mismatch is an error that names both numbers and the classes found. ``strict`` turns every
    dropped image or box into an error. See docs/datasets.md for the formats and the checks.
    """
    source = Path(dataset_dir).expanduser()
    dataset_format, layout, coco_files = read_annotations(dataset_dir, dataset_format, layout)
    root = source.resolve() if dataset_format != "hf" or source.is_dir() else Path(dataset_dir)
    label_map = build_label_map(coco_files)
    if num_classes is not None and num_classes != len(label_map.names):
        raise DatasetError(
            f"num_classes={num_classes}, but the annotations in {root} define "
            f"{len(label_map.names)} classes: {label_map.names}. Pass "
            f"num_classes={len(label_map.names)} or fix the category list."
        )

    features = detection_features(label_map.names)
    splits, skipped = {}, {}
    for coco in coco_files:
        split = coco.files.split
        records, skipped[split] = to_records(coco, label_map, strict=strict)
        if not records:
            raise DatasetError(
                f"The {split} split ({coco.files.annotation_file}) has no usable images: "
                f"all were dropped ({dict(skipped[split].counts)})."
            )
        splits[split] = Dataset.from_list(records, features=features)
    if "train" not in splits:
        raise DatasetError(f"No training split in {root} (found: {sorted(splits)}).")
    if "validation" not in splits and validation_fraction:
        splits.update(split_off_validation(splits["train"], validation_fraction, seed))

    ordered = DatasetDict({name: splits[name] for name in SPLIT_ORDER if name in splits})
    summary = ", ".join(f"{name}: {len(ds)} images" for name, ds in ordered.items())
    logger.info(
        "Loaded %s (%s, %s layout): %s; classes %s",
        root,
        dataset_format,
        layout,
        summary,
        label_map.names,
    )
    return DetectionDataset(ordered, label_map, layout, root, skipped, dataset_format)


def split_off_validation(train: Dataset, fraction: float, seed: int) -> dict[str, Dataset]:
    """Split a seeded validation set off the training images (at least one image each)."""
    if len(train) < 2:
        raise DatasetError(
            "There is no validation split and the training split has fewer than 2 images, "
            "so none can be split off. Add a validation split (valid/ or instances_val*.json)."
        )
    if not 0 < fraction < 1:
        raise DatasetError(f"validation_fraction must be between 0 and 1, got {fraction}.")
    size = min(max(1, round(len(train) * fraction)), len(train) - 1)
    parts = train.train_test_split(test_size=size, seed=seed, shuffle=True)
    logger.warning(
        "No validation split found: using %d of %d training images (seed %d) for validation.",
        size,
        len(train),
        seed,
    )
    return {"train": parts["train"], "validation": parts["test"]}
