"""Check and convert a whole split's boxes at once, with numpy, in the order of its annotations.

A COCO-scale split has close to a million boxes: one Python call per box (parse, orient, clip,
measure) and one record dict per image cost ~4 µs per box, plus ~5 µs to write them to Arrow
row by row. Here each rule runs once over the arrays of 65,536 annotations at a time (~2.3 µs
per box, most of it reading the fields out of the dicts); Python touches each annotation only
to read its fields into columns, and only the annotations with a problem afterwards, to
report it (:func:`..records.check_split` does, in
annotation order, so the report and the first error under ``strict`` are those of a box-by-box
check).

Values that are not plain numbers (strings, ``None``, a bbox of 3 numbers) are parsed one by one
with Python's own ``float``/``int``, exactly as a box-by-box check would, and then join the
arrays: every rule below has this one implementation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .image_files import orient_box

# What happened to each annotation, in the order the rules look at it (the first that applies).
KEPT, UNKNOWN_IMAGE, IMAGE_DROPPED, UNKNOWN_CATEGORY, INVALID_BBOX, NO_SIZE, OUTSIDE = range(7)
#: The statuses that are reported (an annotation of a dropped image was counted with it).
REPORTED = (UNKNOWN_IMAGE, UNKNOWN_CATEGORY, INVALID_BBOX, NO_SIZE, OUTSIDE)

_NUMBERS = frozenset({int, float, bool})
_MISSING = object()  # no "id": the object's position in its record is its id
#: The fields read, with the value of a missing one (``annotation.get(key, default)``).
_FIELDS = {
    "image_id": None,
    "category_id": None,
    "bbox": None,
    "id": _MISSING,
    "area": None,
    "iscrowd": 0,
}
_CHUNK = 1 << 16  # annotations checked at a time


@dataclass
class ImageColumns:
    """Per kept image (record), in record order: what its boxes are checked against."""

    width: np.ndarray
    height: np.ndarray
    orientation: np.ndarray  # EXIF orientation to apply to the boxes (1: none)
    stored_width: np.ndarray
    stored_height: np.ndarray

    @classmethod
    def of(cls, sizes: list[tuple[int, int, int, int, int]]) -> ImageColumns:
        """From ``(width, height, orientation, stored width, stored height)`` per record, plus
        a last row for annotations without a record (their values are never used)."""
        table = np.array([*sizes, (0, 0, 1, 0, 0)], dtype=np.int64).reshape(-1, 5)
        return cls(*table.T)


@dataclass
class CheckedBoxes:
    """Every annotation of a split, checked: its status and, if kept, its object's values."""

    status: np.ndarray  # one of the constants above, per annotation
    clipped: np.ndarray  # kept, but clipped to its image
    record: np.ndarray  # position of its record (negative: none)
    bbox: np.ndarray  # (n, 4) float64 [x, y, w, h], oriented and clipped
    area: np.ndarray
    category: np.ndarray
    id: np.ndarray
    id_missing: np.ndarray  # no "id": the object's position in its record is its id
    iscrowd: np.ndarray
    errors: dict[int, Exception]  # an id that int() refused: raised if the box is kept
    annotations: dict[int, dict[str, Any]]  # the fields of those to report, in order

    @property
    def reported(self) -> np.ndarray:
        """The annotations to report, in order: problems, clipped boxes, kept boxes whose
        id could not be read."""
        kept = self.status == KEPT
        odd_id = np.zeros(len(kept), dtype=bool)
        odd_id[list(self.errors)] = True
        return np.flatnonzero(np.isin(self.status, REPORTED) | (kept & (self.clipped | odd_id)))


