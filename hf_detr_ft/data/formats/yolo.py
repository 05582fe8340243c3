"""Read a YOLO (Ultralytics) folder as COCO content.

``data.yaml`` names the classes (``names``: a list, or a dict ``{index: name}``) and the image
folders of each split (``train``, ``val``, ``test``: a folder, a list of folders or a ``.txt``
list of image paths, relative to ``path`` or to the YAML file's folder; a leading ``../`` that
leads nowhere is retried without it, as Ultralytics and Roboflow exports expect). The label file
of ``.../images/x.jpg`` is ``.../labels/x.txt``: one ``class cx cy w h`` line per box,
normalised to the image size (a polygon line ``class x1 y1 x2 y2 ...`` gives its bounding box).
An image without a label file has no boxes. The image size is read from the image file, after
EXIF orientation (as Ultralytics does), so the boxes are never rotated again.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from ...errors import DatasetError
from ..image_files import IMAGE_ERRORS, inspect_all, inspect_image
from ..layouts import SplitFiles
from ..records import CocoFile
from ..splits import SPLIT_ALIASES
from .voc import IMAGE_EXTENSIONS

YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml")


def find_yaml(root: Path) -> Path | None:
    for name in YAML_NAMES:
        if (root / name).is_file():
            return root / name
    candidates = sorted(root.glob("*.yaml")) + sorted(root.glob("*.yml"))
    return candidates[0] if len(candidates) == 1 else None


def read_yolo(root: Path) -> list[CocoFile]:
    """One :class:`CocoFile` per split named in the folder's ``data.yaml``."""
    config_path = find_yaml(root)
    if config_path is None:
        raise DatasetError(f"{root} is not a YOLO folder: no data.yaml found.")
    config = _read_yaml(config_path)
    names = _class_names(config, config_path)
    categories = [{"id": i, "name": name} for i, name in enumerate(names)]
    base = Path(config.get("path") or ".")
    base = base if base.is_absolute() else (config_path.parent / base)

    coco_files, next_image_id, next_annotation_id = [], 1, 1
    for key, split in SPLIT_ALIASES.items():
        if not config.get(key) or any(c.files.split == split for c in coco_files):
            continue
        images = _split_images(base, config[key], config_path, key)
        image_dir = images[0].parent if images else base
        coco = CocoFile(SplitFiles(split, config_path, image_dir), categories, [], [])
        coco.boxes_as_displayed = True
        inspect_all(images)  # the sizes that _pixel_box needs, read on every core
        for image_path in images:
            image_id = next_image_id
            next_image_id += 1
            coco.images.append({"id": image_id, "file_name": str(image_path)})
            label_path = label_file(image_path)
            coco.image_sources[image_id] = (str(label_path), f"image {image_path.name}")
            for line, values in _label_lines(label_path):
                annotation = {
                    "id": next_annotation_id,
                    "image_id": image_id,
                    "category_id": values[0],
                    "bbox": None,
                }
                annotation["bbox"] = _pixel_box(values[1:], image_path)
                coco.annotations.append(annotation)
                coco.annotation_sources[next_annotation_id] = (str(label_path), f"line {line}")
                next_annotation_id += 1
        coco_files.append(coco)
    if not coco_files:
        raise DatasetError(f"{config_path} names no split: add 'train:' (and 'val:') folders.")
    return coco_files


def label_file(image_path: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``."""
    parts = list(image_path.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise DatasetError(f"Cannot read {path}: {err}") from err
    if not isinstance(config, dict):
        raise DatasetError(f"{path} is not a YOLO dataset file (expected keys names, train, val).")
    return config


def _class_names(config: dict[str, Any], path: Path) -> list[str]:
    names = config.get("names")
    if isinstance(names, dict):
        try:
            ordered = sorted((int(k), str(v)) for k, v in names.items())
        except ValueError as err:
            raise DatasetError(f"{path}: the keys of 'names' must be class indices.") from err
        if [k for k, _ in ordered] != list(range(len(ordered))):
            raise DatasetError(f"{path}: 'names' must number the classes 0..N-1, got {names}.")
        names = [v for _, v in ordered]
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{path} has no 'names' list of classes; add one (names: [a, b]).")
    if "nc" in config and config["nc"] != len(names):
        raise DatasetError(f"{path}: nc is {config['nc']} but 'names' lists {len(names)} classes.")
    return [str(n) for n in names]


def _split_images(base: Path, entry: Any, config_path: Path, key: str) -> list[Path]:
    """The image files of one split entry: folders, ``.txt`` lists, or lists of either."""
    images: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        path = _resolve(base, str(item))
        if path is None:
            raise DatasetError(
                f"{config_path}: {key}: {item!r} is neither a folder nor a list file "
                f"(looked in {base}). Fix the path in the YAML file."
            )
        if path.is_dir():
            images += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
            images += [
                _resolve(path.parent, s.strip()) or path.parent / s.strip()
                for s in lines
                if s.strip()
            ]
    return images


def _resolve(base: Path, name: str) -> Path | None:
    candidates = [Path(name)] if Path(name).is_absolute() else [base / name]
    if name.startswith("../"):
        candidates.append(base / name[3:])
    return next((c.resolve() for c in candidates if c.exists()), None)


def _label_lines(path: Path) -> list[tuple[int, list[Any]]]:
    """``(line number, [class, *normalised values])`` of a label file (none if it is missing)."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            values = [float(v) for v in fields]
        except ValueError:
            values = []
        if len(values) < 5 or len(values) % 2 == 0 or not float(values[0]).is_integer():
            raise DatasetError(
                f"{path}, line {number}: {line.strip()!r} is not 'class cx cy w h' (a class "
                "index and four numbers between 0 and 1) nor a polygon. Fix or remove the line."
            )
        rows.append((number, [int(values[0]), *values[1:]]))
    return rows


def _pixel_box(values: list[float], image_path: Path) -> list[float] | None:
    """Normalised ``cx cy w h`` (or a polygon) as a pixel ``[x, y, w, h]`` box."""
    try:
        width, height = inspect_image(image_path).size
    except IMAGE_ERRORS:
        return None  # the image is reported unreadable (or missing) and dropped with its boxes
    if len(values) == 4:
        cx, cy, w, h = values
        x, y = cx - w / 2, cy - h / 2
    else:
        xs, ys = values[0::2], values[1::2]
        x, y, w, h = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return [x, y, w, h]  # dropped and counted as a NaN box
    return [x * width, y * height, w * width, h * height]
