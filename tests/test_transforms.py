"""Examples -> model inputs: the transform matches DetrImageProcessor; collate pads per batch."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DetrImageProcessor

from hf_detr_ft.collate import collate_fn
from hf_detr_ft.dataset import load_detection_dataset
from hf_detr_ft.transforms import DetrTransform, train_scales


@pytest.fixture(scope="module")
def processor() -> DetrImageProcessor:
    return DetrImageProcessor(size={"shortest_edge": 96, "longest_edge": 160})


@pytest.fixture(scope="module")
def bccd_train(bccd_coco_dir: Path):
    return load_detection_dataset(bccd_coco_dir).splits["train"]


def test_eval_transform_equals_image_processor(bccd_train, processor) -> None:
    example = bccd_train[0]
    transformed = bccd_train.with_transform(DetrTransform.for_evaluation(processor))
    ours = collate_fn([transformed[0]])
    objects = example["objects"]
    annotation = {
        "image_id": example["image_id"],
        "annotations": [
            {"bbox": b, "category_id": c, "area": a, "iscrowd": int(z)}
            for b, c, a, z in zip(
                objects["bbox"], objects["category"], objects["area"], objects["iscrowd"]
            )
        ],
    }
    reference = processor(images=example["image"], annotations=annotation, return_tensors="pt")
    torch.testing.assert_close(ours["pixel_values"], reference["pixel_values"])
    torch.testing.assert_close(ours["pixel_mask"], reference["pixel_mask"])
    assert ours["pixel_values"].shape[-2:] == (96, 128)  # 640x480 -> shortest edge 96
    for key in ("boxes", "class_labels", "size", "orig_size", "image_id", "area", "iscrowd"):
        torch.testing.assert_close(ours["labels"][0][key], reference["labels"][0][key])
    assert ours["labels"][0]["orig_size"].tolist() == [480, 640]


def test_train_transform_keeps_boxes_valid(bccd_train, processor) -> None:
    transform = DetrTransform.for_training(processor)
    scales = train_scales(96)
    assert scales[0] < scales[-1] == 96
    for _ in range(5):
        item = bccd_train.with_transform(transform)[1]
        labels = item["labels"]
        boxes = labels["boxes"]
        assert len(boxes) == len(labels["class_labels"]) == len(bccd_train[1]["objects"]["bbox"])
        assert torch.all((boxes >= 0) & (boxes <= 1))
        assert torch.all(boxes[:, 2:] > 0)
        assert min(item["pixel_values"].shape[-2:]) in scales


def test_min_scale_sets_the_multi_scale_range(bccd_train, processor) -> None:
    assert train_scales(800) == [480, 560, 640, 720, 800]  # DETR's range
    assert train_scales(800, min_scale=0.8) == [640, 720, 800]
    fixed = DetrTransform.for_training(processor, min_scale=1.0)
    assert fixed.scales == [96]
    for i in range(3):
        assert min(bccd_train.with_transform(fixed)[i]["pixel_values"].shape[-2:]) == 96
    with pytest.raises(ValueError, match="min_scale"):
        train_scales(800, min_scale=0)


def test_collate_pads_to_largest_image_not_a_square() -> None:
    tall = {"pixel_values": torch.ones(3, 40, 20), "labels": {"id": 1}}
    wide = {"pixel_values": torch.full((3, 16, 30), 2.0), "labels": {"id": 2}}
    batch = collate_fn([tall, wide])
    assert batch["pixel_values"].shape == (2, 3, 40, 30)
    assert batch["pixel_mask"].shape == (2, 40, 30)
    assert batch["pixel_mask"][0].sum() == 40 * 20 and batch["pixel_mask"][1].sum() == 16 * 30
    assert np.all(batch["pixel_values"][0, :, :, 20:].numpy() == 0)
    assert torch.all(batch["pixel_values"][1, :, :16, :30] == 2.0)
    assert [label["id"] for label in batch["labels"]] == [1, 2]


def test_training_augmentation_is_reproducible_from_the_seed(bccd_train, processor) -> None:
    def run(seed: int, epoch: int = 0) -> list[torch.Tensor]:
        random.seed(seed + 1)  # the global random state plays no part
        transform = DetrTransform.for_training(processor, seed=seed)
        transform.set_epoch(epoch)
        transformed = bccd_train.with_transform(transform)
        return [transformed[i]["labels"]["boxes"] for i in (0, 1, 0)]

    first, again = run(7), run(7)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    for other in (run(8), run(7, epoch=1)):
        assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, other))
