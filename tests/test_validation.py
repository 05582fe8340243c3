"""Bad input, one case a test: a named error, or a counted repair or drop; and the report."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_coco_json
from PIL import Image

from hf_detr_ft.artifacts.output_files import MANIFEST
from hf_detr_ft.cli import main as cli_main
from hf_detr_ft.data.dataset import load_detection_dataset
from hf_detr_ft.data.dataset_report import DATASET_WIDE, REPORT_JSON, REPORT_TEXT, build_report
from hf_detr_ft.data.image_files import (
    EXIF_ORIENTATION,
    IMAGE_ERRORS,
    _inspect_path,
    inspect_all,
    inspect_image,
    on_every_core,
)
from hf_detr_ft.errors import DatasetError

CATEGORIES = [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}]


def _save(path: Path, image: Image.Image, **options) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path.name


def _rgb(path: Path, size=(40, 30)) -> str:
    return _save(path, Image.new("RGB", size, (10, 20, 30)))


def _folder(root: Path, images: list[dict], annotations: list[dict], split="train", cats=None):
    write_coco_json(
        root / split / "_annotations.coco.json", images, annotations, cats or CATEGORIES
    )
    return root


def _one_image(root: Path, boxes: list, size=(40, 30), split="train", category=1) -> Path:
    name = _rgb(root / split / f"{split}.jpg", size)
    images = [{"id": 1, "file_name": name, "width": size[0], "height": size[1]}]
    annotations = [
        {"id": k, "image_id": 1, "category_id": category, "bbox": b} for k, b in enumerate(boxes)
    ]
    return _folder(root, images, annotations, split)


def _problems(data, reason: str) -> list:
    return [p for r in data.skipped.values() for p in r.problems if p.reason == reason]


def _load(root: Path, **kwargs):
    return load_detection_dataset(root, validation_fraction=0, **kwargs)


def test_missing_image_file_is_dropped_and_named(tmp_path: Path) -> None:
    name = _rgb(tmp_path / "train" / "ok.jpg")
    images = [{"id": 1, "file_name": name}, {"id": 2, "file_name": "gone.jpg"}]
    annotations = [{"id": 5, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]}]
    data = _load(_folder(tmp_path, images, annotations))
    [problem] = _problems(data, "images with a missing file dropped")
    assert "gone.jpg" in problem.detail and problem.record == "image 2 (gone.jpg)"
    assert len(data.splits["train"]) == 1


def test_unreadable_and_truncated_images_are_dropped_and_counted(tmp_path: Path) -> None:
    _rgb(tmp_path / "train" / "ok.jpg")
    (tmp_path / "train" / "garbage.jpg").write_bytes(b"this is not an image")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buffer, format="JPEG"
    )
    (tmp_path / "train" / "truncated.jpg").write_bytes(
        buffer.getvalue()[: len(buffer.getvalue()) // 2]
    )
    images = [
        {"id": i, "file_name": n, "width": 64, "height": 64}
        for i, n in enumerate(["ok.jpg", "garbage.jpg", "truncated.jpg"])
    ]
    data = _load(_folder(tmp_path, images, []))
    problems = _problems(data, "unreadable images dropped")
    assert sorted(p.record for p in problems) == [
        "image 1 (garbage.jpg)",
        "image 2 (truncated.jpg)",
    ]
    assert "truncated" in problems[1].detail
    with pytest.raises(DatasetError, match=r"image 1 \(garbage.jpg\).*strict=True"):
        _load(tmp_path, strict=True)


def test_on_every_core_keeps_the_order_across_chunks() -> None:
    items = list(range(1000))  # several chunks of 256, done on several threads
    assert on_every_core(lambda item: item * 2, items, "doubling") == [i * 2 for i in items]
    assert on_every_core(str, [], "nothing") == []


def test_inspect_all_returns_and_caches_every_file_and_its_error(tmp_path) -> None:
    good = [tmp_path / f"{i}.jpg" for i in range(5)]
    for i, path in enumerate(good):
        _rgb(path, size=(40 + i, 30))
    bad = tmp_path / "garbage.jpg"
    bad.write_bytes(b"this is not an image")
    found = inspect_all([*good, bad, good[0]])  # in order: each file's info, or its error
    assert [info.size for info in found[:5]] == [(40 + i, 30) for i in range(5)]
    assert isinstance(found[5], IMAGE_ERRORS) and found[6] == found[0]
    before = _inspect_path.cache_info().hits
    assert [inspect_image(path).size for path in good] == [(40 + i, 30) for i in range(5)]
    assert _inspect_path.cache_info().hits == before + len(good)  # none read a second time
    with pytest.raises(IMAGE_ERRORS):
        inspect_image(bad)


def test_image_size_differing_from_the_annotation_uses_the_file(tmp_path: Path) -> None:
    name = _rgb(tmp_path / "train" / "x.jpg", (40, 30))
    images = [{"id": 1, "file_name": name, "width": 80, "height": 60}]
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [30, 20, 20, 20]}]
    data = _load(_folder(tmp_path, images, annotations))
    [problem] = _problems(
        data, "images whose size differs from the annotation (the file's size is used)"
    )
    assert "annotated 80x60, file 40x30" in problem.detail
    row = data.splits["train"][0]
    assert (row["width"], row["height"]) == (40, 30)
    assert row["objects"]["bbox"] == [[30.0, 20.0, 10.0, 10.0]]  # clipped to the real image


@pytest.mark.parametrize(
    ("bbox", "reason"),
    [
        ([1, 1, float("nan"), 3], "boxes with zero, negative or NaN size dropped"),
        ([5, 5, -4, 3], "boxes with zero, negative or NaN size dropped"),
        ([5, 5, 0, 3], "boxes with zero, negative or NaN size dropped"),
        ([50, 40, 5, 5], "boxes wholly outside their image dropped"),
        ([-10, -10, 5, 5], "boxes wholly outside their image dropped"),
        ("1,2,3,4", "annotations without a valid bbox dropped"),
    ],
)
def test_unusable_boxes_are_dropped_counted_and_strict_errors(tmp_path, bbox, reason) -> None:
    root = _one_image(tmp_path, [[1, 1, 5, 5], bbox])
    data = _load(root)
    [problem] = _problems(data, reason)
    assert problem.kind == "dropped" and problem.record.startswith("annotation 1 of image 1")
    assert data.splits["train"][0]["objects"]["bbox"] == [[1.0, 1.0, 5.0, 5.0]]
    with pytest.raises(DatasetError, match="annotation 1 of image 1.*strict=True"):
        _load(root, strict=True)


def test_box_partly_outside_is_clipped_and_counted(tmp_path: Path) -> None:
    data = _load(_one_image(tmp_path, [[-5, 25, 20, 20]]))
    [problem] = _problems(data, "boxes clipped to their image")
    assert problem.kind == "fixed" and "in a 40x30 image" in problem.detail
    assert data.splits["train"][0]["objects"]["bbox"] == [[0.0, 25.0, 15.0, 5.0]]
    assert _load(tmp_path, strict=True).splits["train"][0]["objects"]["bbox"]  # a fix, not a drop


def test_unknown_category_id_is_an_error_naming_file_and_annotation(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        _load(_one_image(tmp_path, [[1, 1, 5, 5]], category=9))
    message = str(err.value)
    assert "_annotations.coco.json: annotation 0 of image 1 (train.jpg)" in message
    assert "category_id 9" in message and "'thing'" in message


def test_yolo_class_out_of_range_and_malformed_line_name_file_and_line(tmp_path: Path) -> None:
    _rgb(tmp_path / "images" / "train" / "a.jpg")
    labels = tmp_path / "labels" / "train" / "a.txt"
    labels.parent.mkdir(parents=True)
    (tmp_path / "data.yaml").write_text("train: images/train\nnames: [one, two]\n")
    labels.write_text("0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DatasetError, match=r"a\.txt: line 2 has category_id 7"):
        _load(tmp_path)
    labels.write_text("0 0.5 0.5 0.2\n")
    with pytest.raises(
        DatasetError, match=r"a\.txt, line 1: '0 0.5 0.5 0.2' is not 'class cx cy w h'"
    ):
        _load(tmp_path)


def test_duplicate_image_ids_are_an_error_and_duplicate_files_are_merged(tmp_path: Path) -> None:
    a, b = _rgb(tmp_path / "train" / "a.jpg"), _rgb(tmp_path / "train" / "b.jpg")
    images = [{"id": 1, "file_name": a}, {"id": 1, "file_name": b}]
    _folder(tmp_path, images, [])
    with pytest.raises(
        DatasetError, match=r"image id 1 is used by two images, 'a.jpg' and 'b.jpg'"
    ):
        _load(tmp_path)
    images = [{"id": 1, "file_name": a}, {"id": 2, "file_name": a}]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [9, 9, 5, 5]},
    ]
    data = _load(_folder(tmp_path, images, annotations))
    [problem] = _problems(data, "image files listed twice merged")
    assert problem.record == "image 2 (a.jpg)" and "same file as image 1" in problem.detail
    assert data.splits["train"]["objects"][0]["category"] == [0, 1]  # no box lost


def test_annotation_of_unknown_image_is_dropped_and_named(tmp_path: Path) -> None:
    root = _one_image(tmp_path, [[1, 1, 5, 5]])
    content = json.loads((root / "train" / "_annotations.coco.json").read_text())
    content["annotations"].append(
        {"id": 42, "image_id": 777, "category_id": 1, "bbox": [1, 1, 2, 2]}
    )
    (root / "train" / "_annotations.coco.json").write_text(json.dumps(content))
    [problem] = _problems(_load(root), "annotations of unknown images dropped")
    assert problem.record == "annotation 42" and "image_id 777" in problem.detail


def test_empty_split_and_no_images_are_errors(tmp_path: Path) -> None:
    _one_image(tmp_path, [[1, 1, 5, 5]])
    _folder(tmp_path, [], [], split="valid")
    with pytest.raises(DatasetError, match=r"validation split .*valid.*lists no images"):
        _load(tmp_path)
    (tmp_path / "valid" / "_annotations.coco.json").unlink()
    (tmp_path / "train" / "train.jpg").unlink()
    with pytest.raises(DatasetError, match="train split .* has no usable images"):
        _load(tmp_path)


def test_no_dataset_and_num_classes_mismatch_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="No dataset found in .*Pascal VOC.*YOLO"):
        _load(tmp_path)
    with pytest.raises(DatasetError, match="num_classes=3, but .* define 2 classes"):
        _load(_one_image(tmp_path, [[1, 1, 5, 5]]), num_classes=3)


def test_class_in_validation_but_never_in_training_is_reported(tmp_path: Path) -> None:
    _one_image(tmp_path, [[1, 1, 5, 5]], category=1)
    _one_image(tmp_path, [[1, 1, 5, 5]], split="valid", category=2)
    report = build_report(_load(tmp_path))
    [problem] = report.problems[DATASET_WIDE]
    assert problem.reason == "classes never seen in training" and problem.record == "class 'other'"
    assert "1 in validation" in problem.detail


def test_colour_modes_are_converted_and_counted(tmp_path: Path) -> None:
    folder = tmp_path / "train"
    gradient = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    images = {
        "gray.png": Image.new("L", (40, 30), 128),
        "rgba.png": Image.new("RGBA", (40, 30), (255, 0, 0, 128)),
        "palette.png": Image.new("RGB", (40, 30), (0, 255, 0)).convert("P"),
        "cmyk.jpg": Image.new("CMYK", (40, 30), (0, 255, 255, 0)),
        "deep.png": Image.fromarray(gradient),
    }
    entries = [
        {"id": i, "file_name": _save(folder / n, im)} for i, (n, im) in enumerate(images.items())
    ]
    data = _load(_folder(tmp_path, entries, []))
    counts = data.skipped["train"].counts
    for kind in ("grayscale", "RGBA", "palette", "CMYK", "16-bit"):
        assert counts[f"{kind} images converted to RGB"] == 1, kind
    decoded = {row["image_id"]: row["image"] for row in data.splits["train"]}
    assert all(image.mode == "RGB" and image.size == (40, 30) for image in decoded.values())
    deep = np.asarray(decoded[4])[..., 0]
    assert deep.min() == 0 and deep.max() == 255 and 100 < deep.mean() < 155  # not all white


def _oriented(path: Path, orientation: int) -> str:
    """A 40x30 stored image, black with a white 10x6 box at (5, 3), and an EXIF orientation."""
    pixels = np.zeros((30, 40), np.uint8)
    pixels[3:9, 5:15] = 255
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return _save(path, Image.fromarray(pixels), exif=exif, format="PNG")


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_rotates_boxes_with_the_image(tmp_path: Path, orientation) -> None:
    name = _oriented(tmp_path / "train" / "o.png", orientation)
    images = [{"id": 1, "file_name": name, "width": 40, "height": 30}]  # the stored pixels
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 3, 10, 6]}]
    data = _load(_folder(tmp_path, images, annotations))
    assert (
        data.skipped["train"].counts["images with EXIF orientation: boxes rotated with the image"]
        == 1
    )
    row = data.splits["train"][0]
    x, y, w, h = (int(v) for v in row["objects"]["bbox"][0])
    white = np.argwhere(np.asarray(row["image"])[..., 0] > 128)
    assert (row["width"], row["height"]) == row["image"].size
    assert (white[:, 1].min(), white[:, 0].min()) == (x, y)
    assert (white[:, 1].max() + 1, white[:, 0].max() + 1) == (x + w, y + h)


def test_exif_orientation_annotated_as_displayed_keeps_boxes(tmp_path: Path) -> None:
    name = _oriented(tmp_path / "train" / "o.png", 6)
    images = [{"id": 1, "file_name": name, "width": 30, "height": 40}]  # the displayed size
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [21, 5, 6, 10]}]
    data = _load(_folder(tmp_path, images, annotations))
    assert data.skipped["train"].counts["images with EXIF orientation annotated as displayed"] == 1
    assert data.splits["train"][0]["objects"]["bbox"] == [[21.0, 5.0, 6.0, 10.0]]


def test_no_box_is_lost_without_being_counted(tmp_path: Path) -> None:
    boxes = [[1, 1, 5, 5], [0, 0, 0, 0], [99, 99, 3, 3], [30, 20, 30, 30], [1, 2, float("inf"), 1]]
    data = _load(_one_image(tmp_path, boxes))
    kept = len(data.splits["train"][0]["objects"]["bbox"])
    dropped = sum(1 for p in data.skipped["train"].problems if p.kind == "dropped")
    assert (kept, dropped) == (2, 3) and kept + dropped == len(boxes)


def test_voc_problems_name_the_xml_file(tmp_path: Path) -> None:
    _rgb(tmp_path / "JPEGImages" / "a.jpg")
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><size><width>40</width><height>30</height></size>"
        "<object><name>x</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>5</xmax><ymax>9</ymax>"
        "</bndbox></object><object><name>x</name><bndbox><xmin>2</xmin><ymin>2</ymin>"
        "<xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>"
    )
    [problem] = _problems(_load(tmp_path), "boxes with zero, negative or NaN size dropped")
    assert problem.file.endswith("a.xml") and problem.record == "object 1"
    (tmp_path / "Annotations" / "a.xml").write_text("<annotation><object>")
    with pytest.raises(DatasetError, match=r"Cannot read the VOC annotation file .*a\.xml"):
        _load(tmp_path)


def test_report_table_files_and_inspect_preview(tmp_path: Path, capsys) -> None:
    root = _one_image(tmp_path / "data", [[1, 1, 5, 5], [0, 0, 0, 0]])
    _one_image(root, [[2, 2, 6, 6]], split="valid", category=2)
    out = tmp_path / "report"
    assert cli_main(["inspect", str(root), "--preview", "2", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "images without boxes" in printed and "boxes with zero, negative or NaN" in printed
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["splits"]["train"] == {
        "images": 1,
        "boxes": 1,
        "images_without_boxes": 0,
        "boxes_per_class": {"thing": 1, "other": 0},
        "images_per_class": {"thing": 1, "other": 0},
    }
    [dropped] = report["problems"]["train"]
    assert dropped["kind"] == "dropped" and dropped["record"].startswith("annotation 1")
    assert (out / REPORT_TEXT).read_text().startswith("Dataset ")
    assert sorted(p.name for p in (out / "preview").iterdir() if p.name != MANIFEST) == [
        "train_1.png",
        "validation_1.png",
    ]
    assert Image.open(out / "boxes_per_class.png").size[0] > 100


def test_cli_prints_one_line_for_a_broken_dataset(tmp_path: Path, capsys) -> None:
    _one_image(tmp_path, [[1, 1, 5, 5]], category=9)
    assert cli_main(["inspect", str(tmp_path), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-detr-ft inspect: error: ") and "category_id 9" in err
    assert "Traceback" not in err and err.count("\n") == 1
