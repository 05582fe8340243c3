"""`predict` on a video: an annotated video and one JSON entry per frame, written by OpenCV."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from hf_detr_ft.cli import main
from hf_detr_ft.demo import DEMO_CHECKPOINT
from hf_detr_ft.errors import InputError, OutputDirError
from hf_detr_ft.inference.predict import ImagePrediction, predict
from hf_detr_ft.inference.video import VideoPrediction

FRAMES, FPS, SIZE, SIDE = 12, 10.0, 128, 30
DIAMOND = 0  # the demo checkpoint's first class


def _diamond_box(index: int) -> list[int]:
    """Where the diamond is in frame ``index``: moving right 6 px a frame (xyxy)."""
    x0, y0 = 10 + 6 * index, 40
    return [x0, y0, x0 + SIDE, y0 + SIDE]


def _write_clip(path: Path) -> Path:
    """A dark clip with an orange-yellow diamond (the demo checkpoint's diamond colour)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (SIZE, SIZE))
    for index in range(FRAMES):
        frame = np.full((SIZE, SIZE, 3), 30, dtype=np.uint8)
        x0, y0, x1, y1 = _diamond_box(index)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        corners = np.array([[cx, y0], [x1, cy], [cx, y1], [x0, cy]], dtype=np.int32)
        cv2.fillPoly(frame, [corners], color=(0, 200, 255))  # BGR
        writer.write(frame)
    writer.release()
    return path


def _frame_count(path: Path) -> int:
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


def test_a_video_round_trips_frame_by_frame(tmp_path, shapes_dir) -> None:
    clip = _write_clip(tmp_path / "clip.mp4")
    image = next((shapes_dir / "test").glob("*.png"))
    out = tmp_path / "out"
    found = predict(DEMO_CHECKPOINT, [clip, image], output_dir=out, batch_size=5, device="cpu")

    video, picture = found  # in the order given
    assert isinstance(video, VideoPrediction) and isinstance(picture, ImagePrediction)
    assert (video.width, video.height, video.fps) == (SIZE, SIZE, FPS)
    assert [f.index for f in video.frames] == list(range(FRAMES))  # 5 + 5 + 2 frames
    assert [f.time for f in video.frames] == pytest.approx([i / FPS for i in range(FRAMES)])
    followed = 0  # frames where the diamond is found where it is
    for frame in video.frames:
        truth = torch.tensor([_diamond_box(frame.index)], dtype=torch.float32)
        hits = box_iou(truth, frame.boxes.xyxy)[0] >= 0.5
        followed += any(h and label == DIAMOND for h, label in zip(hits, frame.boxes.labels))
    assert followed >= FRAMES - 2

    assert video.annotated_video == out / "clip_detections.mp4"
    assert _frame_count(video.annotated_video) == FRAMES
    capture = cv2.VideoCapture(str(video.annotated_video))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(FPS)
    assert (capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (
        SIZE,
        SIZE,
    )
    capture.release()

    written = json.loads(video.detections_file.read_text())
    assert video.detections_file == out / "clip_detections.json"
    assert written["video"] == str(clip.resolve()) and written["frame_count"] == FRAMES
    assert written["annotated_video"] == "clip_detections.mp4"
    assert [f["frame"] for f in written["frames"]] == list(range(FRAMES))
    first = written["frames"][0]["detections"]
    assert len(first) == len(video.frames[0].boxes.labels)
    x0, y0, x1, y1 = video.frames[0].boxes.xyxy[0].tolist()
    assert first[0]["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0])
    assert written["categories"][DIAMOND] == {"id": 0, "name": "diamond"}

    coco = json.loads((out / "predictions.json").read_text())  # the images only
    assert [i["file_name"] for i in coco["images"]] == [str(image.resolve())]

    # a file of the user's is never overwritten (checked before anything is written)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "clip_detections.json").write_text("the user's")
    with pytest.raises(OutputDirError, match="clip_detections.json"):
        predict(DEMO_CHECKPOINT, clip, output_dir=tmp_path / "mine", device="cpu")
    assert not (tmp_path / "mine" / "clip_detections.mp4").exists()


def test_an_unreadable_video_is_one_line_before_the_model_loads(tmp_path, capsys) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(InputError, match="broken.mp4 is not a video OpenCV can read"):
        predict(tmp_path / "no-such-model", broken)
    assert main(["predict", "--model", "no-such-model", str(broken), "--cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "broken.mp4 is not a video" in err


def test_cli_predict_on_a_video_with_tiles(tmp_path, capsys) -> None:
    clip = _write_clip(tmp_path / "clip.mov")
    out = tmp_path / "out"
    args = ["predict", "--model", str(DEMO_CHECKPOINT), str(clip), "--output_dir", str(out)]
    assert main([*args, "--tile", "96", "--overlap", "0.3", "--cpu"]) == 0
    assert f"in 0 images and {FRAMES} frames of 1 video;" in capsys.readouterr().out
    assert _frame_count(out / "clip_detections.mp4") == FRAMES
    assert not (out / "predictions.json").exists()  # no images given
