"""Read COCO annotation content into annotation records, checking every image and box.

A record is one image with its objects, in the schema of :mod:`hf_detr_ft.data.dataset`::

    {"image": "/abs/path.jpg", "image_id": 7, "width": 640, "height": 480,
     "objects": {"id": [...], "bbox": [[x, y, w, h], ...], "category": [0..N-1, ...],
                 "area": [...], "iscrowd": [...]}}

Every format (COCO, Pascal VOC, YOLO, Hugging Face datasets) is first read into a
:class:`CocoFile` per split, so the same checks apply to all of them. Source category ids may
be anything (non-contiguous, starting at 0 or 1); a :class:`LabelMap` maps them to contiguous
class indices and keeps the source ids so predictions can be written back in them.

Policy (see docs/datasets.md): what can be repaired is repaired and counted (boxes clipped to
the image, colour modes converted to RGB, EXIF rotation applied to image and boxes together);
what is unusable is dropped and counted (zero-area boxes, boxes wholly outside the image,
annotations of unknown images, missing or unreadable image files), and with ``strict=True``
every drop is an error instead; what makes the dataset meaningless (unknown category ids,
conflicting image ids, unreadable annotation files, empty splits) raises :class:`DatasetError`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import DatasetError
from .box_checks import (
    INVALID_BBOX,
    NO_SIZE,
    OUTSIDE,
    UNKNOWN_CATEGORY,
    UNKNOWN_IMAGE,
    CheckedBoxes,
    ImageColumns,
    check_boxes,
    objects_by_record,
)
from .image_files import (
    ImageInfo,
    eight_bit_png,
    inspect_or_error,
    on_every_core,
)
from .layouts import SplitFiles
from .record_columns import RecordColumns

logger = logging.getLogger(__name__)

_EXAMPLES_PER_REASON = 3
FIXED, DROPPED, WARNING = "fixed", "dropped", "warning"


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

    @property
    def class_of(self) -> dict[int, int]:
        """Class index by source category id."""
        return self._index


@dataclass
class CocoFile:
    """One split's annotations as COCO content, whichever format they were read from.

    ``image_sources`` / ``annotation_sources`` name, per image or annotation id, the file and
    record a problem is reported against (a VOC XML file, a YOLO label file and line); COCO
    content needs none. ``embedded_images`` holds ``{"bytes", "path"}`` images of datasets that
    carry their images inside (Hugging Face datasets), by image id. ``boxes_as_displayed``
    says the boxes are relative to the EXIF-oriented image (YOLO, Hugging Face datasets).
    """

    files: SplitFiles
    categories: list[dict[str, Any]]
    images: list[dict[str, Any]]
    annotations: list[dict[str, Any]]
    image_sources: dict[int, tuple[str, str]] = field(default_factory=dict)
    annotation_sources: dict[int, tuple[str, str]] = field(default_factory=dict)
    embedded_images: dict[int, dict[str, Any]] = field(default_factory=dict)
    boxes_as_displayed: bool = False


@dataclass(frozen=True)
class Problem:
    """One problem found in the data: what happened, why, and the file and record it is in."""

    kind: str  # FIXED, DROPPED or WARNING
    reason: str
    file: str
    record: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.file}: {self.record}" + (f": {self.detail}" if self.detail else "")


@dataclass
class SkipReport:
    """What was repaired, dropped or found suspicious while reading one split.

    ``counts`` counts every problem by reason, ``problems`` lists them all. With ``strict``
    every drop raises a :class:`DatasetError` instead.
    """

    strict: bool = False
    counts: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)

    @property
    def examples(self) -> dict[str, list[str]]:
        """The first few problems of each reason, as text."""
        return self._examples()

    def _examples(self, source: str | None = None) -> dict[str, list[str]]:
        shown: dict[str, list[str]] = {}
        for problem in self.problems:
            examples = shown.setdefault(problem.reason, [])
            if len(examples) < _EXAMPLES_PER_REASON:
                text = str(problem)
                examples.append(text.removeprefix(f"{source}: ") if source else text)
        return shown

    def fixed(self, reason: str, file: str | Path, record: str, detail: str = "") -> None:
        self._add(Problem(FIXED, reason, str(file), record, detail))

    def dropped(self, reason: str, file: str | Path, record: str, detail: str = "") -> None:
        problem = Problem(DROPPED, reason, str(file), record, detail)
        if self.strict:
            raise DatasetError(
                f"{problem} ({reason}; strict=True makes every drop an error). Fix the "
                "annotation or the file, or leave strict off to drop and count it."
            )
        self._add(problem)

    def warn(self, reason: str, file: str | Path, record: str, detail: str = "") -> None:
        self._add(Problem(WARNING, reason, str(file), record, detail))

    def _add(self, problem: Problem) -> None:
        self.counts[problem.reason] += 1
        self.problems.append(problem)

    def log(self, source: str | Path) -> None:
        for reason, examples in self._examples(str(source)).items():
            logger.warning(
                "%s: %d %s (e.g. %s)", source, self.counts[reason], reason, "; ".join(examples)
            )


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
    annotations = data.get("annotations") or []
    if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
        raise DatasetError(f"{path}: 'annotations' must be a list of objects.")
    return CocoFile(files, data["categories"], data["images"], annotations)


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
    names = [str(c["name"]) for c in classes]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        ids = {name: [c["id"] for c in classes if str(c["name"]) == name] for name in twice}
        raise DatasetError(
            f"{coco_files[0].files.annotation_file}: the class name(s) "
            + "; ".join(f"{name!r} (category ids {ids[name]})" for name in twice)
            + " name several categories; a model's labels must be distinct. Merge or rename them."
        )
    return LabelMap([str(c["name"]) for c in classes], [int(c["id"]) for c in classes])


def to_records(
    coco: CocoFile, label_map: LabelMap, *, strict: bool = False
) -> tuple[list[dict[str, Any]], SkipReport]:
    """:func:`check_split`'s records as dicts, for the code that wants rows (streaming)."""
    records, report = check_split(coco, label_map, strict=strict)
    return list(records.rows()), report


