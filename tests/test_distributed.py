"""A real two-process run under `accelerate launch` (CPU, gloo), compared with one process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from conftest import two_process_launch
from transformers import AutoImageProcessor, AutoModelForObjectDetection

from hf_detr_ft.arguments import DetrTrainingArguments
from hf_detr_ft.artifacts.output_files import MANIFEST
from hf_detr_ft.data.dataset import load_detection_dataset
from hf_detr_ft.evaluation.coco_metrics import SUMMARY_METRICS
from hf_detr_ft.pipeline.collate import collate_fn
from hf_detr_ft.pipeline.transforms import DetrTransform
from hf_detr_ft.training.checkpoints import missing_parts
from hf_detr_ft.training.ema import TRAINING_WEIGHTS_FILE
from hf_detr_ft.training.trainer import DetrTrainer

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = {
    "single_gpu": ("NO", 1),
    "multi_gpu": ("MULTI_GPU", 4),
    "multi_node": ("MULTI_GPU", 8),
    "fsdp": ("FSDP", 4),
    "deepspeed_zero2": ("DEEPSPEED", 4),
}


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_shipped_accelerate_configs_load(name: str) -> None:
    """Each examples/accelerate config is read by accelerate's own loader as documented."""
    config = load_config_from_file(str(REPO / "examples" / "accelerate" / f"{name}.yaml"))
    assert (config.distributed_type.value, config.num_processes) == ACCELERATE_CONFIGS[name]
    assert config.mixed_precision == "no" and not config.use_cpu


def test_two_processes_train_and_evaluate_each_image_once(
    tiny_model_dir, shapes_dir, tmp_path
) -> None:
    out = tmp_path / "ddp"
    command = two_process_launch(
        29531,
        str(REPO / "examples" / "train.py"),
        "--use_cpu",
        "true",
        "--dataset_dir",
        str(shapes_dir),
        "--num_classes",
        "3",
        "--model_name_or_path",
        str(tiny_model_dir),
        "--output_dir",
        str(out),
        "--num_train_epochs",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "2",  # 5 test images: the last batch is uneven
        "--image_size",
        "64",
        "--max_image_size",
        "64",
        "--disable_tqdm",
        "true",
        "--ema_decay",
        "0.9",
        "--ema_tau",
        "1",  # the average: evaluated and saved once
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("Model saved to") == 1  # only the main process reports

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2  # 16 images / (2 processes x 4)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    # Complete, with each process's random state, and written once (by the main process).
    assert missing_parts(out / "checkpoint-2") == []
    assert sorted(p.name for p in out.glob("checkpoint-2/rng_state*")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]
    assert (out / "checkpoint-2" / TRAINING_WEIGHTS_FILE).is_file()
    leftovers = [p for p in out.iterdir() if p.name.startswith(("tmp", ".")) or "_1." in p.name]
    assert [p.name for p in leftovers] == [MANIFEST]  # only the list of files hf-detr-ft wrote
    distributed = json.loads((out / "metrics.json").read_text())
    assert distributed["eval_split"] == "test"

    data = load_detection_dataset(shapes_dir)
    processor = AutoImageProcessor.from_pretrained(out)
    single = DetrTrainer(
        model=AutoModelForObjectDetection.from_pretrained(out),
        args=DetrTrainingArguments(
            output_dir=str(tmp_path / "single"),
            report_to="none",
            per_device_eval_batch_size=3,
            eval_strategy="no",
            load_best_model_at_end=False,
        ),
        processing_class=processor,
        data_collator=collate_fn,
    ).evaluate(data.splits["test"].with_transform(DetrTransform.for_evaluation(processor)))
    for name in SUMMARY_METRICS:
        assert distributed[f"eval_{name}"] == pytest.approx(single[f"eval_{name}"], abs=1e-6), name
