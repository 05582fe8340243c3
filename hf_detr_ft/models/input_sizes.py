"""The smallest square input a detector runs on, found by running it.

Why: two-stage detectors (RT-DETR, D-FINE, DEIMv2, RF-DETR, LW-DETR, a two-stage Deformable
DETR) pick their ``num_queries`` starting boxes among the positions of their feature maps, so
an image with fewer positions than queries fails deep inside the forward pass (``selected
index k out of range``). Where that limit lies depends on the strides, patch size, feature
levels and query count of each config (RT-DETR's 300 queries: 128 px; RF-DETR-B's: 280 px),
so rather than a formula per family the model is run on small blank images, a side at a time
in steps of its size multiple. Models without such a limit (DETR) pass the first, 64 px try.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)

#: The first side tried (the smallest any size rule here produces in practice).
FIRST_SIDE = 64
#: Sides are tried up to this, or the requested one if larger, before a model counts as unable
#: to run at all (RF-DETR-B's 300 queries need 280 px, whatever size was asked for).
LARGEST_SIDE = 1024
#: The side found for each model and size multiple. It depends on the model's structure, not
#: its weights, and ``finetune`` asks twice: to size its inputs, then to check the fold of the
#: frozen norms (:mod:`.speedups`).
_found: weakref.WeakKeyDictionary[nn.Module, tuple[int, int]] = weakref.WeakKeyDictionary()


def smallest_input_side(model: nn.Module, multiple: int, requested: int) -> int:
    """The smallest multiple of ``multiple`` (at least :data:`FIRST_SIDE`) at which ``model``
    runs on a square image, searched up to :data:`LARGEST_SIDE` or ``requested``.

    Raises :class:`~hf_detr_ft.errors.ModelLoadError` with the model's own error when it runs
    at none of them (a config that builds no working model).
    """
    if model in _found and _found[model][0] == multiple:
        return _found[model][1]
    side = multiple * math.ceil(FIRST_SIDE / multiple)
    limit = max(side, LARGEST_SIDE, requested)
    first_error: BaseException | None = None
    while side <= limit:
        error = run_error(model, side)
        if error is None:
            _found[model] = (multiple, side)
            return side
        first_error = first_error or error
        side += multiple
    raise ModelLoadError(
        f"This {model.config.model_type} model runs on no square image from "
        f"{FIRST_SIDE} to {limit} px (sides in steps of {multiple}); its forward pass fails "
        f"with {type(first_error).__name__}: {first_error}. Its config does not build a "
        "working detector: start from a published checkpoint of this type or check the config."
    )


@torch.no_grad()
def run_error(model: nn.Module, side: int) -> BaseException | None:
    """The error of ``model``'s forward pass on a blank ``side x side`` image (None: it ran).

    Runs in eval mode (no denoising or query groups, which training adds on top)."""
    parameter = next(model.parameters())
    pixels = torch.zeros(1, 3, side, side, device=parameter.device, dtype=parameter.dtype)
    try:
        with eval_mode(model):
            model(pixel_values=pixels)
    except (RuntimeError, ValueError, IndexError) as err:
        return err
    return None


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode while inside, then in the mode it was in (a probe run in the
    middle of training must not leave dropout off)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def detr_longest_edge(shortest_edge: int) -> int:
    """The longest edge DETR's size rule pairs with ``shortest_edge`` when none is given:
    800 -> 1333, the ratio of its published training size."""
    return math.ceil(shortest_edge * 1333 / 800)


#: Images a forward pass takes when the caller leaves it to ``predict`` / ``evaluate`` on a GPU
#: (and the most on a CPU).
BATCH_SIZE = 8
#: On a CPU, the model-input pixels a default batch holds at most. Larger batches run slower
#: per image there once their feature maps outgrow the caches (median ms per image at batch
#: 1 / 2 / 4 / 8, AVX2 CPU, 2 threads: RT-DETR-R18vd at 640x640 633 / 590 / 708 / 1051;
#: DETR-R50 at 800x1066 1587 / 2168 / 1812 / 2067), while small inputs gain from batching
#: (the demo's DETR at 96x128: 12.9 / 7.8 / 4.9 / 4.1); benchmarks/README.md.
CPU_BATCH_PIXELS = 1_000_000


def default_batch_size(device: torch.device, size: dict[str, int | None]) -> int:
    """Images per forward pass when none is given: :data:`BATCH_SIZE` on an accelerator; on
    the CPU as many as :data:`CPU_BATCH_PIXELS` of input (the processor's ``size`` rule at
    its largest), between 1 and :data:`BATCH_SIZE`."""
    pixels = largest_input_pixels(size)
    if device.type != "cpu" or pixels is None:
        return BATCH_SIZE
    return max(1, min(BATCH_SIZE, CPU_BATCH_PIXELS // pixels))


def largest_input_pixels(size: dict[str, int | None]) -> int | None:
    """The most pixels an image processor's ``size`` rule makes of one image (fixed
    ``height`` x ``width``, ``max_height`` x ``max_width``, or ``shortest_edge`` x
    ``longest_edge``; :func:`detr_longest_edge` when only the shortest edge is set); ``None``
    for a rule this does not know."""
    for first, second in (("height", "width"), ("max_height", "max_width")):
        if size.get(first) and size.get(second):
            return size[first] * size[second]
    shortest, longest = size.get("shortest_edge"), size.get("longest_edge")
    if shortest and not longest:
        longest = detr_longest_edge(shortest)
    if longest:
        return (shortest or longest) * longest
    return None
