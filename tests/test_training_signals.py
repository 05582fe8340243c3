"""DETR's training signals (class_error, cardinality_error) and stopping on divergence."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from conftest import tiny_detr_config, tiny_trainer
from transformers import (
    AutoModelForObjectDetection,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)
from transformers.loss.loss_for_object_detection import ForObjectDetectionLoss
from transformers.models.detr.modeling_detr import DetrObjectDetectionOutput

from hf_detr_ft.arguments import DetrTrainingArguments
from hf_detr_ft.errors import TrainingDivergedError
from hf_detr_ft.run import finetune
from hf_detr_ft.training.signals import TrainingSignalsCallback
from hf_detr_ft.training.trainer import (
    DetrTrainer,
    add_training_signals,
    count_class_errors,
    training_signal_means,
)

NO_OBJECT = 3  # 3 classes: logits index 3 is "no object"
NEAR, FAR = [0.25, 0.25, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]


def _outputs(top_classes: list[list[int]], boxes: list[list[list[float]]], labels: list[dict]):
    """Model outputs whose queries predict ``top_classes`` (logit 6 vs 0) and ``boxes``."""
    logits = torch.zeros(len(top_classes), len(top_classes[0]), NO_OBJECT + 1)
    for image, classes in enumerate(top_classes):
        for query, cls in enumerate(classes):
            logits[image, query, cls] = 6.0
    pred_boxes = torch.tensor(boxes)
    config = tiny_detr_config(num_labels=NO_OBJECT)
    loss, loss_dict, _ = ForObjectDetectionLoss(logits, labels, "cpu", pred_boxes, config)
    output = DetrObjectDetectionOutput(
        loss=loss, loss_dict=loss_dict, logits=logits, pred_boxes=pred_boxes
    )
    return output, config


def _target(classes: list[int], boxes: list[list[float]]) -> dict[str, torch.Tensor]:
    return {"class_labels": torch.tensor(classes), "boxes": torch.tensor(boxes)}


def test_class_and_cardinality_error_of_a_constructed_batch() -> None:
    # Image 0: two objects (class 0 at NEAR, class 1 at the middle). Query 0 sits on the first
    # with the right class; query 2 sits on the second but says class 2: 1 of 2 matched wrong.
    # Queries 1 and 3 say "no object": 2 non-empty predictions for 2 objects, |2 - 2| = 0.
    # Image 1: one object of class 2; query 1 finds it right; query 0 predicts class 1 far
    # away (unmatched): 2 non-empty predictions for 1 object, |2 - 1| = 1.
    middle = [0.5, 0.5, 0.3, 0.3]
    labels = [_target([0, 1], [NEAR, middle]), _target([2], [NEAR])]
    outputs, config = _outputs(
        [[0, NO_OBJECT, 2, NO_OBJECT], [1, 2, NO_OBJECT, NO_OBJECT]],
        [[NEAR, FAR, middle, FAR], [FAR, NEAR, FAR, FAR]],
        labels,
    )
    assert count_class_errors(outputs.logits, outputs.pred_boxes, labels, config) == (1, 3)

    totals: dict[str, float] = defaultdict(float)
    add_training_signals(totals, outputs, labels, config)
    means = training_signal_means(totals)
    assert means["class_error"] == pytest.approx(100 * 1 / 3)  # 1 wrong of 3 matched
    assert means["cardinality_error"] == pytest.approx((0 + 1) / 2)
    assert means["loss_ce"] == pytest.approx(float(outputs.loss_dict["loss_ce"]))

    # A second batch, image 1 alone (0 wrong of 1 matched, cardinality error 1): class_error
    # pools the matched queries (1 of 4), the loss terms average over the 3 images.
    single = [labels[1]]
    second, _ = _outputs([[1, 2, NO_OBJECT, NO_OBJECT]], [[FAR, NEAR, FAR, FAR]], single)
    add_training_signals(totals, second, single, config)
    means = training_signal_means(totals)
    assert means["class_error"] == pytest.approx(25.0)
    assert means["cardinality_error"] == pytest.approx((0 + 1 + 1) / 3)


def test_images_without_objects_have_no_class_error() -> None:
    labels = [{"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    logits, boxes = torch.zeros(1, 4, NO_OBJECT + 1), torch.rand(1, 4, 4)
    assert count_class_errors(logits, boxes, labels, tiny_detr_config(3)) == (0, 0)
    assert "class_error" not in training_signal_means({"_images": 1, "_matched": 0})


def _trainer(tiny_model_dir: Path, shapes_dir: Path, out: Path, **args) -> DetrTrainer:
    return tiny_trainer(
        tiny_model_dir,
        shapes_dir,
        out,
        train_images=8,
        callbacks=[TrainingSignalsCallback()],
        eval_strategy="no",
        load_best_model_at_end=False,
        per_device_train_batch_size=2,
        **args,
    )


def test_training_and_evaluation_log_detr_signals(tiny_model_dir, shapes_dir, tmp_path) -> None:
    trainer = _trainer(
        tiny_model_dir, shapes_dir, tmp_path, max_steps=2, logging_steps=1, save_strategy="no"
    )
    trainer.train()
    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(train_logs) == 2
    for log in train_logs:
        for key in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error", "grad_norm"):
            assert math.isfinite(log[key]), key
        assert 0 <= log["class_error"] <= 100
    metrics = trainer.evaluate()
    assert 0 <= metrics["eval_class_error"] <= 100
    assert {"eval_loss_ce", "eval_cardinality_error"} <= metrics.keys()


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(
    tiny_model_dir, shapes_dir, tmp_path
) -> None:
    trainer = _trainer(
        tiny_model_dir,
        shapes_dir,
        tmp_path,
        max_steps=10,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        save_total_limit=5,
    )
    forward_passes = []

    def nan_loss_at_step_4(module, inputs, outputs):  # a real model, its loss made NaN once
        if module.training:
            forward_passes.append(1)
            if len(forward_passes) == 4:  # a step that saves a checkpoint
                outputs["loss"] = outputs.loss * float("nan")

    trainer.model.register_forward_hook(nan_loss_at_step_4)
    with pytest.raises(TrainingDivergedError) as err:
        trainer.train()

    message = str(err.value)
    last_good = tmp_path / "checkpoint-2"
    assert "the loss became nan at step 4 of 10" in message
    assert f"The last good checkpoint is {last_good}" in message
    assert "learning_rate" in message
    assert len(forward_passes) == 4  # stopped right away
    # The NaN reached the weights, but no checkpoint and no final model hold them.
    assert not all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (tmp_path / "model.safetensors").exists()
    model = AutoModelForObjectDetection.from_pretrained(last_good)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.config.id2label[0] == "circle"


class _NanWeightsAfterStep(TrainerCallback):
    """Turns the class head's weights NaN right after the optimizer's ``step``-th update,
    with a finite loss: what NaN gradients from a finite loss would do."""

    def __init__(self, step: int) -> None:
        self.step, self.updates = step, 0

    def on_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        self.updates += 1
        if self.updates == self.step:
            with torch.no_grad():
                model.class_labels_classifier.weight.fill_(float("nan"))


@pytest.mark.parametrize(
    ("nan_after", "found"),
    [
        (4, "the weights became NaN or infinite (the update was far too large)"),
        (3, "the predictions became NaN or infinite (the weights grew far too large)"),
    ],
)
def test_nan_weights_never_reach_a_checkpoint(
    tiny_model_dir, shapes_dir, tmp_path, nan_after, found
) -> None:
    # Step 4 saves a checkpoint: the weights are checked before it is written. After step 3
    # (nothing saved), step 4's forward pass meets them in its predictions.
    trainer = _trainer(
        tiny_model_dir,
        shapes_dir,
        tmp_path,
        max_steps=10,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        save_total_limit=5,
    )
    trainer.add_callback(_NanWeightsAfterStep(nan_after))
    with pytest.raises(TrainingDivergedError) as err:
        trainer.train()
    assert f"{found} at step 4 of 10" in str(err.value)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (tmp_path / "model.safetensors").exists()


def test_a_flat_class_error_warns_with_the_likely_causes(caplog) -> None:
    callback = TrainingSignalsCallback(check_after=0.5, stop_if_not_learning=True)
    args = DetrTrainingArguments(output_dir="out", report_to="none")
    state, control = TrainerState(max_steps=10), TrainerControl()
    for step, class_error in [(2, 95.0), (4, 96.0), (6, 95.5)]:
        state.global_step = step
        callback.on_log(args, state, control, logs={"class_error": class_error})
    assert callback.not_learning and control.should_training_stop
    assert "95.0%" in callback.not_learning and "num_queries" in callback.not_learning
    assert "class_error has not improved" in caplog.text

    learning = TrainingSignalsCallback(check_after=0.5)
    state, control = TrainerState(max_steps=10), TrainerControl()
    for step, class_error in [(2, 95.0), (4, 80.0), (6, 60.0)]:
        state.global_step = step
        learning.on_log(args, state, control, logs={"class_error": class_error})
    assert learning.not_learning is None and not control.should_training_stop


def test_a_run_forced_to_diverge_stops_with_a_clear_error(tiny_model_dir, shapes_dir, tmp_path):
    # A learning rate of 1e25 blows the weights up in one step; the next step's predictions
    # are NaN, which the loss's box matching would meet with a bare ValueError.
    out = tmp_path / "out"
    with pytest.raises(TrainingDivergedError, match="Training diverged") as err:
        finetune(
            shapes_dir,
            3,
            model=tiny_model_dir,
            output_dir=out,
            learning_rate=1e25,
            lr_backbone=1e25,
            max_steps=5,
            image_size=64,
            max_image_size=64,
            report_to="none",
            disable_tqdm=True,
            eval_strategy="no",
            save_strategy="no",
            load_best_model_at_end=False,
        )
    assert "at step 2 of 5" in str(err.value) and "learning_rate 1e+25" in str(err.value)
    assert "No checkpoint had been saved yet" in str(err.value)
    assert not (out / "model.safetensors").exists()
    report = json.loads((out / "preflight_report.json").read_text())
    assert any("learning_rate 1e+25 is high" in w for w in report["warnings"])
