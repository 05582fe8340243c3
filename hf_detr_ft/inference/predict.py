"""Run a fine-tuned detector on image files, folders and globs; write pictures and one JSON.

:func:`predict` reads the images in batches with training's EXIF orientation and RGB
conversion, so boxes fit the image as it is displayed, and decodes each as evaluation does
(:func:`read_pixels`): a JPEG at least twice as large as the model's input at a reduced
scale (Pillow's ``draft``), other camera JPEGs with torchvision, anything else with Pillow.
The pictures, drawn at the input's size, decode every pixel.
Batches hold images of similar aspect ratio (sorted by their headers; the processor pads each
batch to its largest image). With the model on a GPU the next batch is decoded in a
background thread while the model runs; on the CPU batches are read in turn, as the model's
own threads use every core and a reader thread running the processor's torch operations would
compete with them (measured in benchmarks/README.md). Results come back in the order the
inputs were given.

With ``output_dir`` it writes, per image, a copy with the boxes, class names
and scores drawn (:func:`hf_detr_ft.artifacts.pictures.draw_boxes`, one colour per class), and one
``predictions.json`` in COCO format::

    {"images":      [{"id": 1, "file_name": "/abs/photo.jpg", "width": 640, "height": 480,
                      "picture": "photo.jpg"}, ...],           # every input image, boxes or not
     "annotations": [{"id": 1, "image_id": 1, "category_id": 0, "bbox": [x, y, w, h],
                      "score": 0.97, "area": 1234.5, "iscrowd": 0}, ...],
     "categories":  [{"id": 0, "name": "stop"}, ...]}          # the model's class indices

``annotations`` is a COCO results list (``COCO.loadRes`` takes it), and ``COCO(path)`` reads
the whole file.

Video files (by extension, :data:`~.video.VIDEO_EXTENSIONS`) go to
:func:`~.video.predict_video`; with ``tile`` images and frames are also run in overlapping
tiles (:mod:`.tiling`), both through the same detection path as images.
"""

from __future__ import annotations

import glob
import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from torchvision.transforms.functional import pil_to_tensor
from transformers.image_processing_utils import BaseImageProcessor

from ..artifacts.output_files import claim_files, write_text_atomic
from ..artifacts.pictures import Boxes, draw_boxes
from ..data.formats.voc import IMAGE_EXTENSIONS
from ..data.image_files import (
    IMAGE_ERRORS,
    SIXTEEN_BIT_MODES,
    decode_for_resize,
    displayed_size,
    eight_bit_png,
)
from ..errors import InputError
from ..models.input_sizes import default_batch_size
from ..models.loading import load_detector
from ..models.thresholds import saved_score_threshold
from ..pipeline.transforms import DetrTransform, channels_last_view
from ..wording import plural
from .detect import PreparedBatch, prepare_batch
from .onnx_runtime import is_onnx_model, load_onnx_detector
from .tiling import Tiling, detect_images
from .video import VideoPrediction, check_video, is_video, predict_video

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.json"
_PICTURE_SUFFIXES = {".jpg": ".jpg", ".jpeg": ".jpg", ".png": ".png"}  # anything else: PNG


@dataclass
class ImagePrediction:
    """The detections of one image, in pixels of the image as displayed (EXIF applied)."""

    path: Path
    width: int
    height: int
    boxes: Boxes  # xyxy, class indices, scores
    picture: Path | None = None


def find_images(inputs: str | Path | Iterable[str | Path]) -> list[Path]:
    """Image files named by ``inputs``: files, folders (their images, sorted) and globs.

    Raises :class:`InputError` naming the input that does not exist or matches nothing.
    """
    if isinstance(inputs, str | Path):
        inputs = [inputs]
    found: dict[Path, None] = {}  # ordered, without duplicates
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise InputError(
                    f"The folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})."
                )
        elif path.is_file():
            files = [path]
        elif glob.has_magic(str(item)):
            files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
            files = [p for p in files if p.is_file()]
            if not files:
                raise InputError(f"The pattern {item!r} matches no files.")
        else:
            raise InputError(f"{path} does not exist (expected an image, a folder or a glob).")
        found.update(dict.fromkeys(_resolved(files)))
    if not found:
        raise InputError("No images given.")
    return list(found)


