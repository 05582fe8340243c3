"""The COCO box metric as an ``evaluate`` module: CocoEvaluator's numbers, loaded either way."""

from __future__ import annotations

import subprocess
import sys

import evaluate
import pytest
import torch
from datasets import Dataset

from hf_detr_ft.data.dataset import detection_features
from hf_detr_ft.evaluation import coco_metric_module
from hf_detr_ft.evaluation.coco_metric_module import CocoDetectionMetric
from hf_detr_ft.evaluation.coco_metrics import CocoEvaluator

CLASSES = ["cat", "dog"]
CAT, DOG = 0, 1

#: image id -> ground truth boxes: (xywh, class, area, iscrowd); coordinates exact in float32.
GROUND_TRUTH = {
    1: [
        ([10, 20, 200, 150], CAT, 25000.5, False),  # large, area below the box's (a mask's)
        ([300, 40, 60, 50], DOG, 1000.0, False),  # small by its (mask's) area, medium box
        ([400, 300, 20, 15], CAT, 300.0, False),  # small, never detected
    ],
    2: [
        ([50, 50, 100, 80], DOG, 8000.0, False),
        ([200, 100, 300, 200], DOG, 60000.0, True),  # a crowd region
    ],
    3: [],  # no boxes, one false positive
    4: [
        ([0, 0, 40, 40], CAT, 1600.0, False),
        ([100, 100, 25.5, 30], CAT, 765.0, False),  # small, detected at IoU 0.4 only
    ],
}
#: image id -> detections: (xyxy, class, score).
DETECTIONS = {
    1: [
        ([10, 20, 210, 170], CAT, 0.95),  # exact
        ([305, 45, 360, 90], DOG, 0.8),  # IoU 0.825
        ([500, 10, 560, 70], CAT, 0.6),  # false positive
        ([12, 22, 208, 170], DOG, 0.3),  # right place, wrong class
    ],
    2: [
        ([55, 50, 150, 130], DOG, 0.7),  # IoU 0.95
        ([220, 120, 300, 200], DOG, 0.9),  # inside the crowd region: ignored
        ([10, 10, 30, 30], CAT, 0.2),  # false positive
    ],
    3: [([10, 10, 50, 50], DOG, 0.5)],
    4: [([2, 0, 40, 42], CAT, 0.85), ([110, 105, 130, 135], CAT, 0.4)],
}


def _detections(image_id: int) -> dict[str, torch.Tensor]:
    """As ``post_process_object_detection`` returns them."""
    boxes, labels, scores = zip(*DETECTIONS[image_id])
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels),
    }


def _reference(image_id: int, *, area_and_crowd: bool = True) -> dict:
    boxes = GROUND_TRUTH[image_id]
    reference = {
        "image_id": image_id,
        "boxes": [[x, y, x + w, y + h] for (x, y, w, h), *_ in boxes],
        "labels": [label for _, label, *_ in boxes],
    }
    if area_and_crowd:
        reference["area"] = [area for *_, area, _ in boxes]
        reference["iscrowd"] = [crowd for *_, crowd in boxes]
    return reference


def _coco_evaluator_metrics(ground_truth: dict = GROUND_TRUTH) -> dict[str, float]:
    """hf-detr-ft's own evaluation: the ground truth as a detection split, tensors in."""
    records = [
        {
            "image": None,
            "image_id": image_id,
            "width": 640,
            "height": 480,
            "objects": {
                "id": list(range(len(boxes))),
                "bbox": [bbox for bbox, *_ in boxes],
                "category": [label for _, label, *_ in boxes],
                "area": [area for *_, area, _ in boxes],
                "iscrowd": [crowd for *_, crowd in boxes],
            },
        }
        for image_id, boxes in ground_truth.items()
    ]
    evaluator = CocoEvaluator.from_dataset(
        Dataset.from_list(records, features=detection_features(CLASSES))
    )
    evaluator.update(list(DETECTIONS), [_detections(i) for i in DETECTIONS])
    return evaluator.compute()


def _assert_same(metrics: dict[str, float], expected: dict[str, float]) -> None:
    assert metrics.keys() == expected.keys()
    assert metrics == pytest.approx(expected, abs=1e-9, rel=0)


