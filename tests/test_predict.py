"""`predict`: images, folders and globs in; one picture per image and one COCO JSON out."""

from __future__ import annotations

import contextlib
import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision.transforms.functional import pil_to_tensor
from transformers import DetrImageProcessor

from hf_detr_ft.cli import main
from hf_detr_ft.data.image_files import IMAGE_ERRORS
from hf_detr_ft.inference.predict import (
    InputError,
    _by_aspect_ratio,
    _read_ahead,
    _read_in_turn,
    find_images,
    open_image,
    predict,
    read_pixels,
)
from hf_detr_ft.pipeline.transforms import DetrTransform

NUM_QUERIES = 10  # of the tiny model


def test_a_folder_gives_one_picture_per_image_and_a_json_of_every_image(
    tiny_model_dir, shapes_dir, tmp_path
) -> None:
    inputs = sorted((shapes_dir / "test").glob("*.png"))
    out = tmp_path / "out"
    found = predict(
        tiny_model_dir,
        shapes_dir / "test",
        threshold=0.0,
        output_dir=out,
        batch_size=2,
        device="cpu",
    )

    assert [p.path for p in found] == [p.resolve() for p in inputs]
    pictures = sorted(out.glob("*.png"))
    assert [p.name for p in pictures] == [p.name for p in inputs]
    for source, picture in zip(inputs, pictures):
        with Image.open(picture) as drawn, Image.open(source) as original:
            assert drawn.format == "PNG" and drawn.size == original.size
            drawn.load()  # decodes: a complete, valid file

    coco = json.loads((out / "predictions.json").read_text())
    assert [image["file_name"] for image in coco["images"]] == [str(p.resolve()) for p in inputs]
    assert [c["name"] for c in coco["categories"]] == [f"LABEL_{i}" for i in range(5)]
    # threshold 0: every query of every image is kept (5 images, 2 + 2 + 1 per batch)
    assert len(coco["annotations"]) == len(inputs) * NUM_QUERIES
    with contextlib.redirect_stdout(io.StringIO()):
        index = COCO(str(out / "predictions.json"))
        results = index.loadRes(coco["annotations"])
    assert sorted(results.getImgIds()) == sorted(index.getImgIds())


def test_globs_files_jpeg_and_no_detections(tiny_model_dir, shapes_dir, tmp_path) -> None:
    photo = tmp_path / "photo.jpg"
    with Image.open(next((shapes_dir / "train").glob("*.png"))) as image:
        image.convert("RGB").resize((150, 90)).save(photo)
    pattern = str(shapes_dir / "valid" / "valid_0000[01].png")
    out = tmp_path / "out"
    found = predict(tiny_model_dir, [pattern, photo, photo], threshold=1.0, output_dir=out)

    assert [p.path.name for p in found] == ["valid_00000.png", "valid_00001.png", "photo.jpg"]
    assert all(len(p.boxes.labels) == 0 for p in found)  # nothing reaches a score of 1
    with Image.open(out / "photo.jpg") as drawn:
        assert drawn.format == "JPEG" and drawn.size == (150, 90)
    coco = json.loads((out / "predictions.json").read_text())
    assert len(coco["images"]) == 3 and coco["annotations"] == []  # every image, even empty


