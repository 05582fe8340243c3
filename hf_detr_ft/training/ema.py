"""An exponential moving average (EMA) of the weights, the model that is evaluated and saved.

A run that stops on a noisy step (a constant or step schedule, early stopping, long training
at a high rate) ends on weights that the last updates have just moved. Averaging the weights
over the recent steps, as RT-DETR, D-FINE, rf-detr and Ultralytics do, gives a model that is
evaluated, selected and published in their place, at the cost of one copy of the trainable
parameters and one ``lerp`` per step. With a cosine schedule that ends at zero it changed
little here (benchmarks/README.md, "Learning at a fixed budget"), so it is off by default.

After optimizer step ``t`` each average moves towards the weights by ``1 - d_t``, with
``d_t = decay * (1 - exp(-t / tau))``: early on, while the new class head is random, the
average follows the weights closely; after a few ``tau`` it keeps about ``1 / (1 - decay)``
steps. ``t`` is the Trainer's global step, so a resumed run continues the same sequence.

Only parameters that train are averaged: frozen ones (DETR's stem, its frozen BatchNorm
statistics) never change. :meth:`WeightAverage.swapped_in` exchanges the averages with the
parameters' storage (no copy), so evaluation, saving and the Hub push see the average while
the optimizer's parameters, states and gradients stay as they are.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback, TrainerState


class WeightAverage:
    """The EMA of ``model``'s trainable parameters, starting from their current values.

    It keeps the parameter objects, so the model's weights may be loaded in place (resume,
    best checkpoint) but its parameters not replaced (as FSDP and DeepSpeed ZeRO-3 do).
    """

    def __init__(self, model: nn.Module, decay: float, tau: float) -> None:
        self.decay, self.tau = decay, tau
        trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in trained]
        self.parameters = [p for _, p in trained]
        self.averages = [p.detach().clone() for p in self.parameters]

    def decay_at(self, step: int) -> float:
        """``d_t`` after optimizer step ``step`` (1 for the first step)."""
        return self.decay * (1.0 - math.exp(-step / self.tau))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the averages towards the weights after optimizer step ``step``."""
        weights = [p.detach() for p in self.parameters]
        torch._foreach_lerp_(self.averages, weights, 1.0 - self.decay_at(step))

    @torch.no_grad()
    def restart(self) -> None:
        """Restart the averages at the model's weights (e.g. a checkpoint's averaged ones)."""
        torch._foreach_copy_(self.averages, [p.detach() for p in self.parameters])

    @torch.no_grad()
    def apply(self) -> None:
        """Give the parameters the averages' values (when training is over)."""
        torch._foreach_copy_([p.data for p in self.parameters], self.averages)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside, the model's trainable parameters hold the averages; outside, the weights."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        for i, param in enumerate(self.parameters):
            param.data, self.averages[i] = self.averages[i], param.data


#: The weights the optimizer was working on, beside a checkpoint's averaged model (for resume).
TRAINING_WEIGHTS_FILE = "training_weights.safetensors"


def save_training_weights(average: WeightAverage, folder: str | Path) -> None:
    """Write the weights (not the averages) that ``average`` follows into ``folder``."""
    tensors = {
        name: param.detach().contiguous() for name, param in zip(average.names, average.parameters)
    }
    save_file(tensors, os.path.join(folder, TRAINING_WEIGHTS_FILE))


def load_training_weights(model: nn.Module, folder: str | Path) -> None:
    """Load a checkpoint's training weights into ``model`` in place, if it kept them (a run
    with EMA, resumed with or without it, goes on from the optimizer's weights)."""
    path = os.path.join(folder, TRAINING_WEIGHTS_FILE)
    if not os.path.isfile(path):
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in load_file(path).items():
            params[name].copy_(tensor)


class UpdateAverageCallback(TrainerCallback):
    """Updates ``average`` after every optimizer step, numbered by the Trainer's global step."""

    def __init__(self, average: WeightAverage) -> None:
        self.average = average

    def on_optimizer_step(self, args: Any, state: TrainerState, control: Any, **kwargs: Any):
        self.average.update(state.global_step + 1)  # global_step counts it right after
