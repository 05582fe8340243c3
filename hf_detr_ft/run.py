"""One fine-tuning run, from a dataset folder to a saved model: the flow every entry point shares.

``finetune()`` (Python), ``hf-detr-ft train`` and ``examples/train.py`` all end in
:func:`run_training`::

    dataset folder -> DetectionDataset -> DetrTransform.apply_to (with_transform) -> collate_fn
        -> DetrTrainer (train, COCO evaluation) -> output_dir (model, processor, metrics JSON,
           model card README.md) -> the Hub with push_to_hub (see hub.py)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, IterableDataset
from transformers import TrainerCallback, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import TrainOutput
from transformers.utils import CONFIG_NAME, IMAGE_PROCESSOR_NAME, SAFE_WEIGHTS_NAME

from .arguments import (
    DataArguments,
    DetrTrainingArguments,
    ModelArguments,
    apply_family_data_defaults,
    apply_family_recipe,
)
from .artifacts.error_report import error_analysis_files, write_error_analysis
from .artifacts.model_card import (
    CARD_FILE,
    EXAMPLE_IMAGE,
    CardContext,
    ModelCardCallback,
    training_hyperparameters,
)
from .artifacts.onnx_export import DEFAULT_CHECK_IMAGES, EXPORT_DIR, export
from .artifacts.output_files import claim_files, write_text_atomic
from .artifacts.training_report import TRAINING_REPORT_FILES, write_training_report
from .data.dataset import DetectionDataset, load_detection_dataset
from .data.dataset_report import REPORT_JSON, REPORT_TEXT, DatasetReport, build_report
from .data.streaming import (
    StreamingDataset,
    check_streaming_run,
    load_streaming_dataset,
    transformed_stream,
)
from .errors import DatasetError, ExportError, TrainingInterrupted
from .evaluation.error_analysis import analyse_errors
from .models.families import family_of
from .models.input_sizes import smallest_input_side
from .models.loading import DEFAULT_MODEL, at_least, load_image_processor, load_model
from .models.thresholds import store_score_thresholds
from .pipeline.augmentation import describe_augmentation
from .pipeline.collate import collate_fn
from .pipeline.transforms import AugmentationEpochCallback, DetrTransform
from .training.checkpoints import StopOnInterrupt, last_complete_checkpoint
from .training.console import TRAIN_LOG, LogFileCallback
from .training.early_stopping import early_stopping_callbacks
from .training.preflight import PREFLIGHT_REPORT, run_preflight
from .training.run_guard import (
    RUN_RECORD,
    OutputDirLock,
    check_resumable,
    training_data_fingerprint,
    write_run_record,
)
from .training.signals import TrainingSignalsCallback
from .training.trainer import DetrTrainer

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"

#: The top-level files a run writes into ``output_dir`` (checked before it writes any: see
#: :mod:`.artifacts.output_files`).
RUN_OUTPUTS = (
    METRICS_FILE,
    TRAIN_LOG,
    RUN_RECORD,
    REPORT_JSON,
    REPORT_TEXT,
    f"{PREFLIGHT_REPORT}.json",
    f"{PREFLIGHT_REPORT}.txt",
    CARD_FILE,
    EXAMPLE_IMAGE,
    *TRAINING_REPORT_FILES,
    CONFIG_NAME,
    SAFE_WEIGHTS_NAME,
    IMAGE_PROCESSOR_NAME,
    TRAINING_ARGS_NAME,
    TRAINER_STATE_NAME,
    "all_results.json",
    "train_results.json",
    "eval_results.json",
)


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
    if data_args.streaming:  # refused before the output folder or any data is touched
        check_streaming_run(data_args.dataset_dir, data_args.dataset_format, training_args)
    main_process = training_args.process_index == 0
    with OutputDirLock(training_args.output_dir) if main_process else contextlib.nullcontext():
        data, report = _load_data(data_args, training_args)
        record = _run_record(data, model_args)
        checkpoint = _checkpoint_to_resume(training_args, record)  # before anything is written
        if main_process:
            analysis_files = error_analysis_files(data.eval_split)
            claim_files(
                training_args.output_dir, [*RUN_OUTPUTS, *analysis_files], run_outputs=RUN_OUTPUTS
            )
            report.write(training_args.output_dir)
            write_run_record(training_args.output_dir, record)
        run = _build(data, model_args, data_args, training_args, callbacks)
        train_result = _train(run, checkpoint)
        return _finish(run, train_result, model_args)


@dataclass
class _Run:
    """What the steps of :func:`run_training` hand on: the data, the Trainer, its callbacks."""

    data: DetectionDataset
    splits: dict[str, Dataset]  # train, validation, and the final evaluation's split
    eval_transform: DetrTransform
    trainer: DetrTrainer
    card: ModelCardCallback
    interrupt: StopOnInterrupt


def _load_data(
    data_args: DataArguments, training_args: DetrTrainingArguments
) -> tuple[DetectionDataset, DatasetReport]:
    """The dataset, checked, and its report (logged here, written once the run may start);
    with ``streaming``, the training split is a stream and the report covers the others."""
    if data_args.streaming:
        data = load_streaming_dataset(
            data_args.dataset_dir,
            data_args.num_classes,
            seed=training_args.seed,
            shuffle_buffer=data_args.shuffle_buffer,
            strict=data_args.strict,
        )
        report = build_report(data)
        logger.info("Dataset report (evaluation splits):\n%s", report.table())
        return data, report
    data = load_detection_dataset(
        data_args.dataset_dir,
        data_args.num_classes,
        layout=data_args.dataset_layout,
        dataset_format=data_args.dataset_format,
        validation_fraction=data_args.validation_fraction,
        seed=training_args.seed,
        strict=data_args.strict,
        cache=data_args.dataset_cache,
        cache_dir=data_args.dataset_cache_dir,  # one process builds it, the others map it
    )
    if "validation" not in data.splits:
        raise DatasetError(f"{data.root} has no validation split; set validation_fraction > 0.")
    report = build_report(data)
    logger.info("Dataset report:\n%s", report.table())
    return data, report


def _build(
    data: DetectionDataset,
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: DetrTrainingArguments,
    callbacks: Sequence[TrainerCallback],
) -> _Run:
    """Model, transforms and Trainer; pre-flight stops here if the run cannot work.

    The model's family (:mod:`.models.families`) fills what the user left unset: its recipe's
    training options, its input size and multi-scale range.
    """
    model = load_model(
        model_args.model_name_or_path,
        data.class_names,
        revision=model_args.revision,
        trust_remote_code=model_args.trust_remote_code,
        num_queries=model_args.num_queries,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        freeze_backbone=model_args.freeze_backbone,
    )
    family = family_of(model.config)
    apply_family_recipe(training_args, family)
    apply_family_data_defaults(data_args, family)
    size_multiple = family.size_multiple(model.config)
    image_processor = load_image_processor(
        model_args.model_name_or_path,
        image_size=data_args.image_size,
        max_image_size=data_args.max_image_size,
        revision=model_args.revision,
    )
    requested = dict(image_processor.size)
    # Under ZeRO-3 the weights are sharded until the Trainer wraps the model: nothing to run.
    min_side = 1
    if not is_deepspeed_zero3_enabled():
        first_side = requested.get("shortest_edge") or requested["height"]
        min_side = smallest_input_side(model, size_multiple, first_side)
    image_processor.size = at_least(requested, min_side)
    size = dict(image_processor.size)  # in force: for the pre-flight report and the card
    data_args.image_size = size.get("shortest_edge") or size["height"]
    data_args.max_image_size = size.get("longest_edge") or size["width"]
    train = _training_split(data, data_args.max_train_samples)
    splits = {
        **({"train": train} if isinstance(train, Dataset) else {}),  # a stream is not read ahead
        "validation": _first(data.splits["validation"], data_args.max_eval_samples),
        data.eval_split: _first(data.splits[data.eval_split], data_args.max_eval_samples),
    }
    run_preflight(
        splits,
        model.config,
        data_args,
        training_args,
        size_rule=size,
        freeze_backbone=model_args.freeze_backbone,
    )
    train_transform = DetrTransform.for_training(
        image_processor,
        seed=training_args.seed,
        min_scale=data_args.min_scale,
        image_cache_mb=data_args.image_cache_mb,
        max_scale=family.recipe.train_scales[1],
        size_multiple=size_multiple,
        min_side=min_side,
        augmentation=data_args.augmentation,
    )
    eval_transform = DetrTransform.for_evaluation(image_processor)
    card = ModelCardCallback(_card_context(data, splits, model_args, data_args, training_args))
    interrupt = StopOnInterrupt()
    trainer = DetrTrainer(
        model=model,
        args=training_args,
        train_dataset=_transformed(train, train_transform, training_args),
        eval_dataset=eval_transform.apply_to(splits["validation"]),
        processing_class=image_processor,
        data_collator=collate_fn,
        callbacks=[
            card,
            TrainingSignalsCallback(
                training_args.not_learning_check_after,
                stop_if_not_learning=training_args.stop_if_not_learning,
            ),
            AugmentationEpochCallback(train_transform),
            LogFileCallback(Path(training_args.output_dir) / TRAIN_LOG),
            interrupt,
            *callbacks,
            *early_stopping_callbacks(training_args),  # last: it reads the metrics as logged
        ],
    )
    card.repo_id = trainer.hub_model_id  # the full id of the repo, when pushing
    return _Run(data, splits, eval_transform, trainer, card, interrupt)


def _card_context(
    data: DetectionDataset,
    splits: dict[str, Dataset],
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: DetrTrainingArguments,
) -> CardContext:
    return CardContext(
        class_names=data.class_names,
        eval_split=data.eval_split,
        base_model=model_args.model_name_or_path,
        dataset_name=training_args.hub_dataset_id,
        dataset_dir=data_args.dataset_dir,
        license=training_args.hub_license,
        splits=splits,
        hyperparameters=training_hyperparameters(
            training_args,
            image_size=data_args.image_size,
            max_image_size=data_args.max_image_size,
            augmentation=describe_augmentation(data_args.augmentation),
        ),
    )


def _run_record(data: DetectionDataset, model_args: ModelArguments) -> dict[str, Any]:
    """What this run trains: compared with a checkpoint's before resuming it."""
    return {
        "model": str(model_args.model_name_or_path),
        "class_names": data.class_names,
        "data": data.fingerprint
        if isinstance(data, StreamingDataset)
        else training_data_fingerprint(data.splits["train"], data.class_names),
    }


