"""Seeded synthetic shape images, written as a COCO folder in Roboflow-export layout.

Why this exists: the offline demo (and the tests) need a detection data set that can be
made on the spot, without network access, small enough to train on in minutes on a CPU, and
laid out exactly like the Roboflow COCO exports the library reads
(``<root>/<split>/_annotations.coco.json`` next to the images).

Design choices:

* Each shape kind has its own hue (see :data:`SHAPE_HUES`), jittered a little per object in
  hue, saturation and brightness. Colour is therefore a strong but not perfect cue, which lets
  a tiny DETR learn within minutes while it still has to localize every object precisely and
  tell shapes apart by outline.
* Backgrounds are a random dark colour with a faint gradient and pixel noise, so that "bright
  blob on flat black" is not the whole story and images differ from each other.
* Boxes are computed from the rasterized mask of each shape, so they are tight to the pixel
  and always fully inside the image.
* Objects may overlap a little (each existing box may be covered by at most
  :data:`MAX_OVERLAP` of its area by a new one), so they stay mostly visible.
* Everything is driven by :class:`numpy.random.Generator` objects derived from ``seed`` and
  the split name, and the JSON and PNG writers contain nothing time-dependent, so the same
  arguments produce byte-identical output.
"""

from __future__ import annotations

import colorsys
import json
import math
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "DEMO_CLASSES",
    "SHAPES",
    "SHAPE_HUES",
    "make_shapes_dataset",
    "render_shapes_image",
]

#: Every shape kind :func:`render_shapes_image` can draw.
SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "cross",
    "ring",
    "star",
    "hexagon",
)

#: Classes used by the offline demo. The shipped starting checkpoint was pretrained on the
#: other kinds in :data:`SHAPES`, so the demo fine-tunes onto classes it has never seen.
DEMO_CLASSES: tuple[str, ...] = ("circle", "square", "triangle")

#: Base hue (0..1) of each shape kind: eight slots 45 degrees apart, arranged so that the three
#: demo classes are far apart (red, green, azure) and the other kinds fill the gaps.
SHAPE_HUES: dict[str, float] = {
    "circle": 0 / 8,  # red
    "diamond": 1 / 8,  # orange-yellow
    "cross": 2 / 8,  # yellow-green
    "square": 3 / 8,  # green
    "ring": 4 / 8,  # cyan
    "triangle": 5 / 8,  # azure
    "star": 6 / 8,  # violet
    "hexagon": 7 / 8,  # magenta
}

#: Largest share of an already placed object's box that a new object's box may cover.
MAX_OVERLAP = 0.2

_HUE_JITTER = 0.025  # +-9 degrees: neighbouring kinds are 45 degrees apart
_PLACEMENT_TRIES = 50


def _polygon(
    cx: float, cy: float, radius: float, n: int, angle: float
) -> list[tuple[float, float]]:
    """Vertices of a regular ``n``-gon centred on (cx, cy), first vertex at ``angle``."""
    return [
        (
            cx + radius * math.cos(angle + 2 * math.pi * k / n),
            cy + radius * math.sin(angle + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def _draw_shape_mask(
    kind: str, size: int, x0: int, y0: int, canvas: tuple[int, int], rng: np.random.Generator
) -> Image.Image:
    """Rasterize one shape of ``kind`` into an ``L`` mask of ``canvas`` (width, height) pixels,
    inside the square (x0, y0, size)."""
    mask = Image.new("L", canvas, 0)
    draw = ImageDraw.Draw(mask)
    x1, y1 = x0 + size - 1, y0 + size - 1
    cx, cy = x0 + (size - 1) / 2, y0 + (size - 1) / 2
    r = (size - 1) / 2
    if kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif kind == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, rng.uniform(0, 2 * math.pi)), fill=255)
    elif kind == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    elif kind == "cross":
        t = max(2.0, size / 3)
        draw.rectangle((x0, cy - t / 2, x1, cy + t / 2), fill=255)
        draw.rectangle((cx - t / 2, y0, cx + t / 2, y1), fill=255)
    elif kind == "ring":
        width = max(2, round(size / 5))
        draw.ellipse((x0, y0, x1, y1), outline=255, width=width)
    elif kind == "star":
        angle = rng.uniform(0, 2 * math.pi)
        points = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = angle + math.pi * k / 5
            points.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        draw.polygon(points, fill=255)
    elif kind == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, rng.uniform(0, math.pi / 3)), fill=255)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; expected one of {SHAPES}")
    return mask


