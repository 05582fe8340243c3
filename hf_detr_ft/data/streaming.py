"""Train from a dataset too big for the disk: the training split streamed (``--streaming``).

``load_dataset(source, streaming=True)`` reads a Hub dataset (or a folder of its Parquet
files) as it is iterated. The training split becomes an ``IterableDataset``: shuffled with a
buffer (``--shuffle_buffer`` rows; the order of its files is shuffled too, with the run's
seed), and checked and converted to records a batch of rows at a time by the same code as the
materialised path (:func:`..formats.hf_datasets.rows_to_coco`, :func:`..records.to_records`),
so a bad box is clipped or dropped, counted and warned about in the same words (per batch,
as the stream is read). The validation and test splits are read whole, checked as usual and
kept in memory: evaluation counts every image once, on every process.

What a stream cannot do, refused before anything is loaded (:func:`check_streaming_run`):
there is no length, so ``max_steps`` sets the run's length; there are no epochs that all
processes end together, so evaluation, saving and logging go by steps; there is no whole
set to split a validation set off or to group by aspect ratio over.

Sharding across processes is accelerate's, when the Trainer prepares the data loader (with
``dispatch_batches`` off, which this module sets): with at least as many data files as
processes, each process reads its own files (``IterableDataset.shard``); with fewer, every
process reads the stream and keeps every n-th batch (``IterableDatasetShard``). Splitting
here as well (``datasets.distributed.split_dataset_by_node``) would split twice, since
accelerate shards any ``IterableDataset`` it is given; dispatching (the main process reads
every batch and sends each process its part) needs batches of one size, which multi-scale
training does not make. Processes whose files hold different numbers of images simply start
their next pass at different steps; every step still has one batch from each process.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, IterableDataset
from datasets import Image as ImageFeature
from transformers import TrainingArguments

from ..errors import ArgumentError, DatasetError
from .dataset import DetectionDataset, check_num_classes, detection_features
from .formats import resolve_format
from .formats.hf_datasets import (
    check_schema,
    class_label_names,
    is_saved_dataset,
    load_hf_splits,
    rows_to_coco,
)
from .records import LabelMap, SkipReport, to_records
from .splits import canonical_split

logger = logging.getLogger(__name__)

#: Rows checked and converted together: the unit of the stream's problem warnings.
RECORD_BATCH = 256
#: Strategies that need epochs, which a stream does not have (per process, they end apart).
EPOCH_STRATEGIES = ("eval_strategy", "save_strategy", "logging_strategy")


@dataclass
class StreamingDataset(DetectionDataset):
    """A dataset whose training split is the stream ``train_stream`` (never read whole);
    ``splits`` holds the evaluation splits, read and checked as the materialised path does."""

    train_stream: IterableDataset | None = None

    @property
    def fingerprint(self) -> str:
        """What a resumed run compares: the source and the classes (a stream is not read)."""
        return hashlib.sha256(json.dumps([str(self.root), self.class_names]).encode()).hexdigest()


def check_streaming_run(source: str, dataset_format: str, training_args: TrainingArguments) -> None:
    """Refuse what a stream cannot do (see the module docstring), before anything is loaded,
    and let every process read its own batches (``dispatch_batches`` off)."""
    if Path(source).expanduser().exists():
        found = resolve_format(source, dataset_format)
        if found != "hf" or is_saved_dataset(Path(source).expanduser()):
            kind = "a save_to_disk" if found == "hf" else f"a {found.upper()}"
            raise ArgumentError(
                f"--streaming reads a Hub dataset id or a folder of Parquet files; {source} is "
                f"{kind} folder, which is on disk already: drop --streaming."
            )
    if training_args.max_steps <= 0:
        raise ArgumentError(
            "--streaming needs --max_steps (a positive number of steps): a streamed dataset "
            "has no length, so --num_train_epochs cannot set the run's length."
        )
    epoch_based = [name for name in EPOCH_STRATEGIES if getattr(training_args, name) == "epoch"]
    if epoch_based:
        flags = ", ".join(f"--{name}" for name in epoch_based)
        raise ArgumentError(
            f"--streaming: {flags} set to 'epoch', but a stream has no epochs that every process "
            "ends together; use steps (e.g. --eval_strategy steps --eval_steps 500 "
            "--save_strategy steps --save_steps 500 --logging_strategy steps) or no."
        )
    training_args.accelerator_config.dispatch_batches = False


def load_streaming_dataset(
    source: str,
    num_classes: int | None = None,
    *,
    seed: int = 42,
    shuffle_buffer: int = 1000,
    strict: bool = False,
) -> StreamingDataset:
    """The streamed training split and the evaluation splits of a Hub id or Parquet folder."""
    streams = {
        canonical_split(name): (name, split) for name, split in load_hf_splits(source, True).items()
    }
    if "train" not in streams or "validation" not in streams:
        raise DatasetError(
            f"--streaming needs a train and a validation split in {source} (found: "
            f"{sorted(name for name, _ in streams.values())}): a stream is never read whole, "
            "so no validation set can be split off it."
        )
    name, train = streams["train"]
    key = _checked(train, source, name)
    names = _stream_class_names(train, key, source)
    label_map = LabelMap(names, list(range(len(names))))
    check_num_classes(label_map, num_classes, Path(source))
    splits, skipped = {}, {}
    for split in ("validation", "test"):
        if split in streams:
            splits[split], skipped[split] = _materialised(
                *streams[split], source, label_map, strict
            )
    records = _ToRecords(name, source, key, label_map, strict)
    stream = (
        train.cast_column("image", ImageFeature(decode=False))
        .shuffle(seed=seed, buffer_size=shuffle_buffer)
        .map(
            records,
            batched=True,
            batch_size=RECORD_BATCH,
            with_indices=True,
            remove_columns=list(train.features),
            features=_record_features(names),
        )
    )
    logger.info(
        "Streaming the train split of %s (%d data files, shuffle buffer %d); %s; classes %s",
        source,
        train.n_shards,
        shuffle_buffer,
        ", ".join(f"{split}: {len(data)} images" for split, data in splits.items()),
        names,
    )
    root = (
        Path(source).expanduser().resolve() if Path(source).expanduser().exists() else Path(source)
    )
    layout = "train split streamed"  # as the dataset report names it
    return StreamingDataset(splits, label_map, layout, root, skipped, "hf", train_stream=stream)


def transformed_stream(stream: IterableDataset, transform: Any, batch_size: int) -> IterableDataset:
    """``stream`` through the training transform a batch at a time, as ``with_transform``
    applies it to a ``Dataset`` (an ``IterableDataset`` has none: ``map`` is lazy too)."""
    return stream.map(
        transform, batched=True, batch_size=batch_size, remove_columns=list(stream.features)
    )


class _ToRecords:
    """A batch of streamed rows -> checked records (picklable, for DataLoader workers)."""

    def __init__(self, name: str, source: str, key: str, label_map: LabelMap, strict: bool):
        self.name, self.source, self.key = name, source, key
        self.label_map, self.strict = label_map, strict

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        rows = (dict(zip(batch, values)) for values in zip(*batch.values()))
        coco = rows_to_coco(
            zip(indices, rows), "train", self.name, self.source, self.label_map.names, self.key
        )
        records, _ = to_records(coco, self.label_map, strict=self.strict)  # warns per batch
        columns = _record_features(self.label_map.names)
        return {column: [record[column] for record in records] for column in columns}


def _materialised(
    name: str, split: IterableDataset, source: str, label_map: LabelMap, strict: bool
) -> tuple[Dataset, SkipReport]:
    """An evaluation split read whole, checked and converted as the materialised path does."""
    key = _checked(split, source, name)
    rows = enumerate(split.cast_column("image", ImageFeature(decode=False)))
    coco = rows_to_coco(rows, canonical_split(name), name, source, label_map.names, key)
    records, skipped = to_records(coco, label_map, strict=strict)
    if not records:
        raise DatasetError(f"The {name} split of {source} has no usable images.")
    return Dataset.from_list(records, features=detection_features(label_map.names)), skipped


def _checked(split: IterableDataset, source: str, name: str) -> str:
    if split.features is None:  # JSON files without a schema: known only once read
        raise DatasetError(
            f"{source} ({name} split) declares no features, so its columns and class names "
            "are unknown until it is read; --streaming needs Parquet files or a Hub dataset "
            "with features."
        )
    return check_schema(split, source, name)


def _stream_class_names(train: IterableDataset, key: str, source: str) -> list[str]:
    names = class_label_names(train, key)
    if names is None:
        raise DatasetError(
            f"{source}: objects.{key} is not a ClassLabel, so the class names are unknown "
            "until the whole stream is read; --streaming needs a ClassLabel category."
        )
    return names


def _record_features(class_names: list[str]) -> Any:
    """The records' features, with the image left encoded for the training transform."""
    features = detection_features(class_names)
    features["image"] = ImageFeature(mode="RGB", decode=False)
    return features
