"""Run a fine-tuned detector on a video: an annotated copy and one JSON of detections a frame.

:func:`predict <hf_detr_ft.inference.predict.predict>` hands every input whose extension is in
:data:`VIDEO_EXTENSIONS` to :func:`predict_video`. Frames are decoded by OpenCV (a dependency
already, through albumentations), converted to RGB and run through the same detection path as
images (:func:`~hf_detr_ft.inference.tiling.detect_images`: ``batch_size`` frames a forward
pass, tiles too with ``--tile``), with a progress bar. Written next to the pictures:

* ``<stem>_detections.mp4``: the frames with the boxes drawn as on pictures (``mp4v``, the
  codec every OpenCV build writes), at the input's frame rate and size;
* ``<stem>_detections.json``::

    {"video": "/abs/clip.mp4", "width": 640, "height": 360, "fps": 25.0, "frame_count": 250,
     "annotated_video": "clip_detections.mp4",
     "categories": [{"id": 0, "name": "car"}, ...],
     "frames": [{"frame": 0, "time": 0.0,
                 "detections": [{"category_id": 0, "bbox": [x, y, w, h], "score": 0.97}]},
                ...]}                                         # every frame, boxes or not

Boxes are in the frame's pixels (COCO ``[x, y, w, h]``); ``time`` is in seconds from the
start (frame index / frame rate).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from torchvision.ops import box_convert
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.image_processing_utils import BaseImageProcessor

from ..artifacts.output_files import write_text_atomic
from ..artifacts.pictures import Boxes, draw_boxes
from ..errors import InputError
from ..pipeline.transforms import channels_last_view
from .detect import prepare_batch
from .tiling import Tiling, detect_images

#: Files handled as videos (decided by extension): what OpenCV's FFmpeg backend reads.
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
#: Frame rate written when a file does not state one.
DEFAULT_FPS = 30.0


@dataclass
class FramePrediction:
    """The detections of one frame, in its pixels; ``time`` in seconds from the start."""

    index: int
    time: float
    boxes: Boxes


@dataclass
class VideoPrediction:
    """A video's detections frame by frame, and the files written for it (if any)."""

    path: Path
    width: int
    height: int
    fps: float
    frames: list[FramePrediction] = field(default_factory=list)
    annotated_video: Path | None = None
    detections_file: Path | None = None


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def check_video(path: Path) -> None:
    """Raise :class:`InputError` unless OpenCV decodes a first frame of ``path`` (checked
    before the model is loaded, so that a run does not end on a broken file)."""
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened() or not capture.read()[0]:
            raise InputError(
                f"{path} is not a video OpenCV can read (no frame decoded; "
                f"videos are {', '.join(VIDEO_EXTENSIONS)})."
            )
    finally:
        capture.release()


def predict_video(
    model: PreTrainedModel,
    image_processor: BaseImageProcessor,
    path: Path,
    class_names: Sequence[str],
    *,
    threshold: float,
    batch_size: int,
    tiling: Tiling | None = None,
    outputs: tuple[Path, Path] | None = None,
) -> VideoPrediction:
    """Detect objects in every frame of ``path``; with ``outputs`` (the annotated video's and
    the JSON's paths, claimed by the caller) write both files."""
    capture = cv2.VideoCapture(str(path))
    width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = capture.get(cv2.CAP_PROP_FPS) or DEFAULT_FPS
    result = VideoPrediction(path, width, height, fps)
    writer = _writer(outputs[0], fps, (width, height)) if outputs else None
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None  # an estimate in some formats
    try:
        with tqdm(total=total, unit="frame", desc=path.name) as progress:
            for frames in _frame_batches(capture, batch_size):
                pixels = [channels_last_view(frame) for frame in frames]
                batch = prepare_batch(image_processor, pixels)
                detected = detect_images(
                    model,
                    image_processor,
                    batch,
                    pixels,
                    tiling,
                    threshold=threshold,
                    batch_size=batch_size,
                )
                for frame, found in zip(pixels, detected):
                    boxes = Boxes(
                        found["boxes"].cpu(), found["labels"].tolist(), found["scores"].tolist()
                    )
                    index = len(result.frames)
                    result.frames.append(FramePrediction(index, index / fps, boxes))
                    if writer is not None:
                        writer.write(_bgr(draw_boxes(frame, boxes, class_names)))
                progress.update(len(frames))
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if outputs:
        result.annotated_video, result.detections_file = outputs
        write_text_atomic(outputs[1], json.dumps(_as_json(result, class_names), indent=1) + "\n")
    return result


def _frame_batches(capture: cv2.VideoCapture, size: int) -> Iterator[list[np.ndarray]]:
    """The video's frames as RGB arrays (H, W, 3), ``size`` at a time, until one is missing."""
    while True:
        frames = []
        while len(frames) < size:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        if frames:
            yield frames
        if len(frames) < size:
            return


def _writer(path: Path, fps: float, size: tuple[int, int]) -> cv2.VideoWriter:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        raise OSError(f"OpenCV cannot write {path} (mp4v codec)")
    return writer


def _bgr(rgb: np.ndarray) -> np.ndarray:
    """A drawn RGB frame in the channel order and contiguous memory VideoWriter takes."""
    return np.ascontiguousarray(rgb[..., ::-1])


def _as_json(result: VideoPrediction, class_names: Sequence[str]) -> dict[str, Any]:
    frames = []
    for frame in result.frames:
        xywh = box_convert(frame.boxes.xyxy.reshape(-1, 4), "xyxy", "xywh").tolist()
        detections = [
            {"category_id": int(label), "bbox": box, "score": float(score)}
            for box, label, score in zip(xywh, frame.boxes.labels, frame.boxes.scores)
        ]
        frames.append({"frame": frame.index, "time": frame.time, "detections": detections})
    return {
        "video": str(result.path),
        "width": result.width,
        "height": result.height,
        "fps": result.fps,
        "frame_count": len(result.frames),
        "annotated_video": result.annotated_video.name if result.annotated_video else None,
        "categories": [{"id": i, "name": name} for i, name in enumerate(class_names)],
        "frames": frames,
    }
