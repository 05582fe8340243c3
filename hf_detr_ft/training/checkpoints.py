"""Checkpoints that survive kills and Ctrl-C, and resumes that continue exactly.

* **Complete checkpoints.** The Trainer writes a checkpoint's files one after another in place
  and ``trainer_state.json`` last; :class:`~training.trainer.DetrTrainer` adds a barrier so
  that it is written only once every process has written its files, and first removes any
  folder left by an earlier save of the same step (removing its ``trainer_state.json`` first).
  A checkpoint is therefore complete exactly when :func:`missing_parts` finds nothing missing:
  a kill while saving leaves a folder without (or with a truncated) ``trainer_state.json``.
  Resuming uses :func:`last_complete_checkpoint`, which skips such folders with a warning.
  (transformers 4.36 wrote into ``tmp-checkpoint-N`` and renamed it; the renames raced between
  processes and nodes, and transformers dropped it. Writing in place needs no rename.)
* **Evaluation leaves the random state alone** (:func:`random_state_kept`): the evaluation
  data loader draws a seed from torch's generator, so without this a run resumed from a
  checkpoint saved before an evaluation would continue with other dropout masks.
* **Ctrl-C** (:class:`StopOnInterrupt`): the first SIGINT asks the Trainer to save a
  checkpoint at the end of the current step and to stop; :func:`hf_detr_ft.run_training` then
  raises :class:`~hf_detr_ft.errors.TrainingInterrupted`, whose message says how to resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import reduce
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import (
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")

_WEIGHTS = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
# FSDP and DeepSpeed save the model and optimizer as folders of shards.
_SHARDED = ("pytorch_model_fsdp", "global_step")


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a ``checkpoint-N`` folder, None for any other name."""
    match = CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def missing_parts(checkpoint: str | Path, with_optimizer: bool = True) -> list[str]:
    """What ``checkpoint`` lacks to resume from it (empty when complete).

    ``with_optimizer=False`` is for runs with ``save_only_model``, whose checkpoints have no
    optimizer, scheduler or random states.
    """
    folder = Path(checkpoint)
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    sharded = any(name.startswith(_SHARDED) for name in names)
    required = {
        "trainer_state.json (written last)": _readable_json(folder / TRAINER_STATE_NAME),
        "model weights": sharded or bool(names & set(_WEIGHTS)),
        CONFIG_NAME: sharded or CONFIG_NAME in names,
    }
    if with_optimizer:
        required["optimizer state"] = sharded or "optimizer.pt" in names
        required["random states"] = any(name.startswith("rng_state") for name in names)
    return [part for part, present in required.items() if not present]


def last_complete_checkpoint(output_dir: str | Path, with_optimizer: bool = True) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir``; warns about newer incomplete ones."""
    folder = Path(output_dir)
    entries = folder.iterdir() if folder.is_dir() else []
    found = [path for path in entries if checkpoint_step(path) is not None]
    for path in sorted(found, key=checkpoint_step, reverse=True):
        missing = missing_parts(path, with_optimizer)
        if not missing:
            return str(path)
        logger.warning(
            "Skipping %s: incomplete (no %s), probably killed while saving.",
            path,
            ", ".join(missing),
        )
    return None


def discard_checkpoint(checkpoint: str | Path) -> None:
    """Delete a checkpoint folder, unmarking it first so a kill midway leaves it incomplete."""
    folder = Path(checkpoint)
    (folder / TRAINER_STATE_NAME).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def random_state_kept() -> contextlib.AbstractContextManager:
    """Restore torch's random state (CPU and the current GPU) when the block ends."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


def on_any_process(flag: bool) -> bool:
    """``flag`` of any process, so every process stops at the same step (no hanging)."""
    state = PartialState()
    if state.num_processes == 1:
        return flag
    return bool(reduce(torch.tensor([float(flag)], device=state.device), reduction="sum") > 0)


def _readable_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


class StopOnInterrupt(TrainerCallback):
    """Turn Ctrl-C into "save a checkpoint at the end of this step, then stop".

    Use :meth:`catching_sigint` around ``trainer.train()``. Every process of a multi-process
    run stops at the same step (the request is shared at each step end). A second Ctrl-C
    stops at once, without saving. When the stop comes at an epoch's last step, that epoch's
    evaluation still runs before the checkpoint is saved, as in an uninterrupted run.
    """

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None

    @contextlib.contextmanager
    def catching_sigint(self) -> Iterator[None]:
        """Handle SIGINT in the block (main thread only), then restore the previous handler."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning(
            "Ctrl-C: saving a checkpoint at the end of this step, then stopping "
            "(Ctrl-C again stops at once, without saving)."
        )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if on_any_process(self.requested):
            self.stopped_at = state.global_step
            control.should_training_stop = True
            # At an epoch's last step, save after the epoch's evaluation (on_epoch_end).
            control.should_save = control.should_save or state.epoch != int(state.epoch)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.stopped_at is None:
            return
        ended = state.epoch == int(state.epoch)
        control.should_evaluate = control.should_evaluate and ended
        control.should_save = ended

    def message(self, output_dir: str | Path) -> str:
        """How to resume, for the run that this callback stopped."""
        checkpoint = Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.stopped_at}"
        return (
            f"Training interrupted (Ctrl-C) at step {self.stopped_at}; saved {checkpoint}. "
            f"Run the same command again to resume from it (it picks the newest complete "
            f"checkpoint in {output_dir}), or pass --resume_from_checkpoint {checkpoint}."
        )
