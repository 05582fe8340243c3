"""Read COCO annotation files into annotation records.

A record is one image with its objects, in the schema of :mod:`hf_detr_ft.dataset`::

    {"image": "/abs/path.jpg", "image_id": 7, "width": 640, "height": 480,
     "objects": {"id": [...], "bbox": [[x, y, w, h], ...], "category": [0..N-1, ...],
                 "area": [...], "iscrowd": [...]}}

Source category ids may be anything (non-contiguous, starting at 0 or 1); they are mapped to
contiguous class indices by a :class:`LabelMap`, which keeps the source ids so predictions can
be written back in them. Problems that can be repaired (a box overhanging the image) are
repaired and counted; unusable annotations (zero-area boxes, boxes wholly outside the image,
annotations of unknown images, missing image files) are dropped and counted. Problems that make
the dataset meaningless (unknown category ids, unreadable JSON) raise :class:`DatasetError`.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import DatasetError
from .layouts import SplitFiles

logger = logging.getLogger(__name__)

_EXAMPLES_PER_REASON = 3


@dataclass(frozen=True)
class LabelMap:
    """Class names in model order, and the source category id of each."""

    names: list[str]
    source_ids: list[int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {cid: i for i, cid in enumerate(self.source_ids)})

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    def index(self, source_id: int) -> int | None:
        return self._index.get(source_id)


@dataclass
class CocoFile:
    """The parsed content of one split's COCO annotation file."""

    files: SplitFiles
    categories: list[dict[str, Any]]
    images: list[dict[str, Any]]
    annotations: list[dict[str, Any]]


@dataclass
class SkipReport:
    """What was repaired or dropped while reading one split, with a few examples of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < _EXAMPLES_PER_REASON:
            shown.append(example)

    def log(self, source: Path) -> None:
        for reason, count in self.counts.items():
            examples = "; ".join(self.examples[reason])
            logger.warning("%s: %d %s (e.g. %s)", source, count, reason, examples)


def read_coco_file(files: SplitFiles) -> CocoFile:
    """Parse one COCO annotation file, checking the keys every later step relies on."""
    path = files.annotation_file
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"Cannot read COCO annotations from {path}: {err}") from err
    if not isinstance(data, dict):
        raise DatasetError(f"{path} is not a COCO annotation file (top level is not an object).")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path} has no {key!r} list; is it a COCO detection file?")
    for i, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise DatasetError(f"{path}: categories[{i}] needs an 'id' and a 'name': {category!r}")
    return CocoFile(files, data["categories"], data["images"], data.get("annotations") or [])


def build_label_map(coco_files: list[CocoFile]) -> LabelMap:
    """Merge the categories of all splits into one label map, ordered by source id.

    A category that is the ``supercategory`` of other categories and has no boxes of its own is
    a grouping node (Roboflow exports one with id 0), not a class, and is left out.
    """
    categories: dict[int, dict[str, Any]] = {}
    for coco in coco_files:
        for category in coco.categories:
            cid = int(category["id"])
            known = categories.setdefault(cid, category)
            if known["name"] != category["name"]:
                raise DatasetError(
                    f"Category id {cid} is {known['name']!r} in one split but "
                    f"{category['name']!r} in {coco.files.annotation_file}."
                )
    used_ids = {a.get("category_id") for coco in coco_files for a in coco.annotations}
    parents = {c.get("supercategory") for c in categories.values()}
    classes = [
        c for cid, c in sorted(categories.items()) if cid in used_ids or c["name"] not in parents
    ]
    if not classes:
        raise DatasetError(
            f"No categories in {coco_files[0].files.annotation_file}; nothing to learn."
        )
    return LabelMap([str(c["name"]) for c in classes], [int(c["id"]) for c in classes])


def to_records(coco: CocoFile, label_map: LabelMap) -> tuple[list[dict[str, Any]], SkipReport]:
    """Turn one split's COCO content into annotation records, repairing or dropping bad boxes."""
    path = coco.files.annotation_file
    report = SkipReport()
    records: dict[int, dict[str, Any]] = {}
    for entry in coco.images:
        record = _image_record(entry, coco.files, report)
        if record is not None:
            records[record["image_id"]] = record

    known_images = {int(e["id"]) for e in coco.images if isinstance(e, dict) and "id" in e}
    for ann in coco.annotations:
        image_id = ann.get("image_id")
        if image_id not in known_images:
            report.add("annotations of unknown images dropped", f"annotation {ann.get('id')}")
            continue
        record = records.get(image_id)
        if record is None:  # the image itself was dropped and counted
            continue
        label = label_map.index(ann.get("category_id"))
        if label is None:
            raise DatasetError(
                f"{path}: annotation {ann.get('id')} has category_id {ann.get('category_id')!r}, "
                f"which is not a class of this dataset (classes: "
                f"{dict(zip(label_map.source_ids, label_map.names))})."
            )
        box = _clean_box(ann, record, report)
        if box is None:
            continue
        objects = record["objects"]
        objects["id"].append(int(ann.get("id", len(objects["id"]))))
        objects["bbox"].append(box)
        objects["category"].append(label)
        box_area = box[2] * box[3]  # a segment's area never exceeds its (clipped) box's
        objects["area"].append(min(float(ann.get("area") or box_area), box_area))
        objects["iscrowd"].append(bool(ann.get("iscrowd", 0)))

    report.log(path)
    return list(records.values()), report


def _image_record(entry: Any, files: SplitFiles, report: SkipReport) -> dict[str, Any] | None:
    path = files.annotation_file
    if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
        raise DatasetError(f"{path}: image entry needs an 'id' and a 'file_name': {entry!r}")
    image_path = _resolve_image(files, str(entry["file_name"]))
    if image_path is None:
        report.add("images with a missing file dropped", str(files.image_dir / entry["file_name"]))
        return None
    width, height = entry.get("width"), entry.get("height")
    if not width or not height:
        try:
            with Image.open(image_path) as image:
                width, height = image.size
        except OSError as err:
            report.add("unreadable images dropped", f"{image_path} ({err})")
            return None
    return {
        "image": str(image_path),
        "image_id": int(entry["id"]),
        "width": int(width),
        "height": int(height),
        "objects": {"id": [], "bbox": [], "category": [], "area": [], "iscrowd": []},
    }


def _resolve_image(files: SplitFiles, file_name: str) -> Path | None:
    """Find an image whether its file name is relative to the image folder or the dataset root."""
    for base in (files.image_dir, files.annotation_file.parent.parent, files.image_dir.parent):
        candidate = base / file_name
        if candidate.is_file():
            return candidate.resolve()
    return None


def _clean_box(ann: dict, record: dict, report: SkipReport) -> list[float] | None:
    """Clip a COCO ``[x, y, w, h]`` box to its image; ``None`` when nothing usable is left."""
    where = f"annotation {ann.get('id')} of {Path(record['image']).name}"
    bbox = ann.get("bbox")
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        report.add("annotations without a valid bbox dropped", f"{where}: {bbox!r}")
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        report.add("boxes with zero, negative or NaN size dropped", f"{where}: {bbox}")
        return None
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, record["width"]), min(y + h, record["height"])
    if x1 <= x0 or y1 <= y0:
        report.add("boxes wholly outside their image dropped", f"{where}: {bbox}")
        return None
    if (x0, y0, x1, y1) != (x, y, x + w, y + h):
        report.add("boxes clipped to their image", f"{where}: {bbox}")
    return [x0, y0, x1 - x0, y1 - y0]
