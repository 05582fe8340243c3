"""Every dataset format loads to the same records; BCCD (VOC) loads and trains; convert to COCO."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import BCCD, write_coco_json
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image

from hf_detr_ft.cli import main as cli_main
from hf_detr_ft.data.dataset import load_detection_dataset
from hf_detr_ft.data.dataset_report import REPORT_JSON
from hf_detr_ft.data.formats import detect_format
from hf_detr_ft.errors import DatasetError
from hf_detr_ft.run import finetune

CLASSES = ["cat", "dog"]  # sorted: VOC without labelmap.txt orders classes by name
# split -> [(file stem, (width, height), [(class index, [x, y, w, h] pixels)])]
SOURCE = {
    "train": [
        ("a", (64, 48), [(0, [4, 6, 20, 10]), (1, [30, 20, 16, 24])]),
        ("b", (50, 40), [(1, [0, 0, 10, 10])]),
        ("c", (40, 40), []),
    ],
    "validation": [
        ("d", (64, 48), [(0, [10, 10, 30, 20])]),
        ("e", (32, 32), [(1, [2, 2, 8, 8]), (0, [20, 16, 12, 16])]),
    ],
}


def _picture(path: Path, size: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (sum(size) % 256, 90, 160)).save(path)
    return path


def write_coco(root: Path) -> Path:
    categories = [{"id": 0, "name": "animals", "supercategory": "none"}]
    categories += [
        {"id": i + 1, "name": n, "supercategory": "animals"} for i, n in enumerate(CLASSES)
    ]
    for split, folder in (("train", "train"), ("validation", "valid")):
        images, annotations = [], []
        for image_id, (stem, size, boxes) in enumerate(SOURCE[split]):
            _picture(root / folder / f"{stem}.png", size)
            images.append(
                {"id": image_id, "file_name": f"{stem}.png", "width": size[0], "height": size[1]}
            )
            for label, box in boxes:
                annotations.append(
                    {
                        "id": len(annotations),
                        "image_id": image_id,
                        "category_id": label + 1,
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": 0,
                    }
                )
        write_coco_json(root / folder / "_annotations.coco.json", images, annotations, categories)
    return root


def write_voc(root: Path) -> Path:
    for split, list_name in (("train", "train"), ("validation", "val")):
        for stem, size, boxes in SOURCE[split]:
            _picture(root / "JPEGImages" / f"{stem}.png", size)
            objects = "".join(
                f"<object><name>{CLASSES[label]}</name><difficult>0</difficult><bndbox>"
                f"<xmin>{x + 1}</xmin><ymin>{y + 1}</ymin><xmax>{x + w + 1}</xmax>"
                f"<ymax>{y + h + 1}</ymax></bndbox></object>"
                for label, (x, y, w, h) in boxes
            )
            xml = (
                f"<annotation><filename>{stem}.png</filename><size><width>{size[0]}</width>"
                f"<height>{size[1]}</height><depth>3</depth></size>{objects}</annotation>"
            )
            (root / "Annotations").mkdir(parents=True, exist_ok=True)
            (root / "Annotations" / f"{stem}.xml").write_text(xml)
        main = root / "ImageSets" / "Main"
        main.mkdir(parents=True, exist_ok=True)
        (main / f"{list_name}.txt").write_text("".join(f"{s}\n" for s, _, _ in SOURCE[split]))
    return root


def write_yolo(root: Path, names: object = None) -> Path:
    for split, folder in (("train", "train"), ("validation", "val")):
        for stem, (width, height), boxes in SOURCE[split]:
            _picture(root / "images" / folder / f"{stem}.png", (width, height))
            lines = [
                f"{label} {(x + w / 2) / width} {(y + h / 2) / height} {w / width} {h / height}"
                for label, (x, y, w, h) in boxes
            ]
            label_file = root / "labels" / folder / f"{stem}.txt"
            label_file.parent.mkdir(parents=True, exist_ok=True)
            label_file.write_text("\n".join(lines))
    config = {
        "path": ".",
        "train": "images/train",
        "val": "images/val",
        "names": CLASSES if names is None else names,
    }
    (root / "data.yaml").write_text(yaml.safe_dump(config))
    return root


def hf_splits(tmp: Path, embed: bool = False) -> DatasetDict:
    """The source as a ``DatasetDict`` in the cppe-5 schema; ``embed``: images as bytes."""
    features = Features(
        {
            "image_id": Value("int64"),
            "image": ImageFeature(),
            "width": Value("int32"),
            "height": Value("int32"),
            "objects": {
                "id": List(Value("int64")),
                "area": List(Value("float32")),
                "bbox": List(List(Value("float32"), length=4)),
                "category": List(ClassLabel(names=CLASSES)),
            },
        }
    )
    splits = {}
    for split, examples in SOURCE.items():
        rows = []
        for index, (stem, size, boxes) in enumerate(examples):
            picture = _picture(tmp / f"{stem}.png", size)
            image = {"bytes": picture.read_bytes(), "path": None} if embed else str(picture)
            rows.append(
                {
                    "image_id": index,
                    "image": image,
                    "width": size[0],
                    "height": size[1],
                    "objects": {
                        "id": list(range(len(boxes))),
                        "area": [b[2] * b[3] for _, b in boxes],
                        "bbox": [b for _, b in boxes],
                        "category": [c for c, _ in boxes],
                    },
                }
            )
        splits[split] = Dataset.from_list(rows, features=features)
    return DatasetDict(splits)


def write_hf(root: Path, tmp: Path) -> Path:
    hf_splits(tmp).save_to_disk(str(root))
    return root


def write_hf_parquet(root: Path, tmp: Path) -> Path:
    """As a dataset on the Hub is stored (and downloaded): Parquet files, images inside."""
    for split, dataset in hf_splits(tmp, embed=True).items():
        dataset.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    (root / "README.md").write_text("# shapes\n")
    return root


def canonical(data) -> dict[str, list]:
    """Per split: sorted (width, height, sorted boxes with class names) of every image."""
    result = {}
    for split, dataset in data.splits.items():
        rows = dataset.select_columns(["width", "height", "objects"])
        result[split] = sorted(
            (
                row["width"],
                row["height"],
                tuple(
                    sorted(
                        (data.class_names[c], *(round(v, 3) for v in box))
                        for c, box in zip(row["objects"]["category"], row["objects"]["bbox"])
                    )
                ),
            )
            for row in rows
        )
    return result


@pytest.fixture(scope="module")
def every_format(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("formats")
    return {
        "coco": write_coco(base / "coco"),
        "voc": write_voc(base / "voc"),
        "yolo": write_yolo(base / "yolo"),
        "hf": write_hf(base / "hf", base / "hf-images"),
        "hf-parquet": write_hf_parquet(base / "hf-parquet", base / "hf-parquet-images"),
    }


def test_every_format_loads_to_the_same_records(every_format: dict[str, Path]) -> None:
    expected = {
        split: sorted(
            (w, h, tuple(sorted((CLASSES[c], *map(float, box)) for c, box in boxes)))
            for _, (w, h), boxes in examples
        )
        for split, examples in SOURCE.items()
    }
    for name, root in every_format.items():
        kind = name.split("-")[0]  # hf-parquet: the hf format
        assert detect_format(root) == kind
        data = load_detection_dataset(root, num_classes=2)
        assert data.format == kind
        assert data.class_names == CLASSES, name
        assert data.splits["train"].features["objects"]["category"].feature.names == CLASSES
        assert canonical(data) == expected, name
        assert all(not report.problems for report in data.skipped.values()), name
        example = data.splits["validation"][0]
        assert example["image"].mode == "RGB" and example["image"].size == (64, 48)


def test_format_can_be_forced_and_wrong_format_is_named(every_format: dict[str, Path]) -> None:
    assert load_detection_dataset(every_format["voc"], dataset_format="voc").format == "voc"
    with pytest.raises(DatasetError, match="not a YOLO folder: no data.yaml"):
        load_detection_dataset(every_format["voc"], dataset_format="yolo")
    with pytest.raises(DatasetError, match="Unknown dataset format 'tfrecord'"):
        load_detection_dataset(every_format["voc"], dataset_format="tfrecord")


def test_yolo_names_as_dict(tmp_path: Path) -> None:
    root = write_yolo(tmp_path, names={1: "dog", 0: "cat"})
    assert load_detection_dataset(root).class_names == CLASSES


def test_image_folder_with_detection_metadata(tmp_path: Path, caplog) -> None:
    # datasets' image-folder detection layout: split folders, metadata.jsonl, "categories"
    for split, examples in SOURCE.items():
        lines = []
        for stem, size, boxes in examples:
            _picture(tmp_path / split / f"{stem}.png", size)
            objects = {"bbox": [b for _, b in boxes], "categories": [c for c, _ in boxes]}
            lines.append(json.dumps({"file_name": f"{stem}.png", "objects": objects}))
        (tmp_path / split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    assert detect_format(tmp_path) == "hf"
    with caplog.at_level(logging.WARNING):
        data = load_detection_dataset(tmp_path, num_classes=2)
    assert "objects.categories is not a ClassLabel" in caplog.text
    assert data.class_names == ["class_0", "class_1"]
    expected = {
        split: sorted(
            (w, h, tuple(sorted((f"class_{c}", *map(float, box)) for c, box in boxes)))
            for _, (w, h), boxes in examples
        )
        for split, examples in SOURCE.items()
    }
    assert canonical(data) == expected


def test_unreadable_parquet_folders_are_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken" / "data"
    broken.mkdir(parents=True)
    (broken / "train-00000-of-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match=f"Cannot load the dataset files in {broken.parent}"):
        load_detection_dataset(broken.parent)
    unlabeled = tmp_path / "unlabeled"
    Dataset.from_dict({"image": ["a.jpg"], "label": [0]}).to_parquet(str(unlabeled / "x.parquet"))
    with pytest.raises(DatasetError, match=r"lacks the column\(s\) \['objects'\]"):
        load_detection_dataset(unlabeled)


@pytest.mark.parametrize("name", ["hf-detr-ft-tests/no-such-dataset", "no-such-dataset-5"])
def test_hub_id_fails_offline_with_a_clear_error(name: str) -> None:
    # owner/name, or a name without owner as the transformers example's default "cppe-5"
    with pytest.raises(DatasetError) as err:
        load_detection_dataset(name)
    message = str(err.value)
    assert f"{name!r} is not a folder" in message
    assert "Hugging Face Hub" in message and "save_to_disk" in message


def test_yolo_round_trips_to_coco_within_half_a_pixel(tmp_path: Path, capsys) -> None:
    width, height = 97, 61  # odd sizes: normalised values are not round in pixels
    lines = ["0 0.31415 0.52718 0.2 0.33333", "1 0.77777 0.25 0.123456 0.4", "0 0.5 0.5 1.0 1.0"]
    _picture(tmp_path / "yolo" / "images" / "train" / "x.jpg", (width, height))
    (tmp_path / "yolo" / "labels" / "train").mkdir(parents=True)
    (tmp_path / "yolo" / "labels" / "train" / "x.txt").write_text("\n".join(lines) + "\n")
    config = {"train": "images/train", "names": {0: "a", 1: "b"}}
    (tmp_path / "yolo" / "data.yaml").write_text(yaml.safe_dump(config))

    command = ["convert", str(tmp_path / "yolo"), str(tmp_path / "coco"), "--to", "coco"]
    assert cli_main(command) == 0
    assert "Wrote" in capsys.readouterr().out
    content = json.loads((tmp_path / "coco" / "train" / "_annotations.coco.json").read_text())
    assert [c["name"] for c in content["categories"]] == ["a", "b"]
    assert content["images"][0]["width"] == width and content["images"][0]["height"] == height
    assert (tmp_path / "coco" / "train" / content["images"][0]["file_name"]).is_file()
    for line, annotation in zip(lines, content["annotations"]):
        label, cx, cy, w, h = (float(v) for v in line.split())
        expected = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
        assert annotation["category_id"] == label
        assert all(abs(a - b) <= 0.5 for a, b in zip(annotation["bbox"], expected)), annotation
    again = load_detection_dataset(tmp_path / "coco", validation_fraction=0)
    assert again.format == "coco" and again.class_names == ["a", "b"]
    assert len(again.splits["train"][0]["objects"]["bbox"]) == 3


def test_converted_folder_loads_to_the_same_records(every_format, tmp_path: Path) -> None:
    for name in ("voc", "hf"):
        source = load_detection_dataset(every_format[name], validation_fraction=0)
        destination = tmp_path / name
        assert cli_main(["convert", str(every_format[name]), str(destination)]) == 0
        converted = load_detection_dataset(destination, validation_fraction=0)
        assert converted.class_names == source.class_names
        assert canonical(converted) == canonical(source), name
    assert cli_main(["convert", str(every_format["voc"]), str(tmp_path / "voc")]) == 2


@pytest.fixture(scope="module")
def bccd():
    if not BCCD.is_dir():
        pytest.skip(f"real data not found at {BCCD}")
    return BCCD


def test_bccd_voc_loads_with_published_splits_and_reports_zero_size_boxes(bccd, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        data = load_detection_dataset(bccd, num_classes=3)
    assert (data.format, data.layout) == ("voc", "voc")
    assert sorted(data.class_names) == ["Platelets", "RBC", "WBC"]
    assert {s: len(d) for s, d in data.splits.items()} == {
        "train": 205,
        "validation": 87,
        "test": 72,
    }
    reason = "boxes with zero, negative or NaN size dropped"
    dropped = [p for r in data.skipped.values() for p in r.problems if p.reason == reason]
    assert sorted(Path(p.file).name for p in dropped) == [
        "BloodImage_00338.xml",
        "BloodImage_00343.xml",
    ]
    assert sum(r.counts[reason] for r in data.skipped.values()) == 2
    assert "BloodImage_00338.xml" in caplog.text and "BloodImage_00343.xml" in caplog.text
    boxes = sum(len(o["bbox"]) for d in data.splits.values() for o in d["objects"])
    assert boxes == 4155 + 372 + 361 - 2  # the README's counts, less the two dropped


def test_bccd_voc_trains_a_few_steps(bccd, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = finetune(
        bccd,
        3,
        model=tiny_model_dir,
        output_dir=out,
        max_steps=2,
        per_device_train_batch_size=2,
        image_size=128,
        max_image_size=128,
        max_eval_samples=4,
        num_queries=40,  # BCCD images hold up to 30 boxes
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        report_to="none",
        disable_tqdm=True,
    )
    assert result.eval_split == "test" and result.metrics["eval_loss"] > 0
    config = json.loads((out / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["Platelets", "RBC", "WBC"]
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["format"] == "voc" and report["splits"]["test"]["images"] == 72


def test_convert_is_written_whole_or_not_at_all(every_format, tmp_path, monkeypatch, capsys):
    """A failure midway (here: the disk fills up at the third image) leaves no destination that
    looks complete, and the rerun succeeds."""
    from hf_detr_ft.data.formats import coco_writer

    copy, written = shutil.copy2, []

    def fill_the_disk(source, target, *args, **kwargs):
        written.append(target)
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        return copy(source, target, *args, **kwargs)

    destination = tmp_path / "coco"
    monkeypatch.setattr(coco_writer.shutil, "copy2", fill_the_disk)
    assert cli_main(["convert", str(every_format["voc"]), str(destination)]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert not destination.exists()
    monkeypatch.setattr(coco_writer.shutil, "copy2", copy)
    assert cli_main(["convert", str(every_format["voc"]), str(destination)]) == 0
    source = load_detection_dataset(every_format["voc"], validation_fraction=0)
    assert load_detection_dataset(destination, validation_fraction=0).class_names == (
        source.class_names
    )
    assert [p.name for p in tmp_path.iterdir()] == ["coco"]  # no partial folder left
