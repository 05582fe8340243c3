"""Error analysis: confusion matrix, PR curves and the best-F1 threshold on hand-made detections
whose right answers are known by construction; the threshold saved with a trained model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoImageProcessor

from hf_detr_ft import finetune
from hf_detr_ft.cli import main
from hf_detr_ft.demo import DEMO_CHECKPOINT
from hf_detr_ft.errors import ArgumentError
from hf_detr_ft.evaluation.coco_metrics import CocoEvaluator, coco_index
from hf_detr_ft.evaluation.error_analysis import (
    analyse_errors,
    boxes_per_object,
    confusion_matrix,
)
from hf_detr_ft.inference.predict import predict
from hf_detr_ft.models.loading import load_model

NAMES = ["a", "b", "c"]
BACKGROUND = 3


def _objects(boxes: list[list[float]], classes: list[int]) -> dict:
    return {
        "bbox": boxes,
        "category": classes,
        "area": [w * h for _, _, w, h in boxes],
        "iscrowd": [0] * len(boxes),
    }


def _evaluator(truth: dict[int, dict], detections: dict[int, list[tuple]]) -> CocoEvaluator:
    """An evaluator of ``truth`` (image id -> objects) holding ``detections`` (image id ->
    (xywh, score, class) tuples), as the Trainer's evaluation leaves it."""
    images = [{"id": i, "width": 200, "height": 200} for i in truth]
    evaluator = CocoEvaluator(coco_index(images, truth.values(), NAMES))
    for image_id, found in detections.items():
        xywh = torch.tensor([box for box, _, _ in found], dtype=torch.float32).reshape(-1, 4)
        result = {
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
            "scores": torch.tensor([score for _, score, _ in found]),
            "labels": torch.tensor([label for _, _, label in found], dtype=torch.long),
        }
        evaluator.update([image_id], [result])
    evaluator.compute(gather=False)
    return evaluator


A, B, C = [0, 0, 10, 10], [20, 0, 10, 10], [40, 0, 10, 10]


def test_confusion_matrix_counts_matches_misses_and_false_detections() -> None:
    truth = {1: _objects([A, B, C], [0, 1, 2]), 2: _objects([], []), 3: _objects([A], [0])}
    evaluator = _evaluator(
        truth,
        {
            1: [
                (A, 0.9, 0),  # right
                ([1, 0, 10, 10], 0.8, 1),  # a second box on A (IoU .82): a false detection
                (B, 0.7, 2),  # B found as c: wrong class
                (C, 0.3, 0),  # below the threshold: C is missed
                ([100, 100, 10, 10], 0.6, 0),  # nothing there: a false detection
            ],
            2: [(A, 0.95, 1)],  # an image without objects: a false detection
            3: [],  # its A is missed
        },
    )
    found = confusion_matrix(evaluator.ground_truth, evaluator.detections, score_threshold=0.5)
    expected = np.zeros((4, 4), dtype=int)
    expected[0, 0] = 1  # a as a
    expected[0, BACKGROUND] = 1  # image 3's a, missed
    expected[1, 2] = 1  # b as c
    expected[2, BACKGROUND] = 1  # c missed (its detection scored 0.3)
    expected[BACKGROUND, 0] = 1  # the detection where nothing is
    expected[BACKGROUND, 1] = 2  # the duplicate on A, the one on an empty image
    np.testing.assert_array_equal(found.matrix, expected)
    assert found.errors_per_image == {
        1: {"missed": 1, "false": 2, "wrong_class": 1},
        2: {"missed": 0, "false": 1, "wrong_class": 0},
        3: {"missed": 1, "false": 0, "wrong_class": 0},
    }
    assert found.worst_images(2) == [1, 2]  # 4 errors; then 1 each, the lower id first
    saved = found.to_dict()
    assert saved["labels"] == [*NAMES, "background"] and saved["matrix"] == expected.tolist()
    lowered = confusion_matrix(evaluator.ground_truth, evaluator.detections, score_threshold=0.2)
    assert lowered.matrix[2, 0] == 1 and lowered.matrix[2, BACKGROUND] == 0  # c found as a


