"""A split's checked records as columns: one entry per image, one array per object field.

:func:`..records.check_split` leaves the objects of a COCO-scale split (close to a million
boxes) in numpy arrays grouped by image. Making a Python dict and lists per image from them only
to have ``datasets`` turn them back into Arrow columns cost seconds and hundreds of MB, so the
Arrow table is built from the arrays directly (:meth:`RecordColumns.table`); ``rows()`` gives
the same records one dict at a time, for the code that wants rows (streaming).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Features
from datasets.table import table_cast

#: The fields of a record's ``objects``, in the order of the schema (:mod:`.dataset`).
OBJECT_FIELDS = ("id", "bbox", "category", "area", "iscrowd")
_IMAGE_FIELDS = ("image_id", "width", "height")


@dataclass
class RecordColumns:
    """``images[k]`` (``image``, ``image_id``, ``width``, ``height``) has the objects
    ``offsets[k]:offsets[k + 1]`` of each array in ``objects`` (``bbox``: ``(n, 4)``)."""

    images: list[dict[str, Any]]
    offsets: np.ndarray
    objects: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.images)

    def rows(self) -> Iterator[dict[str, Any]]:
        """Each record as a dict of Python values (``objects`` as lists), in order."""
        values = {name: self.objects[name].tolist() for name in OBJECT_FIELDS}
        bounds = self.offsets.tolist()
        for image, start, end in zip(self.images, bounds, bounds[1:], strict=False):
            yield {**image, "objects": {name: v[start:end] for name, v in values.items()}}

    def table(self, features: Features) -> pa.Table:
        """The records as an Arrow table of ``features``, the same values ``datasets`` would
        store for :meth:`rows`, built without a Python object per box."""
        offsets = pa.array(self.offsets, pa.int32())
        bbox = self.objects["bbox"].astype(np.float32).reshape(-1)
        fields = {
            "id": pa.array(self.objects["id"], pa.int64()),
            "bbox": pa.FixedSizeListArray.from_arrays(pa.array(bbox), 4),
            "category": pa.array(self.objects["category"], pa.int64()),
            "area": pa.array(self.objects["area"].astype(np.float32)),
            "iscrowd": pa.array(self.objects["iscrowd"], pa.bool_()),
        }
        objects = pa.StructArray.from_arrays(
            [pa.ListArray.from_arrays(offsets, fields[name]) for name in OBJECT_FIELDS],
            names=list(OBJECT_FIELDS),
        )
        image = features["image"]
        encoded = [image.encode_example(r["image"]) for r in self.images]
        columns = {
            "image": pa.array(encoded, image.pa_type),
            **{name: pa.array([r[name] for r in self.images]) for name in _IMAGE_FIELDS},
            "objects": objects,
        }
        table = pa.Table.from_arrays(list(columns.values()), names=list(columns))
        return table_cast(table, features.arrow_schema)
