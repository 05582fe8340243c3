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

import logging
import math

import torch
from torch import nn

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)

#: The first side tried (the smallest any size rule here produces in practice).
FIRST_SIDE = 64
#: Sides are tried up to this, or the requested one if larger, before a model counts as unable
#: to run at all (RF-DETR-B's 300 queries need 280 px, whatever size was asked for).
LARGEST_SIDE = 1024


def smallest_input_side(model: nn.Module, multiple: int, requested: int) -> int:
    """The smallest multiple of ``multiple`` (at least :data:`FIRST_SIDE`) at which ``model``
    runs on a square image, searched up to :data:`LARGEST_SIDE` or ``requested``.

    Raises :class:`~hf_detr_ft.errors.ModelLoadError` with the model's own error when it runs
    at none of them (a config that builds no working model).
    """
    side = multiple * math.ceil(FIRST_SIDE / multiple)
    limit = max(side, LARGEST_SIDE, requested)
    first_error: BaseException | None = None
    while side <= limit:
        error = run_error(model, side)
        if error is None:
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
    was_training = model.training
    model.eval()
    try:
        model(pixel_values=pixels)
    except (RuntimeError, ValueError, IndexError) as err:
        return err
    finally:
        model.train(was_training)
    return None
