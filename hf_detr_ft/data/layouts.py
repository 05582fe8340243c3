"""Find the annotation file and image folder of every split in a dataset folder.

Two COCO folder layouts are common in the wild:

* ``roboflow``: ``train/``, ``valid/``, ``test/``, each holding ``_annotations.coco.json``
  beside its images (Roboflow's "COCO" export). A folder that itself holds
  ``_annotations.coco.json`` is read as a single training split.
* ``coco``: ``annotations/instances_{train,val,test}2017.json`` (or
  ``custom_{train,val,test}.json``, the layout of DETR's fine-tuning tutorials) with images in
  ``train2017/``, ``val2017/``, ...

Split names are normalised by :mod:`.splits`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError
from .splits import canonical_split

ROBOFLOW_ANNOTATION_FILE = "_annotations.coco.json"
LAYOUTS = ("auto", "roboflow", "coco")

# instances_train2017.json, custom_val.json, instances_valid.json, ...
_COCO_ANNOTATION_NAME = re.compile(r"^(?:instances|custom)_(?P<split>[a-z]+)(?P<year>\d*)\.json$")


@dataclass(frozen=True)
class SplitFiles:
    """Where one split lives: its COCO annotation file and the folder its file names refer to."""

    split: str
    annotation_file: Path
    image_dir: Path


def find_splits(dataset_dir: str | Path, layout: str = "auto") -> tuple[str, list[SplitFiles]]:
    """Return the detected layout name and the splits found in ``dataset_dir``."""
    root = Path(dataset_dir).expanduser()
    if not root.is_dir():
        raise DatasetError(f"Dataset folder {root} does not exist or is not a folder.")
    if layout not in LAYOUTS:
        raise DatasetError(f"Unknown dataset layout {layout!r}; expected one of {LAYOUTS}.")

    finders = {"roboflow": _roboflow_splits, "coco": _coco_splits}
    candidates = finders if layout == "auto" else {layout: finders[layout]}
    for name, finder in candidates.items():
        splits = finder(root)
        if splits:
            _check_unique(splits, root)
            return name, splits

    expected = (
        f"either split folders (train/, valid/, test/) each with {ROBOFLOW_ANNOTATION_FILE}, "
        "or annotations/instances_train2017.json (or custom_train.json) with train2017/ images"
    )
    raise DatasetError(
        f"No COCO annotations found in {root} (layout={layout!r}). Expected {expected}."
    )


def has_coco_annotations(root: Path) -> bool:
    """Whether ``root`` holds COCO annotation files in either layout."""
    if (root / ROBOFLOW_ANNOTATION_FILE).is_file():
        return True
    if any((p / ROBOFLOW_ANNOTATION_FILE).is_file() for p in root.iterdir() if p.is_dir()):
        return True
    return any(_COCO_ANNOTATION_NAME.match(p.name) for p in (root / "annotations").glob("*.json"))


def _roboflow_splits(root: Path) -> list[SplitFiles]:
    if (root / ROBOFLOW_ANNOTATION_FILE).is_file():
        return [SplitFiles("train", root / ROBOFLOW_ANNOTATION_FILE, root)]
    splits = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        split = canonical_split(folder.name)
        if split and (folder / ROBOFLOW_ANNOTATION_FILE).is_file():
            splits.append(SplitFiles(split, folder / ROBOFLOW_ANNOTATION_FILE, folder))
    return splits


def _coco_splits(root: Path) -> list[SplitFiles]:
    annotation_dir = root / "annotations"
    if not annotation_dir.is_dir():
        return []
    splits = []
    for path in sorted(annotation_dir.glob("*.json")):
        match = _COCO_ANNOTATION_NAME.match(path.name)
        split = match and canonical_split(match["split"])
        if split:
            image_dir = _coco_image_dir(root, match["split"], match["year"], path)
            splits.append(SplitFiles(split, path, image_dir))
    return splits


def _coco_image_dir(root: Path, split: str, year: str, annotation_file: Path) -> Path:
    """Pick the image folder of a COCO-layout split (``train2017/``, ``images/train/``, ...)."""
    names = [f"{split}{year or '2017'}", split, f"{split}{year}"]
    candidates = [root / n for n in names] + [root / "images" / n for n in names]
    candidates.append(root / "images")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    tried = ", ".join(str(c.relative_to(root)) for c in dict.fromkeys(candidates))
    raise DatasetError(
        f"Found {annotation_file} but no image folder for it in {root} (looked for: {tried})."
    )


def _check_unique(splits: list[SplitFiles], root: Path) -> None:
    seen: dict[str, Path] = {}
    for s in splits:
        if s.split in seen:
            raise DatasetError(
                f"Two annotation files for the {s.split!r} split in {root}: "
                f"{seen[s.split]} and {s.annotation_file}. Keep one, or pass the folder of one."
            )
        seen[s.split] = s.annotation_file
