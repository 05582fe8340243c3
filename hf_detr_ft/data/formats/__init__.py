"""Every dataset format read into the same per-split COCO content.

``auto`` detects the format from the folder's contents, in this order:

========  ==========================================================================
``hf``    a ``save_to_disk`` folder (``dataset_dict.json``), a Hub id (``owner/name``, ``cppe-5``)
``coco``  ``_annotations.coco.json`` split folders or ``annotations/instances_*.json``
``voc``   ``Annotations/*.xml`` (+ ``JPEGImages/``, ``ImageSets/Main/*.txt``)
``yolo``  ``data.yaml`` with ``names`` and ``train``/``val``/``test`` image folders
``hf``    none of those, but data files for ``datasets.load_dataset``: Parquet files (a Hub
          dataset downloaded as files) or an image folder's ``metadata.jsonl``
========  ==========================================================================
"""

from __future__ import annotations

from pathlib import Path

from ...errors import DatasetError
from ..layouts import find_splits, has_coco_annotations
from ..records import CocoFile, read_coco_file
from .hf_datasets import has_data_files, is_saved_dataset, looks_like_hub_id, read_hf_dataset
from .voc import is_voc, read_voc
from .yolo import find_yaml, read_yolo

FORMATS = ("auto", "coco", "voc", "yolo", "hf")


def detect_format(source: str | Path) -> str:
    """The format of ``source`` (a folder or a Hub id), or a clear error when none fits."""
    root = Path(source).expanduser()
    if not root.is_dir():
        if looks_like_hub_id(str(source)):
            return "hf"
        raise DatasetError(f"Dataset folder {root} does not exist or is not a folder.")
    checks = (
        ("hf", is_saved_dataset),
        ("coco", has_coco_annotations),
        ("voc", is_voc),
        ("yolo", lambda r: find_yaml(r) is not None),
        ("hf", has_data_files),  # last: it lists folders, maybe of many images
    )
    for name, check in checks:
        if check(root):
            return name
    raise DatasetError(
        f"No dataset found in {root}. Expected COCO (train/_annotations.coco.json or "
        "annotations/instances_train2017.json), Pascal VOC (Annotations/*.xml + JPEGImages/), "
        "YOLO (data.yaml + images/ + labels/), or a Hugging Face dataset (saved with "
        "save_to_disk, or its Parquet files as on the Hub); see docs/datasets.md."
    )


def resolve_format(source: str | Path, dataset_format: str = "auto", layout: str = "auto") -> str:
    """The format ``source`` is read as: ``dataset_format``, or detected for ``auto``
    (a forced COCO ``layout`` implies COCO)."""
    if dataset_format not in FORMATS:
        raise DatasetError(f"Unknown dataset format {dataset_format!r}; expected one of {FORMATS}.")
    if dataset_format == "auto":
        return "coco" if layout != "auto" else detect_format(source)
    return dataset_format


def read_annotations(
    source: str | Path, dataset_format: str = "auto", layout: str = "auto"
) -> tuple[str, str, list[CocoFile]]:
    """``(format, layout, one CocoFile per split)`` of a dataset folder or Hub id.

    ``layout`` (``roboflow`` or ``coco``) applies to COCO folders; forcing one implies COCO.
    """
    dataset_format = resolve_format(source, dataset_format, layout)
    if dataset_format == "hf":
        return "hf", "hf", read_hf_dataset(source)
    root = Path(source).expanduser()
    if dataset_format == "coco":
        layout, split_files = find_splits(root, layout)
        return "coco", layout, [read_coco_file(files) for files in split_files]
    if not root.is_dir():
        raise DatasetError(f"Dataset folder {root} does not exist or is not a folder.")
    reader = {"voc": read_voc, "yolo": read_yolo}[dataset_format]
    return dataset_format, dataset_format, reader(root)
