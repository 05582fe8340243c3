"""Write a loaded dataset as a Roboflow-layout COCO folder (``hf-detr-ft convert``).

``train/``, ``valid/``, ``test/``, each with ``_annotations.coco.json`` beside its images, in
the normalised form training uses: the boxes as checked (clipped, bad ones dropped), images
with EXIF orientation or embedded bytes written out as displayed, and categories with the
source ids and names of the label map. Reading the folder back gives the same records.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

from datasets import Image as ImageFeature
from PIL import Image, ImageOps

from ..dataset import DetectionDataset
from ..image_files import inspect_image
from ..layouts import ROBOFLOW_ANNOTATION_FILE
from ..splits import ROBOFLOW_FOLDERS


def write_coco_folder(data: DetectionDataset, destination: str | Path) -> Path:
    """Write every split of ``data`` under ``destination`` (which must be new or empty).

    Everything is written into a hidden sibling folder first and renamed to ``destination``
    once complete, so a failure midway (a full disk, a kill) never leaves a half-written
    dataset that looks complete; the next run replaces the leftover partial folder.
    """
    final = Path(destination).expanduser()
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise FileExistsError(f"{final} already exists and is not empty; pick a new folder.")
    root = final.with_name(f".{final.name}.partial")
    shutil.rmtree(root, ignore_errors=True)  # ours: a run that failed midway
    _write_splits(data, root)
    if final.exists():
        final.rmdir()  # empty, checked above
    root.rename(final)
    return final


def _write_splits(data: DetectionDataset, root: Path) -> None:
    categories = [
        {"id": source_id, "name": name, "supercategory": "none"}
        for source_id, name in zip(data.label_map.source_ids, data.label_map.names)
    ]
    for split, dataset in data.splits.items():
        folder = root / ROBOFLOW_FOLDERS[split]
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations, used = [], [], set()
        rows = dataset.cast_column("image", ImageFeature(decode=False))
        for row in rows:
            file_name = _write_image(row["image"], row["image_id"], folder, used)
            images.append(
                {
                    "id": row["image_id"],
                    "file_name": file_name,
                    "width": row["width"],
                    "height": row["height"],
                }
            )
            objects = row["objects"]
            for bbox, category, area, crowd in zip(
                objects["bbox"], objects["category"], objects["area"], objects["iscrowd"]
            ):
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": row["image_id"],
                        "category_id": data.label_map.source_ids[category],
                        "bbox": bbox,
                        "area": area,
                        "iscrowd": int(crowd),
                    }
                )
        content = {"images": images, "annotations": annotations, "categories": categories}
        (folder / ROBOFLOW_ANNOTATION_FILE).write_text(json.dumps(content) + "\n")


def _write_image(image: dict[str, Any], image_id: int, folder: Path, used: set[str]) -> str:
    """Copy (or encode) one image into ``folder`` as displayed; returns its unique file name."""
    source: str | bytes = image["bytes"] or image["path"]
    name = Path(image["path"] or f"{image_id}.png").name
    if image["bytes"]:
        with Image.open(io.BytesIO(image["bytes"])) as opened:
            name = f"{Path(name).stem}.{(opened.format or 'png').lower()}"
    if name in used:
        name = f"{image_id}_{name}"
    used.add(name)
    if inspect_image(source).orientation != 1:
        with Image.open(io.BytesIO(source) if image["bytes"] else source) as opened:
            ImageOps.exif_transpose(opened).save(folder / name, quality=95)
    elif image["bytes"]:
        (folder / name).write_bytes(image["bytes"])
    else:
        shutil.copy2(image["path"], folder / name)
    return name