def test_matching_takes_the_highest_iou_first_not_the_first_box() -> None:
    """g1's best detection (p1, IoU .70) fits g2 better (IoU .90): matched highest IoU first,
    p1 goes to g2 and p2 (IoU .60 with g1 only) to g1; nothing is missed."""
    g1, g2 = [8.24, 0, 10, 10], [10.53, 0, 10, 10]
    p1, p2 = [10, 0, 10, 10], [5.74, 0, 10, 10]
    evaluator = _evaluator({1: _objects([g1, g2], [0, 1])}, {1: [(p1, 0.9, 1), (p2, 0.8, 0)]})
    found = confusion_matrix(evaluator.ground_truth, evaluator.detections, score_threshold=0.5)
    assert found.matrix[0, 0] == 1 and found.matrix[1, 1] == 1 and found.matrix.sum() == 2


def _ranked_case() -> CocoEvaluator:
    """Class a: 4 boxes, detections right, right, wrong, right, wrong, wrong (scores .9 down
    to .4): F1 is best (0.75) keeping scores >= .6. Class b: 2 boxes, both found (.95, .65):
    F1 1 from .65 on. Class c: no boxes. Mean F1 is best (0.875) at .6."""
    boxes_a = [[20 * i, 0, 10, 10] for i in range(4)]
    boxes_b = [[20 * i, 50, 10, 10] for i in range(2)]

    def far(x: int) -> list[int]:
        return [x, 150, 10, 10]

    found = [(boxes_a[0], 0.9, 0), (boxes_a[1], 0.8, 0), (far(100), 0.7, 0), (boxes_a[2], 0.6, 0)]
    found += [(far(120), 0.5, 0), (far(140), 0.4, 0), (boxes_b[0], 0.95, 1), (boxes_b[1], 0.65, 1)]
    return _evaluator({1: _objects(boxes_a + boxes_b, [0] * 4 + [1] * 2)}, {1: found})


