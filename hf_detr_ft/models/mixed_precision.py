"""Mixed precision (``--bf16``, ``--fp16``): the prediction heads run in fp32.

Under autocast a linear layer returns its compute dtype, and bf16 keeps 8 bits of mantissa:
a box coordinate from DETR's box head (a sigmoid, 0 to 1 of the image side) would be off by
up to 1/512 of the image, which is the scale of the IoU steps that COCO's mAP@[.5:.95] counts.
The decoder's output is already fp32 (autocast runs layer norms in fp32), so the small heads
(class logits, box MLP: a tiny share of the compute) run outside autocast and give the loss and
the evaluation fp32 logits and boxes. The effect on mAP is measured in benchmarks/README.md.
Which modules are heads is the family's (:meth:`~.families.Family.is_head`): DETR's class and
box heads, the per-layer heads of Deformable DETR and RT-DETR, their two-stage encoder heads.

Each head gets a subclass of its own class whose ``forward`` runs inside
``torch.autocast(enabled=False)``: a ``with`` block in ``forward`` is exception-safe, thread-safe
(``nn.DataParallel``'s replicas run in threads) and traced by ``torch.compile``, which forward
hooks entering autocast in one hook and leaving it in another are not. The subclasses are made
at run time, so pickle cannot look them up by name: a head pickles (``torch.save`` of the whole
model, ``copy.deepcopy``) as "the fp32 subclass of <its transformers class>", rebuilt on load.
"""

from __future__ import annotations

import functools
from typing import Any, SupportsIndex

import torch
from torch import nn

from .families import family_of


class _Fp32Forward:
    """Mixed into a head's class: its forward runs outside autocast, on inputs cast to its
    parameters' dtype (fp32 under autocast; bf16 where the weights themselves are, as with
    DeepSpeed's bf16)."""

    _fp32_base: type[nn.Module]

    def forward(self, *inputs: torch.Tensor) -> Any:
        dtype = next(self.parameters()).dtype
        with torch.autocast(inputs[0].device.type, enabled=False):
            return super().forward(*(x.to(dtype) for x in inputs))

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        # object's own reduction (state and all), but the class rebuilt from its importable base
        _, _, *state = super().__reduce_ex__(max(int(protocol), 2))
        return (_new_fp32_head, (self._fp32_base,), *state)


@functools.cache
def _fp32_class(cls: type[nn.Module]) -> type[nn.Module]:
    return type(f"Fp32{cls.__name__}", (_Fp32Forward, cls), {"_fp32_base": cls})


def _new_fp32_head(cls: type[nn.Module]) -> nn.Module:
    """An empty instance of ``cls``'s fp32 subclass, for pickle to fill in."""
    return object.__new__(_fp32_class(cls))


def keep_heads_in_fp32(model: nn.Module) -> int:
    """Run the model's prediction heads (its family's :meth:`~.families.Family.is_head`) in
    fp32 under autocast; returns how many. Parameters, state dict and outputs without autocast
    are unchanged. A head shared under two names (DAB-DETR's box head, RT-DETRv2's per-layer
    heads) is one module, wrapped once."""
    family = family_of(model.config)
    heads = [module for name, module in model.named_modules() if family.is_head(name)]
    for head in heads:
        if not isinstance(head, _Fp32Forward):
            head.__class__ = _fp32_class(type(head))
    return len(heads)