def _resolved(files: Iterable[Path]) -> Iterator[Path]:
    """Absolute paths, skipping (with a warning) links that lead nowhere or in a loop."""
    for path in files:
        try:
            yield path.resolve(strict=True)
        except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop
            logger.warning("Skipped %s: %s", path, err)


def open_image(path: Path) -> Image.Image:
    """Decode all of an image, oriented and converted as in training: EXIF orientation
    applied, RGB (16-bit scaled to 8)."""
    with Image.open(path) as image:
        if image.mode in SIXTEEN_BIT_MODES:
            with Image.open(io.BytesIO(eight_bit_png(path))) as scaled:
                return scaled.convert("RGB")
        return ImageOps.exif_transpose(image).convert("RGB")


def read_pixels(
    path: Path, resized_size: Callable[[tuple[int, int]], tuple[int, int] | None] | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """An image as uint8 RGB pixels (3, H, W), oriented and converted as :func:`open_image`
    does, and its ``(width, height)`` as displayed (the size boxes refer to).

    Decoded as training and evaluation decode it
    (:func:`~hf_detr_ft.data.image_files.decode_for_resize`: camera JPEGs by torchvision,
    and with ``resized_size``, the model's input size for a displayed size as
    :meth:`~pipeline.transforms.DetrTransform.resized_size` gives it, a JPEG at least twice
    as large as that at 1/2, 1/4 or 1/8 scale, so that the JPEG decoder never decodes the
    pixels that resizing would throw away). 16-bit
    images go through :func:`open_image`. Unreadable files raise Pillow's error. The tensor
    is a channel-last view, the memory layout that resizes fastest
    (:func:`~hf_detr_ft.pipeline.transforms.resize_for_model`).
    """
    with Image.open(path) as image:
        sixteen_bit = image.mode in SIXTEEN_BIT_MODES
    if sixteen_bit:
        pixels = pil_to_tensor(open_image(path))
        return pixels, (pixels.shape[-1], pixels.shape[-2])
    value = {"path": str(path), "bytes": None}
    pixels, size = decode_for_resize(value, resized_size or (lambda size: None))
    return channels_last_view(pixels), size


def predict(
    model: str | Path,
    inputs: str | Path | Iterable[str | Path],
    threshold: float | str = 0.5,
    output_dir: str | Path | None = None,
    batch_size: int | None = None,
    *,
    device: str | torch.device | None = None,
    tile: int | None = None,
    overlap: float = 0.2,
    tile_nms_iou: float = 0.5,
) -> list[ImagePrediction | VideoPrediction]:
    """Detect objects in images, folders and globs, and in video files, with a fine-tuned
    model (folder or Hub id, or an exported ``.onnx`` file, run by ONNX Runtime on the CPU).

    Keeps detections scoring at least ``threshold`` (``"auto"``: the best-F1 threshold saved
    with the model, :mod:`~hf_detr_ft.models.thresholds`). With ``output_dir``, writes a picture per
    image and ``predictions.json`` (see the module docstring), and per video an annotated
    video and a JSON of each frame's detections (:mod:`.video`). Unreadable images are skipped
    with a warning that counts and names them; an unreadable video is an error. With ``tile``
    (pixels), images and frames are also run in tiles of that side overlapping by ``overlap``
    (a fraction), detections merged at ``tile_nms_iou`` (:mod:`.tiling`). Results come back
    in the order of the inputs: :class:`ImagePrediction` for images, :class:`VideoPrediction`
    for videos. ``batch_size``: images (frames, tiles) a forward pass; by default 8 on a GPU
    and on a CPU as many as make up a megapixel of model input
    (:func:`~hf_detr_ft.models.input_sizes.default_batch_size`: a CPU runs large batches of
    large inputs slower per image).
    """
    if threshold != "auto" and not 0.0 <= threshold <= 1.0:
        raise InputError(f"threshold must be 'auto' or between 0 and 1, got {threshold}.")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}.")
    tiling = Tiling(tile, overlap, tile_nms_iou) if tile is not None else None
    files = find_images(inputs)
    videos = [path for path in files if is_video(path)]
    for video in videos:  # before the model is loaded
        check_video(video)
    images = [path for path in files if not is_video(path)]
    detector, processor = (
        load_onnx_detector(model) if is_onnx_model(model) else load_detector(model, device=device)
    )
    batch_size = batch_size or default_batch_size(detector.device, processor.size)
    if threshold == "auto":  # the best-F1 one of the model's final evaluation
        threshold = saved_score_threshold(detector.config, model)
        logger.info("Score threshold %.3f: the best-F1 one saved with %s.", threshold, model)
    class_names = [detector.config.id2label[i] for i in range(len(detector.config.id2label))]
    out = Path(output_dir) if output_dir is not None else None
    pictures = _picture_names(files) if out is not None else {}
    if out is not None:  # never over the inputs, or any file hf-detr-ft did not write
        written = [PREDICTIONS_FILE] if images else []
        for path in files:
            written += _video_outputs(pictures[path]) if is_video(path) else [pictures[path]]
        claim_files(out, written)
    found: dict[Path, ImagePrediction | VideoPrediction] = {}
    unreadable: list[str] = []
    batches = _batches(_by_aspect_ratio(images), batch_size)
    read = _read_ahead if detector.device.type != "cpu" else _read_in_turn
    full_pixels = out is not None or tiling is not None  # tiles are cut from every pixel
    for batch in read(batches, processor, with_pictures=full_pixels):
        unreadable += batch.unreadable
        if not batch.paths:
            continue
        detections = detect_images(
            detector,
            processor,
            batch.prepared,
            batch.pictures,
            tiling,
            threshold=threshold,
            batch_size=batch_size,
        )
        for path, (width, height), pixels, detected in zip(
            batch.paths, batch.sizes, batch.pictures, detections
        ):
            boxes = Boxes(
                detected["boxes"].cpu(), detected["labels"].tolist(), detected["scores"].tolist()
            )
            prediction = found[path] = ImagePrediction(path, width, height, boxes)
            if out is not None:
                prediction.picture = out / pictures[path]
                Image.fromarray(draw_boxes(pixels, boxes, class_names)).save(prediction.picture)
    for video in videos:
        outputs = tuple(out / name for name in _video_outputs(pictures[video])) if out else None
        found[video] = predict_video(
            detector,
            processor,
            video,
            class_names,
            threshold=threshold,
            batch_size=batch_size,
            tiling=tiling,
            outputs=outputs,
        )
    predictions = [found[path] for path in files if path in found]  # in the order given
    if unreadable:
        logger.warning(
            "Skipped %s: %s", plural(len(unreadable), "unreadable image"), "; ".join(unreadable[:5])
        )
    if out is not None and images:
        pictured = [p for p in predictions if isinstance(p, ImagePrediction)]
        coco = predictions_to_coco(pictured, class_names)
        write_text_atomic(out / PREDICTIONS_FILE, json.dumps(coco, indent=1) + "\n")
        logger.info("Wrote %d pictures and %s to %s", len(pictured), PREDICTIONS_FILE, out)
    return predictions


