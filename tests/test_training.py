"""Real Trainer runs on tiny models: learning, the optimizer recipe, finetune() outputs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BCCD, tiny_trainer
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForObjectDetection,
    Trainer,
    TrainerCallback,
    pipeline,
)

from hf_detr_ft.arguments import DetrTrainingArguments, mixed_precision_for, parse_train_args
from hf_detr_ft.cli import main as cli_main
from hf_detr_ft.data.synthetic import DEMO_CLASSES
from hf_detr_ft.evaluation.coco_metrics import SUMMARY_METRICS
from hf_detr_ft.pipeline.collate import collate_fn
from hf_detr_ft.run import METRICS_FILE, finetune
from hf_detr_ft.training.trainer import DetrTrainer, is_backbone_parameter

REPO = Path(__file__).resolve().parents[1]
QUICK = {"image_size": 64, "max_image_size": 64, "report_to": "none", "disable_tqdm": True}


def _trainer(tiny_model_dir: Path, shapes_dir: Path, tmp_path: Path, **args) -> DetrTrainer:
    return tiny_trainer(tiny_model_dir, shapes_dir, tmp_path, train_images=4, **args)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_a_few_trainer_steps_reduce_the_loss(bf16, tiny_model_dir, shapes_dir, tmp_path) -> None:
    trainer = _trainer(
        tiny_model_dir,
        shapes_dir,
        tmp_path,
        use_cpu=True,
        bf16=bf16,
        max_steps=40,
        learning_rate=3e-3,
        lr_backbone=3e-4,
        per_device_train_batch_size=4,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
    )
    batch = collate_fn([trainer.train_dataset[i] for i in range(4)])
    encoder_dtypes, output_dtypes = set(), set()
    hooks = [
        trainer.model.model.encoder.register_forward_hook(
            lambda module, args, output: encoder_dtypes.add(output.last_hidden_state.dtype)
        ),
        trainer.model.register_forward_hook(
            lambda module, args, out: output_dtypes.update(
                {out.loss.dtype, out.logits.dtype, out.pred_boxes.dtype}
            )
        ),
    ]

    def loss() -> float:
        trainer.model.eval()
        with torch.no_grad():
            return trainer.model(**batch).loss.item()

    before = loss()
    encoder_dtypes.clear()
    trainer.train()
    for hook in hooks:
        hook.remove()
    after = loss()
    assert encoder_dtypes == {torch.bfloat16 if bf16 else torch.float32}  # autocast really ran
    assert output_dtypes == {torch.float32}  # loss, logits and boxes: the heads ran in fp32
    assert trainer.model.dtype == torch.float32  # weights (and the optimizer) stay in fp32
    assert after < 0.8 * before


def test_mixed_precision_is_chosen_for_the_hardware_unless_asked_for(tmp_path, monkeypatch) -> None:
    # by compute capability: bf16 from Ampere on, fp16 on Volta/Turing, none on a CPU
    assert mixed_precision_for((9, 0)) == mixed_precision_for((8, 0)) == "bf16"
    assert mixed_precision_for((7, 5)) == mixed_precision_for((7, 0)) == "fp16"
    assert mixed_precision_for((6, 1)) == mixed_precision_for(None) == "no"
    on_cpu = DetrTrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    assert not on_cpu.bf16 and not on_cpu.fp16
    asked = DetrTrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=True)
    assert asked.bf16 and not asked.fp16 and asked.auto_mixed_precision
    _, _, off = parse_train_args(["--dataset_dir", "d", "--auto_mixed_precision", "false"])
    assert not off.auto_mixed_precision and not off.bf16 and not off.fp16
    # accelerate's config chooses when it names a precision; "no" is accelerate launch's default
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert not on_cpu._mixed_precision_configured()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert on_cpu._mixed_precision_configured()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert on_cpu._mixed_precision_configured()


def test_flos_estimate_is_the_trainers(tiny_model_dir, shapes_dir, tmp_path) -> None:
    # total_flos: the Trainer's own estimate, with the parameters counted once per model
    trainer = _trainer(tiny_model_dir, shapes_dir, tmp_path, use_cpu=True)
    batches = [collate_fn([trainer.train_dataset[i] for i in r]) for r in ([0, 1], [1, 2, 3])]
    for model in (trainer.model, torch.nn.Linear(3, 2)):
        trainer.model = model
        for batch in batches:
            expected = Trainer.floating_point_ops(trainer, batch)
            assert trainer.floating_point_ops(batch) == expected


def test_torch_compile_trains_the_sped_up_model(tiny_model_dir, shapes_dir, tmp_path) -> None:
    """--torch_compile with the folded norms and channels-last weights (aot_eager: the graph
    capture that every backend starts from, without a C++ compilation in the test)."""
    torch._dynamo.reset()
    trainer = _trainer(
        tiny_model_dir,
        shapes_dir,
        tmp_path,
        use_cpu=True,
        max_steps=3,
        logging_steps=1,
        torch_compile=True,
        torch_compile_backend="aot_eager",
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled, not eager


def test_optimizer_follows_the_detr_recipe(tiny_model_dir, shapes_dir, tmp_path) -> None:
    trainer = _trainer(tiny_model_dir, shapes_dir, tmp_path, learning_rate=3e-4, lr_backbone=2e-5)
    optimizer = trainer.create_optimizer()
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    trainable = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert len(lr_of) == len(trainable)
    config = trainer.model.config
    assert any(is_backbone_parameter(n, config) for n, _ in trainable)
    for name, param in trainable:
        assert lr_of[id(param)] == (2e-5 if is_backbone_parameter(name, config) else 3e-4), name
    assert decay_of[id(trainer.model.class_labels_classifier.weight)] == 1e-4
    assert decay_of[id(trainer.model.class_labels_classifier.bias)] == 0.0
    assert type(optimizer).__name__ == "AdamW"
    assert trainer.args.max_grad_norm == 0.1


def test_evaluate_returns_every_metric(tiny_model_dir, shapes_dir, tmp_path) -> None:
    metrics = _trainer(tiny_model_dir, shapes_dir, tmp_path).evaluate()
    expected = {f"eval_{m}" for m in SUMMARY_METRICS}
    expected |= {f"eval_{kind}_{c}" for kind in ("ap", "ar") for c in DEMO_CLASSES}
    expected |= {"eval_loss", "eval_loss_ce", "eval_loss_bbox", "eval_loss_giou"}
    assert expected <= metrics.keys()
    assert all(-1 <= metrics[f"eval_{m}"] <= 1 for m in SUMMARY_METRICS)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForObjectDetection.from_pretrained(path).state_dict()


class EpochCounter(TrainerCallback):
    """Counts epochs; keeps the training transform's image cache size at each epoch's end."""

    def __init__(self) -> None:
        self.ended = 0
        self.cached: list[tuple[int, int]] = []  # (images cached, training images)

    def on_epoch_end(self, *args, train_dataloader=None, **kwargs) -> None:
        self.ended += 1
        data = train_dataloader.dataset
        cache = data.format["format_kwargs"]["transform"].image_cache
        self.cached.append((len(cache), len(data)))


def test_finetune_saves_a_model_that_pipeline_loads(tiny_model_dir, shapes_dir, tmp_path) -> None:
    out = tmp_path / "out"
    epochs = EpochCounter()
    result = finetune(
        shapes_dir,
        3,
        model=tiny_model_dir,
        output_dir=out,
        num_train_epochs=2,
        per_device_train_batch_size=8,
        callbacks=[epochs],
        **QUICK,
    )
    assert epochs.ended == 2  # the user's callback ran in the Trainer
    # Each training image decoded once: all of them cached in the first epoch (the default).
    assert epochs.cached[0] == epochs.cached[1] and epochs.cached[0][0] == epochs.cached[0][1]
    assert result.output_dir == out and result.eval_split == "test"
    assert {f"eval_{m}" for m in SUMMARY_METRICS} <= result.metrics.keys()
    saved = json.loads((out / METRICS_FILE).read_text())
    assert saved["eval_split"] == "test" and saved["eval_map"] == result.metrics["eval_map"]
    assert saved["class_names"] == list(DEMO_CLASSES)
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "circle", "1": "square", "2": "triangle"}
    assert (out / "model.safetensors").is_file() and (out / "preprocessor_config.json").is_file()

    # The final model is the best checkpoint's (the Trainer reloads it at the end).
    assert result.best_checkpoint and Path(result.best_checkpoint).is_dir()
    final, best = _state(out), _state(Path(result.best_checkpoint))
    assert all(torch.equal(final[k], best[k]) for k in final)

    model = AutoModelForObjectDetection.from_pretrained(out)
    processor = AutoImageProcessor.from_pretrained(out)
    assert model.config.id2label[2] == "triangle" and processor.size["shortest_edge"] == 64
    detector = pipeline("object-detection", model=str(out), threshold=0.0)
    image = Image.open(next((shapes_dir / "test").glob("*.png")))
    detections = detector(image)
    assert detections and {d["label"] for d in detections} <= set(DEMO_CLASSES)


def test_real_bccd_photos_train_evaluate_and_load(tiny_model_dir, bccd_coco_dir, tmp_path) -> None:
    out = tmp_path / "bccd-model"
    result = finetune(
        bccd_coco_dir,
        3,
        model=tiny_model_dir,
        output_dir=out,
        max_steps=3,
        num_queries=40,
        per_device_train_batch_size=2,
        image_size=128,
        max_image_size=160,
        eval_strategy="steps",
        save_strategy="steps",
        eval_steps=3,
        save_steps=3,
        report_to="none",
        disable_tqdm=True,
    )
    assert result.eval_split == "validation"
    assert 0 <= result.metrics["eval_map"] <= 1 and result.metrics["eval_loss"] > 0
    detector = pipeline("object-detection", model=str(out), threshold=0.0)
    detections = detector(str(BCCD / "JPEGImages" / "BloodImage_00003.jpg"))
    assert {d["label"] for d in detections} <= {"RBC", "WBC", "Platelets"}
    assert all(0 <= d["box"]["xmax"] <= 700 for d in detections)


def test_examples_train_script_runs(tiny_model_dir, shapes_dir, tmp_path) -> None:
    out = tmp_path / "script-out"
    command = [
        sys.executable,
        str(REPO / "examples" / "train.py"),
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
        "8",
        "--image_size",
        "64",
        "--max_image_size",
        "64",
        "--disable_tqdm",
        "true",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Model saved to" in done.stdout
    assert json.loads((out / "config.json").read_text())["id2label"]["1"] == "square"


STEPS = {"eval_strategy": "steps", "save_strategy": "steps"}


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, True),
        ({"eval_strategy": "no"}, False),
        ({"save_strategy": "no"}, False),
        ({"save_strategy": "best"}, True),
        ({"eval_strategy": "steps", "eval_steps": 5}, False),
        ({**STEPS, "eval_steps": 5, "save_steps": 10}, True),
        ({**STEPS, "eval_steps": 4, "save_steps": 10}, False),
        ({"load_best_model_at_end": False}, False),
    ],
)
def test_best_checkpoint_loading_defaults_to_what_the_strategies_allow(
    settings, expected, tmp_path
) -> None:
    # transformers refuses load_best_model_at_end unless checkpoints are saved where the run
    # evaluates: the default follows, so that e.g. eval_strategy="no" alone is a valid run.
    args = DetrTrainingArguments(output_dir=str(tmp_path), **settings)
    assert args.load_best_model_at_end is expected


def test_the_transformers_example_flags_parse() -> None:
    # run_object_detection.py's flags that mean the same here (its README's command)
    model, data, training = parse_train_args(
        [
            "--model_name_or_path",
            "detr",
            "--dataset_name",
            "data/cppe-5",
            "--output_dir",
            "out",
            "--do_train",
            "true",
            "--do_eval",
            "true",
            "--image_square_size",
            "600",
            "--remove_unused_columns",
            "false",
            "--eval_do_concat_batches",
            "false",
            "--ignore_mismatched_sizes",
            "true",
            "--train_val_split",
            "0.15",
            "--model_revision",
            "v2",
            "--learning_rate",
            "5e-5",
        ]
    )
    assert data.dataset_dir == "data/cppe-5" and data.max_image_size == 600
    assert data.validation_fraction == 0.15
    assert model.ignore_mismatched_sizes and model.revision == "v2"
    assert training.do_train and training.do_eval and training.learning_rate == 5e-5
    assert not training.remove_unused_columns and not training.eval_do_concat_batches


def test_cli_reports_user_mistakes_without_traceback(
    tiny_model_dir, shapes_dir, tmp_path, capsys
) -> None:
    code = cli_main(
        [
            "train",
            "--dataset_dir",
            str(shapes_dir),
            "--num_classes",
            "5",
            "--model_name_or_path",
            str(tiny_model_dir),
            "--output_dir",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "num_classes=5" in err and "3 classes" in err and "Traceback" not in err

    code = cli_main(
        [
            "train",
            "--dataset_dir",
            str(shapes_dir),
            "--model_name_or_path",
            str(tiny_model_dir),
            "--output_dir",
            str(tmp_path),
            "--ema_decay",
            "1.5",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "ema_decay must be" in err and "Traceback" not in err


def test_freeze_backbone_trains_everything_but_the_backbone(
    tiny_model_dir, shapes_dir, tmp_path
) -> None:
    """``freeze_backbone`` (the demo's setting) leaves every backbone weight as loaded."""
    out = tmp_path / "frozen"
    finetune(
        shapes_dir,
        3,
        model=tiny_model_dir,
        output_dir=out,
        freeze_backbone=True,
        max_steps=3,
        learning_rate=1e-3,
        lr_backbone=1e-3,
        per_device_train_batch_size=4,
        eval_strategy="no",  # no load_best_model_at_end needed
        **QUICK,
    )
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(out / "model.safetensors")
    config = AutoConfig.from_pretrained(out)
    shared = [name for name in after if name in before and before[name].shape == after[name].shape]
    backbone = [name for name in shared if is_backbone_parameter(name, config)]
    rest = [name for name in shared if name not in backbone and "decoder.layers" in name]
    assert backbone and rest
    assert all(torch.equal(before[name], after[name]) for name in backbone)
    assert any(not torch.equal(before[name], after[name]) for name in rest)