def check_split(
    coco: CocoFile, label_map: LabelMap, *, strict: bool = False
) -> tuple[RecordColumns, SkipReport]:
    """Turn one split's COCO content into annotation records, repairing or dropping bad input.

    Consumes ``coco.annotations`` (left empty): they are let go a chunk at a time as their
    boxes are checked, so a COCO-scale split is never held twice in memory. The boxes are
    checked with numpy (:mod:`.box_checks`), their problems reported in annotation order, and
    the records kept as columns (:class:`.RecordColumns`).
    """
    path = coco.files.annotation_file
    report = SkipReport(strict=strict)
    if not coco.images:
        raise DatasetError(
            f"The {coco.files.split} split ({path}) lists no images. Add images to it or remove it."
        )
    records: dict[int, _Record] = {}
    by_file: dict[str, int] = {}
    aliases: dict[int, int] = {}  # image id -> id of the first entry of the same file
    known_images: set[int] = set()
    # each file looked up (a stat and a realpath) and decoded once, on every core
    names = list(dict.fromkeys(str(e.get("file_name")) for e in coco.images if isinstance(e, dict)))
    checked = dict(
        zip(
            names,
            on_every_core(
                partial(_locate_and_inspect, coco.files),
                names,
                f"Checking {coco.files.split} images",
            ),
            strict=True,
        )
    )
    del names
    for entry in coco.images:
        image_id = _image_id(entry, path)
        if image_id in known_images:
            _duplicate_id(coco, entry, image_id, records, report)
            continue
        known_images.add(image_id)
        record = _image_record(coco, entry, image_id, report, checked)
        if record is None:
            continue
        image = record.data["image"]
        first = by_file.setdefault(image, image_id) if isinstance(image, str) else image_id
        if first != image_id:
            aliases[image_id] = first
            report.fixed(
                "image files listed twice merged",
                *_image_source(coco, image_id, entry),
                f"same file as image {first}; its boxes are added to that image",
            )
            continue
        records[image_id] = record

    del checked
    file_names = {e.get("id"): e.get("file_name") for e in coco.images}
    kept = list(records.values())
    boxes = check_boxes(
        coco.annotations,  # emptied: see the docstring
        _record_positions(records, aliases, known_images),
        label_map.class_of,
        ImageColumns.of([(*_size_of(r.data), r.orientation, *r.stored_size) for r in kept]),
        desc=f"Checking {coco.files.split} boxes",
    )
    for i, ann in boxes.annotations.items():  # in order: the first error comes first
        _report_box(coco, ann, file_names, boxes, i, kept, label_map, report)
    del records
    report.log(path)
    offsets, objects = objects_by_record(boxes, len(kept))
    return RecordColumns([r.data for r in kept], offsets, objects), report


