"""``--early_stopping_patience``: real Trainer runs that stop when mAP stops improving."""

from __future__ import annotations

import logging

import pytest
from conftest import tiny_trainer
from transformers import TrainerCallback

from hf_detr_ft.arguments import DetrTrainingArguments, parse_train_args
from hf_detr_ft.errors import ArgumentError
from hf_detr_ft.run import finetune
from hf_detr_ft.training.early_stopping import EarlyStopping


class ScriptedMap(TrainerCallback):
    """Replaces each evaluation's mAP by the next value of a script (before early stopping
    and best-model selection read it)."""

    def __init__(self, values: list[float]) -> None:
        self.values = values
        self.calls = 0

    def on_evaluate(self, args, state, control, metrics, **kwargs) -> None:
        metrics["eval_map"] = self.values[self.calls]
        self.calls += 1


@pytest.mark.parametrize(
    ("values", "stopped_at"),
    [
        # best 0.30 at epoch 2; 0.30, 0.29: two evaluations without a gain -> stop at epoch 4
        ([0.10, 0.30, 0.30, 0.29, 0.50], 4),
        # a gain of 0.005 over the best is no gain (threshold 0.01)
        ([0.10, 0.30, 0.305, 0.305, 0.50], 4),
        # 0.008 a step: below the threshold each time, above it over two -> never stops
        # (transformers' own callback, which compares with the last best, stops at epoch 3)
        ([0.100, 0.108, 0.116, 0.124, 0.132], None),
    ],
)
def test_training_stops_at_the_expected_epoch(
    values, stopped_at, tiny_model_dir, shapes_dir, tmp_path, caplog
) -> None:
    scripted = ScriptedMap(values)
    trainer = tiny_trainer(
        tiny_model_dir,
        shapes_dir,
        tmp_path,
        train_images=2,
        per_device_train_batch_size=2,
        num_train_epochs=len(values),
        save_strategy="no",
        load_best_model_at_end=False,
        callbacks=[scripted, EarlyStopping(2, 0.01)],
    )
    trainer.eval_dataset = trainer.eval_dataset.select([0])  # its mAP is scripted anyway
    with caplog.at_level(logging.WARNING, logger="hf_detr_ft.training.early_stopping"):
        trainer.train()
    epochs = stopped_at or len(values)
    assert scripted.calls == epochs and trainer.state.epoch == epochs
    stopped = [r.getMessage() for r in caplog.records if "Stopped early" in r.getMessage()]
    if stopped_at is None:
        assert not stopped
    else:
        [line] = stopped
        assert line.startswith(f"Stopped early at epoch {stopped_at} ")
        assert "eval_map did not improve by more than 0.01 for 2 evaluations" in line


def test_finetune_with_the_flag_stops_early(tiny_model_dir, shapes_dir, tmp_path) -> None:
    """No gain can exceed 1 (mAP is at most 1): the run stops after patience + 1 epochs."""
    out = tmp_path / "out"
    result = finetune(
        shapes_dir,
        3,
        model=tiny_model_dir,
        output_dir=out,
        num_train_epochs=10,
        per_device_train_batch_size=8,
        max_train_samples=8,
        max_eval_samples=2,
        early_stopping_patience=2,
        early_stopping_threshold=1.0,
        augmentation="strong",
        image_size=64,
        max_image_size=64,
        report_to="none",
        disable_tqdm=True,
    )
    evaluated = [log["epoch"] for log in result.log_history if "eval_map" in log]
    assert sorted(set(evaluated)) == [1, 2, 3]  # and the final evaluation, at epoch 3
    card = (out / "README.md").read_text()
    assert "| early_stopping | patience 2, threshold 1 on eval_map |" in card
    assert "| augmentation | strong: HorizontalFlip, BBoxSafeRandomCrop, Affine," in card


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"eval_strategy": "no", "load_best_model_at_end": False}, "eval_strategy is 'no'"),
        (
            {"metric_for_best_model": None, "load_best_model_at_end": False},
            "metric_for_best_model, which is not set",
        ),
    ],
)
def test_early_stopping_without_evaluations_is_refused(settings, message, tmp_path) -> None:
    with pytest.raises(ArgumentError, match=message):
        DetrTrainingArguments(output_dir=str(tmp_path), early_stopping_patience=2, **settings)


def test_a_config_file_sets_both_controls(tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        f"dataset_dir: data\noutput_dir: {tmp_path / 'out'}\nearly_stopping_patience: 3\n"
        "early_stopping_threshold: 0.005\naugmentation: strong\n"
    )
    _, data_args, training_args = parse_train_args([str(config)])
    assert (training_args.early_stopping_patience, training_args.early_stopping_threshold) == (
        3,
        0.005,
    )
    assert data_args.augmentation == "strong"