def check_boxes(
    annotations: list[dict[str, Any]],
    record_of: dict[Any, int],
    class_of: dict[Any, int],
    images: ImageColumns,
    desc: str = "Checking boxes",
) -> CheckedBoxes:
    """Check every annotation: ``record_of`` maps an image id to its record's position (-1:
    a known image that was dropped), ``class_of`` a category id to its class index.

    Empties ``annotations`` a chunk at a time: a chunk's dicts and values are let go once its
    arrays are made, so a COCO-scale split's annotations are never held beside all of them.
    A progress bar (``desc``) shows once the check has run 2 s (~1M boxes).
    """
    parts = []
    with tqdm(total=len(annotations), desc=desc, unit="box", delay=2, disable=None) as progress:
        for start in range(0, max(len(annotations), 1), _CHUNK):
            chunk = annotations[start : start + _CHUNK]
            # let the chunk's dicts go in place: deleting from the list's front would move
            # every later entry once per chunk (quadratic at Objects365 scale)
            annotations[start : start + len(chunk)] = [None] * len(chunk)
            parts.append(_check_chunk(chunk, record_of, class_of, images))
            progress.update(len(chunk))
    annotations.clear()
    starts = np.cumsum([0] + [len(part.status) for part in parts]).tolist()
    arrays = {
        field.name: np.concatenate([getattr(part, field.name) for part in parts])
        for field in dataclasses.fields(CheckedBoxes)
        if field.name not in ("errors", "annotations")
    }
    by_position = {
        name: {
            start + i: value
            for start, part in zip(starts, parts, strict=False)
            for i, value in getattr(part, name).items()
        }
        for name in ("errors", "annotations")
    }
    return CheckedBoxes(**arrays, **by_position)


def _check_chunk(
    annotations: list[dict[str, Any]],
    record_of: dict[Any, int],
    class_of: dict[Any, int],
    images: ImageColumns,
) -> CheckedBoxes:
    """:func:`check_boxes` on one chunk (positions are within the chunk)."""
    fields = {key: [a.get(key, default) for a in annotations] for key, default in _FIELDS.items()}
    record = np.array([record_of.get(v, -2) for v in fields["image_id"]], dtype=np.int64)
    category = np.array([class_of.get(v, -1) for v in fields["category_id"]], dtype=np.int64)
    ids, id_missing, errors = _ids(fields["id"])
    iscrowd = np.fromiter(map(bool, fields.pop("iscrowd")), dtype=bool, count=len(record))
    area = _areas(fields.pop("area"))
    bbox, parsed = _boxes(fields["bbox"])
    with np.errstate(invalid="ignore"):
        size_ok = np.isfinite(bbox).all(axis=1) & (bbox[:, 2] > 0) & (bbox[:, 3] > 0)
    at = np.where(record >= 0, record, len(images.width) - 1)
    bbox, clipped, inside = _clip(bbox, images, at)
    status = np.select(
        [record == -2, record < 0, category < 0, ~parsed, ~size_ok, ~inside],
        [UNKNOWN_IMAGE, IMAGE_DROPPED, UNKNOWN_CATEGORY, INVALID_BBOX, NO_SIZE, OUTSIDE],
        KEPT,
    ).astype(np.int8)
    checked = CheckedBoxes(
        status, clipped, record, bbox, area, category, ids, id_missing, iscrowd, errors, {}
    )
    checked.annotations = {  # kept for the report; the other values are let go
        i: {key: column[i] for key, column in fields.items() if column[i] is not _MISSING}
        for i in checked.reported.tolist()
    }
    del fields
    box_area = bbox[:, 2] * bbox[:, 3]  # a segment's area never exceeds its clipped box's
    np.copyto(area, box_area, where=np.isnan(area))
    np.copyto(area, box_area, where=box_area < area)  # min(area, box_area)
    return checked


