"""COCO metrics from CocoEvaluator equal pycocotools run directly on the same predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cocoeval_stats
from datasets import Dataset

from hf_detr_ft.data.dataset import detection_features
from hf_detr_ft.evaluation.coco_metrics import SUMMARY_METRICS, CocoEvaluator

CLASSES = ["cat", "dog", "bird"]


def _ground_truth_records() -> list[dict]:
    rng = np.random.default_rng(0)
    records = []
    for image_id in (5, 9, 12, 40):
        count = 0 if image_id == 12 else int(rng.integers(1, 6))  # image 12 has no boxes
        boxes = [rng.uniform([0, 0, 5, 5], [150, 100, 120, 90]).tolist() for _ in range(count)]
        records.append(
            {
                "image": None,
                "image_id": image_id,
                "width": 320,
                "height": 240,
                "objects": {
                    "id": list(range(count)),
                    "bbox": boxes,
                    "category": [int(rng.integers(0, 2)) for _ in range(count)],  # no "bird"
                    "area": [b[2] * b[3] for b in boxes],
                    "iscrowd": [False] * count,
                },
            }
        )
    return records


def _noisy_predictions(records: list[dict], seed: int = 1) -> dict[int, dict[str, torch.Tensor]]:
    """Jittered true boxes, some with wrong labels, plus random false positives."""
    rng = np.random.default_rng(seed)
    predictions = {}
    for record in records:
        xywh = np.array(record["objects"]["bbox"], dtype=np.float32).reshape(-1, 4)
        labels = np.array(record["objects"]["category"], dtype=np.int64)
        xywh = xywh + rng.normal(0, 4, xywh.shape).astype(np.float32)
        labels = np.where(rng.random(len(labels)) < 0.2, (labels + 1) % 3, labels)
        extra = rng.uniform(0, 150, (3, 4)).astype(np.float32)
        xywh = np.concatenate([xywh, extra])
        xywh[:, 2:] = np.abs(xywh[:, 2:]) + 1
        labels = np.concatenate([labels, rng.integers(0, 3, 3)])
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        predictions[record["image_id"]] = {
            "boxes": torch.from_numpy(xyxy),
            "labels": torch.from_numpy(labels),
            "scores": torch.from_numpy(rng.uniform(0.05, 1, len(labels)).astype(np.float32)),
        }
    return predictions


def _pycocotools_stats(tmp_path: Path, records, predictions, cat_ids=None) -> np.ndarray:
    """The reference: pycocotools on a GT file and a results list, nothing of ours."""
    gt = {
        "images": [
            {"id": r["image_id"], "width": r["width"], "height": r["height"]} for r in records
        ],
        "annotations": [
            {
                "id": 1000 * r["image_id"] + k,
                "image_id": r["image_id"],
                "category_id": c,
                "bbox": b,
                "area": b[2] * b[3],
                "iscrowd": 0,
            }
            for r in records
            for k, (b, c) in enumerate(zip(r["objects"]["bbox"], r["objects"]["category"]))
        ],
        "categories": [{"id": i, "name": n} for i, n in enumerate(CLASSES)],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    results = [
        {
            "image_id": image_id,
            "category_id": int(label),
            "score": float(score),
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
        }
        for image_id, p in predictions.items()
        for (x0, y0, x1, y1), label, score in zip(p["boxes"].tolist(), p["labels"], p["scores"])
    ]
    return cocoeval_stats(path, results, cat_ids)


@pytest.fixture()
def records() -> list[dict]:
    return _ground_truth_records()


def _evaluator(records) -> CocoEvaluator:
    dataset = Dataset.from_list(records, features=detection_features(CLASSES))
    return CocoEvaluator.from_dataset(dataset)


def test_metrics_equal_pycocotools(tmp_path: Path, records) -> None:
    predictions = _noisy_predictions(records)
    evaluator = _evaluator(records)
    ids = list(predictions)
    evaluator.update(ids[:2], [predictions[i] for i in ids[:2]])  # batch by batch
    evaluator.update(ids[2:], [predictions[i] for i in ids[2:]])
    metrics = evaluator.compute()

    reference = _pycocotools_stats(tmp_path, records, predictions)
    assert [metrics[name] for name in SUMMARY_METRICS] == pytest.approx(list(reference), abs=1e-12)
    assert 0 < metrics["map"] < 1  # a real, non-trivial case
    for k in (0, 1):
        per_class = _pycocotools_stats(tmp_path, records, predictions, cat_ids=[k])
        assert metrics[f"ap_{CLASSES[k]}"] == pytest.approx(per_class[0], abs=1e-12)
        assert metrics[f"ar_{CLASSES[k]}"] == pytest.approx(per_class[8], abs=1e-12)
    assert metrics["ap_bird"] == -1.0  # no ground truth for this class


def test_an_image_seen_twice_counts_once(records) -> None:
    predictions = _noisy_predictions(records)
    once, twice = _evaluator(records), _evaluator(records)
    once.update(list(predictions), list(predictions.values()))
    twice.update(list(predictions), list(predictions.values()))
    twice.update([5], [predictions[5]])  # e.g. padding of the last batch across processes
    assert once.compute() == twice.compute()


def test_no_detections_gives_zero_and_missing_images_are_an_error(records) -> None:
    evaluator = _evaluator(records)
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.long),
        "scores": torch.zeros(0),
    }
    evaluator.update([r["image_id"] for r in records], [empty] * len(records))
    metrics = evaluator.compute()
    assert metrics["map"] == 0.0 and metrics["ap_cat"] == 0.0 and metrics["ap_bird"] == -1.0
    partial = _evaluator(records)
    partial.update([5], [empty])
    with pytest.raises(RuntimeError, match="got no prediction"):
        partial.compute()
