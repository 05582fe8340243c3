"""Pre-flight checks: crowded images vs num_queries, tiny objects, classes, batch and rates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_coco_json
from PIL import Image
from tiny_families import tiny_config

from hf_detr_ft.arguments import DataArguments, DetrTrainingArguments
from hf_detr_ft.data.dataset import load_detection_dataset
from hf_detr_ft.errors import HfDetrFtError, PreflightError
from hf_detr_ft.models.loading import load_image_processor, load_model
from hf_detr_ft.pipeline.transforms import DetrTransform
from hf_detr_ft.run import finetune
from hf_detr_ft.training.preflight import (
    PREFLIGHT_REPORT,
    preflight_checks,
    run_preflight,
)

WIDTH, HEIGHT = 640, 480  # at image_size 64 / max_image_size 64: 64 x 48, a scale of 0.1
CLASSES = ["a", "b", "c"]


def _write_dataset(root: Path, splits: dict[str, dict[str, list[tuple[str, list]]]]) -> Path:
    """A Roboflow-layout folder: per split, image name -> [(class, [x, y, w, h]), ...]."""
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    for split, images in splits.items():
        folder = root / split
        folder.mkdir(parents=True)
        entries, annotations = [], []
        for image_id, (name, boxes) in enumerate(images.items(), start=1):
            Image.new("RGB", (WIDTH, HEIGHT)).save(folder / name)
            entries.append({"id": image_id, "file_name": name, "width": WIDTH, "height": HEIGHT})
            for cls, box in boxes:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "bbox": box,
                        "category_id": CLASSES.index(cls) + 1,
                        "area": box[2] * box[3],
                        "iscrowd": 0,
                    }
                )
        write_coco_json(folder / "_annotations.coco.json", entries, annotations, categories)
    return root


def _boxes(count: int, cls: str = "a", size: float = 40) -> list[tuple[str, list]]:
    return [(cls, [(i % 10) * 60.0, (i // 10) * 60.0, size, size]) for i in range(count)]


def _args(tmp_path: Path, **kwargs) -> DetrTrainingArguments:
    return DetrTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", **kwargs)


def test_more_boxes_than_num_queries_fails_before_training(tiny_model_dir, tmp_path) -> None:
    root = _write_dataset(
        tmp_path / "data",
        {
            "train": {"crowded.png": _boxes(12), "calm.png": _boxes(2, "b") + _boxes(1, "c")},
            "valid": {"val.png": _boxes(2)},
        },
    )
    out = tmp_path / "out"
    with pytest.raises(PreflightError) as raised:
        finetune(
            root,
            3,
            model=tiny_model_dir,
            output_dir=out,
            image_size=64,
            max_image_size=64,
            max_steps=1,
            report_to="none",
        )
    err = str(raised.value)
    assert isinstance(raised.value, HfDetrFtError)  # the CLI prints it as one line
    assert "crowded.png" in err and "12 objects" in err and "num_queries=10" in err
    assert "--num_queries 20" in err and "re-initialises" in err
    # It stopped before training: a report, but no checkpoint, model or trainer state.
    report = json.loads((out / f"{PREFLIGHT_REPORT}.json").read_text())
    assert report["max_boxes"]["boxes"] == 12 and "crowded.png" in report["max_boxes"]["image"]
    assert report["errors"] and not list(out.glob("checkpoint-*"))
    assert not (out / "model.safetensors").exists() and not (out / "trainer_state.json").exists()

    # The suggested fix works: num_queries=20 re-initialises the queries and passes the check.
    model = load_model(tiny_model_dir, CLASSES, num_queries=20)
    assert model.model.query_position_embeddings.weight.shape[0] == 20
    data = load_detection_dataset(root)
    fixed = preflight_checks(
        data.splits, model.config, image_size=64, max_image_size=64, training_args=_args(tmp_path)
    )
    assert not fixed.errors and not any("num_queries" in w for w in fixed.warnings)


def test_close_to_num_queries_warns(tiny_model_dir, tmp_path) -> None:
    root = _write_dataset(
        tmp_path / "data",
        {
            "train": {"busy.png": _boxes(9), "calm.png": _boxes(2, "b") + _boxes(1, "c")},
            "valid": {"val.png": _boxes(2)},
        },
    )
    config = load_model(tiny_model_dir, CLASSES).config
    report = preflight_checks(
        load_detection_dataset(root).splits,
        config,
        image_size=64,
        max_image_size=64,
        training_args=_args(tmp_path),
    )
    assert not report.errors
    [warning] = [w for w in report.warnings if "num_queries" in w]
    assert "busy.png" in warning and "9 objects" in warning and "num_queries=10" in warning


def test_report_counts_tiny_objects_and_class_imbalance(tiny_model_dir, tmp_path) -> None:
    # At image_size 64 a 640 x 480 image is scaled by 0.1: 100 px -> 10 px, 20/30 px -> 2/3 px.
    root = _write_dataset(
        tmp_path / "data",
        {
            "train": {
                "big.png": _boxes(10, "a", size=100),
                "small.png": [
                    ("a", [0, 0, 20, 50]),
                    ("a", [100, 100, 30, 30]),
                    ("b", [300, 300, 100, 100]),
                ],
            },
            "valid": {"val.png": [("c", [0, 0, 100, 100]), ("a", [200, 200, 30, 40])]},
        },
    )
    splits = load_detection_dataset(root).splits
    config = load_model(tiny_model_dir, CLASSES).config
    args = _args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=4)
    data_args = DataArguments(dataset_dir=str(root), image_size=64, max_image_size=64)
    report = run_preflight(splits, config, data_args, args)

    out = Path(args.output_dir)
    saved = json.loads((out / f"{PREFLIGHT_REPORT}.json").read_text())
    text = (out / f"{PREFLIGHT_REPORT}.txt").read_text()
    assert saved["tiny_boxes"] == {"total": 3, "boxes": 15, "train": 2, "validation": 1}
    assert saved["suggested_image_size"] == 128 and saved["suggested_max_image_size"] == 128
    assert saved["splits"]["train"]["boxes_per_class"] == {"a": 12, "b": 1, "c": 0}
    assert saved["splits"]["train"]["images_per_class"] == {"a": 2, "b": 1, "c": 0}
    assert saved["class_balance"]["smallest_to_largest"] == 0
    assert saved["batch"]["effective"] == 8
    assert "3 of 15 boxes under 4 px" in text and "a 12 boxes / 2 images" in text
    assert any("Imbalanced" in w or "no training boxes" in w for w in report.warnings)
    assert any("never shows: c" in w for w in report.warnings)
    assert any("--image_size 128" in w for w in report.warnings)

    # The same tiny count as the image processor's own resize of the training boxes.
    processor = load_image_processor(tiny_model_dir, image_size=64, max_image_size=64)
    encoded = splits["train"].with_transform(DetrTransform.for_evaluation(processor))
    tiny = 0
    for example in encoded:
        height, width = example["labels"]["size"].tolist()
        boxes = example["labels"]["boxes"]
        tiny += int(((boxes[:, 2:] * boxes.new_tensor([width, height])).min(1).values < 4).sum())
    assert tiny == saved["tiny_boxes"]["train"]


def test_imbalance_ratio_is_reported(tiny_model_dir, tmp_path) -> None:
    root = _write_dataset(
        tmp_path / "data",
        {
            "train": {"many.png": _boxes(24, "a"), "few.png": _boxes(2, "b") + _boxes(1, "c")},
            "valid": {"val.png": _boxes(2)},
        },
    )
    config = load_model(tiny_model_dir, CLASSES, num_queries=40).config
    report = preflight_checks(
        load_detection_dataset(root).splits,
        config,
        image_size=64,
        max_image_size=64,
        training_args=_args(tmp_path),
    )
    assert report.stats["class_balance"] == {
        "smallest_class": "c",
        "largest_class": "a",
        "smallest_to_largest": round(1 / 24, 4),
    }
    assert any("Imbalanced classes: c has 1 training boxes, a 24" in w for w in report.warnings)
    assert "smallest/largest 0.042" in report.to_text()


def test_batch_and_learning_rates_against_the_detr_recipe(tiny_model_dir, tmp_path) -> None:
    root = _write_dataset(
        tmp_path / "data",
        {
            "train": {"one.png": _boxes(2, "a") + _boxes(1, "b") + _boxes(1, "c")},
            "valid": {"val.png": _boxes(1)},
        },
    )
    splits = load_detection_dataset(root).splits
    config = load_model(tiny_model_dir, CLASSES).config
    args = _args(
        tmp_path,
        learning_rate=5e-3,
        lr_backbone=1e-2,
        gradient_accumulation_steps=4,
        per_device_train_batch_size=2,
        not_learning_check_after=2.0,
    )
    report = preflight_checks(splits, config, image_size=64, max_image_size=64, training_args=args)
    assert report.stats["batch"]["effective"] == 8
    assert any("learning_rate 0.005 is high" in w for w in report.warnings)
    assert any("lr_backbone 0.01 is higher" in w for w in report.warnings)
    assert any("not_learning_check_after" in e for e in report.errors)
    with pytest.raises(PreflightError, match="not_learning_check_after"):
        data_args = DataArguments(dataset_dir=str(root), image_size=64, max_image_size=64)
        run_preflight(splits, config, data_args, args)


def test_a_faster_backbone_is_flagged_unless_the_family_trains_it_so(tmp_path) -> None:
    # LW-DETR's (and RF-DETR's) recipe trains its ViT encoder at 1.5e-4 against 1e-4.
    root = _write_dataset(
        tmp_path / "data",
        {
            "train": {"one.png": _boxes(1, "a") + _boxes(1, "b") + _boxes(1, "c")},
            "valid": {"val.png": _boxes(1)},
        },
    )
    splits = load_detection_dataset(root).splits
    args = _args(tmp_path, learning_rate=1e-4, lr_backbone=1.5e-4)
    flagged = {}
    for model_type in ("detr", "lw_detr"):
        config = tiny_config(model_type, CLASSES)
        report = preflight_checks(
            splits, config, image_size=64, max_image_size=64, training_args=args
        )
        flagged[model_type] = any("lr_backbone 0.00015 is higher" in w for w in report.warnings)
    assert flagged == {"detr": True, "lw_detr": False}

    # A frozen backbone learns at no rate: neither a warning nor an lr_backbone in the summary.
    report = preflight_checks(
        splits,
        tiny_config("detr", CLASSES),
        image_size=64,
        max_image_size=64,
        training_args=args,
        freeze_backbone=True,
    )
    assert not any("lr_backbone" in w for w in report.warnings)
    assert "backbone frozen" in report.summary["batch and lr"]
    assert "lr_backbone" not in report.summary["batch and lr"]


def test_an_image_that_vanishes_when_resized_is_an_error(tiny_model_dir, tmp_path) -> None:
    """A 2000x4 strip passes the dataset checks but becomes 0 pixels high at 64: named here."""
    root = _write_dataset(tmp_path / "data", {"train": {"ok.png": _boxes(1)}, "valid": {}})
    annotations = root / "train" / "_annotations.coco.json"
    coco = json.loads(annotations.read_text())
    Image.new("RGB", (2000, 4)).save(root / "train" / "strip.png")
    coco["images"].append({"id": 9, "file_name": "strip.png", "width": 2000, "height": 4})
    coco["annotations"].append({"id": 99, "image_id": 9, "category_id": 1, "bbox": [5, 0, 50, 4]})
    annotations.write_text(json.dumps(coco))
    valid = root / "valid"
    valid.joinpath("_annotations.coco.json").write_text(annotations.read_text())
    for name in ("ok.png", "strip.png"):
        valid.joinpath(name).write_bytes((root / "train" / name).read_bytes())
    config = load_model(tiny_model_dir, CLASSES).config
    report = preflight_checks(
        load_detection_dataset(root).splits,
        config,
        image_size=64,
        max_image_size=64,
        training_args=_args(tmp_path),
    )
    [error] = [e for e in report.errors if "vanish" in e]
    assert "2 images vanish" in error and "strip.png" in error and "2000x4" in error
    assert "64x0" in error
