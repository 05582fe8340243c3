"""Read a Pascal VOC folder (LabelImg, CVAT, Roboflow "VOC" exports) as COCO content.

Layout: ``Annotations/*.xml`` (one file per image), images in ``JPEGImages/`` and, when
present, the split lists ``ImageSets/Main/{train,val,trainval,test}.txt`` (one image id, the
XML file's stem, per line). With ``train.txt`` the splits are train/val/test; with only
``trainval.txt`` it is the training split; without split lists every XML file is training.

Classes are the ``<name>`` values, in the order of ``labelmap.txt`` (CVAT's export) when there
is one, else sorted by name.

Coordinates: VOC corners are 1-based pixel indices. A corner ``(xmin, ymin, xmax, ymax)`` is
read as the COCO box ``[xmin - 1, ymin - 1, xmax - xmin, ymax - ymin]`` (both corners shifted
to 0-based), so ``xmin == xmax`` is a zero-width box, which is dropped and counted.
``<difficult>1</difficult>`` objects become ``iscrowd`` regions: ignored in training and in
evaluation, as in the VOC benchmark.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from ...errors import DatasetError
from ..layouts import SplitFiles
from ..records import CocoFile
from ..splits import canonical_split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def is_voc(root: Path) -> bool:
    return (root / "Annotations").is_dir() and any((root / "Annotations").glob("*.xml"))


def read_voc(root: Path) -> list[CocoFile]:
    """One :class:`CocoFile` per split of the VOC folder ``root``."""
    annotation_dir = root / "Annotations"
    if not is_voc(root):
        raise DatasetError(f"{root} is not a Pascal VOC folder: no Annotations/*.xml found.")
    image_dir = root / "JPEGImages" if (root / "JPEGImages").is_dir() else annotation_dir
    parsed = {path.stem: _parse(path) for path in sorted(annotation_dir.glob("*.xml"))}
    names = _class_names(root, parsed)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(names)]
    category_ids = {name: i + 1 for i, name in enumerate(names)}

    coco_files, next_image_id, next_annotation_id = [], 1, 1
    for split, list_file, stems in _split_lists(root, parsed):
        coco = CocoFile(SplitFiles(split, list_file, image_dir), categories, [], [])
        for line, stem in stems:
            xml = annotation_dir / f"{stem}.xml"
            if stem not in parsed:
                raise DatasetError(
                    f"{list_file}, line {line}: image {stem!r} has no annotation file {xml}. "
                    "Remove the line or add the XML file."
                )
            image_id, content = next_image_id, parsed[stem]
            next_image_id += 1
            file_name = _image_name(image_dir, stem, content)
            coco.images.append({"id": image_id, "file_name": file_name, **content["size"]})
            coco.image_sources[image_id] = (str(xml), f"image {content['filename'] or stem}")
            for index, obj in enumerate(content["objects"], start=1):
                name = obj["name"]
                if name not in category_ids:
                    raise DatasetError(
                        f"{xml}: object {index} has class {name!r}, which is not in "
                        f"{root / 'labelmap.txt'} ({names}). Add it there or fix the name."
                    )
                coco.annotations.append(
                    {
                        "id": next_annotation_id,
                        "image_id": image_id,
                        "category_id": category_ids[name],
                        "bbox": obj["bbox"],
                        "iscrowd": obj["difficult"],
                    }
                )
                coco.annotation_sources[next_annotation_id] = (str(xml), f"object {index}")
                next_annotation_id += 1
        coco_files.append(coco)
    return coco_files


def _parse(path: Path) -> dict[str, Any]:
    """The image name, size and objects of one VOC XML file."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise DatasetError(f"Cannot read the VOC annotation file {path}: {err}") from err
    size = {}
    for key in ("width", "height"):
        text = root.findtext(f"size/{key}")
        try:
            size[key] = int(float(text)) if text else 0
        except ValueError as err:
            raise DatasetError(f"{path}: <size><{key}> is {text!r}, not a number.") from err
    objects = []
    for index, obj in enumerate(root.iter("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DatasetError(f"{path}: object {index} has no <name>. Give it a class name.")
        objects.append(
            {"name": name, "bbox": _bbox(obj), "difficult": obj.findtext("difficult") == "1"}
        )
    return {"filename": (root.findtext("filename") or "").strip(), "size": size, "objects": objects}


def _bbox(obj: ET.Element) -> list[float] | None:
    """The 1-based VOC corners as a 0-based COCO box; ``None`` when a corner is missing."""
    try:
        corners = ("xmin", "ymin", "xmax", "ymax")
        x0, y0, x1, y1 = (float(obj.findtext(f"bndbox/{k}")) for k in corners)
    except (TypeError, ValueError):
        return None
    return [x0 - 1, y0 - 1, x1 - x0, y1 - y0]


def _class_names(root: Path, parsed: dict[str, dict[str, Any]]) -> list[str]:
    labelmap = root / "labelmap.txt"
    if labelmap.is_file():
        lines = labelmap.read_text(encoding="utf-8").splitlines()
        names = [line.split(":")[0].strip() for line in lines if line.strip()]
        names = [n for n in names if n and not n.startswith("#") and n != "background"]
        if names:
            return names
    names = sorted({obj["name"] for content in parsed.values() for obj in content["objects"]})
    if not names:
        raise DatasetError(f"No objects in any of {root / 'Annotations'}/*.xml; nothing to learn.")
    return names


def _split_lists(
    root: Path, parsed: dict[str, dict[str, Any]]
) -> list[tuple[str, Path, list[tuple[int, str]]]]:
    """``(split, list file, [(line number, image id)])`` for every split."""
    main = root / "ImageSets" / "Main"
    found = {name: main / f"{name}.txt" for name in ("train", "val", "trainval", "test")}
    found = {name: path for name, path in found.items() if path.is_file()}
    if "train" not in found and "trainval" in found:
        found["train"] = found.pop("trainval")
        found.pop("val", None)  # already inside trainval
    if "train" not in found:
        return [("train", root / "Annotations", [(0, stem) for stem in parsed])]
    splits = []
    for name in ("train", "val", "test"):
        if name in found:
            lines = found[name].read_text(encoding="utf-8").splitlines()
            stems = [(n, line.split()[0]) for n, line in enumerate(lines, 1) if line.strip()]
            splits.append((canonical_split(name), found[name], stems))
    return splits


def _image_name(image_dir: Path, stem: str, content: dict[str, Any]) -> str:
    """The image file of an XML file: its ``<filename>``, else the stem with an image suffix."""
    filename = content["filename"]
    if filename and (image_dir / filename).is_file():
        return filename
    for suffix in IMAGE_EXTENSIONS:
        for candidate in (f"{stem}{suffix}", f"{stem}{suffix.upper()}"):
            if (image_dir / candidate).is_file():
                return candidate
    return filename or f"{stem}.jpg"  # missing: reported as such
