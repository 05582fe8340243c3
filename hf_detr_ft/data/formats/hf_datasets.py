"""Read a Hugging Face ``datasets`` detection dataset (the ``cppe-5`` schema) as COCO content.

Expected columns: ``image``, ``objects`` with ``bbox`` (``[x, y, w, h]`` pixels) and
``category`` (a ``ClassLabel``, whose names become the classes; ``categories`` as in
``datasets``' image-folder detection metadata), optionally ``objects.id``,
``objects.area``, ``image_id``, ``width``, ``height``. The dataset is a folder written by
``save_to_disk``; a folder of data files read by ``datasets.load_dataset`` as the transformers
example scripts read one (Parquet files as the Hub stores datasets, e.g. a snapshot from
``huggingface-cli download --repo-type dataset``, or an image folder with ``metadata.jsonl``;
split names come from the file or folder names or the README's ``configs``); or a Hub id
(``owner/name``, or ``cppe-5`` as the transformers example names it), read by
``load_dataset`` from the Hub or, offline, from its cache; failing that, the error says how
to bring the dataset over as a folder. Images are carried inside the records (as bytes, or
as paths where the dataset stores paths), and boxes are relative to the image as
``datasets`` decodes it (EXIF applied).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    IterableDataset,
    IterableDatasetDict,
    load_dataset,
    load_from_disk,
)
from datasets import Image as ImageFeature

from ...errors import DatasetError
from ..layouts import SplitFiles
from ..records import CocoFile
from ..splits import canonical_split

logger = logging.getLogger(__name__)

#: ``owner/name``, or a name without owner as the transformers example's default ``cppe-5``.
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
#: Data files of a dataset as the Hub stores it (``data/train-*.parquet``,
#: ``<config>/train/*.parquet``) or of an image folder with ``datasets``' detection metadata
#: (``train/metadata.jsonl``: ``file_name``, ``objects``).
DATA_FILE_PATTERNS = (
    "*.parquet",
    "*/*.parquet",
    "*/*/*.parquet",
    "metadata.jsonl",
    "*/metadata.jsonl",
    "metadata.csv",
    "*/metadata.csv",
)


def is_saved_dataset(root: Path) -> bool:
    return (root / "dataset_dict.json").is_file() or (root / "dataset_info.json").is_file()


def has_data_files(root: Path) -> bool:
    """Files that ``datasets.load_dataset(root)`` reads (:data:`DATA_FILE_PATTERNS`)."""
    return any(next(root.glob(pattern), None) for pattern in DATA_FILE_PATTERNS)


def looks_like_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and not Path(name).expanduser().exists()


def read_hf_dataset(source: str | Path) -> list[CocoFile]:
    """One :class:`CocoFile` per split of a ``save_to_disk`` folder or a Hub dataset."""
    splits = load_hf_splits(source)
    coco_files, next_annotation_id = [], 1
    for name, dataset in splits.items():
        split = canonical_split(name)
        if split is None:
            logger.warning("%s: split %r is not train/validation/test; skipped.", source, name)
            continue
        key = check_schema(dataset, source, name)
        names = _class_names(dataset, key, source)
        rows = dataset.cast_column("image", ImageFeature(decode=False))
        coco = rows_to_coco(enumerate(rows), split, name, source, names, key, next_annotation_id)
        next_annotation_id += len(coco.annotations)
        coco_files.append(coco)
    if not coco_files:
        raise DatasetError(f"{source} has no train, validation or test split ({list(splits)}).")
    return coco_files


def rows_to_coco(
    rows: Iterable[tuple[int, dict[str, Any]]],
    split: str,
    name: str,
    source: str | Path,
    class_names: list[str],
    key: str,
    first_annotation_id: int = 1,
) -> CocoFile:
    """``(row index, row)`` pairs of split ``name`` (images not decoded) as COCO content, for
    :func:`~..records.to_records` to check: a whole split, or a batch of a stream."""
    categories = [{"id": i, "name": n} for i, n in enumerate(class_names)]
    where = Path(str(source)) / name
    coco = CocoFile(SplitFiles(split, where, where), categories, [], [])
    coco.boxes_as_displayed = True
    next_annotation_id = first_annotation_id
    for index, row in rows:
        image_id = int(row.get("image_id", index))
        size = {"width": row.get("width"), "height": row.get("height")}
        coco.images.append({"id": image_id, "file_name": f"{name}[{index}]", **size})
        coco.embedded_images[image_id] = row["image"]
        coco.image_sources[image_id] = (str(where), f"row {index} (image_id {image_id})")
        objects = _columns(row["objects"])
        for k, (bbox, category) in enumerate(zip(objects["bbox"], objects[key])):
            ann_id = next_annotation_id
            next_annotation_id += 1
            coco.annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": bbox,
                    "area": (objects.get("area") or [None] * (k + 1))[k],
                }
            )
            coco.annotation_sources[ann_id] = (str(where), f"row {index}, object {k}")
    return coco


def load_hf_splits(
    source: str | Path, streaming: bool = False
) -> DatasetDict | IterableDatasetDict:
    """The splits of ``source``; ``streaming``: read as they are iterated (``load_dataset``'s
    ``streaming=True``), for data files and Hub ids, never downloaded whole."""
    path = Path(source).expanduser()
    if path.is_dir() and is_saved_dataset(path):
        try:
            loaded = load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as err:
            raise DatasetError(f"Cannot load the saved dataset in {path}: {err}") from err
    elif path.is_dir():
        try:
            loaded = load_dataset(str(path), streaming=streaming)
        except Exception as err:  # datasets raises many kinds for unreadable data files
            raise DatasetError(
                f"Cannot load the dataset files in {path} with datasets.load_dataset "
                f"({type(err).__name__}: {err})."
            ) from err
    else:
        try:
            loaded = load_dataset(str(source), streaming=streaming)
        except Exception as err:  # offline, not found, gated: all mean "not reachable from here"
            raise DatasetError(
                f"{source!r} is not a folder, and loading it as a Hugging Face Hub dataset "
                f"failed ({type(err).__name__}: {err}). Check the id and your network; offline, "
                "run datasets.load_dataset(ID).save_to_disk(FOLDER) where the Hub is reachable "
                "and pass FOLDER."
            ) from err
    if isinstance(loaded, DatasetDict | IterableDatasetDict):
        return loaded
    return (IterableDatasetDict if streaming else DatasetDict)({"train": loaded})


def check_schema(dataset: Dataset | IterableDataset, source: str | Path, split: str) -> str:
    """Refuse a split without the cppe-5 detection columns; the key of its categories."""
    missing = [c for c in ("image", "objects") if c not in dataset.features]
    if not missing and not (_category_key(dataset) and "bbox" in _object_features(dataset)):
        missing = ["objects.bbox", "objects.category"]
    if missing:
        raise DatasetError(
            f"{source} ({split} split) lacks the column(s) {missing}; expected the cppe-5 "
            "detection schema: image, objects {bbox [x, y, w, h] pixels, category ClassLabel}."
        )
    return _category_key(dataset)


def _class_names(dataset: Dataset, key: str, source: str | Path) -> list[str]:
    """The ClassLabel names of ``objects.<key>``, else ``class_0``, ``class_1``, ... (warned)."""
    names = class_label_names(dataset, key)
    if names is not None:
        return names
    ids = {c for objects in dataset["objects"] for c in _columns(objects)[key]}
    count = int(max(ids)) + 1 if ids else 1
    logger.warning(
        "%s: objects.%s is not a ClassLabel, so there are no class names; using class_0..class_%d.",
        source,
        key,
        count - 1,
    )
    return [f"class_{i}" for i in range(count)]


def class_label_names(dataset: Dataset | IterableDataset, key: str) -> list[str] | None:
    """The class names of ``objects.<key>`` if it is a ``ClassLabel`` (else ``None``)."""
    category = _object_features(dataset)[key]
    label = getattr(category, "feature", category)
    return list(label.names) if isinstance(label, ClassLabel) else None


def _columns(objects: Any) -> dict[str, list[Any]]:
    """``objects`` as a dict of lists, whether stored so or as a list of dicts."""
    if isinstance(objects, dict):
        return objects
    return {key: [o[key] for o in objects] for key in (objects[0] if objects else {})} or {
        "bbox": [],
        "category": [],
    }


def _category_key(dataset: Dataset) -> str | None:
    """``category`` (the Hub's detection datasets) or ``categories`` (image-folder metadata)."""
    objects = _object_features(dataset)
    keys = objects.keys() if isinstance(objects, dict) else ()
    return next((key for key in ("category", "categories") if key in keys), None)


def _object_features(dataset: Dataset) -> Any:
    objects = dataset.features.get("objects")
    return getattr(objects, "feature", objects)
