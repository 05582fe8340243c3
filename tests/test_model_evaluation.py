"""`evaluate`: the numbers are pycocotools' own, on the dataset's original ids and files."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import cocoeval_stats, two_process_launch
from pycocotools.coco import COCO
from transformers import AutoImageProcessor

from hf_detr_ft.cli import main
from hf_detr_ft.data.synthetic import make_shapes_dataset
from hf_detr_ft.demo import DEMO_CHECKPOINT
from hf_detr_ft.errors import DatasetError
from hf_detr_ft.evaluation.coco_metrics import SUMMARY_METRICS
from hf_detr_ft.evaluation.evaluate import evaluate
from hf_detr_ft.models.loading import load_model

CLASSES = ["circle", "square", "triangle"]
SOURCE_IDS = {1: 3, 2: 7, 3: 11}  # the generator's ids -> non-contiguous ones
EMPTY_IMAGE_INDEX = 2  # this test image keeps no boxes


@pytest.fixture(scope="module")
def odd_ids_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shapes with category ids 3, 7, 11 (0 is Roboflow's supercategory), image ids 100+."""
    root = make_shapes_dataset(
        tmp_path_factory.mktemp("odd-ids"), splits={"train": 4, "test": 6}, seed=3
    )
    for split in ("train", "test"):
        path = root / split / "_annotations.coco.json"
        coco = json.loads(path.read_text())
        for category in coco["categories"]:
            category["id"] = SOURCE_IDS.get(category["id"], category["id"])
        new_ids = {image["id"]: 100 + 3 * k for k, image in enumerate(coco["images"])}
        for image in coco["images"]:
            image["id"] = new_ids[image["id"]]
        for annotation in coco["annotations"]:
            annotation["category_id"] = SOURCE_IDS[annotation["category_id"]]
            # pycocotools (the reference below) takes a detection matched to annotation id 0
            # for unmatched; our evaluator renumbers the annotations, the reference cannot.
            annotation["id"] += 1
            annotation["image_id"] = new_ids[annotation["image_id"]]
        if split == "test":
            empty = coco["images"][EMPTY_IMAGE_INDEX]["id"]
            coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != empty]
        path.write_text(json.dumps(coco))
    return root


@pytest.fixture(scope="module")
def shapes_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's checkpoint (its boxes find shapes) with a fresh head for CLASSES: detections
    land on the objects with mixed-up classes, so the metrics are neither 0 nor 1."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("shapes-model")
    load_model(DEMO_CHECKPOINT, CLASSES).save_pretrained(path)
    AutoImageProcessor.from_pretrained(DEMO_CHECKPOINT).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def evaluated(shapes_model_dir: Path, odd_ids_dir: Path, tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("evaluation")
    result = evaluate(
        shapes_model_dir, odd_ids_dir, "test", output_dir=out, save_predictions=True, device="cpu"
    )
    return result, out


def test_metrics_equal_pycocotools_on_the_source_annotations(evaluated, odd_ids_dir) -> None:
    result, out = evaluated
    annotations = odd_ids_dir / "test" / "_annotations.coco.json"
    reference = cocoeval_stats(annotations, out / "predictions_test.json")
    assert [result.metrics[name] for name in SUMMARY_METRICS] == pytest.approx(
        list(reference), abs=1e-12
    )
    assert 0 < result.metrics["map_50"] < 1  # a real, non-trivial case
    for name, source_id in zip(CLASSES, SOURCE_IDS.values()):
        per_class = cocoeval_stats(annotations, out / "predictions_test.json", cat_ids=[source_id])
        assert result.per_class[name]["ap"] == pytest.approx(per_class[0], abs=1e-12), name
        assert result.per_class[name]["ar"] == pytest.approx(per_class[8], abs=1e-12), name

    saved = json.loads((out / "evaluation_test.json").read_text())
    assert saved["metrics"] == result.metrics and saved["per_class"] == result.per_class
    assert saved["images"] == 6 and saved["class_names"] == CLASSES
    assert {"loss", "loss_ce", "loss_bbox", "loss_giou"} <= saved["losses"].keys()
    table = result.table()
    assert all(name in table for name in CLASSES) and "maxDets=100" in table


def test_predictions_load_back_with_the_coco_api(evaluated, odd_ids_dir) -> None:
    result, out = evaluated
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(odd_ids_dir / "test" / "_annotations.coco.json"))
        loaded = truth.loadRes(str(out / "predictions_test.json"))
    predictions = loaded.dataset["annotations"]
    assert {p["category_id"] for p in predictions} <= set(SOURCE_IDS.values())
    # Every image, the one without boxes too, has its detections under its id: as many for each
    # (the checkpoint's sigmoid classes: one per query and class, 10 x 3).
    per_image = Counter(p["image_id"] for p in predictions)
    assert sorted(per_image) == sorted(truth.getImgIds())
    assert set(per_image.values()) == {10 * len(CLASSES)}
    assert len(predictions) == len(result.predictions)


