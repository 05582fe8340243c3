"""Never silently train a model that is not learning: stop on divergence, warn on a plateau.

:class:`TrainingSignalsCallback` watches two things while a ``Trainer`` runs:

* **A loss that is NaN or infinite.** One such step turns every weight into NaN (the gradients
  are NaN, so are the clipped ones and the optimizer's update), and each later checkpoint
  would be useless. The callback sees the loss of every training forward pass (a forward hook
  on the model: the Trainer's own log replaces non-finite losses by the running mean), and
  checks that the weights are finite before anything evaluates or saves them. On a failure
  it stops training at the end of that step, before anything is evaluated or saved, and
  makes ``Trainer.train`` raise :class:`TrainingDivergedError` naming the step, the last good
  checkpoint and the likely causes. So no NaN model becomes a checkpoint or the final model.
  Predictions that are already NaN (weights blown up by a huge update) raise it during the
  forward pass, before the loss's box matching fails on them with a bare ``ValueError``.
* **A class_error that does not improve.** The share of matched queries with the wrong class
  (logged by :class:`~training.trainer.DetrTrainer`) is DETR's first sign of learning; when
  it is no better after ``check_after`` of the training steps than at the first log, the
  callback warns with the usual causes (and stops training if asked to).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from torch.nn.utils import get_total_norm
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..arguments import effective_batch_size
from ..errors import TrainingDivergedError
from .checkpoints import last_complete_checkpoint, on_any_process
from .preflight import PREFLIGHT_REPORT

logger = logging.getLogger(__name__)

TROUBLESHOOTING = "docs/troubleshooting.md"

#: class_error (percent) below which a plateau is not a problem: the model already classifies.
CLASS_ERROR_GOOD_ENOUGH = 10.0
#: Non-finite losses in a row tolerated with fp16, whose gradient scaler skips those steps.
FP16_OVERFLOW_STEPS = 10
NAN_WEIGHTS = "the weights became NaN or infinite (the update was far too large)"


class TrainingSignalsCallback(TrainerCallback):
    """Stop on a non-finite loss; warn when ``class_error`` has not improved.

    ``check_after`` is the share of the training steps (0 to 1; 0 turns the check off) after
    which the training ``class_error`` must be at least ``min_improvement`` percentage points
    below its first logged value; ``stop_if_not_learning`` stops training when it is not.
    """

    def __init__(
        self,
        check_after: float = 0.25,
        *,
        min_improvement: float = 1.0,
        stop_if_not_learning: bool = False,
    ) -> None:
        self.check_after = check_after
        self.min_improvement = min_improvement
        self.stop_if_not_learning = stop_if_not_learning
        self.divergence: str | None = None
        self.not_learning: str | None = None
        self._class_errors: list[float] = []
        self._bad_loss: float | None = None
        self._bad_streak = 0
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._state: TrainerState | None = None
        self._args: TrainingArguments | None = None

    # -- divergence -------------------------------------------------------------------------

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        self.divergence = self.not_learning = None
        self._class_errors, self._bad_loss, self._bad_streak = [], None, 0
        self._state, self._args = state, args
        if model is None:
            return
        self._hooks = [model.register_forward_hook(self._check_loss)]
        # The heads (DETR: class_labels_classifier, bbox_predictor) run before the loss, whose
        # box matching raises a bare ValueError on NaN boxes: check their outputs first.
        base = getattr(model, "base_model_prefix", None)
        self._hooks += [
            child.register_forward_hook(self._check_prediction)
            for name, child in model.named_children()
            if name != base
        ]

    def _check_prediction(self, module: nn.Module, inputs: Any, outputs: Any) -> None:
        """Stop at once when a head predicts NaN/inf in training (the weights have blown up)."""
        if module.training and isinstance(outputs, torch.Tensor):
            if not bool(torch.isfinite(outputs.detach()).all()):
                what = "the predictions became NaN or infinite (the weights grew far too large)"
                self._remove_hooks()
                step = self._state.global_step + 1  # the step being computed
                self.divergence = _divergence_message(self._args, self._state, what, step)
                logger.error(self.divergence)
                raise TrainingDivergedError(self.divergence)

    def _check_loss(self, module: nn.Module, inputs: Any, outputs: Any) -> None:
        """Remember a non-finite loss of a training forward pass (read at the step's end)."""
        loss = getattr(outputs, "loss", None)
        if module.training and loss is not None and self._bad_loss is None:
            value = float(loss.detach())
            if not math.isfinite(value):
                self._bad_loss = value

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        bad_loss, self._bad_loss = self._bad_loss, None
        self._bad_streak = self._bad_streak + 1 if bad_loss is not None else 0
        # fp16's gradient scaler skips overflowing steps itself; allow it a few in a row.
        allowed = FP16_OVERFLOW_STEPS if args.fp16 else 0
        weights_ok = not _reads_weights(control) or _finite_weights(model)
        if not on_any_process(self._bad_streak > allowed or not weights_ok):
            return
        if bad_loss is not None:
            what = f"the loss became {bad_loss}"
        elif not weights_ok:
            what = NAN_WEIGHTS
        else:
            what = "another process's loss became NaN or infinite"
        self._stop(args, state, control, what)
        control.should_log = True  # the last log shows the non-finite loss terms

    def on_epoch_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if self.divergence:
            control.should_save = control.should_evaluate = False
        elif _reads_weights(control) and on_any_process(not _finite_weights(model)):
            self._stop(args, state, control, NAN_WEIGHTS)

    def _stop(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, what: str
    ) -> None:
        """Stop training now, before anything evaluates or saves the weights."""
        self.divergence = _divergence_message(args, state, what, state.global_step)
        logger.error(self.divergence)
        control.should_training_stop = True
        control.should_save = control.should_evaluate = False

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._remove_hooks()
        if self.divergence:
            raise TrainingDivergedError(self.divergence)

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- not learning -----------------------------------------------------------------------

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        value = (logs or {}).get("class_error")
        if value is None or not math.isfinite(value):
            return
        self._class_errors.append(value)
        due = self.check_after > 0 and state.global_step >= self.check_after * state.max_steps
        if not due or self.not_learning or len(self._class_errors) < 2:
            return
        first, best = self._class_errors[0], min(self._class_errors[1:])
        if best > first - self.min_improvement and best > CLASS_ERROR_GOOD_ENOUGH:
            self.not_learning = _not_learning_message(args, state, first, best)
            logger.warning(self.not_learning)
            if self.stop_if_not_learning:
                control.should_training_stop = True


def _reads_weights(control: TrainerControl) -> bool:
    """Whether the weights are about to be saved, evaluated or kept as the final model.

    Only then are they checked: the check is one max-abs reduction over every weight, a cost
    not worth paying at every step (measured in benchmarks/README.md). Between those steps,
    weights that went NaN or infinite make the next forward pass's predictions so, which
    :meth:`_check_prediction` stops at.
    The Trainer's own callback sets these flags before this one runs.
    """
    return control.should_save or control.should_evaluate or control.should_training_stop


def _finite_weights(model: nn.Module | None) -> bool:
    """Whether every weight is finite (one max-abs reduction, which cannot overflow)."""
    tensors = [p.detach() for p in model.parameters()] if model is not None else []
    return not tensors or bool(torch.isfinite(get_total_norm(tensors, norm_type=math.inf)))


def _recipe(args: TrainingArguments) -> str:
    """The settings that decide whether DETR learns (unset ones: the family's defaults)."""
    values = {
        name: getattr(args, name, None)
        for name in ("learning_rate", "lr_backbone", "max_grad_norm")
    }
    settings = [
        f"{name} {value:g}" if value is not None else f"{name} (the family's default)"
        for name, value in values.items()
    ]
    settings.insert(2, f"effective batch {effective_batch_size(args)}")
    return ", ".join(settings)


def _divergence_message(args: TrainingArguments, state: TrainerState, what: str, step: int) -> str:
    last_good = last_complete_checkpoint(args.output_dir) if args.output_dir else None
    if last_good:
        saved = (
            f"The last good checkpoint is {last_good}: load it with from_pretrained, or start a "
            f"new run from its weights with a lower learning rate (--model_name_or_path "
            f"{last_good} --learning_rate {args.learning_rate / 10:g} and a new output_dir; "
            f"re-running into {args.output_dir} resumes from it with the same settings)."
        )
    else:
        saved = "No checkpoint had been saved yet; restart with a lower learning rate."
    precision = " fp16 overflow (use bf16 or fp32);" if args.fp16 else ""
    return (
        f"Training diverged: {what} at step {step} of {state.max_steps}. "
        f"Training was stopped; nothing from that step on was saved. {saved} "
        f"Likely causes: a learning rate too high for the batch ({_recipe(args)}; DETR uses "
        f"1e-4 / 1e-5 at batch 64 with max_grad_norm 0.1);{precision} degenerate or "
        f"mis-read boxes (check {PREFLIGHT_REPORT}.txt in {args.output_dir}). See "
        f"{TROUBLESHOOTING}."
    )


def _not_learning_message(
    args: TrainingArguments, state: TrainerState, first: float, best: float
) -> str:
    return (
        f"class_error has not improved after {state.global_step} of {state.max_steps} steps: "
        f"{first:.1f}% at the first log, {best:.1f}% at best since (the share of matched queries "
        f"given the wrong class; it should fall well below its start early in training). "
        f"Likely causes: more objects per image than num_queries, objects only a few pixels "
        f"wide at this image_size, a learning rate that does not fit the batch "
        f"({_recipe(args)}), too few images per class, or a wrong label map. See "
        f"{PREFLIGHT_REPORT}.txt in {args.output_dir} and {TROUBLESHOOTING}."
    )
