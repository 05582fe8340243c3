"""Mixed precision (``--bf16``, ``--fp16``): the prediction heads run in fp32.

Under autocast a linear layer returns its compute dtype, and bf16 keeps 8 bits of mantissa:
a box coordinate from DETR's box head (a sigmoid, 0 to 1 of the image side) would be off by
up to 1/512 of the image, 1.25 px on a 640 px photo and 8 px on a phone photo, which is the
scale of the IoU steps that COCO's mAP@[.5:.95] counts. The decoder's output is already fp32
(autocast runs layer norms in fp32), so the small heads (class logits, box MLP: well under
1 % of the compute) run outside autocast and give the loss and the evaluation fp32 logits and
boxes. Measured on the demo's fine-tuned model (64 images, CPU bf16; benchmarks/README.md):
mAP 0.203 in fp32, 0.198 in bf16, 0.202 in bf16 with the heads in fp32.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

#: The class and box heads of DETR (and Conditional DETR) models.
HEAD_NAMES = ("class_labels_classifier", "bbox_predictor")


class _Fp32Forward:
    """Mixed into a head's class: its forward runs outside autocast, on inputs cast to its
    parameters' dtype (fp32 under autocast; bf16 where the weights themselves are, as with
    DeepSpeed's bf16)."""

    def forward(self, *inputs: torch.Tensor) -> Any:
        dtype = next(self.parameters()).dtype
        with torch.autocast(inputs[0].device.type, enabled=False):
            return super().forward(*(x.to(dtype) for x in inputs))


@functools.cache
def _fp32_class(cls: type[nn.Module]) -> type[nn.Module]:
    return type(f"Fp32{cls.__name__}", (_Fp32Forward, cls), {})


def keep_heads_in_fp32(model: nn.Module) -> int:
    """Run the model's prediction heads (:data:`HEAD_NAMES`) in fp32 under autocast; returns
    how many. Parameters, state dict and outputs without autocast are unchanged."""
    heads = [getattr(model, name, None) for name in HEAD_NAMES]
    heads = [head for head in heads if isinstance(head, nn.Module)]
    for head in heads:
        if not isinstance(head, _Fp32Forward):
            head.__class__ = _fp32_class(type(head))
    return len(heads)
