"""Early stopping on the evaluation metric (``--early_stopping_patience N``).

transformers' ``EarlyStoppingCallback`` does the stopping (and saves its count in each
checkpoint). Two things are changed here:

* the reference is the best value that counted as an improvement, as in Keras and PyTorch
  Lightning. transformers compares with ``state.best_metric``, which moves with every gain,
  however small (it picks the best checkpoint), so a metric creeping up by less than the
  threshold per evaluation would stop the run although it gains more than the threshold over a
  few of them;
* the run says why it stopped, in one line.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from transformers import EarlyStoppingCallback, TrainerControl, TrainerState, TrainingArguments

if TYPE_CHECKING:
    from ..arguments import DetrTrainingArguments

logger = logging.getLogger(__name__)


class EarlyStopping(EarlyStoppingCallback):
    """Stop when ``metric_for_best_model`` has not improved by more than ``threshold`` over
    its best for ``patience`` evaluations in a row."""

    def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: float = 0.0):
        super().__init__(early_stopping_patience, early_stopping_threshold)
        self.best_value: float | None = None

    def check_metric_value(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metric_value: float,
    ) -> None:
        better = np.greater if args.greater_is_better else np.less
        improved = self.best_value is None or (
            better(metric_value, self.best_value)
            and abs(metric_value - self.best_value) > self.early_stopping_threshold
        )
        if improved:
            self.best_value = float(metric_value)
            self.early_stopping_patience_counter = 0
        else:
            self.early_stopping_patience_counter += 1

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float],
        **kwargs: Any,
    ) -> None:
        stopping = control.should_training_stop
        super().on_evaluate(args, state, control, metrics, **kwargs)
        if control.should_training_stop and not stopping:
            logger.warning(
                "Stopped early at epoch %g (step %d): %s did not improve by more than %g for %d "
                "evaluations (best %.4f).",
                state.epoch or 0,
                state.global_step,
                args.metric_for_best_model,
                self.early_stopping_threshold,
                self.early_stopping_patience,
                self.best_value,
            )

    def state(self) -> dict:
        saved = super().state()
        saved["attributes"]["best_value"] = self.best_value
        return saved


def early_stopping_callbacks(args: DetrTrainingArguments) -> list[EarlyStopping]:
    """The early stopping that ``args`` ask for: one callback, or none."""
    if args.early_stopping_patience is None:
        return []
    return [EarlyStopping(args.early_stopping_patience, args.early_stopping_threshold)]
