"""The attention figure and the training report, from a tiny model's real (2-epoch) run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from hf_detr_ft.artifacts.training_report import (
    LOSSES_PLOT,
    MAP_PLOT,
    SAMPLES_JSON,
    SAMPLES_PLOT,
    ReportError,
    plot_training_curves,
    read_log_history,
    save_sample_predictions,
)
from hf_detr_ft.cli import main
from hf_detr_ft.data.dataset import load_detection_dataset
from hf_detr_ft.inference.explain import attention_maps, explain
from hf_detr_ft.models.loading import load_detector
from hf_detr_ft.run import finetune

REPORT = (LOSSES_PLOT, MAP_PLOT, SAMPLES_PLOT)


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, shapes_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    finetune(
        shapes_dir,
        3,
        model=tiny_model_dir,
        output_dir=out,
        num_train_epochs=2,
        image_size=64,
        max_image_size=64,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
    )
    return out


def _assert_png(path: Path, min_size: tuple[int, int]) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_size[0] and image.height >= min_size[1]
        image.load()


def test_training_writes_its_report(run_dir: Path) -> None:
    for name in REPORT:
        _assert_png(run_dir / name, (400, 300))
    history = read_log_history(run_dir)
    assert any("loss_giou" in e for e in history) and any("eval_map" in e for e in history)


def _iou(a: list[float], b: list[float]) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(
        0.0, min(a[3], b[3]) - max(a[1], b[1])
    )
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area - inter)


def test_sample_predictions_json_holds_what_the_picture_draws(run_dir, shapes_dir, tmp_path):
    """Every drawn box with its score, and boxes per object recountable from them."""
    assert (run_dir / SAMPLES_JSON).is_file()  # written by training beside the picture
    model, processor = load_detector(run_dir)
    validation = load_detection_dataset(shapes_dir).splits["validation"]
    written = save_sample_predictions(
        model, processor, validation, tmp_path / SAMPLES_PLOT, count=3, threshold=0.01
    )
    assert [p.name for p in written] == [SAMPLES_PLOT, SAMPLES_JSON]
    drawn = json.loads(written[1].read_text())
    assert drawn["score_threshold"] == 0.01 and len(drawn["images"]) == 3
    counts = []
    for image, objects in zip(drawn["images"], validation["objects"][:3], strict=True):
        assert len(image["ground_truth"]) == len(objects["bbox"])
        assert image["predictions"] and all(p["score"] >= 0.01 for p in image["predictions"])
        per_object = [0] * len(image["ground_truth"])
        for prediction in image["predictions"]:
            ious = [_iou(prediction["box"], t["box"]) for t in image["ground_truth"]]
            if ious and max(ious) >= 0.5:
                per_object[ious.index(max(ious))] += 1
        counts += per_object
    summary = drawn["boxes_per_object"]
    assert summary["objects"] == len(counts)
    assert summary["one_box"] == counts.count(1) and summary["missed"] == counts.count(0)
    assert summary["several_boxes"] == sum(n > 1 for n in counts)


def test_report_on_demand_from_an_output_dir(run_dir: Path, shapes_dir, tmp_path, capsys) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("*.png"))
    assert main(["report", str(copy), "--dataset_dir", str(shapes_dir)]) == 0
    assert all((copy / name).is_file() for name in REPORT)
    assert SAMPLES_PLOT in capsys.readouterr().out

    # A stopped run: no trainer_state.json or final model at the top, only its checkpoints.
    (copy / "trainer_state.json").unlink()
    (copy / "model.safetensors").unlink()
    (copy / "config.json").unlink()
    for name in REPORT:
        (copy / name).unlink()
    assert main(["report", str(copy)]) == 0
    assert (copy / LOSSES_PLOT).is_file() and not (copy / SAMPLES_PLOT).exists()
    assert main(["report", str(copy), "--dataset_dir", str(shapes_dir)]) == 0
    assert (copy / SAMPLES_PLOT).is_file()  # drawn with the newest checkpoint

    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "No trainer_state.json" in capsys.readouterr().err
    with pytest.raises(ReportError):
        read_log_history(tmp_path)


def test_curves_only_with_what_was_logged(tmp_path) -> None:
    history = [
        {"epoch": 0.5, "loss": 3.0, "loss_ce": 1.0, "loss_bbox": 1.0, "loss_giou": 1.0},
        {"epoch": 1.0, "loss": 2.0, "loss_ce": 0.5, "loss_bbox": 0.7, "loss_giou": 0.8},
        {"epoch": 1.0, "train_loss": 2.5, "train_runtime": 1.0},
    ]
    assert plot_training_curves(history, tmp_path) == [tmp_path / LOSSES_PLOT]  # no eval: no mAP
    history.append(
        {
            "epoch": 1.0,
            "eval_loss": 2.1,
            "eval_loss_ce": 0.6,
            "eval_map": 0.25,
            "eval_map_50": 0.5,
            "eval_map_75": 0.2,
        }
    )
    assert plot_training_curves(history, tmp_path) == [tmp_path / LOSSES_PLOT, tmp_path / MAP_PLOT]


def test_attention_maps_cover_the_feature_map(run_dir: Path, shapes_dir) -> None:
    model, processor = load_detector(run_dir, device="cpu", attn_implementation="eager")
    with Image.open(next((shapes_dir / "test").glob("*.png"))) as image:
        wide = image.convert("RGB").resize((256, 128))
    height, width = processor(images=wide, return_tensors="pt")["pixel_values"].shape[-2:]
    assert width == 2 * height  # the aspect ratio is kept
    boxes, maps = attention_maps(model, processor, wide, top_k=3)
    assert len(maps) == len(boxes.labels) == 3
    assert boxes.scores == sorted(boxes.scores, reverse=True)
    for attention in maps:
        # the ResNet's stride-32 feature map of the resized image, padding cropped
        assert attention.shape == (math.ceil(height / 32), math.ceil(width / 32))
        assert float(attention.sum()) == pytest.approx(1.0, abs=1e-5)  # softmax over all cells
    assert torch.all(boxes.xyxy[:, 2:] <= torch.tensor([256.0, 128.0]) + 1e-3)


def test_explain_writes_the_figure(run_dir: Path, shapes_dir, tmp_path, capsys) -> None:
    image = next((shapes_dir / "test").glob("*.png"))
    path = explain(run_dir, image, tmp_path / "attention.png", top_k=2, device="cpu")
    _assert_png(path, (700, 700))
    assert (
        main(
            [
                "explain",
                "--model",
                str(run_dir),
                str(image),
                "--output",
                str(tmp_path / "cli.png"),
                "--top_k",
                "3",
                "--cpu",
            ]
        )
        == 0
    )
    _assert_png(tmp_path / "cli.png", (1000, 700))
