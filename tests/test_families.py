"""Every DETR-family type end to end: fine-tune, evaluate, save, load in ``pipeline()``.

Each of the twelve types is built tiny and random (:mod:`tiny_families`), fine-tuned a few
steps on the shapes dataset with its family's own input sizes and recipe, evaluated with COCO
metrics, saved, and loaded back by ``transformers.pipeline("object-detection")``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import two_process_launch
from PIL import Image
from tiny_families import FAMILY_TYPES, save_tiny_model
from transformers import AutoImageProcessor, AutoModelForObjectDetection, pipeline

from hf_detr_ft import evaluate, finetune, predict
from hf_detr_ft.cli import main as cli_main
from hf_detr_ft.errors import ArgumentError, ModelLoadError
from hf_detr_ft.inference.explain import explain
from hf_detr_ft.models.families import FAMILIES, SUPPORTED_TYPES, family_of
from hf_detr_ft.models.loading import load_image_processor
from hf_detr_ft.pipeline.transforms import channels_last_view, resize_for_model, train_sizes
from hf_detr_ft.training.ema import TRAINING_WEIGHTS_FILE

CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {t: save_tiny_model(t, root / t, ["a", "b", "c", "d"]) for t in FAMILY_TYPES}


def test_every_type_has_one_family_and_others_are_refused() -> None:
    assert sorted(SUPPORTED_TYPES) == sorted(FAMILY_TYPES)
    assert len(SUPPORTED_TYPES) == len(set(SUPPORTED_TYPES))
    with pytest.raises(ModelLoadError, match="supported: detr, table-transformer"):
        family_of("owlvit")
    for family in FAMILIES:
        assert family.recipe.source and family.checkpoints


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_processor_sizes_follow_the_family_contract(tiny_models, model_type) -> None:
    family = family_of(model_type)
    processor = load_image_processor(tiny_models[model_type], image_size=100, max_image_size=120)
    pixels = processor(images=Image.new("RGB", (80, 48)), return_tensors="pt")["pixel_values"]
    height, width = pixels.shape[-2:]
    if family.square_input:
        assert processor.size == {"height": 96, "width": 96}  # 100 rounded to the stride 32
        assert (height, width) == (96, 96)
        sizes = train_sizes({"height": 640, "width": 640}, *family.recipe.train_scales, 32)
        assert [s["height"] for s in sizes] == list(range(480, 801, 32))  # RT-DETR's recipe
    else:
        assert processor.size == {"shortest_edge": 100, "longest_edge": 120}
        assert width <= 120 and (height % 16 == 0 if model_type == "yolos" else True)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_our_resize_feeds_the_pixels_the_processor_would(tiny_models, model_type) -> None:
    # Training, evaluate and predict resize with resize_for_model, then let the processor
    # rescale and normalise: the result must be the processor's own (RF-DETR's resizes
    # without antialiasing) up to uint8 rounding, on a photo it shrinks.
    processor = load_image_processor(tiny_models[model_type], image_size=100, max_image_size=120)
    photo = np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8)
    expected = processor(images=Image.fromarray(photo), return_tensors="pt")["pixel_values"]
    resized = resize_for_model(processor, channels_last_view(photo))
    ours = processor(images=resized, do_resize=False, return_tensors="pt")["pixel_values"]
    assert ours.shape == expected.shape
    one_level = 1 / 255 / min(processor.image_std)  # a uint8 step after normalisation
    assert (ours - expected).abs().max() <= one_level + 1e-4


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_every_type_fine_tunes_evaluates_and_loads_in_pipeline(
    tiny_models, shapes_dir, tmp_path, model_type
) -> None:
    out = tmp_path / "out"
    result = finetune(
        shapes_dir,
        3,
        model=tiny_models[model_type],
        output_dir=out,
        max_steps=2,
        logging_steps=1,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        image_size=64,
        max_image_size=64,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    assert result.class_names == CLASSES
    assert 0.0 <= result.metrics["eval_map"] <= 1.0 and result.metrics["eval_map_50"] >= 0
    train_logs = [entry for entry in result.log_history if "loss" in entry]
    assert train_logs and all(torch.isfinite(torch.tensor(e["loss"])) for e in train_logs)
    signals = [entry for entry in result.log_history if "class_error" in entry]
    assert signals and all(0.0 <= entry["class_error"] <= 100.0 for entry in signals)
    assert (out / "sample_predictions.png").is_file() and (out / "README.md").is_file()

    processor = AutoImageProcessor.from_pretrained(out)
    assert dict(processor.size) == dict(load_image_processor(out).size)
    detector = pipeline("object-detection", model=str(out), threshold=0.0)
    image = next((shapes_dir / "test").glob("*.png"))
    found = detector(str(image))
    assert found and {d["label"] for d in found} <= set(CLASSES)

    # The saved model, evaluated again and run on files, gives the run's own numbers.
    evaluated = evaluate(out, shapes_dir, "test", batch_size=4, device="cpu")
    assert evaluated.metrics["map"] == pytest.approx(result.metrics["eval_map"], abs=1e-6)
    [predicted] = predict(out, image, threshold=0.0, device="cpu")
    assert len(predicted.boxes.labels) == len(found)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_explain_works_or_says_why(tiny_models, shapes_dir, tmp_path, model_type) -> None:
    image = next((shapes_dir / "test").glob("*.png"))
    output = tmp_path / "attention.png"
    if family_of(model_type).dense_cross_attention:
        assert explain(tiny_models[model_type], image, output, top_k=2) == output
        assert output.read_bytes().startswith(b"\x89PNG")
    else:
        with pytest.raises(ArgumentError, match="cross-attention"):
            explain(tiny_models[model_type], image, output)


def _train_command(dataset: Path, model: Path, out: Path, max_steps: int) -> list[str]:
    """``hf-detr-ft train`` flags for a few tiny steps, a checkpoint every 2."""
    return [
        "--dataset_dir",
        str(dataset),
        "--num_classes",
        "3",
        "--model_name_or_path",
        str(model),
        "--output_dir",
        str(out),
        "--max_steps",
        str(max_steps),
        "--per_device_train_batch_size",
        "4",
        "--image_size",
        "64",
        "--max_image_size",
        "64",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--load_best_model_at_end",
        "false",
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
    ]


@pytest.mark.parametrize("model_type", ["rt_detr", "lw_detr"])
def test_cli_training_resumes_with_the_family_recipe(
    tiny_models, shapes_dir, tmp_path, model_type, caplog
) -> None:
    """The CLI, a checkpoint and a resume, for a denoising (RT-DETR) and a group-DETR family
    whose recipes turn the weight average on."""
    out = tmp_path / "out"
    assert cli_main(["train", *_train_command(shapes_dir, tiny_models[model_type], out, 2)]) == 0
    first = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert first["global_step"] == 2 and (out / "checkpoint-2" / TRAINING_WEIGHTS_FILE).is_file()
    args = torch.load(out / "training_args.bin", weights_only=False)
    recipe = family_of(model_type).recipe
    assert (args.learning_rate, args.lr_backbone, args.ema_decay) == (
        recipe.learning_rate,
        recipe.lr_backbone,
        recipe.ema_decay,
    )
    assert cli_main(["train", *_train_command(shapes_dir, tiny_models[model_type], out, 4)]) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert f"Resuming from {out / 'checkpoint-2'}" in caplog.text
    detector = pipeline("object-detection", model=str(out), threshold=0.0)
    assert detector(str(next(shapes_dir.glob("test/*.png"))))


def test_two_processes_train_a_real_time_family(tiny_models, shapes_dir, tmp_path) -> None:
    """`accelerate launch examples/train.py` (2 CPU processes) with RT-DETR: square inputs,
    denoising queries and the weight average across processes."""
    out = tmp_path / "ddp"
    command = two_process_launch(
        29535,
        str(Path(__file__).resolve().parents[1] / "examples" / "train.py"),
        *_train_command(shapes_dir, tiny_models["rt_detr"], out, 2),
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_split"] == "test" and 0.0 <= metrics["eval_map"] <= 1.0
    assert AutoModelForObjectDetection.from_pretrained(out).config.model_type == "rt_detr"
