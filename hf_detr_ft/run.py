"""One fine-tuning run, from a dataset folder to a saved model: the flow every entry point shares.

``finetune()`` (Python), ``hf-detr-ft train`` and ``examples/train.py`` all end in
:func:`run_training`::

    dataset folder -> DetectionDataset -> DetrTransform.apply_to (with_transform) -> collate_fn
        -> DetrTrainer (train, COCO evaluation) -> output_dir (model, processor, metrics JSON,
           model card README.md) -> the Hub with push_to_hub (see hub.py)
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import TrainerCallback, set_seed

from .arguments import DataArguments, DetrTrainingArguments, ModelArguments
from .artifacts.model_card import CardContext, ModelCardCallback, training_hyperparameters
from .artifacts.training_report import write_training_report
from .data.dataset import load_detection_dataset
from .data.dataset_report import build_report
from .errors import DatasetError, TrainingInterrupted
from .models.loading import DEFAULT_MODEL, load_image_processor, load_model
from .pipeline.collate import collate_fn
from .pipeline.transforms import AugmentationEpochCallback, DetrTransform
from .training.checkpoints import StopOnInterrupt, last_complete_checkpoint
from .training.preflight import run_preflight
from .training.signals import TrainingSignalsCallback
from .training.trainer import DetrTrainer

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


@dataclass
class FinetuneResult:
    """What a run produced. ``metrics`` come from the final evaluation on ``eval_split``."""

    output_dir: Path
    metrics: dict[str, float]
    best_checkpoint: str | None
    eval_split: str
    class_names: list[str]
    log_history: list[dict[str, Any]] = field(default_factory=list)


def run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: DetrTrainingArguments,
    callbacks: Sequence[TrainerCallback] = (),
) -> FinetuneResult:
    """Train, evaluate on the test split (validation if none), save everything to output_dir.

    ``callbacks`` are added to the Trainer's own (e.g. early stopping, custom logging).
    """
    set_seed(training_args.seed)
    data = load_detection_dataset(
        data_args.dataset_dir,
        data_args.num_classes,
        layout=data_args.dataset_layout,
        dataset_format=data_args.dataset_format,
        validation_fraction=data_args.validation_fraction,
        seed=training_args.seed,
        strict=data_args.strict,
    )
    if "validation" not in data.splits:
        raise DatasetError(f"{data.root} has no validation split; set validation_fraction > 0.")
    report = build_report(data)  # checked and written before any model is loaded
    logger.info("Dataset report:\n%s", report.table())
    if training_args.process_index == 0:
        report.write(training_args.output_dir)
    image_processor = load_image_processor(
        model_args.model_name_or_path,
        image_size=data_args.image_size,
        max_image_size=data_args.max_image_size,
        revision=model_args.revision,
    )
    model = load_model(
        model_args.model_name_or_path,
        data.class_names,
        revision=model_args.revision,
        trust_remote_code=model_args.trust_remote_code,
        num_queries=model_args.num_queries,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )

    train_transform = DetrTransform.for_training(
        image_processor,
        seed=training_args.seed,
        min_scale=data_args.min_scale,
        image_cache_mb=data_args.image_cache_mb,
    )
    eval_transform = DetrTransform.for_evaluation(image_processor)
    train_dataset = _first(data.splits["train"], data_args.max_train_samples)
    validation = _first(data.splits["validation"], data_args.max_eval_samples)
    final_split = _first(data.splits[data.eval_split], data_args.max_eval_samples)
    # Before any training: stops here (PreflightError) when the run cannot work as configured.
    run_preflight(
        {"train": train_dataset, "validation": validation, data.eval_split: final_split},
        model.config,
        data_args,
        training_args,
    )
    signals = TrainingSignalsCallback(
        training_args.not_learning_check_after,
        stop_if_not_learning=training_args.stop_if_not_learning,
    )
    card = ModelCardCallback(
        CardContext(
            class_names=data.class_names,
            eval_split=data.eval_split,
            base_model=model_args.model_name_or_path,
            dataset_name=training_args.hub_dataset_id,
            dataset_dir=data_args.dataset_dir,
            license=training_args.hub_license,
            splits={"train": train_dataset, "validation": validation, data.eval_split: final_split},
            hyperparameters=training_hyperparameters(
                training_args,
                image_size=data_args.image_size,
                max_image_size=data_args.max_image_size,
            ),
        )
    )
    interrupt = StopOnInterrupt()
    trainer = DetrTrainer(
        model=model,
        args=training_args,
        train_dataset=train_transform.apply_to(train_dataset),
        eval_dataset=eval_transform.apply_to(validation),
        processing_class=image_processor,
        data_collator=collate_fn,
        callbacks=[
            card,
            signals,
            AugmentationEpochCallback(train_transform),
            interrupt,
            *callbacks,
        ],
    )
    card.repo_id = trainer.hub_model_id  # the full id of the repo, when pushing

    with interrupt.catching_sigint():
        train_result = trainer.train(resume_from_checkpoint=_checkpoint_to_resume(training_args))
    if interrupt.stopped_at is not None:
        raise TrainingInterrupted(interrupt.message(training_args.output_dir))
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()

    metrics = trainer.evaluate(eval_transform.apply_to(final_split), metric_key_prefix="eval")
    trainer.log_metrics(f"eval ({data.eval_split} split)", metrics)
    output_dir = Path(training_args.output_dir)
    card.final_metrics = metrics
    if trainer.is_world_process_zero():
        summary = {"eval_split": data.eval_split, "class_names": data.class_names, **metrics}
        (output_dir / METRICS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        card.write(training_args, trainer.state)
        write_training_report(output_dir, validation, trainer.model, image_processor)
    # Last, so that a failed upload (hub.HubError) leaves a complete output_dir behind.
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="End of training")  # saves the model, then uploads
    else:
        trainer.save_model()
    return FinetuneResult(
        output_dir=output_dir,
        metrics=metrics,
        best_checkpoint=trainer.state.best_model_checkpoint,
        eval_split=data.eval_split,
        class_names=data.class_names,
        log_history=trainer.state.log_history,
    )


def finetune(
    dataset_dir: str | Path,
    num_classes: int | None = None,
    *,
    model: str | Path = DEFAULT_MODEL,
    output_dir: str | Path = "detr-finetuned",
    callbacks: Sequence[TrainerCallback] = (),
    **kwargs: Any,
) -> FinetuneResult:
    """Fine-tune ``model`` on the COCO folder ``dataset_dir``; see :func:`run_training`.

    Keyword arguments are the fields of :class:`ModelArguments`, :class:`DataArguments` and
    :class:`DetrTrainingArguments` (i.e. all of ``transformers.TrainingArguments``), for example
    ``finetune("data", 3, num_train_epochs=50, image_size=512, per_device_train_batch_size=8)``.
    ``callbacks`` are ``transformers.TrainerCallback`` objects added to the Trainer.
    """
    groups: dict[type, dict[str, Any]] = {
        ModelArguments: {},
        DataArguments: {},
        DetrTrainingArguments: {},
    }
    kwargs = {"model_name_or_path": str(model), "dataset_dir": str(dataset_dir), **kwargs}
    kwargs.update(num_classes=num_classes, output_dir=str(output_dir))
    for key, value in kwargs.items():
        owner = next((cls for cls in groups if key in _field_names(cls)), None)
        if owner is None:
            raise TypeError(f"finetune() got an unexpected keyword argument {key!r}")
        groups[owner][key] = value
    return run_training(*(cls(**values) for cls, values in groups.items()), callbacks=callbacks)


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _first(dataset: Dataset, limit: int | None) -> Dataset:
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


def _checkpoint_to_resume(args: DetrTrainingArguments) -> str | None:
    """An explicit ``resume_from_checkpoint``, else the newest complete one in ``output_dir``."""
    if args.resume_from_checkpoint:
        return args.resume_from_checkpoint
    last = last_complete_checkpoint(args.output_dir, with_optimizer=not args.save_only_model)
    if last:
        logger.warning("Resuming from %s (use a new output_dir to start over).", last)
    return last
