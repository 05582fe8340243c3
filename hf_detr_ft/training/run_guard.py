"""One run per output folder, and a rerun that never mixes two runs.

``run_training`` resumes the newest complete checkpoint of its ``output_dir`` by itself, which
is what a user who restarts a killed run wants, and what silently ruins a model when the folder
holds a run of something else: a checkpoint trained on another class order would be resumed
with its class head kept bit for bit under the new names. So before resuming:

* :func:`check_resumable` compares the checkpoint's label map with the new run's, and the
  run record (:data:`RUN_RECORD`, written by :func:`write_run_record` at the start of every run)
  with the new run's starting model and training data. A mismatch stops the run with a message
  that says how to start fresh (a new ``output_dir``) or resume deliberately
  (``--resume_from_checkpoint PATH``, which skips these checks).
* :class:`OutputDirLock` keeps a second run out of a folder another run is writing to. The
  lock file names the process; a lock whose process is gone (a crash, ``kill -9``) on this host
  is stale and taken over with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import CONFIG_NAME

from ..artifacts.output_files import RUN_RECORD, write_text_atomic
from ..errors import ArgumentError, OutputDirError

logger = logging.getLogger(__name__)

LOCK_FILE = ".hf-detr-ft.lock"


def training_data_fingerprint(train: Dataset, class_names: list[str]) -> str:
    """A digest of the training split's annotations and class names (not the pixels)."""
    digest = hashlib.sha256(json.dumps(class_names).encode())
    for row in train.select_columns(["image_id", "objects"]):
        objects = row["objects"]
        digest.update(json.dumps([row["image_id"], objects["bbox"], objects["category"]]).encode())
    return digest.hexdigest()


def write_run_record(output_dir: str | Path, record: Mapping[str, Any]) -> Path:
    """Record what this run trains on (model, classes, data), for the checks of a rerun."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return write_text_atomic(
        Path(output_dir) / RUN_RECORD, json.dumps(dict(record), indent=2) + "\n"
    )


def check_resumable(checkpoint: str | Path, record: Mapping[str, Any]) -> None:
    """Refuse to resume ``checkpoint`` for a run whose classes, starting model or training data
    differ from those it was trained with (see the module docstring)."""
    folder = Path(checkpoint)
    saved = _read_json(folder / CONFIG_NAME)
    classes = [saved.get("id2label", {}).get(str(i)) for i in range(len(saved.get("id2label", {})))]
    previous = _read_json(folder.parent / RUN_RECORD)
    differences = []
    if classes != list(record["class_names"]):
        differences.append(f"classes {classes} (this run: {record['class_names']})")
    for key, what in (("model", "starting model"), ("data", "training data")):
        if key in previous and previous[key] != record[key]:
            differences.append(f"{what} {previous[key]!r} (this run: {record[key]!r})")
    if differences:
        raise ArgumentError(
            f"{folder.parent} holds {folder.name} of another run: " + "; ".join(differences) + ". "
            f"Resuming it would mix the two runs. Use a new --output_dir to start fresh, or "
            f"--resume_from_checkpoint {folder} to continue that checkpoint deliberately."
        )


class OutputDirLock:
    """``with OutputDirLock(output_dir):`` holds the folder for one run (see the module)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}

    def __enter__(self) -> OutputDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while not self._create():
            holder = _read_json(self.path)
            if not _is_stale(holder):
                raise OutputDirError(
                    f"Another run (process {holder.get('pid')} on {holder.get('host')}, started "
                    f"{time.ctime(holder.get('started', 0))}) is writing to {self.path.parent}. "
                    f"Wait for it to end, or use another --output_dir."
                )
            logger.warning("Taking over %s: its run (process %s) is gone.", self.path, holder)
            self.path.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if _read_json(self.path).get("pid") == self.owner["pid"]:
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        try:
            with self.path.open("x") as file:
                json.dump(self.owner, file)
        except FileExistsError:
            return False
        return True


def _is_stale(holder: Mapping[str, Any]) -> bool:
    """A lock of this host whose process no longer runs (or that cannot be read)."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return True
    if holder.get("host") != socket.gethostname():
        return False  # another machine's process cannot be checked from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}
