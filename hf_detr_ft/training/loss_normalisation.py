"""The multi-process box-loss normalisation of transformers' DETR loss, corrected while it runs.

DETR divides its box losses (L1, GIoU; masks for segmentation) by the number of target boxes
averaged over the processes, so that every process weights a box the same. transformers 5's
``ImageLoss`` (the criterion of DETR, Conditional, DAB and Deformable DETR and Grounding DINO)
computes that average as ``reduce(num_boxes) / world_size``, but accelerate's ``reduce`` is
already a *mean* across processes: the normaliser is divided by the process count twice. With N
processes the box losses come out up to N times too large (up to, because of a ``clamp(min=1)``),
so multi-process training weights box regression differently from one process, and evaluation
losses depend on the process count. Making that ``reduce`` a sum gives the intended average.

The correction is not a process-wide patch: :func:`corrected_loss_normalisation` swaps the
``reduce`` the loss module uses only for the duration of a block (``DetrTrainer`` wraps its loss
computations in it) and puts the original back afterwards. It does so only in a multi-process
run and only when :func:`loss_normalisation_fix_needed` has seen the installed transformers get
the normaliser wrong and the sum get it right, so a fixed transformers is left alone.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import reduce
from transformers.loss import loss_for_object_detection

logger = logging.getLogger(__name__)

_PATCHED = "transformers.loss.loss_for_object_detection.reduce"


def _sum_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """What the loss's ``reduce(num_boxes)`` has to be for ``/ world_size`` to give the mean."""
    return reduce(tensor, reduction="sum")


class _NormaliserProbe(loss_for_object_detection.ImageLoss):
    """``ImageLoss`` whose only "loss" is the box-count normaliser its ``forward`` computed."""

    def __init__(self) -> None:
        super().__init__(
            matcher=lambda outputs, targets: [], num_classes=1, eos_coef=1.0, losses=[""]
        )

    def get_loss(
        self, loss: str, outputs: dict, targets: list, indices: list, num_boxes: float
    ) -> dict[str, float]:
        return {"normaliser": num_boxes}


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _probe_normaliser(num_boxes: int, device: torch.device) -> float:
    """The normaliser ``ImageLoss`` uses for a batch with ``num_boxes`` target boxes here."""
    outputs = {"logits": torch.zeros(1, 1, 2, device=device)}
    targets = [{"class_labels": torch.zeros(num_boxes, dtype=torch.long, device=device)}]
    return float(_NormaliserProbe()(outputs, targets)["normaliser"])


def _probe_is_wrong(num_boxes: int, correct: float, device: torch.device) -> bool:
    return abs(_probe_normaliser(num_boxes, device) - correct) > 1e-6 * correct


@contextlib.contextmanager
def _reduce_replaced() -> Iterator[None]:
    original = loss_for_object_detection.reduce
    loss_for_object_detection.reduce = _sum_across_processes
    try:
        yield
    finally:
        loss_for_object_detection.reduce = original


def _probe_verdict(world_size: int) -> tuple[bool, bool]:
    """Whether the normaliser is wrong on any process, without and with the fix (collective)."""
    rank, device = dist.get_rank(), PartialState().device
    num_boxes = rank + 2  # a different count on each process
    correct = (world_size + 3) / 2  # the mean of 2, 3, ..., world_size + 1
    wrong_unfixed = _probe_is_wrong(num_boxes, correct, device)
    with _reduce_replaced():
        wrong_fixed = _probe_is_wrong(num_boxes, correct, device)
    verdict = torch.tensor([wrong_unfixed, wrong_fixed], dtype=torch.int32, device=device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MAX)  # every process takes the same decision
    return bool(verdict[0]), bool(verdict[1])


def _report(world_size: int, fixable: bool) -> None:
    if fixable:
        logger.info(
            "DETR loss: while DetrTrainer computes losses, %s is made a sum across processes; "
            "transformers divides its result, already a mean, by the number of processes again, "
            "which makes the box losses up to %d times too large.",
            _PATCHED,
            world_size,
        )
    else:
        logger.warning(
            "transformers' DETR loss does not normalise box losses by the mean number of boxes "
            "per process, and making %s a sum does not correct it; left as it is.",
            _PATCHED,
        )


@functools.cache
def _fix_needed(world_size: int) -> bool:
    wrong_unfixed, wrong_fixed = _probe_verdict(world_size)
    if wrong_unfixed and dist.get_rank() == 0:
        _report(world_size, fixable=not wrong_fixed)
    return wrong_unfixed and not wrong_fixed


def loss_normalisation_fix_needed() -> bool:
    """Whether the installed transformers' DETR loss needs the fix in this run (probed once).

    Never in a single process. In a multi-process run every process must call this at the same
    point the first time (the probe communicates), as they do when computing a loss.
    """
    world_size = _world_size()
    return world_size > 1 and _fix_needed(world_size)


@contextlib.contextmanager
def corrected_loss_normalisation() -> Iterator[None]:
    """Inside, transformers' DETR loss normalises box losses by the mean box count per process."""
    with _reduce_replaced() if loss_normalisation_fix_needed() else contextlib.nullcontext():
        yield
