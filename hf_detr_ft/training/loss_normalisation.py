"""Fixes for upstream behaviour this library depends on, each small and in one place.

transformers 5's DETR loss normalises the box losses by the number of target boxes averaged
over processes, but computes that average as ``reduce(num_boxes)`` (a *mean* across processes)
divided again by the number of processes. With N processes the L1 and GIoU losses come out N
times too large, so multi-GPU training weights box regression differently from one GPU, and
evaluation losses depend on the process count. Making that ``reduce`` a sum restores the
intended average. It changes nothing in a single process.
"""

from __future__ import annotations

import functools

from accelerate.utils import reduce
from transformers.loss import loss_for_object_detection


def fix_object_detection_loss_normalisation() -> None:
    """Make the DETR loss's ``reduce(num_boxes)`` a sum, so ``/ world_size`` gives the mean."""
    if getattr(loss_for_object_detection, "reduce", None) is reduce:
        loss_for_object_detection.reduce = functools.partial(reduce, reduction="sum")
