"""Timing and memory helpers: medians of step times after warm-up, peak resident memory, a
wall-clock training budget, the FLOPs of a training step and GPUs' peak FLOP rates."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import math
import threading
import time
from typing import Any

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import TrainerCallback

#: Published dense bf16 tensor-core peaks, TFLOP/s (no sparsity), by a part of the name
#: ``torch.cuda.get_device_name`` gives; the first match counts (so "H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = (
    ("B200", 2250.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 6000 Ada", 364.0),
    ("RTX A6000", 155.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
)


class StepTimer(TrainerCallback):
    """Wall time of each Trainer step (data loading included), end to end."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.start = 0.0

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        self.start = time.perf_counter()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.ends.append(time.perf_counter())

    def durations(self) -> list[float]:
        """The time of every step, in order."""
        times = [self.start, *self.ends]
        return [b - a for a, b in zip(times, times[1:])]


def peak_bf16_tflops(device_name: str) -> float | None:
    """The GPU's dense bf16 peak from :data:`PEAK_BF16_TFLOPS`, ``None`` for one not listed."""
    return next((peak for part, peak in PEAK_BF16_TFLOPS if part in device_name), None)


def training_flops(trainer: Any, batch: dict[str, Any]) -> int:
    """FLOPs of one training step's forward and backward on ``batch``: matrix products,
    convolutions and attention, as ``torch.utils.flop_counter`` counts them (twice the
    multiply-adds, whatever the dtype; elementwise work and the optimizer left out)."""
    model = trainer.model
    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        model(**trainer._prepare_inputs(batch)).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


class TimeBudget(TrainerCallback):
    """Stops training once ``seconds`` of wall time have passed since it began, and anneals
    every learning rate along a cosine over that time.

    Run it with ``lr_scheduler_type="constant"``: a schedule counted in steps cannot end on
    time when the step rate is not known beforehand, so both recipes get this one instead.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = 0.0
        self.steps = 0

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        self.start = time.perf_counter()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        done = min((time.perf_counter() - self.start) / self.seconds, 1.0)
        for group in kwargs["optimizer"].param_groups:
            group["lr"] = group["initial_lr"] * 0.5 * (1.0 + math.cos(math.pi * done))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps = state.global_step
        if time.perf_counter() - self.start >= self.seconds:
            control.should_training_stop = True


def epoch_rates(durations: list[float], batch_sizes: list[int]) -> list[float]:
    """Images/s of each whole epoch: ``durations`` are the step times of consecutive epochs of
    ``len(batch_sizes)`` steps each (the last, partial epoch is left out)."""
    steps = len(batch_sizes)
    epochs = len(durations) // steps
    return [sum(batch_sizes) / sum(durations[e * steps : (e + 1) * steps]) for e in range(epochs)]


def release_freed_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the system (glibc's
    ``malloc_trim``; elsewhere only the collection), so that a measurement neither reuses
    what an earlier one freed (fewer page faults, less measured growth) nor pays for it."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, looked up once (``find_library`` runs ``ldconfig``)."""
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


class PeakRSS:
    """Peak resident memory of this process while the ``with`` block runs (sampled every 5 ms)."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def growth_mb(self) -> float:
        """How far the peak rose above the memory in use when the block started."""
        return (self.peak - self.start) / 2**20


def padded_fraction(pixel_mask: torch.Tensor) -> float:
    """Share of a batch's pixels that are padding (``pixel_mask`` 0)."""
    return 1.0 - float(pixel_mask.float().mean())
