"""The score threshold saved with a model: the one that maximised F1 on its final evaluation.

A training run's error analysis (:mod:`hf_detr_ft.evaluation.error_analysis`) finds the score
threshold of best F1; :func:`~hf_detr_ft.run.run_training` stores it in the model's config
before saving it, so it travels wherever ``config.json`` goes (the output folder, the Hub, the
ONNX export) and survives ``from_pretrained``::

    "score_threshold": 0.43,                                  # overall (mean F1 over classes)
    "score_threshold_per_class": {"cat": 0.51, "dog": 0.38}   # each class's own best

``predict --threshold auto`` reads the overall one (:func:`saved_score_threshold`);
``pipeline()`` users pass ``threshold=pipe.model.config.score_threshold``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from transformers import PretrainedConfig

from ..errors import ArgumentError

SCORE_THRESHOLD = "score_threshold"
SCORE_THRESHOLD_PER_CLASS = "score_threshold_per_class"


def store_score_thresholds(
    config: PretrainedConfig,
    overall: float | None,
    per_class: Mapping[str, float | None],
) -> None:
    """Set the best-F1 thresholds on ``config`` (saved with it); ``None`` where there is none,
    so that a threshold of an earlier fine-tuning never outlives the model it was found for."""
    setattr(config, SCORE_THRESHOLD, overall)
    setattr(config, SCORE_THRESHOLD_PER_CLASS, dict(per_class))


def saved_score_threshold(config: PretrainedConfig, model: str | Path) -> float:
    """The overall best-F1 threshold saved in ``config``, or an ArgumentError saying why not."""
    value = getattr(config, SCORE_THRESHOLD, None)
    if value is None:
        raise ArgumentError(
            f"threshold 'auto': {model} has no saved score threshold (config.json "
            f"{SCORE_THRESHOLD!r}, written at the end of training by hf-detr-ft when a "
            f"detection was right); give a number instead, e.g. --threshold 0.5."
        )
    return float(value)
