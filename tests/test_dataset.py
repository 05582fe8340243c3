"""COCO folders -> annotation records -> DatasetDict: layouts, label maps, bad input."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from conftest import write_coco_json
from PIL import Image

from hf_detr_ft.data.dataset import load_detection_dataset
from hf_detr_ft.data.synthetic import DEMO_CLASSES
from hf_detr_ft.errors import DatasetError


def _image(path: Path, size=(40, 30)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)
    return path.name


def _coco_layout(root: Path, categories: list[dict], annotation_name="instances_{}2017.json"):
    """A COCO/DETR-layout folder: annotations/<name> + <split>2017/ images, 3 images a split."""
    for split in ("train", "val"):
        images, annotations = [], []
        for i in range(3):
            image_id = 100 + i if split == "train" else 200 + i
            name = _image(root / f"{split}2017" / f"{split}_{i}.jpg")
            images.append({"id": image_id, "file_name": name, "width": 40, "height": 30})
            cat = categories[i % len(categories)]["id"]
            annotations.append(
                {
                    "id": image_id * 10,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [2, 3, 10, 8],
                    "area": 80,
                    "iscrowd": 0,
                }
            )
        write_coco_json(
            root / "annotations" / annotation_name.format(split), images, annotations, categories
        )
    return root


def test_roboflow_layout_drops_super_category(shapes_dir: Path) -> None:
    data = load_detection_dataset(shapes_dir, num_classes=3)
    assert data.layout == "roboflow"
    assert list(data.splits) == ["train", "validation", "test"]
    assert [len(data.splits[s]) for s in data.splits] == [16, 6, 5]
    assert data.class_names == list(DEMO_CLASSES)
    assert data.label_map.source_ids == [1, 2, 3]  # id 0 is Roboflow's super-category
    features = data.splits["train"].features
    assert features["objects"]["category"].feature.names == list(DEMO_CLASSES)
    example = data.splits["train"][0]
    assert example["image"].mode == "RGB"
    assert set(example) == {"image", "image_id", "width", "height", "objects"}
    assert set(example["objects"]) == {"id", "bbox", "category", "area", "iscrowd"}
    assert all(0 <= c < 3 for c in example["objects"]["category"])
    assert data.eval_split == "test"


def test_coco_layout_with_non_contiguous_category_ids(tmp_path: Path) -> None:
    categories = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "bird"}]
    root = _coco_layout(tmp_path, categories)
    data = load_detection_dataset(root)
    assert data.layout == "coco"
    assert list(data.splits) == ["train", "validation"]
    assert data.class_names == ["cat", "dog", "bird"]
    assert data.label_map.source_ids == [3, 7, 11]
    train = data.splits["train"]
    assert train["image_id"] == [100, 101, 102]
    assert [o["category"] for o in train["objects"]] == [[0], [1], [2]]
    assert train[0]["objects"]["bbox"] == [[2.0, 3.0, 10.0, 8.0]]
    assert data.eval_split == "validation"


def test_custom_json_layout_ids_from_zero_and_split_off_validation(tmp_path: Path) -> None:
    categories = [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}]
    root = _coco_layout(tmp_path, categories, annotation_name="custom_{}.json")
    (root / "annotations" / "custom_val.json").unlink()
    first = load_detection_dataset(root, num_classes=2, validation_fraction=0.34, seed=3)
    again = load_detection_dataset(root, num_classes=2, validation_fraction=0.34, seed=3)
    assert first.class_names == ["a", "b"] and first.label_map.source_ids == [0, 1]
    assert len(first.splits["train"]) == 2 and len(first.splits["validation"]) == 1
    assert first.splits["validation"]["image_id"] == again.splits["validation"]["image_id"]
    ids = set(first.splits["train"]["image_id"]) | set(first.splits["validation"]["image_id"])
    assert ids == {100, 101, 102}


def test_layout_can_be_forced(shapes_dir: Path) -> None:
    with pytest.raises(DatasetError, match="No COCO annotations found"):
        load_detection_dataset(shapes_dir, layout="coco")
    assert load_detection_dataset(shapes_dir, layout="roboflow").layout == "roboflow"


def test_num_classes_mismatch_names_both_numbers_and_classes(shapes_dir: Path) -> None:
    with pytest.raises(DatasetError) as err:
        load_detection_dataset(shapes_dir, num_classes=5)
    message = str(err.value)
    assert "num_classes=5" in message and "3 classes" in message
    assert all(name in message for name in DEMO_CLASSES)


def test_missing_folder_and_unknown_category_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_detection_dataset(tmp_path / "nope")
    name = _image(tmp_path / "train" / "x.jpg")
    write_coco_json(
        tmp_path / "train" / "_annotations.coco.json",
        [{"id": 1, "file_name": name, "width": 40, "height": 30}],
        [{"id": 9, "image_id": 1, "category_id": 5, "bbox": [1, 1, 5, 5]}],
        [{"id": 1, "name": "thing"}],
    )
    with pytest.raises(DatasetError, match=r"annotation 9 .*has category_id 5") as err:
        load_detection_dataset(tmp_path)
    assert "_annotations.coco.json" in str(err.value)


def test_bad_boxes_are_repaired_or_dropped_and_counted(tmp_path: Path, caplog) -> None:
    split = tmp_path / "train"
    names = [_image(split / f"{i}.jpg") for i in range(3)]
    images = [{"id": i, "file_name": n, "width": 40, "height": 30} for i, n in enumerate(names)]
    images.append({"id": 99, "file_name": "missing.jpg", "width": 40, "height": 30})
    boxes = [
        [1, 1, 10, 10],  # fine
        [30, 20, 20, 20],  # overhangs: clipped to 10 x 10
        [5, 5, 0, 0],  # zero size: dropped
        [50, 50, 5, 5],  # wholly outside: dropped
        [1, 1, float("nan"), 3],  # NaN: dropped
    ]
    annotations = [
        {"id": k, "image_id": k % 3, "category_id": 1, "bbox": b} for k, b in enumerate(boxes)
    ]
    annotations.append({"id": 77, "image_id": 12345, "category_id": 1, "bbox": [1, 1, 2, 2]})
    write_coco_json(split / "_annotations.coco.json", images, annotations, [{"id": 1, "name": "x"}])
    with caplog.at_level(logging.WARNING):
        data = load_detection_dataset(tmp_path)
    all_boxes = [b for split in data.splits.values() for o in split["objects"] for b in o["bbox"]]
    assert sorted(all_boxes) == [[1.0, 1.0, 10.0, 10.0], [30.0, 20.0, 10.0, 10.0]]
    report = data.skipped["train"].counts
    assert report["boxes clipped to their image"] == 1
    assert report["boxes with zero, negative or NaN size dropped"] == 2
    assert report["boxes wholly outside their image dropped"] == 1
    assert report["annotations of unknown images dropped"] == 1
    assert report["images with a missing file dropped"] == 1
    assert "2 boxes with zero, negative or NaN size dropped" in caplog.text
    assert "missing.jpg" in caplog.text


def test_real_bccd_photos_load(bccd_coco_dir: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        data = load_detection_dataset(bccd_coco_dir, num_classes=3)
    assert data.class_names == ["RBC", "WBC", "Platelets"]
    assert data.splits["train"][0]["image"].size == (640, 480)
    # BloodImage_00338 and _00343 each hold one zero-size RBC box (see the dataset README).
    assert data.skipped["train"].counts["boxes with zero, negative or NaN size dropped"] == 1
    assert "BloodImage_00338" in caplog.text


def test_images_found_relative_to_dataset_root(tmp_path: Path) -> None:
    _image(tmp_path / "train2017" / "sub" / "a.jpg")
    shutil.copy(tmp_path / "train2017" / "sub" / "a.jpg", tmp_path / "train2017" / "b.jpg")
    write_coco_json(
        tmp_path / "annotations" / "instances_train2017.json",
        [
            {"id": 1, "file_name": "sub/a.jpg", "width": 40, "height": 30},
            {"id": 2, "file_name": "train2017/b.jpg"},  # relative to the root, size read from file
        ],
        [],
        [{"id": 1, "name": "x"}],
    )
    data = load_detection_dataset(tmp_path)
    rows = [
        row for split in data.splits.values() for row in split.select_columns(["image_id", "width"])
    ]
    assert sorted(row["image_id"] for row in rows) == [1, 2]
    assert {row["width"] for row in rows} == {40}
