"""What a run prints: the progress bar, one table row per evaluation, and a closing summary.

transformers prints every log as a Python dict (``PrinterCallback``, or ``ProgressCallback``
under its progress bar): some 30 keys per line with the numbers as strings, so the handful
that say whether a run learns are lost, and so is the result at the end. :func:`use_console`
swaps those for :class:`EvaluationTable` (a row per evaluation: epoch, step, training loss,
validation loss and class_error, mAP, mAP@.5, elapsed time, ETA) and a progress bar without
the dicts. Nothing is lost: the whole dicts still reach ``report_to``, a run writes them to
:data:`TRAIN_LOG` (:class:`LogFileCallback`), and ``verbose`` keeps transformers' printing as
well. :func:`run_summary` is the block that ends ``train`` and ``demo``: where the model is,
its metrics, its pictures and the commands to run next.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm
from transformers import (
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from ..wording import plural

if TYPE_CHECKING:
    from ..run import FinetuneResult

#: Every log of a run, whole, one JSON object a line (in ``output_dir``).
TRAIN_LOG = "train_log.jsonl"

#: The table's columns and their widths.
COLUMNS = {
    "epoch": 6,
    "step": 11,
    "loss": 7,
    "val loss": 8,
    "class err": 9,
    "mAP": 6,
    "mAP@.5": 6,
    "elapsed": 8,
    "ETA": 8,
}


def use_console(trainer: Trainer, verbose: bool = False) -> None:
    """Give ``trainer`` the compact console; with ``verbose`` transformers' dicts stay too."""
    trainer.add_callback(EvaluationTable())
    if verbose:
        return
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:  # present unless disable_tqdm
        trainer.add_callback(BarOnlyCallback())


class BarOnlyCallback(ProgressCallback):
    """transformers' progress bars, without the log dict written under them at every log."""

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw):
        return None


class EvaluationTable(TrainerCallback):
    """One table row per evaluation during training (the header before the first).

    ``loss`` is the training loss of the latest log; ``val loss``, ``class err`` and the mAPs
    are the evaluation's. The ETA extrapolates the time per step since this session started
    (a resumed run counts from its checkpoint), evaluations included.
    """

    def __init__(self) -> None:
        self._started: float | None = None  # while training
        self._first_step = 0
        self._train_loss: float | None = None
        self._header_written = False

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control, **kw):
        self._started, self._first_step = time.monotonic(), state.global_step

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control, **kw):
        self._started = None  # the final evaluation is the summary's, not a row

    def on_log(self, args: TrainingArguments, state: TrainerState, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs or self._started is None:
            return
        if "loss" in logs:
            self._train_loss = logs["loss"]
        if "eval_map" in logs:
            if not self._header_written:
                tqdm.write(table_row(list(COLUMNS)))
                self._header_written = True
            tqdm.write(table_row(self._cells(state, logs)))

    def _cells(self, state: TrainerState, logs: dict[str, float]) -> list[str]:
        elapsed = time.monotonic() - self._started
        done = state.global_step - self._first_step
        eta = elapsed / done * (state.max_steps - state.global_step) if done else None
        class_error = logs.get("eval_class_error")
        return [
            f"{state.epoch or 0:.1f}",
            f"{state.global_step}/{state.max_steps}",
            _number(self._train_loss),
            _number(logs.get("eval_loss")),
            "-" if class_error is None else f"{class_error:.1f}%",
            f"{logs['eval_map']:.3f}",
            f"{logs.get('eval_map_50', 0.0):.3f}",
            duration(elapsed),
            "-" if eta is None else duration(eta),
        ]


def table_row(cells: Sequence[str]) -> str:
    """The cells right-aligned in the columns' widths."""
    return "  ".join(f"{cell:>{width}}" for cell, width in zip(cells, COLUMNS.values()))


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def duration(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class LogFileCallback(TrainerCallback):
    """Each log of the run, whole, appended to ``path`` as a JSON line: what the console
    leaves out. A run that starts from step 0 starts a new file; a resumed one appends."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control, **kw):
        if state.is_world_process_zero and state.global_step == 0:
            self.path.write_text("")

    def on_log(self, args: TrainingArguments, state: TrainerState, control, logs=None, **kw):
        if state.is_world_process_zero and logs:
            entry = {"step": state.global_step, **logs}
            with self.path.open("a") as log:
                log.write(json.dumps(entry, default=str) + "\n")


def run_summary(
    result: FinetuneResult,
    dataset_dir: str | Path,
    *,
    title: str = "Fine-tuning finished",
    headline: Sequence[str] = (),
    predict_inputs: str = "IMAGES_OR_FOLDER",
) -> str:
    """The block that ends a run: ``headline`` lines, then where the model is, its final
    metrics, how long it trained, its pictures and the next commands, each ready to paste."""
    out, metrics = result.output_dir, result.metrics
    lines = [f"== {title} ".ljust(78, "="), *headline]
    lines.append(f"  model     {out}")
    lines.append(f"  metrics   {_metrics_line(metrics)} ({result.eval_split} split)")
    per_class = [
        f"{name} {metrics[f'eval_ap_{name}']:.3f}"
        for name in result.class_names
        if f"eval_ap_{name}" in metrics
    ]
    if per_class:
        lines.append(f"  AP/class  {', '.join(per_class)}")
    lines += _training_line(result.log_history)
    pictures = sorted(str(path) for path in out.glob("*.png"))
    if pictures:
        lines.append(f"  pictures  {pictures[0]}")
        lines += [f"            {path}" for path in pictures[1:]]
    log = out / TRAIN_LOG
    if log.is_file():
        lines.append(f"  full log  {log}")
    lines += [
        f"  next      hf-detr-ft evaluate --model {out} --dataset_dir {dataset_dir} "
        f"--split {result.eval_split}",
        f"            hf-detr-ft predict {predict_inputs} --model {out}",
        f"            hf-detr-ft push {out} --repo_id YOUR_NAME/{out.resolve().name}",
        "=" * 78,
    ]
    return "\n".join(lines)


def _metrics_line(metrics: dict[str, Any]) -> str:
    names = {"eval_map": "mAP", "eval_map_50": "mAP@.5", "eval_map_75": "mAP@.75"}
    return "  ".join(
        f"{label} {metrics[key]:.3f}" for key, label in names.items() if key in metrics
    )


def _training_line(log_history: Sequence[dict[str, Any]]) -> list[str]:
    """How long training took, in how many steps and epochs (from its last log)."""
    end = next((entry for entry in reversed(log_history) if "train_runtime" in entry), None)
    if end is None:
        return []
    epochs = end.get("epoch", 0)
    epochs_text = (
        plural(round(epochs), "epoch") if float(epochs).is_integer() else f"{epochs:.2f} epochs"
    )
    return [
        f"  training  {duration(end['train_runtime'])} "
        f"({plural(end.get('step', 0), 'step')}, {epochs_text})"
    ]