@dataclass
class _Record:
    """A record under construction, with how its boxes are moved to the displayed image."""

    data: dict[str, Any]
    orientation: int = 1  # EXIF orientation to apply to the boxes
    stored_size: tuple[int, int] = (0, 0)


def _image_id(entry: Any, path: Path) -> int:
    if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
        raise DatasetError(f"{path}: image entry needs an 'id' and a 'file_name': {entry!r}")
    try:
        return int(entry["id"])
    except (TypeError, ValueError) as err:
        raise DatasetError(f"{path}: image id {entry['id']!r} is not an integer.") from err


def _duplicate_id(
    coco: CocoFile, entry: dict, image_id: int, records: dict[int, _Record], report: SkipReport
) -> None:
    """A second image entry with a known id: harmless if it repeats the first, else an error."""
    first = next(e for e in coco.images if e.get("id") == entry["id"])
    if first.get("file_name") != entry.get("file_name"):
        raise DatasetError(
            f"{coco.files.annotation_file}: image id {image_id} is used by two images, "
            f"{first.get('file_name')!r} and {entry.get('file_name')!r}, so its annotations "
            "are ambiguous. Give every image its own id."
        )
    report.fixed(
        "duplicate image entries merged",
        *_image_source(coco, image_id, entry),
        "the same id and file listed twice; read once",
    )


def _image_source(coco: CocoFile, image_id: int, entry: dict) -> tuple[str, str]:
    default = (str(coco.files.annotation_file), f"image {image_id} ({entry.get('file_name')})")
    return coco.image_sources.get(image_id, default)


def _annotation_source(coco: CocoFile, ann: dict, file_names: dict) -> tuple[str, str]:
    record = f"annotation {ann.get('id')}"
    file_name = file_names.get(ann.get("image_id"))
    if file_name is not None:
        record += f" of image {ann.get('image_id')} ({file_name})"
    default = (str(coco.files.annotation_file), record)
    return coco.annotation_sources.get(ann.get("id"), default)


def _image_record(
    coco: CocoFile,
    entry: dict,
    image_id: int,
    report: SkipReport,
    checked: dict[str, tuple[str | None, ImageInfo | Exception | None]],
) -> _Record | None:
    """Check an image entry against its file (``checked``: file name -> path found and what
    :func:`_locate_and_inspect` found in it); ``None`` (counted) when it cannot be used."""
    file, where = _image_source(coco, image_id, entry)
    embedded = coco.embedded_images.get(image_id)
    if embedded is not None:
        # datasets reads an existing file at "path" rather than the bytes: keep only the bytes
        path = None if embedded["bytes"] else embedded["path"]
        image: Any = {"bytes": embedded["bytes"], "path": path}
        source: str | bytes = embedded["bytes"] or embedded["path"]
        info = inspect_or_error(source)
    else:
        found, info = checked[str(entry["file_name"])]
        if found is None:
            missing = coco.files.image_dir / str(entry["file_name"])
            report.dropped("images with a missing file dropped", file, where, f"{missing}")
            return None
        image = source = found
    if isinstance(info, Exception):
        report.dropped("unreadable images dropped", file, where, f"{info}")
        return None
    if info.mode_kind:
        report.fixed(f"{info.mode_kind} images converted to RGB", file, where, f"mode {info.mode}")
    if info.mode_kind == "16-bit":
        image = {"bytes": eight_bit_png(source), "path": None}

    record = _Record({}, stored_size=info.stored_size)
    annotated = (entry.get("width"), entry.get("height"))
    if not all(annotated):
        pass  # no size given: the boxes are taken to be drawn on the image as displayed
    elif info.orientation != 1 and not coco.boxes_as_displayed and annotated == info.stored_size:
        record.orientation = info.orientation
        report.fixed(
            "images with EXIF orientation: boxes rotated with the image",
            file,
            where,
            f"orientation {info.orientation}; annotated on the stored {_size(annotated)} pixels",
        )
    elif tuple(annotated) == info.size:
        if info.orientation != 1:
            report.fixed(
                "images with EXIF orientation annotated as displayed",
                file,
                where,
                f"orientation {info.orientation}; image and boxes used as displayed",
            )
    else:
        report.fixed(
            "images whose size differs from the annotation (the file's size is used)",
            file,
            where,
            f"annotated {_size(annotated)}, file {_size(info.size)} as displayed",
        )
    record.data = {
        "image": image,
        "image_id": image_id,
        "width": info.size[0],
        "height": info.size[1],
    }  # its objects: the columns of check_split's result
    return record