def test_best_f1_threshold_of_a_known_case() -> None:
    analysis = analyse_errors(_ranked_case())
    best = analysis.thresholds
    assert best.score_threshold == pytest.approx(0.6) and best.f1 == pytest.approx(0.875)
    assert best.per_class["a"] == pytest.approx(
        {"score_threshold": 0.6, "f1": 0.75, "precision": 0.75, "recall": 0.75}
    )
    assert best.per_class["b"]["score_threshold"] == pytest.approx(0.65)
    assert best.per_class["b"]["f1"] == 1.0
    assert best.per_class["c"]["score_threshold"] is None  # no boxes of c
    # The confusion matrix at that threshold: a's 3 found, its 4th missed, 1 false; b's 2.
    expected = [[3, 0, 0, 1], [0, 2, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    assert analysis.confusion.score_threshold == best.score_threshold
    assert analysis.confusion.matrix.tolist() == expected
    # Mean F1 per threshold, by hand: (F1 a + F1 b) / 2.
    curve = analysis.f1_curve
    assert curve.thresholds == pytest.approx([0.95, 0.9, 0.8, 0.65, 0.6])
    assert curve.mean == pytest.approx([1 / 3, (0.4 + 2 / 3) / 2, 2 / 3, (2 / 3 + 1) / 2, 0.875])


def test_pr_curves_are_pycocotools_arrays() -> None:
    evaluator = _ranked_case()
    curves = analyse_errors(evaluator, score_threshold=0.5).pr_curves
    assert curves.precision.shape == curves.scores.shape == (3, 101)
    assert (curves.precision[2] == -1).all() and curves.has_ground_truth.tolist() == [1, 1, 0]
    for k in (0, 1):  # interpolated precision and scores never rise with recall
        assert (np.diff(curves.precision[k]) <= 0).all() and (np.diff(curves.scores[k]) <= 0).all()
    assert curves.precision[0, 75] == 0.75 and curves.precision[0, 76] == 0  # a's recall ends
    iou = 0.75
    assert np.array_equal(
        analyse_errors(evaluator, iou_threshold=iou).pr_curves.precision,
        evaluator.accumulation["precision"][5, :, :, 0, -1].T,
    )
    with pytest.raises(ArgumentError, match="iou_threshold must be one of"):
        analyse_errors(evaluator, iou_threshold=0.3)


def test_no_right_detection_has_no_threshold(caplog) -> None:
    evaluator = _evaluator({1: _objects([A], [0])}, {1: [([100, 100, 10, 10], 0.9, 0)]})
    analysis = analyse_errors(evaluator)
    assert analysis.thresholds.score_threshold is None and analysis.thresholds.f1 == 0
    assert analysis.confusion.score_threshold == 0.5 and "uses 0.5" in caplog.text
    assert analysis.confusion.matrix[0, BACKGROUND] == 1
    assert analysis.confusion.matrix[BACKGROUND, 0] == 1


@pytest.fixture(scope="module")
def trained(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training step (learning rate 0: the run's mechanics, not learning) from the demo's
    checkpoint with a fresh head: boxes land on the shapes, some of the right class, so a
    best-F1 threshold exists."""
    torch.manual_seed(0)
    start = tmp_path_factory.mktemp("start")
    load_model(DEMO_CHECKPOINT, ["circle", "square", "triangle"]).save_pretrained(start)
    AutoImageProcessor.from_pretrained(DEMO_CHECKPOINT).save_pretrained(start)
    out = tmp_path_factory.mktemp("run")
    finetune(
        shapes_dir,
        3,
        model=start,
        output_dir=out,
        max_steps=1,
        learning_rate=0.0,
        lr_backbone=0.0,
        per_device_train_batch_size=4,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        report_to="none",
        disable_tqdm=True,
    )
    return out


def test_training_saves_the_threshold_and_the_analysis(trained: Path, shapes_dir: Path) -> None:
    config = AutoConfig.from_pretrained(trained)
    metrics = json.loads((trained / "metrics.json").read_text())
    assert config.score_threshold == metrics["thresholds"]["score_threshold"]
    assert 0 < config.score_threshold <= 1
    assert config.score_threshold_per_class.keys() == {"circle", "square", "triangle"}
    for name in ("confusion_matrix_test.json", "confusion_matrix_test.png", "pr_curves_test.png"):
        assert (trained / name).is_file(), name
    card = (trained / "README.md").read_text()
    assert f"Score threshold: **{config.score_threshold:.3f}**" in card
    assert "(confusion_matrix_test.png)" in card

    images = sorted((shapes_dir / "test").glob("*.png"))
    auto = predict(trained, images, threshold="auto", device="cpu")
    given = predict(trained, images, threshold=config.score_threshold, device="cpu")
    assert [p.boxes.scores for p in auto] == [p.boxes.scores for p in given]
    assert min(s for p in auto for s in p.boxes.scores) >= config.score_threshold


def test_predict_auto_needs_a_saved_threshold(tiny_model_dir, shapes_dir, capsys) -> None:
    image = next((shapes_dir / "test").glob("*.png"))
    with pytest.raises(ArgumentError, match="has no saved score threshold"):
        predict(tiny_model_dir, image, threshold="auto", device="cpu")
    assert main(["predict", str(image), "--model", str(tiny_model_dir), "--threshold", "auto"]) == 2
    assert "no saved score threshold" in capsys.readouterr().err


def test_boxes_per_object_counts_duplicates_and_misses() -> None:
    """Image 1: two boxes on object A, one too loose on B (IoU 0.25), one on nothing;
    image 2: one exact box; image 3: an object and no detection; image 4: nothing at all."""
    truth = [
        torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]),
        torch.tensor([[5.0, 5.0, 15.0, 15.0]]),
        torch.tensor([[1.0, 1.0, 2.0, 2.0]]),
        torch.zeros((0, 4)),
    ]
    detected = [
        torch.tensor(
            [[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 10.0, 10.0], [20, 20, 25, 25], [50, 50, 60, 60]]
        ),
        torch.tensor([[5.0, 5.0, 15.0, 15.0]]),
        torch.zeros((0, 4)),
        torch.tensor([[0.0, 0.0, 4.0, 4.0]]),
    ]
    counted = boxes_per_object(truth, detected)
    assert counted.counts == [2, 0, 1, 0]
    assert (counted.single, counted.duplicated, counted.missed) == (1, 1, 2)
    assert counted.at_most_one_share == pytest.approx(3 / 4)
    # A looser IoU threshold takes the box on B (IoU 0.25) as B's.
    assert boxes_per_object(truth, detected, iou_threshold=0.2).counts == [2, 1, 1, 0]


def test_a_box_between_two_objects_counts_for_the_one_it_overlaps_most() -> None:
    truth = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [4.0, 0.0, 14.0, 10.0]])]
    detected = [torch.tensor([[3.0, 0.0, 13.0, 10.0]])]  # IoU 0.54 with the first, 0.82 second
    assert boxes_per_object(truth, detected).counts == [0, 1]
