"""Check image files the way training will decode them, and orient boxes with EXIF.

Training decodes every image as ``datasets.Image(mode="RGB")`` does: EXIF orientation applied,
then ``convert("RGB")`` (:func:`decode_for_resize`, large JPEGs at a reduced scale).
:func:`inspect_image` decodes each file once up front (at reduced JPEG resolution, so it is
quick; :func:`inspect_all` on every core) so that truncated or unreadable files are found
before any model is loaded, and reports the size as displayed, the stored size, the EXIF
orientation and the kind of colour mode that will be converted.

16-bit grayscale is the one mode ``convert("RGB")`` gets wrong (every value above 255 turns
white), so :func:`eight_bit_png` re-encodes such an image, scaled from the 16-bit range to 8
bits, for the dataset to hold instead of the file.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Image as ImageFeature
from PIL import Image, ImageOps
from tqdm.auto import tqdm

EXIF_ORIENTATION = 0x0112
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_MODE_KINDS = {
    "1": "grayscale",
    "L": "grayscale",
    "LA": "grayscale",
    "P": "palette",
    "PA": "palette",
    "RGBA": "RGBA",
    "RGBa": "RGBA",
    "CMYK": "CMYK",
    **{mode: "16-bit" for mode in SIXTEEN_BIT_MODES},
}
# Exceptions Pillow raises for files it cannot decode (UnidentifiedImageError is an OSError).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_CHUNK = 256  # images a thread checks per task


@dataclass(frozen=True)
class ImageInfo:
    """What training will see of one image file."""

    stored_size: tuple[int, int]  # (width, height) of the pixels in the file
    size: tuple[int, int]  # (width, height) as displayed, after EXIF orientation
    orientation: int  # EXIF orientation 1..8 (1: none)
    mode: str
    mode_kind: str | None  # "grayscale", "RGBA", "palette", "CMYK", "16-bit", "other"; None: RGB

    @property
    def swaps_axes(self) -> bool:
        return self.orientation in (5, 6, 7, 8)


def inspect_image(source: str | Path | bytes) -> ImageInfo:
    """Open and fully decode an image (a path or encoded bytes); raises one of IMAGE_ERRORS."""
    if isinstance(source, bytes):
        return _inspect(io.BytesIO(source))
    return _inspect_path(str(source))


def inspect_all(
    paths: Iterable[str | Path], desc: str = "Checking images"
) -> list[ImageInfo | Exception]:
    """Inspect many image files, one thread per core (Pillow decodes without holding the GIL):
    per path its :class:`ImageInfo`, or the exception (one of IMAGE_ERRORS) that makes it
    unusable. :func:`inspect_image` then answers each file from its cache."""
    return on_every_core(inspect_or_error, list(map(str, paths)), desc)


def inspect_or_error(source: str | bytes) -> ImageInfo | Exception:
    """:func:`inspect_image`, with the error returned rather than raised."""
    try:
        return inspect_image(source)
    except IMAGE_ERRORS as err:
        return err


def on_every_core(function: Callable[[Any], Any], items: list[Any], desc: str) -> list[Any]:
    """``[function(item) for item in items]`` on one thread per core, in order, with a
    progress bar (shown on a terminal once it has run for two seconds).

    The items go to the threads in chunks: one future per item would cost more memory than
    the results at 100k+ images.
    """
    chunks = [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]
    results: list[Any] = []
    workers = max(1, min(len(chunks), os.cpu_count() or 1))
    progress = tqdm(total=len(items), desc=desc, unit="image", delay=2, disable=None)
    with progress, ThreadPoolExecutor(max_workers=workers) as pool:
        for done in pool.map(lambda chunk: [function(item) for item in chunk], chunks):
            results.extend(done)
            progress.update(len(done))
    return results


@lru_cache(maxsize=65536)
def _inspect_path(path: str) -> ImageInfo:
    return _inspect(path)


def _inspect(source: str | io.BytesIO) -> ImageInfo:
    with Image.open(source) as image:
        stored = image.size
        mode = image.mode
        orientation = _orientation(image)
        image.draft(mode, (1, 1))  # JPEG: decode at 1/8 scale; still reads the whole file
        image.load()
    kind = None if mode == "RGB" else _MODE_KINDS.get(mode, "other")
    return ImageInfo(stored, _displayed_size(stored, orientation), orientation, mode, kind)


def displayed_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` as displayed (EXIF orientation applied), from the header only.

    Cheap (nothing is decoded) and unchecked: raises one of IMAGE_ERRORS for unreadable files.
    """
    with Image.open(path) as image:
        return _displayed_size(image.size, _orientation(image))


