"""Build a ``datasets.DatasetDict`` from a COCO dataset folder.

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
(``datasets.Dataset.train_test_split``), so the same seed always gives the same split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from datasets import Image as ImageFeature

from .coco_annotations import LabelMap, SkipReport, build_label_map, read_coco_file, to_records
from .errors import DatasetError
from .layouts import find_splits

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
    validation_fraction: float = 0.1,
    seed: int = 42,
) -> DetectionDataset:
    """Read a COCO dataset folder (layout detected or forced) into a :class:`DetectionDataset`.

    ``num_classes``, when given, must equal the number of classes in the annotations; a
    mismatch is an error that names both numbers and the classes found.
    """
    root = Path(dataset_dir).expanduser().resolve()
    layout, split_files = find_splits(root, layout)
    coco_files = [read_coco_file(files) for files in split_files]
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
        records, skipped[coco.files.split] = to_records(coco, label_map)
        if not records:
            raise DatasetError(
                f"The {coco.files.split} split ({coco.files.annotation_file}) has no usable images."
            )
        splits[coco.files.split] = Dataset.from_list(records, features=features)
    if "train" not in splits:
        raise DatasetError(f"No training split in {root} (found: {sorted(splits)}).")
    if "validation" not in splits:
        splits.update(split_off_validation(splits["train"], validation_fraction, seed))

    ordered = DatasetDict({name: splits[name] for name in SPLIT_ORDER if name in splits})
    summary = ", ".join(f"{name}: {len(ds)} images" for name, ds in ordered.items())
    logger.info("Loaded %s (%s layout): %s; classes %s", root, layout, summary, label_map.names)
    return DetectionDataset(ordered, label_map, layout, root, skipped)


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
