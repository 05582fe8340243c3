"""EMA of the weights (``ema_decay``): the average is evaluated, checkpointed and saved; the
optimizer's weights are kept aside in each checkpoint, so a resume continues exactly."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_trainer
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForObjectDetection, TrainerCallback

from hf_detr_ft.arguments import DetrTrainingArguments
from hf_detr_ft.artifacts.model_card import training_hyperparameters
from hf_detr_ft.errors import ArgumentError
from hf_detr_ft.training.ema import TRAINING_WEIGHTS_FILE, WeightAverage

DECAY, TAU = 0.8, 2.0
EMA = {"ema_decay": DECAY, "ema_tau": TAU}


def test_weight_average_follows_its_recurrence_and_swaps_without_copies() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)  # frozen: not averaged
    average = WeightAverage(model, decay=DECAY, tau=TAU)
    assert average.names == ["0.weight", "1.weight", "1.bias"]

    expected = [p.detach().clone() for p in average.parameters]
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update(step)
        d = DECAY * (1 - math.exp(-step / TAU))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, average.parameters)]
    for got, want in zip(average.averages, expected):
        assert torch.allclose(got, want, atol=1e-6)

    weights = [p.detach().clone() for p in average.parameters]
    first = model[0].weight
    with average.swapped_in():
        assert model[0].weight is first  # same parameter objects, other values
        for p, want in zip(average.parameters, expected):
            assert torch.allclose(p, want, atol=1e-6)
    for p, w in zip(average.parameters, weights):
        assert torch.equal(p, w)
    average.apply()
    for p, want in zip(average.parameters, expected):
        assert torch.allclose(p, want, atol=1e-6)


class RecordWeights(TrainerCallback):
    """The trainable weights before training and after every optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def _record(self, model: nn.Module) -> None:
        self.steps.append(
            {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._record(model)


def _expected_averages(steps: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    averages = [steps[0]]
    for step, weights in enumerate(steps[1:], start=1):
        d = DECAY * (1 - math.exp(-step / TAU))
        averages.append({n: d * averages[-1][n] + (1 - d) * w for n, w in weights.items()})
    return averages


def _assert_weights(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, want in expected.items():
        assert torch.allclose(params[name], want, atol=1e-5), name


def _trainer(tiny_model_dir, shapes_dir, out, **args):
    settings = dict(
        max_steps=6,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        lr_backbone=1e-3,
        save_strategy="steps",
        save_steps=3,
        eval_strategy="steps",
        eval_steps=3,
        load_best_model_at_end=False,
        logging_steps=1,
        train_images=8,
        seed=3,
    )
    return tiny_trainer(tiny_model_dir, shapes_dir, out, **{**settings, **args})


def test_training_evaluates_checkpoints_and_ends_with_the_average(
    tiny_model_dir, shapes_dir, tmp_path
) -> None:
    recorder = RecordWeights()
    trainer = _trainer(tiny_model_dir, shapes_dir, tmp_path / "run", callbacks=[recorder], **EMA)
    trainer.train()
    averages = _expected_averages(recorder.steps)
    assert len(averages) == 7

    # the checkpoint's model is the average; the optimizer's weights are kept beside it
    checkpoint = tmp_path / "run" / "checkpoint-3"
    _assert_weights(AutoModelForObjectDetection.from_pretrained(checkpoint), averages[3])
    kept = load_file(checkpoint / TRAINING_WEIGHTS_FILE)
    assert kept.keys() == recorder.steps[3].keys()
    for name, tensor in kept.items():
        assert torch.equal(tensor, recorder.steps[3][name])
    assert not torch.allclose(
        kept["class_labels_classifier.weight"], averages[3]["class_labels_classifier.weight"]
    )

    # after training the model holds the last average, and saves it
    _assert_weights(trainer.model, averages[6])
    trainer.save_model(str(tmp_path / "final"))
    _assert_weights(AutoModelForObjectDetection.from_pretrained(tmp_path / "final"), averages[6])

    # evaluation at step 3 scored the average: the same loss as the checkpoint's model gives
    logged = next(
        e["eval_loss"] for e in trainer.state.log_history if e.get("step") == 3 and "eval_loss" in e
    )
    again = _trainer(checkpoint, shapes_dir, tmp_path / "again").evaluate()
    assert again["eval_loss"] == pytest.approx(logged, abs=1e-5)


def test_resume_from_a_checkpoint_continues_the_same_weights_and_average(
    tiny_model_dir, shapes_dir, tmp_path
) -> None:
    whole = _trainer(tiny_model_dir, shapes_dir, tmp_path / "whole", **EMA)
    whole.train()
    resumed = _trainer(tiny_model_dir, shapes_dir, tmp_path / "resumed", **EMA)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    expected = {n: p.detach() for n, p in whole.model.named_parameters()}
    _assert_weights(resumed.model, expected)
    for name in ("model.safetensors", TRAINING_WEIGHTS_FILE):
        for key, tensor in load_file(tmp_path / "whole" / "checkpoint-6" / name).items():
            other = load_file(tmp_path / "resumed" / "checkpoint-6" / name)[key]
            assert torch.allclose(tensor, other, atol=1e-6), (name, key)


def test_ema_arguments_are_checked_and_named_in_the_model_card(tmp_path) -> None:
    for bad in ({"ema_decay": 1.0}, {"ema_decay": -0.1}, {"ema_tau": 0.0}):
        with pytest.raises(ArgumentError, match="ema_"):
            DetrTrainingArguments(output_dir=str(tmp_path), **bad)
    sizes = {"image_size": 800, "max_image_size": 1333}
    with_ema = DetrTrainingArguments(output_dir=str(tmp_path), ema_decay=0.99, ema_tau=50)
    listed = training_hyperparameters(with_ema, **sizes)
    assert listed["ema_decay"] == 0.99 and listed["ema_tau"] == 50
    plain = training_hyperparameters(DetrTrainingArguments(output_dir=str(tmp_path)), **sizes)
    assert "ema_decay" not in plain and "ema_tau" not in plain


def test_the_best_checkpoint_loaded_at_the_end_is_its_average(
    tiny_model_dir, shapes_dir, tmp_path
) -> None:
    recorder = RecordWeights()
    trainer = _trainer(
        tiny_model_dir,
        shapes_dir,
        tmp_path / "run",
        callbacks=[recorder],
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        **EMA,
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-3")  # not the last one
    averages = _expected_averages(recorder.steps)
    _assert_weights(trainer.model, averages[3])
    trainer.save_model(str(tmp_path / "final"))
    _assert_weights(AutoModelForObjectDetection.from_pretrained(tmp_path / "final"), averages[3])
