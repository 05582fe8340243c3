"""Decoded training images kept in memory between epochs: each image is decoded once per run.

Training augments every image anew each epoch, but what comes before the augmentation, the
file decoded to pixels at the size the model needs
(:func:`~hf_detr_ft.data.image_files.decode_for_resize`), is the same every epoch. On a CPU
without DataLoader workers (the default there) decoding is part of every step, PNGs most of
all (measured in benchmarks/README.md).

Only the training loop's own process caches. A DataLoader worker (the GPU default) holds a
copy of the transform that ends with the epoch, or, kept between epochs, would cache the same
images once per worker; workers decode beside the model anyway.

The cache fills in the order images are first read until its budget is spent, and then keeps
what it holds: with shuffled batches, evicting the least recently used image would drop each
one just before it is read again. Cached pixels are read-only, so that no augmentation can
change what the next epoch reads.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import psutil

logger = logging.getLogger(__name__)

#: The default budget: an eighth of the machine's memory, at most this many MB.
MAX_DEFAULT_MB = 4096

Decoded = tuple[np.ndarray, tuple[int, int]]


def default_cache_mb() -> float:
    """An eighth of the machine's memory, at most :data:`MAX_DEFAULT_MB`, shared by the
    training processes on the machine (``LOCAL_WORLD_SIZE``, set by torchrun and accelerate):
    each of them caches its own images."""
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return min(MAX_DEFAULT_MB, psutil.virtual_memory().total / 8 / 2**20) / processes


class DecodedImageCache:
    """Decoded pixels and full size of encoded dataset images (``{"path", "bytes"}``), up to
    ``budget_mb`` megabytes of pixels."""

    def __init__(self, budget_mb: float) -> None:
        if budget_mb < 0:
            raise ValueError(f"The image cache budget must be >= 0 MB, got {budget_mb}.")
        self.budget_bytes = int(budget_mb * 2**20)
        self._clear()

    def _clear(self) -> None:
        self._decoded: dict[Hashable, Decoded] = {}
        self.used_bytes = 0
        self.full = False

    def __len__(self) -> int:
        return len(self._decoded)

    def get(self, key: Hashable | None) -> Decoded | None:
        """What :meth:`put` kept under ``key`` (:func:`image_key`), if anything."""
        return None if key is None else self._decoded.get(key)

    def put(self, key: Hashable | None, decoded: Decoded) -> None:
        """Keep ``decoded`` (made read-only) under ``key`` if the budget has room for it."""
        pixels, _ = decoded
        if key is None or key in self._decoded or self.full:
            return
        if self.used_bytes + pixels.nbytes > self.budget_bytes:
            self.full = True
            logger.info(
                "Decoded image cache full at %d images (%.0f MB): the rest are decoded every "
                "epoch (--image_cache_mb raises the budget).",
                len(self._decoded),
                self.used_bytes / 2**20,
            )
            return
        pixels.setflags(write=False)
        self._decoded[key] = decoded
        self.used_bytes += pixels.nbytes

    def __getstate__(self) -> dict[str, Any]:
        """Copies (to spawned DataLoader workers, ``copy.deepcopy``, ``datasets``' hashing of
        the transform) start empty: the pixels stay with the process that decoded them."""
        return {"budget_bytes": self.budget_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.budget_bytes = state["budget_bytes"]
        self._clear()


def image_key(image: Any) -> Hashable | None:
    """The cache key of a dataset image: encoded bytes by their digest (a file name inside a
    Parquet file need not be unique), a file by its path; ``None`` for an image that is not
    an encoded one."""
    if not isinstance(image, Mapping):
        return None
    data, path = image.get("bytes"), image.get("path")
    if data is not None:
        return ("bytes", len(data), hashlib.blake2b(data, digest_size=16).digest())
    return ("path", path) if path else None