def _train(run: _Run, checkpoint: str | None) -> TrainOutput:
    """Train (from ``checkpoint`` when resuming); Ctrl-C saves and stops cleanly."""
    trainer, args = run.trainer, run.trainer.args
    with run.interrupt.catching_sigint():
        result = trainer.train(resume_from_checkpoint=checkpoint)
    if run.interrupt.stopped_at is not None:
        raise TrainingInterrupted(run.interrupt.message(args.output_dir))
    if args.verbose:  # else the run ends with its summary (training.console.run_summary)
        trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    return result


def _finish(
    run: _Run, train_result: TrainOutput, model_args: ModelArguments | None = None
) -> FinetuneResult:
    """Final evaluation and its error analysis (the best-F1 score thresholds go into the
    model's config), the saved model, its report, its export (``--export``) and card, then
    the Hub.

    Every process saves the model first: under FSDP or ZeRO-3 saving gathers the sharded
    weights, so it must come before anything that only the main process does. The sample
    predictions of the report then run on the saved model, read back from disk, never on
    the (possibly sharded) training model, whose forward would wait for the other processes.
    The upload comes last, so that a failed upload leaves a complete output_dir behind.
    """
    trainer, args, data = run.trainer, run.trainer.args, run.data
    final_split = run.eval_transform.apply_to(run.splits[data.eval_split])
    metrics = trainer.evaluate(final_split, metric_key_prefix="eval")
    if args.verbose:
        trainer.log_metrics(f"eval ({data.eval_split} split)", metrics)
    analysis = analyse_errors(trainer.last_evaluator)  # every process: all the detections
    thresholds = analysis.thresholds
    store_score_thresholds(
        trainer.model.config,
        thresholds.score_threshold,
        {name: best["score_threshold"] for name, best in thresholds.per_class.items()},
    )
    trainer.save_model(_internal_call=True)  # the Trainer's flag for "do not push yet"
    output_dir = Path(args.output_dir)
    run.card.final_metrics = metrics
    if trainer.is_world_process_zero():
        summary = {"eval_split": data.eval_split, "class_names": data.class_names, **metrics}
        summary["thresholds"] = thresholds.to_dict()
        write_text_atomic(output_dir / METRICS_FILE, json.dumps(summary, indent=2) + "\n")
        write_training_report(output_dir, run.splits["validation"])
        write_error_analysis(analysis, run.splits[data.eval_split], output_dir, data.eval_split)
        export_failure = _export_at_end(run, output_dir, model_args)
        run.card.write(args, trainer.state)  # it lists the exported files
        if export_failure is not None:  # the model, report and card are complete; no upload
            raise export_failure
    if args.push_to_hub:
        trainer.push_to_hub(commit_message="End of training", save=False)
    return FinetuneResult(
        output_dir=output_dir,
        metrics=metrics,
        best_checkpoint=trainer.state.best_model_checkpoint,
        eval_split=data.eval_split,
        class_names=data.class_names,
        log_history=trainer.state.log_history,
    )


