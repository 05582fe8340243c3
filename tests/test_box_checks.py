"""A split's boxes checked all at once (data/box_checks.py): the records and the report are
those of a box-by-box check, in annotation order, through the cache and without it."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_coco_json
from PIL import Image

from hf_detr_ft.data.dataset import load_detection_dataset
from hf_detr_ft.errors import DatasetError

CATEGORIES = [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}]
NAN = float("nan")
REASONS = {
    "clipped": "boxes clipped to their image",
    "unknown": "annotations of unknown images dropped",
    "size": "boxes with zero, negative or NaN size dropped",
    "outside": "boxes wholly outside their image dropped",
    "bbox": "annotations without a valid bbox dropped",
}

# (annotation, what happens to it), in a shuffled image order
ANNOTATIONS = [
    {"id": 10, "image_id": 2, "category_id": 1, "bbox": [10, 10, 20, 20]},  # kept
    {"id": 11, "image_id": 1, "category_id": 2, "bbox": [30, 20, 20, 20]},  # clipped
    {"id": 12, "image_id": 9, "category_id": 1, "bbox": [1, 1, 5, 5]},  # unknown image
    {"id": 13, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 4]},  # zero width
    {"id": 14, "image_id": 3, "category_id": 1, "bbox": [50, 50, 5, 5]},  # outside
    {"id": 15, "image_id": 2, "category_id": 1, "bbox": [1, 2, 3]},  # wrong length
    {"id": 16, "image_id": 1, "category_id": 1, "bbox": ["2", "3", "4", "5"], "area": "7"},
    {"id": 17, "image_id": 3, "category_id": 1, "bbox": [NAN, 1, 2, 3]},  # NaN
    {"id": 18, "image_id": 2, "category_id": 1, "bbox": "abcd"},  # not numbers
    {"id": 19, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 50, "iscrowd": 1},
    {"id": 20, "image_id": 2, "category_id": 1, "bbox": None},
    {"image_id": 1, "category_id": 1, "bbox": [-5, -5, 10, 10]},  # no id; clipped
    {"id": 21, "image_id": 3, "category_id": 1, "bbox": [1, 1, 2, 2], "area": 100},
]


def _folder(root: Path, annotations: list[dict]) -> Path:
    images = []
    for image_id, (name, size) in enumerate(
        [("a.jpg", (40, 30)), ("b.jpg", (64, 48)), ("c.jpg", (40, 30))], start=1
    ):
        (root / "train").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (10, 20, 30)).save(root / "train" / name)
        images.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
    write_coco_json(root / "train" / "_annotations.coco.json", images, annotations, CATEGORIES)
    return root


def _objects(ids, bbox, category, area, iscrowd) -> dict:
    return {"id": ids, "bbox": bbox, "category": category, "area": area, "iscrowd": iscrowd}


@pytest.mark.parametrize("cached", [True, False])
def test_mixed_boxes_give_the_records_and_report_of_a_box_by_box_check(tmp_path, cached) -> None:
    root = _folder(tmp_path / "data", ANNOTATIONS)
    cache = {"cache_dir": tmp_path / "cache"} if cached else {"cache": False}
    data = load_detection_dataset(root, validation_fraction=0, **cache)
    rows = [{k: row[k] for k in ("image_id", "width", "objects")} for row in data.splits["train"]]
    assert rows == [
        {
            "image_id": 1,
            "width": 40,
            "objects": _objects(
                [11, 16, 19, 3],  # the box without an id: its position in its image
                [[30, 20, 10, 10], [2, 3, 4, 5], [0, 0, 10, 10], [0, 0, 5, 5]],
                [1, 0, 0, 0],
                [100, 20, 50, 25],  # "7" is not a number: the box's area
                [False, False, True, False],
            ),
        },
        {
            "image_id": 2,
            "width": 64,
            "objects": _objects([10], [[10, 10, 20, 20]], [0], [400], [False]),
        },
        {"image_id": 3, "width": 40, "objects": _objects([21], [[1, 1, 2, 2]], [0], [4], [False])},
    ]

    def of(ann_id, image_id) -> str:
        name = "abc"[image_id - 1]
        return f"annotation {ann_id} of image {image_id} ({name}.jpg)"

    in_a = "in a 40x30 image"
    assert [(p.reason, p.record, p.detail) for p in data.skipped["train"].problems] == [
        (REASONS["clipped"], of(11, 1), f"bbox [30, 20, 20, 20] {in_a}"),
        (REASONS["unknown"], "annotation 12", "image_id 9 is not in the image list"),
        (REASONS["size"], of(13, 1), "bbox [5, 5, 0, 4]"),
        (REASONS["outside"], of(14, 3), f"bbox [50, 50, 5, 5] {in_a}"),
        (REASONS["bbox"], of(15, 2), "bbox [1, 2, 3]"),
        (REASONS["size"], of(17, 3), "bbox [nan, 1, 2, 3]"),
        (REASONS["bbox"], of(18, 2), "bbox 'abcd'"),
        (REASONS["bbox"], of(20, 2), "bbox None"),
        (REASONS["clipped"], of(None, 1), f"bbox [-5, -5, 10, 10] {in_a}"),
    ]
    problems = data.skipped["train"].problems
    assert {p.file for p in problems} == {str(root / "train" / "_annotations.coco.json")}
    assert [p.kind for p in problems] == ["fixed", *["dropped"] * 7, "fixed"]
    counts = {"clipped": 2, "unknown": 1, "size": 2, "outside": 1, "bbox": 3}
    assert data.skipped["train"].counts == {REASONS[k]: n for k, n in counts.items()}


def test_the_first_problem_in_annotation_order_is_the_error(tmp_path: Path) -> None:
    unknown_class = {"id": 30, "image_id": 3, "category_id": 99, "bbox": [1, 1, 2, 2]}
    annotations = [*ANNOTATIONS[:4], unknown_class, *ANNOTATIONS[4:]]
    root = _folder(tmp_path, annotations)
    # strict: the unknown image (3rd) comes before the unknown category (5th)
    with pytest.raises(
        DatasetError,
        match=r"annotation 12: image_id 9 is not in the image list \(annotations of unknown",
    ):
        load_detection_dataset(root, validation_fraction=0, strict=True)
    with pytest.raises(DatasetError, match="annotation 30 of image 3 .* category_id 99"):
        load_detection_dataset(root, validation_fraction=0)
