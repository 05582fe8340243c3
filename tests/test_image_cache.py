"""The decoded-image cache of training: same inputs as decoding every epoch, within budget."""

from __future__ import annotations

import copy
import io
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from hf_detr_ft.arguments import DataArguments
from hf_detr_ft.data.dataset import load_detection_dataset
from hf_detr_ft.errors import ArgumentError
from hf_detr_ft.models.loading import load_image_processor
from hf_detr_ft.pipeline.collate import collate_fn
from hf_detr_ft.pipeline.image_cache import (
    MAX_DEFAULT_MB,
    DecodedImageCache,
    default_cache_mb,
    image_key,
)
from hf_detr_ft.pipeline.transforms import DetrTransform


@pytest.fixture(scope="module")
def bccd_train(bccd_coco_dir):
    return load_detection_dataset(bccd_coco_dir).splits["train"]


@pytest.fixture(scope="module")
def processor():
    return load_image_processor("none-such", image_size=96, max_image_size=160)


def _png(value: int) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 4), (value, 0, 0)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": "same-name.png"}


def _epochs(transform: DetrTransform, dataset, epochs: int = 2) -> list[dict]:
    data = transform.apply_to(dataset)
    batches = []
    for epoch in range(epochs):
        transform.set_epoch(epoch)
        batches += list(DataLoader(data, batch_size=2, collate_fn=collate_fn))
    return batches


def test_cached_training_gives_the_inputs_of_decoding_every_epoch(bccd_train, processor) -> None:
    cached = DetrTransform.for_training(processor, seed=4, image_cache_mb=64)
    decodes = []
    decode = cached._decode
    cached._decode = lambda image: decodes.append(image["path"]) or decode(image)
    fresh = DetrTransform.for_training(processor, seed=4, image_cache_mb=0)
    assert fresh.image_cache is None

    with_cache, without = _epochs(cached, bccd_train), _epochs(fresh, bccd_train)
    assert len(cached.image_cache) == len(bccd_train)
    assert len(decodes) == len(set(decodes)) == len(bccd_train)  # each once, in two epochs
    for ours, reference in zip(with_cache, without, strict=True):
        torch.testing.assert_close(ours["pixel_values"], reference["pixel_values"], rtol=0, atol=0)
        for got, expected in zip(ours["labels"], reference["labels"], strict=True):
            torch.testing.assert_close(got["boxes"], expected["boxes"])
    # The two epochs were augmented differently, from pixels decoded once.
    first, second = with_cache[: len(with_cache) // 2], with_cache[len(with_cache) // 2 :]
    assert any(
        a["pixel_values"].shape != b["pixel_values"].shape
        or not torch.equal(a["pixel_values"], b["pixel_values"])
        for a, b in zip(first, second)
    )


def test_the_cache_fills_to_its_budget_and_then_keeps_what_it_holds() -> None:
    images = [{"path": f"/data/{i}.jpg", "bytes": None} for i in range(3)]
    pixels = [np.full((32, 32, 3), i, np.uint8) for i in range(3)]  # 3 KB each
    cache = DecodedImageCache(budget_mb=7 / 1024)
    for image, array in zip(images, pixels):
        cache.put(image_key(image), (array, (32, 32)))
    cache.put(image_key(images[0]), (pixels[0], (32, 32)))  # already held: not counted twice
    assert len(cache) == 2 and cache.full and cache.used_bytes == 2 * pixels[0].nbytes
    assert cache.get(image_key(images[1]))[0] is pixels[1]
    assert cache.get(image_key(images[2])) is None
    assert not pixels[0].flags.writeable  # what the next epoch reads cannot be changed
    with pytest.raises(ValueError):
        pixels[0][0, 0, 0] = 9


def test_encoded_bytes_are_keyed_by_their_content_not_their_name() -> None:
    cache = DecodedImageCache(budget_mb=1)
    red, dark = _png(200), _png(10)
    cache.put(image_key(red), (np.zeros((4, 8, 3), np.uint8), (8, 4)))
    assert cache.get(image_key(dict(red))) is not None  # the same bytes, read again
    assert cache.get(image_key(dark)) is None  # another image under the same file name
    assert image_key(np.zeros((4, 8, 3), np.uint8)) is None  # decoded images are not keyed


def test_copies_of_the_transform_start_with_an_empty_cache(bccd_train, processor) -> None:
    transform = DetrTransform.for_training(processor, image_cache_mb=64)
    _epochs(transform, bccd_train, epochs=1)
    assert len(transform.image_cache) == len(bccd_train)
    for copied in (pickle.loads(pickle.dumps(transform)), copy.deepcopy(transform)):
        assert len(copied.image_cache) == 0
        assert copied.image_cache.budget_bytes == transform.image_cache.budget_bytes


def _cached_in_worker(transform: DetrTransform):
    def collate(items: list[dict]) -> int:
        return len(transform.image_cache)

    return collate


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_dataloader_workers_decode_without_caching(bccd_train, processor) -> None:
    """A worker's copy of the transform ends with the epoch: caching there would only cost."""
    transform = DetrTransform.for_training(processor, image_cache_mb=64)
    loader = DataLoader(
        transform.apply_to(bccd_train),
        batch_size=2,
        num_workers=1,
        collate_fn=_cached_in_worker(transform),
        multiprocessing_context="fork",
    )
    assert list(loader) == [0] * len(loader)
    assert len(transform.image_cache) == 0


def test_the_default_budget_is_shared_by_the_processes_of_a_machine(monkeypatch) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = default_cache_mb()
    assert 0 < alone <= MAX_DEFAULT_MB
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_cache_mb() == pytest.approx(alone / 4)


def test_cache_budget_flag() -> None:
    assert DataArguments(dataset_dir="d").image_cache_mb is None  # the default budget
    assert DataArguments(dataset_dir="d", image_cache_mb=0).image_cache_mb == 0
    with pytest.raises(ArgumentError, match="image_cache_mb"):
        DataArguments(dataset_dir="d", image_cache_mb=-1)
    with pytest.raises(ArgumentError, match="min_scale"):
        DataArguments(dataset_dir="d", min_scale=0)
