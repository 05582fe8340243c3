"""Split names: the three that every stage uses, and the aliases datasets give them.

Folders, annotation files, ``data.yaml`` keys, VOC list files, Hub splits and the user's
``--split`` all name splits their own way (``val``, ``valid``, ``training``, ...). They are
normalised here, once, to ``train``, ``validation`` and ``test``.
"""

from __future__ import annotations

SPLITS = ("train", "validation", "test")

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "validation",
    "valid": "validation",
    "validation": "validation",
    "test": "test",
    "testing": "test",
}

#: The folder of each split in a Roboflow COCO export (what ``convert`` and the demo write).
ROBOFLOW_FOLDERS = {"train": "train", "validation": "valid", "test": "test"}


def canonical_split(name: str) -> str | None:
    """``train``, ``validation`` or ``test`` for any alias of it (any case), else ``None``."""
    return SPLIT_ALIASES.get(name.lower())
