"""Models that run on no image as small as asked for, and configs that build no working model.

Two-stage detectors pick their queries among the positions of their feature maps, so a tiny
RT-DETR given many queries needs a larger image than 64 px: the run raises the size (with a
warning), drops the multi-scale draws below it, and still folds its frozen norms.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from tiny_families import tiny_config, tiny_image_processor
from transformers import (
    AutoImageProcessor,
    AutoModelForObjectDetection,
    DetrImageProcessor,
    RTDetrImageProcessor,
    pipeline,
)

from hf_detr_ft import finetune
from hf_detr_ft.errors import ModelLoadError
from hf_detr_ft.models.families import family_of
from hf_detr_ft.models.input_sizes import (
    FIRST_SIDE,
    default_batch_size,
    largest_input_pixels,
    run_error,
    smallest_input_side,
)
from hf_detr_ft.models.loading import load_model
from hf_detr_ft.models.speedups import fold_frozen_batchnorm
from hf_detr_ft.pipeline.transforms import train_sizes

CLASSES = ["circle", "square", "triangle"]
#: More queries than a 64 px image has feature-map positions in the tiny RT-DETR.
MANY_QUERIES = 150


def _model(model_type: str, **changes: object) -> torch.nn.Module:
    config = tiny_config(model_type, CLASSES)
    for name, value in changes.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    return AutoModelForObjectDetection.from_config(config)


def _saved(model: torch.nn.Module, model_type: str, path: Path) -> Path:
    model.save_pretrained(path)
    tiny_image_processor(model_type).save_pretrained(path)
    return path


def test_the_smallest_side_is_where_the_model_starts_to_run() -> None:
    model = _model("rt_detr", num_queries=MANY_QUERIES)
    multiple = family_of(model.config).size_multiple(model.config)
    side = smallest_input_side(model, multiple, requested=64)
    assert side > FIRST_SIDE and side % multiple == 0
    assert run_error(model, side) is None
    assert "out of range" in str(run_error(model, side - multiple))
    assert model.training  # probing leaves the mode as it was
    # Asked again (finetune asks, then the fold check), the side is known without a run.
    runs = []
    hook = model.register_forward_pre_hook(lambda module, inputs: runs.append(1))
    assert smallest_input_side(model, multiple, requested=640) == side
    assert runs == []
    hook.remove()
    # A model without the limit runs on the first size tried.
    assert smallest_input_side(_model("detr"), 1, requested=64) == FIRST_SIDE


def test_a_run_raises_a_too_small_size_and_its_draws(shapes_dir, tmp_path, caplog) -> None:
    model = _model("rt_detr", num_queries=MANY_QUERIES)
    side = smallest_input_side(model, 32, requested=64)
    folder = _saved(model, "rt_detr", tmp_path / "model")
    with caplog.at_level(logging.WARNING):
        finetune(
            shapes_dir,
            model=folder,
            output_dir=tmp_path / "out",
            image_size=64,
            max_image_size=64,
            max_steps=2,
            per_device_train_batch_size=2,
            eval_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
        )
    assert f"Image size 64x64 raised to {side}x{side}" in caplog.text
    saved = AutoImageProcessor.from_pretrained(tmp_path / "out")
    assert dict(saved.size) == {"height": side, "width": side}
    found = pipeline("object-detection", model=str(tmp_path / "out"), threshold=0.0)(
        str(next((shapes_dir / "test").glob("*.png")))
    )
    assert found and {d["label"] for d in found} <= set(CLASSES)


def test_multi_scale_draws_below_the_smallest_side_are_dropped() -> None:
    square = {"height": 128, "width": 128}
    assert [s["height"] for s in train_sizes(square, 0.5, 1.25, 32)] == [64, 96, 128, 160]
    assert [s["height"] for s in train_sizes(square, 0.5, 1.25, 32, min_side=128)] == [128, 160]
    edges = train_sizes({"shortest_edge": 100, "longest_edge": 200}, 0.6, min_side=90)
    assert [s["shortest_edge"] for s in edges] == [90, 100]


def test_frozen_norms_are_folded_where_64_px_is_too_small() -> None:
    model = _model("rt_detr", num_queries=MANY_QUERIES)
    assert run_error(model, 64) is not None
    assert fold_frozen_batchnorm(model) > 0


def test_a_config_that_runs_on_no_size_is_one_clear_error() -> None:
    model = _model("rt_detr", num_queries=100_000)
    with pytest.raises(ModelLoadError, match="rt_detr model runs on no square image from 64"):
        smallest_input_side(model, 32, requested=64)


def test_lw_detr_without_a_projector_level_is_repaired(tmp_path, caplog) -> None:
    # transformers' LwDetrConfig() default: projector_scale_factors [] builds no feature level.
    config = tiny_config("lw_detr", CLASSES)
    broken = type(config).from_dict(
        {
            **{k: v for k, v in config.to_dict().items() if k != "num_feature_levels"},
            "projector_scale_factors": [],
            "projector_in_channels": [],
        }
    )
    assert broken.num_feature_levels == 0
    model = AutoModelForObjectDetection.from_config(broken)
    assert run_error(model, 64) is not None
    folder = _saved(model, "lw_detr", tmp_path / "model")
    with caplog.at_level(logging.WARNING):
        loaded = load_model(folder, CLASSES)
    assert "config repaired, projector_scale_factors [] -> [1.0]" in caplog.text
    assert loaded.config.projector_scale_factors == [1.0]
    assert loaded.config.id2label == dict(enumerate(CLASSES))
    assert run_error(loaded, 64) is None


@pytest.mark.parametrize(
    ("processor", "device", "expected"),
    [
        # DETR's default rule, up to 800x1333: one image a forward pass on a CPU.
        (lambda: DetrImageProcessor(), "cpu", 1),
        # RT-DETR's fixed 640x640 square: two.
        (lambda: RTDetrImageProcessor(), "cpu", 2),
        # A small model input (the demo's 128 px): the full batch.
        (lambda: DetrImageProcessor(size={"shortest_edge": 128, "longest_edge": 171}), "cpu", 8),
        # The transformers example's letterbox rule (max_height x max_width).
        (lambda: DetrImageProcessor(size={"max_height": 600, "max_width": 600}), "cpu", 2),
        # On an accelerator, always the full batch.
        (lambda: DetrImageProcessor(), "cuda", 8),
    ],
)
def test_the_default_batch_fits_a_megapixel_on_a_cpu(processor, device, expected) -> None:
    assert default_batch_size(torch.device(device), processor().size) == expected


def test_input_pixels_of_every_size_rule() -> None:
    assert largest_input_pixels({"height": 640, "width": 480}) == 640 * 480
    assert largest_input_pixels({"shortest_edge": 800, "longest_edge": 1333}) == 800 * 1333
    assert largest_input_pixels({"shortest_edge": 600}) == 600 * 1000  # DETR's ratio
    assert largest_input_pixels({"longest_edge": 600}) == 600 * 600
    assert largest_input_pixels({}) is None
    assert default_batch_size(torch.device("cpu"), {}) == 8  # an unknown rule: no guess
