"""Tiled inference: the tile grid, boxes mapped back and merged, and small objects in a large
image that only the tiles find (the demo checkpoint, trained on these shapes at 128 px)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_convert, box_iou

from hf_detr_ft.cli import main as cli_main
from hf_detr_ft.data.synthetic import render_shapes_image
from hf_detr_ft.demo import DEMO_CHECKPOINT
from hf_detr_ft.errors import ArgumentError
from hf_detr_ft.inference.predict import predict
from hf_detr_ft.inference.tiling import Tiling, merge_detections, shift_uncut, tile_grid

#: The classes the demo checkpoint was trained on, in its label order.
DEMO_CHECKPOINT_CLASSES = ("diamond", "cross", "ring", "star", "hexagon")


@pytest.mark.parametrize(
    ("width", "height", "size", "overlap"),
    [(1000, 700, 128, 0.2), (300, 128, 128, 0.0), (129, 500, 64, 0.5), (2048, 2048, 128, 0.25)],
)
def test_tiles_cover_the_image_overlap_as_asked_and_stay_whole(width, height, size, overlap):
    grid = tile_grid(width, height, size, overlap)
    covered = np.zeros((height, width), dtype=int)
    for x0, y0, x1, y1 in grid:
        assert (x1 - x0, y1 - y0) == (min(size, width), min(size, height))  # no short edge tiles
        assert 0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    xs = sorted({x0 for x0, *_ in grid})
    ys = sorted({y0 for _, y0, *_ in grid})
    assert xs[0] == ys[0] == 0
    assert xs[-1] + min(size, width) == width and ys[-1] + min(size, height) == height
    for starts in (xs, ys):
        for a, b in zip(starts, starts[1:]):
            assert size - (b - a) >= overlap * size - 1  # overlap kept, to a pixel of rounding


def test_an_image_smaller_than_a_tile_is_one_tile() -> None:
    assert tile_grid(100, 60, 128, 0.2) == [(0, 0, 100, 60)]


def _detections(boxes: list[list[float]], labels: list[int], scores: list[float]) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels),
        "scores": torch.tensor(scores),
    }


def test_tile_boxes_are_shifted_and_those_cut_by_a_shared_edge_dropped() -> None:
    # a tile in the middle of the top row of a 300x200 image: left and right and bottom edges
    # are shared with neighbours, the top edge is the image's
    tile = (100, 0, 228, 128)
    found = _detections(
        [
            [0.0, 40, 20, 60],  # touches the left edge: cut there, dropped
            [50, 0.0, 70, 20],  # touches the top edge, the image's own: kept
            [40, 40, 60, 60],  # inside: kept
            [100, 110, 120, 127],  # reaches the bottom edge: dropped
            [110, 10, 128, 30],  # reaches the right edge: dropped
        ],
        [0, 1, 2, 0, 1],
        [0.9, 0.8, 0.7, 0.6, 0.5],
    )
    kept = shift_uncut(found, tile, (300, 200), margin=2.0)
    assert kept["boxes"].tolist() == [[150, 0, 170, 20], [140, 40, 160, 60]]
    assert kept["labels"].tolist() == [1, 2] and kept["scores"].tolist() == pytest.approx(
        [0.8, 0.7]
    )


def test_merging_suppresses_overlaps_within_a_class_only() -> None:
    whole = _detections([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 1], [0.6, 0.9])
    tiles = _detections(
        [[1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 61]], [0, 2, 1], [0.8, 0.7, 0.5]
    )
    merged = merge_detections([whole, tiles], iou=0.5)
    # class 0: the tile's 0.8 beats the whole image's 0.6; class 2 is another class, kept;
    # class 1: the whole image's 0.9 beats the tile's 0.5
    assert merged["scores"].tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert merged["labels"].tolist() == [1, 0, 2]
    assert merged["boxes"].tolist()[1] == [1, 1, 11, 11]


def test_bad_tiling_values_are_refused_before_any_model_is_loaded(tmp_path) -> None:
    for values, flag in [((16,), "tile"), ((128, 0.95), "overlap"), ((128, 0.2, 1.5), "iou")]:
        with pytest.raises(ArgumentError, match=flag):
            Tiling(*values)
    with pytest.raises(ArgumentError, match="tile must be at least 32"):
        predict(tmp_path / "no-such-model", tmp_path / "no-such.jpg", tile=8)


def test_tiling_flags_without_tile_are_refused(tmp_path, capsys) -> None:
    # --overlap alone would be silently ignored: one line says it needs --tile.
    argv = ["predict", str(tmp_path / "a.jpg"), "--model", str(tmp_path), "--overlap", "0.3"]
    with pytest.raises(SystemExit) as stop:
        cli_main(argv)
    assert stop.value.code == 2
    assert "--overlap needs --tile SIZE" in capsys.readouterr().err


def _recall(found, truth: torch.Tensor, truth_labels: torch.Tensor) -> float:
    """Share of true boxes with a detection of their class at IoU >= 0.5."""
    hits = box_iou(truth, found.boxes.xyxy) >= 0.5
    same_class = truth_labels[:, None] == torch.tensor(found.boxes.labels)[None, :]
    return (hits & same_class).any(dim=1).float().mean().item()


def test_tiles_find_small_objects_that_the_whole_image_misses(tmp_path) -> None:
    """40 shapes of 20-36 px on a 768 x 768 image: the model's 128-px input shrinks them
    to 3-6 px, tiles of 128 px show them at the size the model was trained on."""
    image, objects = render_shapes_image(
        np.random.default_rng(0),
        DEMO_CHECKPOINT_CLASSES,
        shape=(768, 768),
        min_objects=40,
        max_objects=40,
        min_size=20,
        max_size=36,
    )
    path = tmp_path / "large.png"
    image.save(path)
    truth = box_convert(torch.tensor([box for _, box in objects]), "xywh", "xyxy")
    truth_labels = torch.tensor([label for label, _ in objects])

    # 0.3: the checkpoint is pretrained with focal loss, whose scores run lower than DETR's.
    [whole] = predict(DEMO_CHECKPOINT, path, device="cpu", threshold=0.3)
    tiles = {"tile": 128, "overlap": 0.25, "batch_size": 16}
    [tiled] = predict(DEMO_CHECKPOINT, path, device="cpu", threshold=0.3, **tiles)

    whole_recall = _recall(whole, truth, truth_labels)
    tiled_recall = _recall(tiled, truth, truth_labels)
    print(f"recall: whole image {whole_recall:.3f}, tiles {tiled_recall:.3f}")  # docs' numbers
    assert len(objects) == 40
    assert whole_recall <= 0.05
    assert tiled_recall >= 0.8
    assert tiled.boxes.xyxy.min() >= 0 and tiled.boxes.xyxy.max() <= 768 + 1e-3
    assert tiled.boxes.scores == sorted(tiled.boxes.scores, reverse=True)
