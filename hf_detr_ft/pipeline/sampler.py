"""Aspect-ratio grouped batching: batches of images of similar shape, so little is padded.

:func:`pipeline.collate.collate_fn` pads each batch to its largest image. A portrait photo
batched with a panorama is padded to a near-square of mostly zeros, which costs compute in
the backbone and the encoder for nothing. As torchvision's detection references
(``group_by_aspect_ratio.py``) and detectron2 do, images are put in aspect-ratio bins and each
batch is drawn from one bin.

Unlike torchvision's ``GroupedBatchSampler`` (which repeats images to fill the last batch of
each bin), :class:`AspectRatioGroupedSampler` yields every index exactly once per epoch: the
leftovers of the bins (fewer than a batch each) are sorted by aspect ratio and batched
together at the end. It is an ordinary index sampler whose order, cut into consecutive chunks
of ``batch_size``, gives the grouped batches; so the Trainer's ``BatchSampler`` and
accelerate's ``BatchSamplerShard`` (which deals whole batches round-robin to the processes)
keep every batch intact. The order depends only on ``seed`` and the epoch, so every process
computes the same one, as that sharding requires.

Evaluation batches are grouped too (:class:`AspectRatioSortedSampler`): the order of the
evaluation images does not change any metric, so the same bins are cut into batches in a fixed
order, images sorted by aspect ratio within each bin and among the leftovers. (Sorting alone
would start a new batch wherever the previous shape ran out: with a few images of each
shape, most batches would straddle two shapes.)

Aspect ratios come from the dataset's ``width`` and ``height`` columns: no image is decoded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

#: Bins per side of square (torchvision's ``k``): edges at 2 ** linspace(-1, 1, 2k + 1).
ASPECT_BINS_PER_SIDE = 3


def aspect_ratios(widths: Sequence[float], heights: Sequence[float]) -> np.ndarray:
    """Each image's width / height."""
    return np.asarray(widths, dtype=np.float64) / np.asarray(heights, dtype=np.float64)


def aspect_ratio_groups(
    widths: Sequence[float], heights: Sequence[float], k: int = ASPECT_BINS_PER_SIDE
) -> np.ndarray:
    """The bin of each image's width / height, with torchvision's log-spaced bin edges.

    With ``k=3`` the edges run from 1:2 to 2:1; portraits taller than 1:2 and panoramas wider
    than 2:1 get the two outer bins.
    """
    ratios = aspect_ratios(widths, heights)
    edges = 2.0 ** np.linspace(-1, 1, 2 * k + 1)
    return np.digitize(ratios, edges)


class AspectRatioGroupedSampler(Sampler[int]):
    """Indices in an order whose consecutive ``batch_size`` chunks share an aspect-ratio bin.

    Call :meth:`set_epoch` (the Trainer and accelerate do) for a new order each epoch.
    """

    def __init__(
        self,
        widths: Sequence[float],
        heights: Sequence[float],
        batch_size: int,
        *,
        seed: int = 0,
        k: int = ASPECT_BINS_PER_SIDE,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if len(widths) != len(heights):
            raise ValueError(f"{len(widths)} widths but {len(heights)} heights.")
        self.ratios = aspect_ratios(widths, heights)
        self.groups = aspect_ratio_groups(widths, heights, k)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch

    def batches(self) -> list[list[int]]:
        """This epoch's batches: full single-bin batches in random order, then the mixed rest."""
        rng = np.random.default_rng([self.seed, self.epoch])
        full, rest = grouped_batches(
            rng.permutation(len(self.groups)), self.groups, self.ratios, self.batch_size
        )
        return [full[i] for i in rng.permutation(len(full))] + rest


def grouped_batches(
    order: np.ndarray, groups: np.ndarray, ratios: np.ndarray, batch_size: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Cut ``order`` (every index once) into full batches of one bin each, keeping the order
    within a bin, and batches of the leftovers (fewer than a batch per bin) sorted by ratio."""
    full, leftovers = [], []
    for group in np.unique(groups):
        members = order[groups[order] == group]
        cut = len(members) - len(members) % batch_size
        full += [members[i : i + batch_size] for i in range(0, cut, batch_size)]
        leftovers += list(members[cut:])
    leftovers.sort(key=lambda index: ratios[index])
    rest = [leftovers[i : i + batch_size] for i in range(0, len(leftovers), batch_size)]
    return [[int(i) for i in batch] for batch in full], [[int(i) for i in b] for b in rest]


class AspectRatioSortedSampler(Sampler[int]):
    """Every index once, in batches of one aspect-ratio bin (sorted by ratio within it), the
    leftovers last: the evaluation order. Fixed, so the same on every process, as accelerate's
    sharding needs."""

    def __init__(
        self,
        widths: Sequence[float],
        heights: Sequence[float],
        batch_size: int,
        *,
        k: int = ASPECT_BINS_PER_SIDE,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        ratios = aspect_ratios(widths, heights)
        by_ratio = np.argsort(ratios, kind="stable")
        full, rest = grouped_batches(
            by_ratio, aspect_ratio_groups(widths, heights, k), ratios, batch_size
        )
        self.order = [index for batch in full + rest for index in batch]

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)