@pytest.fixture(scope="module")
def expected() -> dict[str, float]:
    metrics = _coco_evaluator_metrics()
    assert 0 < metrics["map"] < 1 and 0 < metrics["ap_cat"] < metrics["ap_dog"] < 1  # non-trivial
    assert 0 < metrics["map_small"] < metrics["map_medium"] < metrics["map_large"]
    return metrics


def test_direct_instance_gives_coco_evaluator_numbers(expected) -> None:
    metric = CocoDetectionMetric(keep_in_memory=True)
    metric.add_batch(  # tensors, as post-processing returns them
        predictions=[_detections(1), _detections(2)], references=[_reference(1), _reference(2)]
    )
    for image_id in (3, 4):  # plain lists, one image at a time
        prediction = {k: v.tolist() for k, v in _detections(image_id).items()}
        metric.add(prediction=prediction, reference=_reference(image_id))
    _assert_same(metric.compute(class_names=CLASSES), expected)


def test_evaluate_load_of_the_file_gives_the_same_numbers(expected) -> None:
    metric = evaluate.load(coco_metric_module.__file__, keep_in_memory=True)
    assert type(metric).__name__ == "CocoDetectionMetric"
    assert type(metric) is not CocoDetectionMetric  # evaluate's own copy of the script
    metrics = metric.compute(
        predictions=[_detections(i) for i in DETECTIONS],
        references=[_reference(i) for i in DETECTIONS],
        class_names=CLASSES,
    )
    _assert_same(metrics, expected)


def test_area_and_iscrowd_default_to_box_area_and_not_crowd(expected) -> None:
    plain = {i: [(b, c, b[2] * b[3], False) for b, c, *_ in v] for i, v in GROUND_TRUTH.items()}
    plain_expected = _coco_evaluator_metrics(plain)
    assert plain_expected["map_small"] != expected["map_small"]  # the given area counted
    assert plain_expected["ap_dog"] != expected["ap_dog"]  # and the crowd flag
    metric = CocoDetectionMetric(keep_in_memory=True)
    metrics = metric.compute(
        predictions=[_detections(i) for i in DETECTIONS],
        references=[_reference(i, area_and_crowd=False) for i in DETECTIONS],
        class_names=CLASSES,
    )
    _assert_same(metrics, plain_expected)


def test_default_class_names_and_a_repeated_image_counted_once(expected) -> None:
    metric = CocoDetectionMetric(keep_in_memory=True)
    ids = [*DETECTIONS, 4]  # image 4 twice, e.g. padding of the last batch
    metrics = metric.compute(
        predictions=[_detections(i) for i in ids], references=[_reference(i) for i in ids]
    )
    renamed = {k.replace("_cat", "_0").replace("_dog", "_1"): v for k, v in expected.items()}
    _assert_same(metrics, renamed)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p, r: (p, r[:-1]), r"Mismatch in the number of predictions \(4\) and references"),
        (
            lambda p, r: ([{**p[0], "scores": p[0]["scores"][:2]}, *p[1:]], r),
            r"prediction of image_id 1 has 4 boxes, 2 scores, 4 labels",
        ),
        (
            lambda p, r: (p, [{**r[0], "labels": [0]}, *r[1:]]),
            r"reference of image_id 1 has 3 boxes, 1 labels, 3 area, 3 iscrowd",
        ),
        (lambda p, r: (p, [{**r[0], "labels": [0, 1, 2]}, *r[1:]]), r"labels \[2\] outside 0..1"),
        (lambda p, r: ([*p, p[0]], [*r, r[1]]), r"image_id 2 is given twice with different"),
    ],
    ids=["images", "scores", "labels", "class", "duplicate"],
)
def test_malformed_input_is_a_clear_error(change, message) -> None:
    predictions, references = change(
        [_detections(i) for i in DETECTIONS], [_reference(i) for i in DETECTIONS]
    )
    metric = CocoDetectionMetric(keep_in_memory=True)
    with pytest.raises(ValueError, match=message):
        metric.compute(predictions=predictions, references=references, class_names=CLASSES)


def test_import_hf_detr_ft_loads_neither_the_module_nor_evaluate() -> None:
    code = (
        "import sys, hf_detr_ft; "
        "assert 'hf_detr_ft.evaluation.coco_metric_module' not in sys.modules; "
        "assert 'evaluate' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