def test_bad_inputs_are_clear_errors_and_unreadable_images_are_skipped(
    tiny_model_dir, shapes_dir, tmp_path, caplog, capsys
) -> None:
    with pytest.raises(InputError, match="does not exist"):
        find_images([tmp_path / "missing.jpg"])
    with pytest.raises(InputError, match="matches no files"):
        find_images([str(tmp_path / "*.jpg")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        find_images([tmp_path / "empty"])

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    good = next((shapes_dir / "test").glob("*.png"))
    with caplog.at_level(logging.WARNING):
        found = predict(tiny_model_dir, [broken, good], output_dir=tmp_path / "out")
    assert [p.path for p in found] == [good.resolve()]
    assert "Skipped 1 unreadable image:" in caplog.text and "broken.jpg" in caplog.text

    capsys.readouterr()
    code = main(["predict", "--model", str(tiny_model_dir), str(tmp_path / "nothing")])
    assert code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0  # one line, no traceback


def test_cli_predict(tiny_model_dir, shapes_dir, tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    args = [
        "predict",
        "--model",
        str(tiny_model_dir),
        str(shapes_dir / "valid"),
        "--threshold",
        "0",
        "--output_dir",
        str(out),
        "--cpu",
    ]
    assert main(args) == 0
    assert f"{6 * NUM_QUERIES} objects (score >= 0.0) in 6 images" in capsys.readouterr().out
    assert len(list(out.glob("*.png"))) == 6 and (out / "predictions.json").is_file()


def test_mixed_shapes_batched_by_shape_come_back_in_input_order(tiny_model_dir, tmp_path) -> None:
    """Batches are sorted by aspect ratio (EXIF orientation counted), results and picture
    names still follow the inputs' order."""
    sizes = {
        "a/photo.jpg": (160, 40),
        "b/photo.jpg": (40, 120),
        "c/square.png": (90, 90),
        "d/wide.jpg": (150, 60),
    }
    inputs = []
    for name, size in sizes.items():
        path = tmp_path / name
        path.parent.mkdir()
        Image.new("RGB", size, (200, 40, 40)).save(path)
        inputs.append(path)
    turned = tmp_path / "e" / "turned.jpg"  # stored 160x40, displayed 40x160 (EXIF 6)
    turned.parent.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (160, 40), (40, 40, 200)).save(turned, exif=exif)
    inputs.append(turned)

    unreadable = tmp_path / "a"  # a folder
    order = _by_aspect_ratio([*inputs, unreadable])
    assert order == [turned, *(inputs[i] for i in (1, 2, 3, 0)), unreadable]  # tall to wide

    out = tmp_path / "out"
    found = predict(tiny_model_dir, inputs, threshold=0.0, output_dir=out, batch_size=2)

    assert [p.path for p in found] == [p.resolve() for p in inputs]
    assert [(p.width, p.height) for p in found] == [*sizes.values(), (40, 160)]
    assert [p.picture.name for p in found] == [
        "photo.jpg",
        "photo_1.jpg",
        "square.png",
        "wide.jpg",
        "turned.jpg",
    ]
    for prediction in found:
        with Image.open(prediction.picture) as picture:
            assert picture.size == (prediction.width, prediction.height)
        assert len(prediction.boxes.labels) == NUM_QUERIES
        assert prediction.boxes.xyxy[:, 2].max() <= prediction.width + 1e-3
        assert prediction.boxes.xyxy[:, 3].max() <= prediction.height + 1e-3


def _photo(size: tuple[int, int]) -> Image.Image:
    """A smooth RGB gradient (JPEG keeps it nearly exact), so decoders can be compared."""
    width, height = size
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    pixels = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_read_pixels_decodes_jpeg_as_pillow_does(orientation, tmp_path) -> None:
    """torchvision's JPEG path turns the image by EXIF as Pillow's does, same pixels."""
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    _photo((96, 64)).save(path, quality=95, exif=exif)

    pixels, size = read_pixels(path)
    expected = pil_to_tensor(open_image(path))
    assert pixels.dtype == torch.uint8 and pixels.shape == expected.shape
    assert size == (expected.shape[2], expected.shape[1])  # (width, height) as displayed
    assert (pixels.int() - expected.int()).abs().max() <= 2  # libjpeg-turbo builds may round


def test_read_pixels_other_files_and_errors(tmp_path) -> None:
    gray = tmp_path / "gray.jpg"
    _photo((40, 30)).convert("L").save(gray)
    pixels, _ = read_pixels(gray)
    assert pixels.shape == (3, 30, 40) and (pixels[0] == pixels[2]).all()  # three equal channels

    for name, image in {
        "cmyk.jpg": _photo((40, 30)).convert("CMYK"),  # Pillow's CMYK conversion, as training
        "alpha.png": _photo((40, 30)).convert("RGBA"),
        "deep.png": Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)),  # 16-bit
    }.items():
        image.save(tmp_path / name)
        pixels, _ = read_pixels(tmp_path / name)
        assert torch.equal(pixels, pil_to_tensor(open_image(tmp_path / name)))
    assert read_pixels(tmp_path / "deep.png")[0].max() < 255  # scaled to 8 bits, not white

    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((gray).read_bytes()[:200])
    with pytest.raises(IMAGE_ERRORS):  # predict skips it with a warning
        read_pixels(truncated)


