"""A COCO folder's checked records, built once into Arrow files and memory-mapped afterwards.

Reading a COCO-scale folder (118k images, 845k boxes) means parsing the JSON, opening every
image and checking every box: minutes of work and gigabytes of Python objects, which every run
and every process of a multi-process run used to repeat. The result only depends on the
annotation files, the image folders and the checking options, so it is kept on disk:

    <cache_dir>/<key>/train.arrow, validation.arrow, test.arrow   one Arrow file per split
    <cache_dir>/<key>/meta.json   label map, row counts, every problem found (written last)

``key`` digests the package's cache version, the layout, ``strict``, each split's annotation
file (path and content hash) and its image folder (path and modification time: adding,
removing or renaming an image changes it). A later run with the same key maps the Arrow files
(``datasets.Dataset.from_file``: the pages are shared with every other process that maps
them) and reproduces the same records, label map and problems. A folder without a readable
``meta.json`` whose row counts match its Arrow files is a partial or corrupt build: it is
removed with a warning and built again, never used.

One process builds, the others wait: the build holds a file lock beside the entry
(``filelock``), which serialises the processes of one machine, and of several machines whose
cache directory is on a shared filesystem with working locks. Processes that find the entry
complete only map it.

The cache directory is ``cache_dir``, else ``$HF_DETR_FT_CACHE`` (``off`` turns the cache off),
else ``$XDG_CACHE_HOME/hf_detr_ft/datasets`` (``~/.cache/hf_detr_ft/datasets``). Clearing it is
deleting that folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
from datasets import Dataset, Features
from datasets.arrow_writer import ArrowWriter
from filelock import FileLock

from .layouts import SplitFiles
from .record_columns import RecordColumns
from .records import LabelMap, Problem, SkipReport

logger = logging.getLogger(__name__)

CACHE_ENV = "HF_DETR_FT_CACHE"
#: Raised whenever what is stored, or how records are checked, changes: old entries then miss.
CACHE_VERSION = 1
META_FILE = "meta.json"
_OFF = ("off", "none", "0", "false", "no")
_HASH_CHUNK = 1 << 24

#: Writes one split's records to the cache and returns the split as a ``Dataset``.
SplitWriter = Callable[[str, RecordColumns, Features], Dataset]
#: What a build produces and the cache gives back: label map, splits, problems per split.
Contents = tuple[LabelMap, dict[str, Dataset], dict[str, SkipReport]]


def cache_root(cache_dir: str | Path | None = None) -> Path | None:
    """The cache directory in force (see the module docstring); ``None``: the cache is off."""
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in (*_OFF, "") else Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return base / "hf_detr_ft" / "datasets"


def cache_key(split_files: list[SplitFiles], *, layout: str, strict: bool) -> str:
    """Digest of everything the checked records depend on (see the module docstring)."""
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, layout, strict]).encode())
    for files in split_files:
        annotation = files.annotation_file.resolve()
        image_dir = files.image_dir.resolve()
        digest.update(f"\0{files.split}\0{annotation}\0{image_dir}\0".encode())
        digest.update(f"{image_dir.stat().st_mtime_ns}\0".encode())
        with annotation.open("rb") as file:
            while chunk := file.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:32]


def cached_build(entry: Path, build: Callable[[SplitWriter], Contents]) -> Contents:
    """The contents of cache ``entry``, built with ``build`` first unless complete already.

    ``build`` gets a :data:`SplitWriter` to write each split through (its columns written to
    an Arrow file as one table: no Python object per box).
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{entry}.lock"):
        contents = _load(entry)
        if contents is not None:
            logger.info("Dataset cache hit: %s", entry)
            return contents
        logger.info("Building the dataset cache %s (later runs map it)", entry)
        _build(entry, build)
        contents = _load(entry)
    if contents is None:  # written and checked just now: only a broken filesystem gets here
        raise OSError(f"The dataset cache {entry} cannot be read back after writing it.")
    return contents


def _build(entry: Path, build: Callable[[SplitWriter], Contents]) -> None:
    """Write into a temporary folder, ``meta.json`` last, then rename it into place.

    Runs under the entry's lock, so any other temporary folder of this entry is left by a
    build that was killed (e.g. SIGTERM, which skips the clean-up below): removed here."""
    for stale in entry.parent.glob(f"{entry.name}.partial-*"):
        logger.info("Removing %s, left by an interrupted cache build", stale)
        shutil.rmtree(stale, ignore_errors=True)
    partial = entry.with_name(f"{entry.name}.partial-{os.getpid()}")
    partial.mkdir()
    files: dict[str, str] = {}

    def write_split(split: str, records: RecordColumns, features: Features) -> Dataset:
        files[split] = f"{split}.arrow"
        path = partial / files[split]
        with ArrowWriter(features=features, path=str(path)) as writer:
            writer.write_table(records.table(features))
            writer.finalize()
        return Dataset.from_file(str(path))

    try:
        label_map, splits, skipped = build(write_split)
        meta = {
            "version": CACHE_VERSION,
            "label_map": {"names": label_map.names, "source_ids": label_map.source_ids},
            "splits": {name: {"file": files[name], "rows": len(ds)} for name, ds in splits.items()},
            "skipped": {
                name: {
                    "strict": report.strict,
                    "problems": [dataclasses.asdict(p) for p in report.problems],
                }
                for name, report in skipped.items()
            },
        }
        (partial / META_FILE).write_text(json.dumps(meta))  # the folder is renamed whole
        os.replace(partial, entry)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _load(entry: Path) -> Contents | None:
    """Map a complete entry; ``None`` when there is none (a broken one is removed)."""
    if not entry.exists():
        return None
    try:
        meta = json.loads((entry / META_FILE).read_text())
        if meta["version"] != CACHE_VERSION:
            raise ValueError(f"cache version {meta['version']}, expected {CACHE_VERSION}")
        splits = {}
        for name, split in meta["splits"].items():
            splits[name] = Dataset.from_file(str(entry / split["file"]))
            if len(splits[name]) != split["rows"]:
                raise ValueError(
                    f"{split['file']}: {len(splits[name])} rows, {split['rows']} written"
                )
        label_map = LabelMap(meta["label_map"]["names"], meta["label_map"]["source_ids"])
        skipped = {name: _skip_report(report) for name, report in meta["skipped"].items()}
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as err:
        logger.warning(
            "The dataset cache %s is incomplete or corrupt (%s): rebuilding it.", entry, err
        )
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return label_map, splits, skipped


def _skip_report(stored: dict[str, Any]) -> SkipReport:
    problems = [Problem(**problem) for problem in stored["problems"]]
    counts = Counter(problem.reason for problem in problems)
    return SkipReport(strict=stored["strict"], counts=counts, problems=problems)