def _export_at_end(
    run: _Run, output_dir: Path, model_args: ModelArguments | None
) -> ExportError | None:
    """``--export onnx``: the saved model exported to ``output_dir/onnx`` and checked on the
    first images of the final evaluation's split; the error if it cannot be (returned, so that
    the card is written before it is raised)."""
    if model_args is None or not model_args.export:
        return None
    split = run.splits[run.data.eval_split]
    images = [split[i]["image"] for i in range(min(DEFAULT_CHECK_IMAGES, len(split)))]
    try:
        export(
            output_dir,
            output_dir / EXPORT_DIR,
            format=model_args.export,
            quantize=model_args.export_quantize,
            images=images or None,
        )
    except ExportError as err:
        return ExportError(
            f"The model is saved in {output_dir}, but its export failed: {err} Retry with "
            f"`hf-detr-ft export {output_dir}`."
        )
    return None


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


def _training_split(data: DetectionDataset, limit: int | None) -> Dataset | IterableDataset:
    """The training images the run reads: the first ``limit`` (of a stream: as they come)."""
    if isinstance(data, StreamingDataset):
        return data.train_stream.take(limit) if limit else data.train_stream
    return _first(data.splits["train"], limit)


def _transformed(
    train: Dataset | IterableDataset, transform: DetrTransform, args: DetrTrainingArguments
) -> Dataset | IterableDataset:
    """``train`` through the training transform, a batch of the data loader's size at a time."""
    if isinstance(train, IterableDataset):
        return transformed_stream(train, transform, args.per_device_train_batch_size)
    return transform.apply_to(train)


def _checkpoint_to_resume(args: DetrTrainingArguments, record: dict[str, Any]) -> str | None:
    """An explicit ``resume_from_checkpoint``, else the newest complete one in ``output_dir``
    if it is of this same run (:func:`~.training.run_guard.check_resumable`)."""
    if args.resume_from_checkpoint:
        return args.resume_from_checkpoint
    last = last_complete_checkpoint(args.output_dir, with_optimizer=not args.save_only_model)
    if last:
        check_resumable(last, record)
        logger.warning("Resuming from %s (use a new output_dir to start over).", last)
    return last
