"""The aspect-ratio grouped sampler: coverage, determinism, sharding, grouping, a real Trainer."""

from __future__ import annotations

import numpy as np
import pytest
from accelerate.data_loader import BatchSamplerShard
from conftest import tiny_trainer
from torch.utils.data import BatchSampler

from hf_detr_ft.data.synthetic import make_shapes_dataset
from hf_detr_ft.pipeline.sampler import (
    AspectRatioGroupedSampler,
    AspectRatioSortedSampler,
    aspect_ratio_groups,
)
from hf_detr_ft.training.trainer import DetrTrainer

# 23 images: portraits, landscapes, panoramas and squares, shuffled together.
SHAPES = [(480, 640)] * 7 + [(640, 480)] * 6 + [(1200, 300)] * 5 + [(500, 500)] * 5
RNG = np.random.default_rng(0)
ORDER = RNG.permutation(len(SHAPES))
WIDTHS = [SHAPES[i][0] for i in ORDER]
HEIGHTS = [SHAPES[i][1] for i in ORDER]


def _sampler(batch_size: int = 4, seed: int = 0, epoch: int = 0) -> AspectRatioGroupedSampler:
    sampler = AspectRatioGroupedSampler(WIDTHS, HEIGHTS, batch_size, seed=seed)
    sampler.set_epoch(epoch)
    return sampler


@pytest.mark.parametrize("batch_size", [1, 2, 4, 5, 30])
def test_every_index_exactly_once_per_epoch(batch_size: int) -> None:
    for epoch in range(3):
        order = list(_sampler(batch_size, epoch=epoch))
        assert sorted(order) == list(range(len(SHAPES)))
        assert len(_sampler(batch_size)) == len(SHAPES)


def test_deterministic_per_seed_and_different_per_epoch() -> None:
    assert list(_sampler(seed=3)) == list(_sampler(seed=3))
    assert list(_sampler(seed=3)) != list(_sampler(seed=4))
    assert list(_sampler(epoch=0)) != list(_sampler(epoch=1))


def test_batches_hold_one_aspect_ratio_bin() -> None:
    groups = aspect_ratio_groups(WIDTHS, HEIGHTS)
    assert len(set(groups)) == 4  # portrait, square, landscape, panorama
    batches = list(BatchSampler(_sampler(4), 4, drop_last=False))
    assert batches == _sampler(4).batches()  # the BatchSampler cuts exactly the grouped batches
    mixed = [n for n, b in enumerate(batches) if len({groups[i] for i in b}) > 1]
    # only the leftovers of the 4 bins (at most 3 each) are batched together, at the end
    assert mixed == list(range(len(batches) - len(mixed), len(batches)))
    assert len(mixed) <= 3
    # versus random batching, where almost every batch mixes shapes
    random_batches = [ORDER[i : i + 4] for i in range(0, len(ORDER), 4)]
    assert sum(len({SHAPES[i] for i in b}) > 1 for b in random_batches) >= 4


def test_shards_across_two_processes_disjointly_and_completely() -> None:
    """accelerate deals whole batches round-robin; each batch stays within one bin."""
    widths, heights = WIDTHS[:20] + [640] * 4, HEIGHTS[:20] + [480] * 4  # 24 = 2 x 3 x 4
    sampler = AspectRatioGroupedSampler(widths, heights, 3, seed=7)
    shards = [list(BatchSamplerShard(BatchSampler(sampler, 3, False), 2, rank)) for rank in (0, 1)]
    seen = [i for shard in shards for batch in shard for i in batch]
    assert sorted(seen) == list(range(24))  # complete, and nothing twice
    assert len(shards[0]) == len(shards[1]) == 4
    assert sorted(shards[0] + shards[1]) == sorted(sampler.batches())  # whole batches dealt


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        AspectRatioGroupedSampler([1], [1], 0)
    with pytest.raises(ValueError, match="2 widths but 1 heights"):
        AspectRatioGroupedSampler([1, 2], [1], 2)


MIXED_SHAPES = [(48, 96), (96, 64), (128, 32)]  # portrait, landscape, panorama


def _mixed_trainer(tiny_model_dir, tmp_path, **args) -> DetrTrainer:
    data_dir = make_shapes_dataset(
        tmp_path / "mixed",
        splits={"train": 12, "valid": 3},
        image_shapes=MIXED_SHAPES,
        min_size=8,
        max_size=24,
        seed=2,
    )
    return tiny_trainer(
        tiny_model_dir,
        data_dir,
        tmp_path / "out",
        max_image_size=96,
        eval_split="train",
        per_device_train_batch_size=2,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        logging_steps=1,
        **args,
    )


def _padded_fraction(batches) -> float:
    masks = [batch["pixel_mask"] for batch in batches]
    return 1 - sum(float(m.sum()) for m in masks) / sum(m.numel() for m in masks)


def test_trainer_batches_by_aspect_ratio_and_trains(tiny_model_dir, tmp_path) -> None:
    grouped = _mixed_trainer(tiny_model_dir, tmp_path, max_steps=4)
    assert isinstance(grouped._get_train_sampler(), AspectRatioGroupedSampler)
    assert _padded_fraction(grouped.get_train_dataloader()) < 0.05  # same shapes per batch
    plain = _mixed_trainer(tiny_model_dir, tmp_path, max_steps=4, group_by_aspect_ratio=False)
    assert _padded_fraction(plain.get_train_dataloader()) > 0.2

    grouped.train()
    losses = [log["loss"] for log in grouped.state.log_history if "loss" in log]
    assert grouped.state.global_step == 4 and len(losses) == 4
    assert all(np.isfinite(losses))


def test_evaluation_batches_sorted_by_aspect_ratio_cover_every_image(
    tiny_model_dir, tmp_path
) -> None:
    sorted_order = AspectRatioSortedSampler([96, 32, 64, 32], [64, 64, 64, 128], batch_size=2)
    assert list(sorted_order) == [3, 1, 2, 0] and len(sorted_order) == 4  # one image per bin
    # three landscapes, three portraits, batches of 2: sorting alone would give a mixed batch in
    # the middle; full batches of one shape come first, the two leftovers last
    alternating = AspectRatioSortedSampler([640, 480] * 3, [480, 640] * 3, batch_size=2)
    assert list(alternating) == [1, 3, 0, 2, 5, 4]

    grouped = _mixed_trainer(tiny_model_dir, tmp_path, per_device_eval_batch_size=2)
    batches = list(grouped.get_eval_dataloader())
    ids = [int(target["image_id"]) for batch in batches for target in batch["labels"]]
    assert sorted(ids) == sorted(grouped.eval_dataset.with_format(None)["image_id"])  # each once
    assert _padded_fraction(batches) < 0.05
    plain = _mixed_trainer(
        tiny_model_dir, tmp_path, per_device_eval_batch_size=2, group_by_aspect_ratio=False
    )
    assert _padded_fraction(plain.get_eval_dataloader()) > 0.2