def _recount(annotation_file: Path, predictions_file: Path, confusion: dict) -> list[list[int]]:
    """The confusion matrix recomputed from the saved files by its documented rule alone."""
    truth = json.loads(annotation_file.read_text())
    found = json.loads(predictions_file.read_text())
    labels = confusion["labels"]  # class names, then "background"
    index = {c["id"]: labels.index(c["name"]) for c in truth["categories"] if c["name"] in labels}
    background = len(labels) - 1
    matrix = [[0] * len(labels) for _ in labels]

    def iou(a: list[float], b: list[float]) -> float:
        w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
        h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
        inter = max(w, 0) * max(h, 0)
        return inter / (a[2] * a[3] + b[2] * b[3] - inter)

    for image in truth["images"]:
        boxes = [a for a in truth["annotations"] if a["image_id"] == image["id"]]
        kept = [
            p
            for p in found
            if p["image_id"] == image["id"] and p["score"] >= confusion["score_threshold"]
        ]
        kept.sort(key=lambda p: -p["score"])
        pairs = [
            (iou(g["bbox"], p["bbox"]), i, j)
            for i, g in enumerate(boxes)
            for j, p in enumerate(kept)
            if iou(g["bbox"], p["bbox"]) >= confusion["iou_threshold"]
        ]
        used_g, used_p = set(), set()
        for _, i, j in sorted(pairs, key=lambda pair: -pair[0]):
            if i not in used_g and j not in used_p:
                used_g.add(i)
                used_p.add(j)
                matrix[index[boxes[i]["category_id"]]][index[kept[j]["category_id"]]] += 1
        for i in set(range(len(boxes))) - used_g:
            matrix[index[boxes[i]["category_id"]]][background] += 1
        for j in set(range(len(kept))) - used_p:
            matrix[background][index[kept[j]["category_id"]]] += 1
    return matrix


def test_error_analysis_files_agree_with_a_recount_from_the_saved_predictions(
    evaluated, odd_ids_dir
) -> None:
    result, out = evaluated
    confusion = json.loads((out / "confusion_matrix_test.json").read_text())
    assert confusion["labels"] == [*CLASSES, "background"] and confusion["iou_threshold"] == 0.5
    # The default threshold is the best-F1 one, also in evaluation_test.json.
    saved = json.loads((out / "evaluation_test.json").read_text())
    assert confusion["score_threshold"] == saved["thresholds"]["score_threshold"] is not None
    assert saved["thresholds"]["per_class"].keys() == set(CLASSES)
    annotations = odd_ids_dir / "test" / "_annotations.coco.json"
    recount = _recount(annotations, out / "predictions_test.json", confusion)
    assert confusion["matrix"] == recount
    boxes = sum(map(sum, recount[:-1]))
    assert boxes == result.boxes and sum(recount[-1]) > 0  # every box counted; false ones too
    curves = json.loads((out / "pr_curves_test.json").read_text())
    assert len(curves["recall"]) == 101 and curves["precision"].keys() == set(CLASSES)
    for name in ("confusion_matrix", "pr_curves", "f1_threshold", "worst_images"):
        assert (out / f"{name}_test.png").stat().st_size > 0, name


def test_cli_prints_the_table_and_checks_the_split_and_classes(
    shapes_model_dir, odd_ids_dir, tiny_model_dir, tmp_path, capsys
) -> None:
    common = ["evaluate", "--model", str(shapes_model_dir), "--dataset_dir", str(odd_ids_dir)]
    assert main([*common, "--split", "test", "--output_dir", str(tmp_path), "--cpu"]) == 0
    printed = capsys.readouterr().out
    assert "AP  @[IoU=0.50:0.95 | area=   all | maxDets=100]" in printed and "triangle" in printed
    assert (tmp_path / "evaluation_test.json").is_file()
    assert not (tmp_path / "predictions_test.json").exists()

    with pytest.raises(DatasetError, match="has no 'test' split"):
        evaluate(shapes_model_dir, odd_ids_dir / "test", "test")  # a folder with only train
    with pytest.raises(DatasetError, match="predicts the classes"):
        evaluate(tiny_model_dir, odd_ids_dir, "test")
    assert main([*common, "--split", "valid", "--output_dir", str(tmp_path)]) == 0  # an alias
    assert (tmp_path / "evaluation_validation.json").is_file()


def test_two_processes_give_the_numbers_of_one(evaluated, shapes_model_dir, odd_ids_dir, tmp_path):
    """`accelerate launch` (2 CPU processes, gloo), with an uneven last batch."""
    result, _ = evaluated
    command = two_process_launch(
        29547,
        "-m",
        "hf_detr_ft.cli",
        "evaluate",
        "--cpu",
        "--batch_size",
        "2",
        "--save_predictions",
        "--model",
        str(shapes_model_dir),
        "--dataset_dir",
        str(odd_ids_dir),
        "--split",
        "test",
        "--output_dir",
        str(tmp_path),
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("Saved to") == 1  # only the main process prints
    distributed = json.loads((tmp_path / "evaluation_test.json").read_text())
    assert distributed["metrics"] == pytest.approx(result.metrics, abs=1e-6)
    for name in CLASSES:
        assert distributed["per_class"][name] == pytest.approx(result.per_class[name], abs=1e-6)
    predictions = json.loads((tmp_path / "predictions_test.json").read_text())
    assert len(predictions) == len(result.predictions)
