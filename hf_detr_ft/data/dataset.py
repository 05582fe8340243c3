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
import os
from dataclasses import dataclass
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, List, Value
from datasets import Image as ImageFeature
from datasets.table import InMemoryTable

from ..errors import DatasetError
from ..wording import plural
from .cache import Contents, SplitWriter, cache_key, cache_root, cached_build
from .formats import read_annotations, resolve_format
from .layouts import SplitFiles, find_splits
from .record_columns import RecordColumns
from .records import CocoFile, LabelMap, SkipReport, build_label_map, check_split

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
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> DetectionDataset:
    """Read a dataset folder or Hub dataset (format detected or forced) and check all of it.

    ``num_classes``, when given, must equal the number of classes in the annotations; a
    mismatch is an error that names both numbers and the classes found. ``strict`` turns every
    dropped image or box into an error. A COCO folder's checked splits are built once into
    the dataset cache (``cache_dir``; ``cache=False`` reads the folder every time; see
    :mod:`.cache`) and memory-mapped afterwards. See docs/datasets.md for the formats, the
    checks and the cache.
    """
    source = Path(dataset_dir).expanduser()
    dataset_format = resolve_format(dataset_dir, dataset_format, layout)
    root = source.resolve() if dataset_format != "hf" or source.is_dir() else Path(dataset_dir)
    read: list[str] = []  # the layout, once the folder has been read (not on a cache hit)

    def build(write: SplitWriter) -> Contents:
        _, found, coco_files = read_annotations(dataset_dir, dataset_format, layout)
        read.append(found)
        return _read_splits(coco_files, root, num_classes, strict, write)

    entry, found_layout, split_files = _cache_entry(
        source, dataset_format, layout, strict, cache, cache_dir
    )
    if entry is None:
        label_map, splits, skipped = build(_in_memory)
    else:
        label_map, splits, skipped = cached_build(entry, build)
        check_num_classes(label_map, num_classes, root)
        if not read:  # a hit: say what the build found, as reading the folder would have
            read.append(found_layout)
            for files in split_files:
                skipped[files.split].log(files.annotation_file)
    read_layout = read[0]
    if "validation" not in splits and validation_fraction:
        splits.update(split_off_validation(splits["train"], validation_fraction, seed))

    ordered = DatasetDict({name: splits[name] for name in SPLIT_ORDER if name in splits})
    summary = ", ".join(f"{name}: {plural(len(ds), 'image')}" for name, ds in ordered.items())
    logger.info(
        "Loaded %s (%s, %s layout): %s; classes %s",
        root,
        dataset_format,
        read_layout,
        summary,
        label_map.names,
    )
    return DetectionDataset(ordered, label_map, read_layout, root, skipped, dataset_format)


def _read_splits(
    coco_files: list[CocoFile],
    root: Path,
    num_classes: int | None,
    strict: bool,
    write: SplitWriter,
) -> Contents:
    """Check every split and hand its records to ``write`` (in memory, or the cache's files)."""
    label_map = build_label_map(coco_files)
    check_num_classes(label_map, num_classes, root)
    features = detection_features(label_map.names)
    splits, skipped = {}, {}
    while coco_files:  # popped: a split's parsed JSON is freed before its records are written
        coco = coco_files.pop(0)
        files = coco.files
        records, skipped[files.split] = check_split(coco, label_map, strict=strict)
        del coco
        if not records:
            raise DatasetError(
                f"The {files.split} split ({files.annotation_file}) has no usable images: "
                f"all were dropped ({dict(skipped[files.split].counts)})."
            )
        splits[files.split] = write(files.split, records, features)
        del records
    if "train" not in splits:
        raise DatasetError(f"No training split in {root} (found: {sorted(splits)}).")
    return label_map, splits, skipped


def check_num_classes(label_map: LabelMap, num_classes: int | None, root: Path) -> None:
    """Fail before training when the caller's ``num_classes`` and the annotations disagree:
    a head of the wrong size would train without error and never predict some classes."""
    if num_classes is not None and num_classes != len(label_map.names):
        raise DatasetError(
            f"num_classes={num_classes}, but the annotations in {root} define "
            f"{len(label_map.names)} classes: {label_map.names}. Pass "
            f"num_classes={len(label_map.names)} or fix the category list."
        )


def _in_memory(split: str, records: RecordColumns, features: Features) -> Dataset:
    return Dataset(InMemoryTable(records.table(features)), info=DatasetInfo(features=features))


def _cache_entry(
    source: Path,
    dataset_format: str,
    layout: str,
    strict: bool,
    cache: bool,
    cache_dir: str | Path | None,
) -> tuple[Path | None, str, list[SplitFiles]]:
    """The cache entry of a COCO folder (``None``: not cached), its layout and split files.

    Only COCO folders are cached: their few annotation files make a cheap key, and COCO is
    the format of the datasets large enough to need it (a ``datasets`` folder is Arrow
    already; VOC and YOLO keep one file per image).
    """
    folder = cache_root(cache_dir) if cache else None
    if folder is None or dataset_format != "coco" or not _usable_cache(folder):
        return None, layout, []
    found_layout, split_files = find_splits(source, layout)
    key = cache_key(split_files, layout=found_layout, strict=strict)
    return folder / key, found_layout, split_files


def _usable_cache(folder: Path) -> bool:
    """Whether the cache folder exists or can be made, and is writable; if not, the run reads
    the dataset folder as without a cache, and says so (a read-only home is no reason to stop)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = err.strerror or str(err)
    else:
        if os.access(folder, os.W_OK | os.X_OK):
            return True
        reason = "not writable"
    logger.warning(
        "The dataset cache folder %s cannot be used (%s): reading the dataset without the "
        "cache. Set --dataset_cache_dir or HF_DETR_FT_CACHE to a writable folder to keep it.",
        folder,
        reason,
    )
    return False


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
    # keep_in_memory: only the index mapping (a cached split's files are never written to)
    parts = train.train_test_split(test_size=size, seed=seed, shuffle=True, keep_in_memory=True)
    logger.warning(
        "No validation split found: using %d of %d training images (seed %d) for validation.",
        size,
        len(train),
        seed,
    )
    return {"train": parts["train"], "validation": parts["test"]}