def decode_for_resize(
    value: Mapping[str, Any],
    resized_size: Callable[[tuple[int, int]], tuple[int, int] | None],
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image of a dataset (``{"path", "bytes"}`` as ``datasets.Image(decode=False)``
    holds it) as ``datasets.Image(mode="RGB")`` does, but no larger than the model will see it.

    ``resized_size`` maps the displayed ``(width, height)`` to the size the image will be
    resized to (``None``: unknown). A JPEG at least twice as large as that is decoded at the
    smallest scale of 1/2, 1/4 or 1/8 that still covers it (Pillow's ``draft``: the scaling
    happens inside the JPEG decoder, which then never decodes the pixels that resizing would
    throw away). Other RGB and grayscale JPEGs not turned by EXIF are decoded by
    torchvision (libjpeg-turbo as in Pillow, without Pillow's per-image overhead; measured in
    benchmarks/README.md). Anything else decodes with Pillow.
    Returns the RGB pixels, ``(H, W, 3)`` uint8, and the displayed full size, which
    annotations refer to.
    """
    path, data = value.get("path"), value.get("bytes")
    if data is None and not (path and os.path.isfile(path)):
        image = ImageFeature(mode="RGB").decode_example(dict(value))  # e.g. a file on the Hub
        return np.array(image), image.size
    with Image.open(io.BytesIO(data) if data is not None else path) as image:
        orientation = _orientation(image)
        size = _displayed_size(image.size, orientation)
        target = resized_size(size)
        if target is not None and target[0] < size[0] and target[1] < size[1]:
            stored = _displayed_size(target, orientation)  # the 90-degree swap is its own inverse
            image.draft(None, (max(1, stored[0]), max(1, stored[1])))
        full_scale = _displayed_size(image.size, orientation) == size
        if full_scale and _torchvision_decodes(image, orientation):
            pixels = _decode_with_torchvision(data if data is not None else path)
            if pixels is not None:
                return pixels, size
        image.load()
        if orientation != 1:  # read above; datasets transposes any tag, a no-op for 1 or invalid
            image = ImageOps.exif_transpose(image)
        return np.array(image if image.mode == "RGB" else image.convert("RGB")), size


def _torchvision_decodes(image: Image.Image, orientation: int) -> bool:
    """Whether torchvision decodes ``image`` to the pixels Pillow gives, in one torch
    operation that starts no threads: an RGB or grayscale JPEG not turned by EXIF (the turn
    would be parallel torch operations, which give a thread its own OpenMP team; training
    decodes on threads kept alive). Not PNGs: Pillow has to decode a PNG to find an EXIF
    chunk after the pixel data."""
    return image.format == "JPEG" and image.mode in ("RGB", "L") and orientation == 1


def _decode_with_torchvision(source: str | bytes) -> np.ndarray | None:
    """``(H, W, 3)`` uint8 pixels, or ``None`` where torchvision refuses the file (truncated,
    say, or 16 bits per channel): Pillow then decodes it or says what is wrong.

    torch and torchvision are imported here, not with the module: loading and checking a
    dataset (``inspect``, ``convert``) never decodes with them, and importing them loads
    torch's large native libraries.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_image, read_file

    encoded = (
        read_file(source)
        if isinstance(source, str)
        else torch.frombuffer(bytearray(source), dtype=torch.uint8)
    )
    try:
        pixels = decode_image(encoded, mode=ImageReadMode.RGB)
    except RuntimeError:
        return None
    if pixels.dtype != torch.uint8:
        return None
    return pixels.permute(1, 2, 0).numpy()  # torchvision decodes into (H, W, 3) memory


def _orientation(image: Image.Image) -> int:
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    return orientation if orientation in range(1, 9) else 1


def _displayed_size(stored: tuple[int, int], orientation: int) -> tuple[int, int]:
    """Orientations 5-8 turn the image by 90 degrees: width and height swap."""
    return (stored[1], stored[0]) if orientation in (5, 6, 7, 8) else stored


def eight_bit_png(source: str | Path | bytes) -> bytes:
    """A 16-bit or 32-bit grayscale image as an 8-bit PNG (EXIF orientation applied).

    16-bit values are scaled by 1/256; 32-bit modes holding 8-bit values are kept; float
    images with values in 0..1 (the usual convention for float pixels) are scaled by 255,
    instead of being rounded to an all-black image.
    """
    file = io.BytesIO(source) if isinstance(source, bytes) else source
    with Image.open(file) as image:
        image = ImageOps.exif_transpose(image)
        values = np.asarray(image, dtype=np.float64)
    top = values.max() if values.size else 0.0
    if image.mode == "F" and 0 < top <= 1:
        scaled = values * 255.0
    elif image.mode in ("I", "F") and top <= 255:  # 32-bit modes holding 8-bit values
        scaled = values
    else:
        scaled = values / 256.0
    out = io.BytesIO()
    Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L").save(out, format="PNG")
    return out.getvalue()


def orient_box(box: list[float], orientation: int, stored_size: tuple[int, int]) -> list[float]:
    """Move an ``[x, y, w, h]`` box drawn on the stored pixels to the EXIF-oriented image.

    The same transposition ``PIL.ImageOps.exif_transpose`` applies to the pixels. Works on
    numpy arrays too (one per coordinate, sizes as arrays): :mod:`.box_checks` moves a whole
    split's boxes with it.
    """
    x, y, w, h = box
    width, height = stored_size
    flipped_x, flipped_y = width - x - w, height - y - h
    return {
        1: [x, y, w, h],
        2: [flipped_x, y, w, h],
        3: [flipped_x, flipped_y, w, h],
        4: [x, flipped_y, w, h],
        5: [y, x, h, w],
        6: [flipped_y, x, h, w],
        7: [flipped_y, flipped_x, h, w],
        8: [y, flipped_x, h, w],
    }[orientation]