def _size(size: tuple[Any, Any]) -> str:
    return f"{size[0]}x{size[1]}"


def _locate_and_inspect(
    files: SplitFiles, file_name: str
) -> tuple[str | None, ImageInfo | Exception | None]:
    """The path of an image file (``None``: not found) and its :func:`inspect_or_error`."""
    found = _resolve_image(files, file_name)
    return (None, None) if found is None else (str(found), inspect_or_error(str(found)))


def _resolve_image(files: SplitFiles, file_name: str) -> Path | None:
    """Find an image whether its file name is relative to the image folder or the dataset root."""
    for base in (files.image_dir, files.annotation_file.parent.parent, files.image_dir.parent):
        candidate = base / file_name
        if candidate.is_file():
            return candidate.resolve()
    return None


def _record_positions(
    records: dict[int, _Record], aliases: dict[int, int], known_images: set[int]
) -> dict[int, int]:
    """Each known image id -> the position of the record its boxes go to (-1: it was dropped)."""
    position = {image_id: k for k, image_id in enumerate(records)}
    return {i: position.get(aliases.get(i, i), -1) for i in known_images}


def _size_of(data: dict[str, Any]) -> tuple[int, int]:
    return data["width"], data["height"]


def _report_box(
    coco: CocoFile,
    ann: dict,
    file_names: dict,
    boxes: CheckedBoxes,
    i: int,
    kept: list[_Record],
    label_map: LabelMap,
    report: SkipReport,
) -> None:
    """Report what :func:`.box_checks.check_boxes` found wrong with annotation ``i``."""
    status, bbox = boxes.status[i], ann.get("bbox")
    file, where = _annotation_source(coco, ann, file_names)
    if status == UNKNOWN_IMAGE:
        detail = f"image_id {ann.get('image_id')!r} is not in the image list"
        report.dropped("annotations of unknown images dropped", file, where, detail)
    elif status == UNKNOWN_CATEGORY:
        classes = dict(zip(label_map.source_ids, label_map.names))
        raise DatasetError(
            f"{file}: {where} has category_id {ann.get('category_id')!r}, which is not a "
            f"class of this dataset (classes: {classes}). Add the category to the category "
            "list or remove the annotation."
        )
    elif status == INVALID_BBOX:
        report.dropped("annotations without a valid bbox dropped", file, where, f"bbox {bbox!r}")
    elif status == NO_SIZE:
        report.dropped("boxes with zero, negative or NaN size dropped", file, where, f"bbox {bbox}")
    else:
        in_image = "in a {}x{} image".format(*_size_of(kept[boxes.record[i]].data))
        if status == OUTSIDE:
            reason = "boxes wholly outside their image dropped"
            report.dropped(reason, file, where, f"bbox {bbox} {in_image}")
            return
        if boxes.clipped[i]:
            report.fixed("boxes clipped to their image", file, where, f"bbox {bbox} {in_image}")
        if i in boxes.errors:  # a kept box whose id int() refused, as reading it one by one
            raise boxes.errors[i]