def _shape_colour(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A bright RGB colour near the kind's hue (float array in 0..255)."""
    hue = (SHAPE_HUES[kind] + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) % 1.0
    sat = rng.uniform(0.55, 1.0)
    val = rng.uniform(0.75, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255.0


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A dark background: random base colour, a faint linear gradient and pixel noise."""
    base = rng.uniform(0, 70, size=3)
    direction = rng.uniform(0, 2 * math.pi)
    x_ramp, y_ramp = np.linspace(-1.0, 1.0, width), np.linspace(-1.0, 1.0, height)
    grad = math.cos(direction) * x_ramp[None, :] + math.sin(direction) * y_ramp[:, None]
    strength = rng.uniform(0, 20, size=3)
    img = base[None, None, :] + grad[:, :, None] * strength[None, None, :]
    img = img + rng.normal(0.0, 6.0, size=(height, width, 3))
    return img


def _overlap_ok(box: list[float], placed: list[list[float]]) -> bool:
    """True if ``box`` covers at most MAX_OVERLAP of every box in ``placed`` (and vice versa)."""
    x, y, w, h = box
    for px, py, pw, ph in placed:
        iw = min(x + w, px + pw) - max(x, px)
        ih = min(y + h, py + ph) - max(y, py)
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        if inter > MAX_OVERLAP * min(w * h, pw * ph):
            return False
    return True


def render_shapes_image(
    rng: np.random.Generator,
    classes: Sequence[str],
    *,
    image_size: int = 128,
    min_objects: int = 1,
    max_objects: int = 3,
    min_size: int = 16,
    max_size: int = 40,
    shape: tuple[int, int] | None = None,
) -> tuple[Image.Image, list[tuple[int, list[float]]]]:
    """Draw one image of 1..N shapes picked from ``classes``.

    Args:
        rng: source of all randomness (pass a seeded generator for reproducible output).
        classes: shape kinds to draw from (each must be in :data:`SHAPES`); the returned class
            index refers to a position in this sequence.
        image_size: width and height of the square image in pixels.
        min_objects: fewest objects to try to place.
        max_objects: most objects to place.
        min_size: smallest side of a shape's bounding square in pixels.
        max_size: largest side of a shape's bounding square in pixels.
        shape: ``(width, height)`` of a non-square image (then ``image_size`` is ignored).

    Returns:
        The RGB image and a list of ``(class_index, [x, y, w, h])``: tight pixel boxes (COCO
        convention: top-left corner, width, height), fully inside the image. If the overlap
        limit makes placement impossible after many tries fewer objects are returned, but
        never zero.
    """
    if not classes:
        raise ValueError("classes must not be empty")
    unknown = [c for c in classes if c not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shape kinds {unknown}; expected a subset of {SHAPES}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError("need 1 <= min_objects <= max_objects")
    width, height = shape or (image_size, image_size)
    if not 3 <= min_size <= max_size <= min(width, height):
        raise ValueError("need 3 <= min_size <= max_size <= the image's shorter side")

    pixels = _background(rng, width, height)
    n_objects = int(rng.integers(min_objects, max_objects + 1))
    objects: list[tuple[int, list[float]]] = []
    placed: list[list[float]] = []
    for _ in range(n_objects):
        cls = int(rng.integers(len(classes)))
        kind = classes[cls]
        for _try in range(_PLACEMENT_TRIES):
            size = int(rng.integers(min_size, max_size + 1))
            x0 = int(rng.integers(0, width - size + 1))
            y0 = int(rng.integers(0, height - size + 1))
            if _overlap_ok([x0, y0, size, size], placed):
                break
        else:
            continue  # no room left for another object
        mask = np.asarray(_draw_shape_mask(kind, size, x0, y0, (width, height), rng)) > 0
        ys, xs = np.nonzero(mask)
        box = [
            float(xs.min()),
            float(ys.min()),
            float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1),
        ]
        pixels[mask] = _shape_colour(kind, rng)
        placed.append([float(x0), float(y0), float(size), float(size)])
        objects.append((cls, box))
    if not objects:  # unreachable with sane sizes: the first object always fits
        raise RuntimeError("could not place any object")
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")
    return image, objects


def _split_rng(seed: int, split: str) -> np.random.Generator:
    """Generator for one split, independent of which other splits are requested."""
    return np.random.default_rng([seed, zlib.crc32(split.encode("utf-8"))])


def make_shapes_dataset(
    output_dir: str | Path,
    *,
    classes: Sequence[str] = DEMO_CLASSES,
    splits: Mapping[str, int] = {"train": 96, "valid": 32, "test": 32},  # never mutated
    image_size: int = 128,
    min_objects: int = 1,
    max_objects: int = 3,
    min_size: int = 16,
    max_size: int = 40,
    seed: int = 0,
    super_category: str = "shapes",
    image_shapes: Sequence[tuple[int, int]] | None = None,
) -> Path:
    """Write a synthetic shapes data set as a Roboflow-style COCO export.

    Layout: ``output_dir/<split>/_annotations.coco.json`` plus ``output_dir/<split>/*.png``.
    The JSON mirrors a Roboflow export: category 0 is the super-category placeholder
    (``{"id": 0, "name": super_category, "supercategory": "none"}``) and the real classes are
    ids ``1..N`` in the order of ``classes``; image and annotation ids start at 0; boxes are
    ``[x, y, w, h]`` floats in pixels with ``area = w * h``, ``iscrowd = 0`` and empty
    ``segmentation``. The same arguments always give byte-identical files.

    Args:
        output_dir: root folder to write (created if needed; existing files are overwritten).
        classes: shape kinds (from :data:`SHAPES`) in category-id order.
        splits: number of images per split name.
        image_size, min_objects, max_objects, min_size, max_size: see
            :func:`render_shapes_image`.
        seed: base seed; each split uses its own stream derived from the seed and its name.
        super_category: name of the Roboflow placeholder category and the supercategory of
            every class.
        image_shapes: ``(width, height)`` sizes used in turn, for images of mixed aspect
            ratios (default: all ``image_size`` squares).

    Returns:
        ``Path(output_dir)``.
    """
    root = Path(output_dir)
    categories: list[dict[str, object]] = [
        {"id": 0, "name": super_category, "supercategory": "none"}
    ]
    categories += [
        {"id": i + 1, "name": cls, "supercategory": super_category} for i, cls in enumerate(classes)
    ]
    for split, count in splits.items():
        split_dir = root / split
        split_dir.mkdir(parents=True, exist_ok=True)
        rng = _split_rng(seed, split)
        images: list[dict[str, object]] = []
        annotations: list[dict[str, object]] = []
        for image_id in range(count):
            shape = image_shapes[image_id % len(image_shapes)] if image_shapes else None
            image, objects = render_shapes_image(
                rng,
                classes,
                image_size=image_size,
                min_objects=min_objects,
                max_objects=max_objects,
                min_size=min_size,
                max_size=max_size,
                shape=shape,
            )
            file_name = f"{split}_{image_id:05d}.png"
            image.save(split_dir / file_name, format="PNG")
            images.append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "width": image.width,
                    "height": image.height,
                }
            )
            for cls, box in objects:
                annotations.append(
                    {
                        "id": len(annotations),
                        "image_id": image_id,
                        "category_id": cls + 1,
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": 0,
                        "segmentation": [],
                    }
                )
        coco = {
            "info": {
                "year": "2024",
                "version": "1",
                "description": f"Synthetic shapes ({split}) made by hf_detr_ft.data.synthetic",
                "contributor": "hf_detr_ft",
                "url": "",
                "date_created": "1970-01-01T00:00:00+00:00",
            },
            "licenses": [{"id": 1, "url": "", "name": "Public Domain"}],
            "categories": categories,
            "images": images,
            "annotations": annotations,
        }
        (split_dir / "_annotations.coco.json").write_text(
            json.dumps(coco, indent=2) + "\n", encoding="utf-8"
        )
    return root