def test_large_jpegs_are_read_reduced_for_the_model_and_drawn_in_full(
    tiny_model_dir, tmp_path
) -> None:
    """A JPEG much larger than the model's input (64 px) is decoded at a reduced scale, as in
    evaluation; boxes, sizes and the picture stay in the displayed image's pixels."""
    photo = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 800x600, displayed 600x800
    _photo((800, 600)).save(photo, quality=95, exif=exif)
    processor = DetrImageProcessor.from_pretrained(tiny_model_dir)  # as saved: 64 px
    resized_size = DetrTransform.for_evaluation(processor).resized_size

    reduced, size = read_pixels(photo, resized_size)
    assert size == (600, 800)
    assert reduced.shape == (3, 100, 75)  # 1/8 still covers the 48x64 input
    full, _ = read_pixels(photo)
    assert full.shape == (3, 800, 600)
    small = torch.nn.functional.interpolate(full[None].float(), size=(100, 75), mode="area")
    assert (small[0] - reduced.float()).abs().mean() < 3  # the same picture, turned alike

    [found] = predict(tiny_model_dir, photo, threshold=0.0, output_dir=tmp_path / "out")
    assert (found.width, found.height) == (600, 800)
    assert found.boxes.xyxy[:, 2].max() > 75 and found.boxes.xyxy[:, 3].max() > 100
    assert found.boxes.xyxy[:, 2].max() <= 600 + 1e-3 and found.boxes.xyxy[:, 3].max() <= 800 + 1e-3
    with Image.open(found.picture) as picture:
        assert picture.size == (600, 800)


def test_reading_ahead_for_a_gpu_gives_the_batches_read_in_turn(tiny_model_dir, tmp_path) -> None:
    """On the CPU predict reads each batch when the model wants it; with the model on a GPU,
    one batch ahead in a thread: the same batches, in the same order, unreadable files too."""
    for i in range(5):
        _photo((40 + 8 * i, 30)).save(tmp_path / f"photo{i}.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    files = sorted(tmp_path.glob("*.jpg"))
    batches = [files[i : i + 2] for i in range(0, len(files), 2)]
    processor = DetrImageProcessor.from_pretrained(tiny_model_dir)
    in_turn = list(_read_in_turn(batches, processor, with_pictures=True))
    ahead = list(_read_ahead(batches, processor, with_pictures=True))
    assert len(ahead) == len(in_turn) == 3
    assert sum(len(batch.unreadable) for batch in ahead) == 1
    for a, b in zip(ahead, in_turn, strict=True):
        assert a.paths == b.paths and a.sizes == b.sizes and a.unreadable == b.unreadable
        if a.prepared is not None:
            torch.testing.assert_close(
                a.prepared.inputs["pixel_values"], b.prepared.inputs["pixel_values"]
            )


def test_a_strip_and_a_symlink_loop_are_skipped_the_rest_predicted(
    tiny_model_dir, shapes_dir, tmp_path, caplog
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    good = next((shapes_dir / "test").glob("*.png"))
    (folder / "good.png").write_bytes(good.read_bytes())
    Image.new("RGB", (4000, 2)).save(folder / "strip.png")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    with caplog.at_level(logging.WARNING):
        found = predict(tiny_model_dir, folder, threshold=0.0, device="cpu")
    assert [p.path.name for p in found] == ["good.png"]
    assert "strip.png (4000x2 pixels vanish when resized)" in caplog.text
    assert "Skipped" in caplog.text and "loop.jpg" in caplog.text


def test_a_float_image_in_0_to_1_is_scaled_not_black(tmp_path) -> None:
    values = np.linspace(0.0, 1.0, 30 * 40, dtype=np.float32).reshape(30, 40)
    Image.fromarray(values, mode="F").save(tmp_path / "float.tif")
    pixels, size = read_pixels(tmp_path / "float.tif")
    assert size == (40, 30) and pixels.max() == 255 and pixels.min() == 0
    assert abs(float(pixels.float().mean()) - 127.5) < 2  # the gradient kept, not all black