def predictions_to_coco(
    predictions: Sequence[ImagePrediction], class_names: Sequence[str]
) -> dict[str, list[dict[str, Any]]]:
    """Predictions as a COCO file whose ``annotations`` are a COCO results list (with scores)."""
    images, annotations = [], []
    for image_id, prediction in enumerate(predictions, start=1):
        images.append(
            {
                "id": image_id,
                "file_name": str(prediction.path),
                "width": prediction.width,
                "height": prediction.height,
                "picture": prediction.picture.name if prediction.picture else None,
            }
        )
        boxes = prediction.boxes
        for (x0, y0, x1, y1), label, score in zip(boxes.xyxy.tolist(), boxes.labels, boxes.scores):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": float(score),
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i, "name": name} for i, name in enumerate(class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


@dataclass
class _ReadBatch:
    """A batch ready for the model, its images' displayed ``(width, height)``, their full
    pixels for the pictures (``None`` each without pictures) and the files not read."""

    paths: list[Path]
    sizes: list[tuple[int, int]]
    pictures: list[torch.Tensor | None]
    prepared: PreparedBatch | None
    unreadable: list[str]


def _read_batch(
    paths: Sequence[Path], processor: BaseImageProcessor, with_pictures: bool
) -> _ReadBatch:
    resized_size = DetrTransform.for_evaluation(processor).resized_size
    batch = _ReadBatch([], [], [], None, [])
    inputs = []
    for path in paths:
        try:
            pixels, size = read_pixels(path, resized_size)
            if min(resized_size(size) or size) < 1:
                raise ValueError(f"{size[0]}x{size[1]} pixels vanish when resized")
            picture = None
            if with_pictures:  # every pixel: the model's input may have been decoded reduced
                picture = pixels if pixels.shape[-1] == size[0] else read_pixels(path)[0]
        except IMAGE_ERRORS as err:
            batch.unreadable.append(f"{path} ({err})")
            continue
        inputs.append(pixels)
        batch.paths.append(path)
        batch.sizes.append(size)
        batch.pictures.append(picture)
    if inputs:
        heights_widths = [(height, width) for width, height in batch.sizes]
        batch.prepared = prepare_batch(processor, inputs, sizes=heights_widths)
    return batch


def _read_in_turn(
    batches: Iterable[Sequence[Path]], processor: BaseImageProcessor, with_pictures: bool
) -> Iterator[_ReadBatch]:
    """Read and prepare each batch when the caller asks for it (the model on the CPU)."""
    for paths in batches:
        yield _read_batch(paths, processor, with_pictures)


def _read_ahead(
    batches: Iterable[Sequence[Path]], processor: BaseImageProcessor, with_pictures: bool
) -> Iterator[_ReadBatch]:
    """Read and prepare each batch in a background thread while the caller runs the model on
    the one before (decoding and the model release the GIL); one batch ahead at most. For a
    model on a GPU, which leaves the cores free for reading."""
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = None
        for paths in batches:
            upcoming = reader.submit(_read_batch, paths, processor, with_pictures)
            if pending is not None:
                yield pending.result()
            pending = upcoming
        if pending is not None:
            yield pending.result()


def _by_aspect_ratio(files: Sequence[Path]) -> list[Path]:
    """The files sorted by displayed aspect ratio (headers only), so that a batch holds images
    of similar shape and little is padded; unreadable files go last (reported when read)."""

    def ratio(path: Path) -> float:
        try:
            width, height = displayed_size(path)
        except IMAGE_ERRORS:
            return float("inf")
        return width / max(height, 1)

    return sorted(files, key=ratio)


def _batches(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _picture_names(files: Sequence[Path]) -> dict[Path, str]:
    """Each input's picture name: its own name (JPEG and PNG kept, anything else as PNG; a
    video's stem, see :func:`_video_outputs`), made unique in the folder in the order the
    inputs were given."""
    used: set[str] = set()
    names = {}
    for path in files:
        suffix = "" if is_video(path) else _PICTURE_SUFFIXES.get(path.suffix.lower(), ".png")
        name, n = f"{path.stem}{suffix}", 1
        while name in used:
            name, n = f"{path.stem}_{n}{suffix}", n + 1
        used.add(name)
        names[path] = name
    return names


def _video_outputs(name: str) -> list[str]:
    """The annotated video's and the detections JSON's names for a video named ``name``."""
    return [f"{name}_detections.mp4", f"{name}_detections.json"]
