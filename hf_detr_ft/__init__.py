"""hf-detr-ft: fine-tune DETR-family object detectors on your own data.

The package follows the path data takes, one sub-package a stage::

    data/        dataset folder -> checked annotation records -> datasets.DatasetDict
    pipeline/    examples -> augmented model inputs (image processor) -> padded batches
    models/      checkpoint -> detector with the new label map, speed-ups, mixed precision
    training/    DetrTrainer (transformers.Trainer), pre-flight, signals, checkpoints, EMA
    evaluation/  detections -> COCO metrics (pycocotools), per class
    inference/   a fine-tuned detector on images: detect, predict, explain
    artifacts/   pictures, the training report, the model card, the Hub upload, ONNX export

and at the top: ``run`` (one fine-tuning run, the flow every entry point shares),
``arguments`` (the dataclasses), ``cli`` (the ``hf-detr-ft`` command), ``errors`` (every
user-facing error) and ``demo``.

Importing the package is cheap: the public names below are loaded on first use, so
``import hf_detr_ft`` and ``hf-detr-ft --help`` load neither torch, transformers nor matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_PUBLIC = {
    "DataArguments": "arguments",
    "DetrTrainingArguments": "arguments",
    "ModelArguments": "arguments",
    "collate_fn": "pipeline.collate",
    "DetrTransform": "pipeline.transforms",
    "DetectionDataset": "data.dataset",
    "load_detection_dataset": "data.dataset",
    "make_shapes_dataset": "data.synthetic",
    "DatasetError": "errors",
    "HfDetrFtError": "errors",
    "ModelLoadError": "errors",
    "ExportError": "errors",
    "ExportCheckError": "errors",
    "DEFAULT_MODEL": "models.loading",
    "load_image_processor": "models.loading",
    "load_model": "models.loading",
    "DetrTrainer": "training.trainer",
    "CocoEvaluator": "evaluation.coco_metrics",
    "EvaluationResult": "evaluation.evaluate",
    "evaluate": "evaluation.evaluate",
    "ImagePrediction": "inference.predict",
    "VideoPrediction": "inference.video",
    "predict": "inference.predict",
    "explain": "inference.explain",
    "export": "artifacts.onnx_export",
    "ExportResult": "artifacts.onnx_export",
    "write_training_report": "artifacts.training_report",
    "FinetuneResult": "run",
    "finetune": "run",
    "run_training": "run",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access (PEP 562) and keep the name."""
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