def _clip(
    raw: np.ndarray, images: ImageColumns, at: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes oriented and clipped to their images (``[x, y, w, h]``), whether clipping
    changed them, and whether anything is left (the rules of the box-by-box check, verbatim)."""
    with np.errstate(invalid="ignore"):
        x, y, w, h = _oriented(raw, images, at)
        width, height = images.width[at], images.height[at]
        x0, y0 = np.where(0.0 > x, 0.0, x), np.where(0.0 > y, 0.0, y)  # max(x, 0.0)
        x_end, y_end = x + w, y + h
        x1, y1 = np.where(width < x_end, width, x_end), np.where(height < y_end, height, y_end)
        clipped = (x0 != x) | (y0 != y) | (x1 != x_end) | (y1 != y_end)
        inside = (x1 > x0) & (y1 > y0)
    return np.stack([x0, y0, x1 - x0, y1 - y0], axis=1), clipped, inside


def objects_by_record(
    checked: CheckedBoxes, records: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The kept objects grouped by record, in annotation order within each: the offsets of
    each record's objects (``records + 1``) and the columns of a record's ``objects``."""
    kept = np.flatnonzero(checked.status == KEPT)
    kept = kept[np.argsort(checked.record[kept], kind="stable")]
    counts = np.bincount(checked.record[kept], minlength=records)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    position = np.arange(len(kept)) - offsets[checked.record[kept]]
    ids = np.where(checked.id_missing[kept], position, checked.id[kept])
    columns = {
        "id": ids,
        "bbox": checked.bbox[kept],
        "category": checked.category[kept],
        "area": checked.area[kept],
        "iscrowd": checked.iscrowd[kept],
    }
    return offsets, columns


def _boxes(bboxes: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Each bbox as 4 floats (``x, y, w, h = map(float, bbox)``), and whether it parsed."""
    n = len(bboxes)
    if (
        set(map(type, bboxes)) <= {list, tuple}
        and set(map(len, bboxes)) <= {4}
        and set(map(type, chain.from_iterable(bboxes))) <= _NUMBERS
    ):
        return np.array(bboxes, dtype=np.float64).reshape(n, 4), np.ones(n, dtype=bool)
    raw, parsed = np.full((n, 4), np.nan), np.ones(n, dtype=bool)
    for i, bbox in enumerate(bboxes):  # odd values: Python's own parsing decides
        try:
            x, y, w, h = map(float, bbox)
        except (TypeError, ValueError):
            parsed[i] = False
        else:
            raw[i] = x, y, w, h
    return raw, parsed


def _oriented(raw: np.ndarray, images: ImageColumns, at: np.ndarray) -> list[np.ndarray]:
    """The boxes moved to their EXIF-oriented images (:func:`orient_box`, on arrays)."""
    x, y, w, h = (raw[:, k].copy() for k in range(4))
    orientation = images.orientation[at]
    for value in np.unique(orientation[orientation != 1]).tolist():
        rows = orientation == value
        stored = (images.stored_width[at][rows], images.stored_height[at][rows])
        box = [x[rows], y[rows], w[rows], h[rows]]
        x[rows], y[rows], w[rows], h[rows] = orient_box(box, value, stored)
    return [x, y, w, h]


def _areas(values: list[Any]) -> np.ndarray:
    """Each given area that is a positive number, NaN for the rest (the box's area is used)."""
    if set(map(type, values)) <= {int, float, type(None)}:
        area = np.array(values, dtype=np.float64).reshape(len(values))
    else:
        area = np.array([float(v) if isinstance(v, int | float) else np.nan for v in values])
    area[~(area > 0)] = np.nan
    return area


def _ids(values: list[Any]) -> tuple[np.ndarray, np.ndarray, dict[int, Exception]]:
    """Each annotation id as ``int(id)``, whether it had none, and the ids ``int`` refused."""
    n = len(values)
    if set(map(type, values)) <= {int}:
        try:
            return np.array(values, dtype=np.int64).reshape(n), np.zeros(n, dtype=bool), {}
        except OverflowError:
            pass  # beyond int64 (which Arrow refuses too): one by one below
    ids, missing, errors = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool), {}
    for i, value in enumerate(values):
        if value is _MISSING:
            missing[i] = True
            continue
        try:
            ids[i] = int(value)
        except (TypeError, ValueError, OverflowError) as err:
            errors[i] = err
    return ids, missing, errors
