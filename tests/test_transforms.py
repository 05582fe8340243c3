"""Examples -> model inputs: the transform matches DetrImageProcessor; collate pads per batch."""

from __future__ import annotations

import io
import multiprocessing
import random
import sys
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from conftest import tiny_detr_config
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image
from transformers import DetrForObjectDetection, DetrImageProcessor, DetrImageProcessorPil

from hf_detr_ft.data.dataset import detection_features, load_detection_dataset
from hf_detr_ft.data.image_files import IMAGE_ERRORS, decode_for_resize
from hf_detr_ft.data.synthetic import make_shapes_dataset
from hf_detr_ft.errors import DatasetError
from hf_detr_ft.models.loading import load_image_processor
from hf_detr_ft.pipeline.augmentation import default_augmentation
from hf_detr_ft.pipeline.collate import collate_fn
from hf_detr_ft.pipeline.transforms import DetrTransform, train_scales


@pytest.fixture(scope="module")
def processor() -> DetrImageProcessor:
    return DetrImageProcessor(size={"shortest_edge": 96, "longest_edge": 160})


@pytest.fixture(scope="module")
def bccd_train(bccd_coco_dir: Path):
    return load_detection_dataset(bccd_coco_dir).splits["train"]


def _coco_annotation(image_id: int, objects: dict[str, list]) -> dict:
    return {
        "image_id": image_id,
        "annotations": [
            {"bbox": b, "category_id": c, "area": a, "iscrowd": int(z)}
            for b, c, a, z in zip(
                objects["bbox"], objects["category"], objects["area"], objects["iscrowd"]
            )
        ],
    }


def test_eval_transform_equals_image_processor(bccd_train, processor) -> None:
    example = bccd_train[0]
    transformed = bccd_train.with_transform(DetrTransform.for_evaluation(processor))
    ours = collate_fn([transformed[0]])
    annotation = _coco_annotation(example["image_id"], example["objects"])
    reference = processor(images=example["image"], annotations=annotation, return_tensors="pt")
    torch.testing.assert_close(ours["pixel_values"], reference["pixel_values"])
    assert torch.equal(ours["pixel_mask"].long(), reference["pixel_mask"])
    assert ours["pixel_values"].shape[-2:] == (96, 128)  # 640x480 -> shortest edge 96
    for key in ("boxes", "class_labels", "size", "orig_size", "image_id", "area", "iscrowd"):
        torch.testing.assert_close(ours["labels"][0][key], reference["labels"][0][key])
    assert ours["labels"][0]["orig_size"].tolist() == [480, 640]


def test_train_transform_equals_image_processor_on_the_augmented_image(
    bccd_train, processor
) -> None:
    """The transform resizes the augmented (here: cropped) image itself, from its channel-last
    pixels, and scales the boxes: the same as the processor at the drawn scale."""
    crop = A.Compose(
        [A.Crop(x_min=100, y_min=50, x_max=500, y_max=350)],
        bbox_params=A.BboxParams(format="coco", label_fields=["category", "iscrowd"], clip=True),
    )
    transform = DetrTransform(processor, augmentation=crop, scales=[64])
    ours = collate_fn([bccd_train.with_transform(transform)[0]])
    example = bccd_train[0]
    objects = example["objects"]
    cropped = crop(
        image=np.array(example["image"]),
        bboxes=objects["bbox"],
        category=objects["category"],
        iscrowd=objects["iscrowd"],
    )
    areas = [w * h for _, _, w, h in cropped["bboxes"]]
    annotation = _coco_annotation(
        example["image_id"], {**cropped, "bbox": cropped["bboxes"], "area": areas}
    )
    reference = processor(
        images=cropped["image"],
        annotations=annotation,
        size={"shortest_edge": 64, "longest_edge": 160},
        return_tensors="pt",
    )
    assert ours["pixel_values"].shape[-2:] == (64, 85)  # the 400x300 crop at shortest edge 64
    torch.testing.assert_close(ours["pixel_values"], reference["pixel_values"])
    for key in ("boxes", "class_labels", "size", "image_id", "area", "iscrowd"):
        torch.testing.assert_close(ours["labels"][0][key], reference["labels"][0][key])
    assert ours["labels"][0]["orig_size"].tolist() == [480, 640]


def test_train_transform_keeps_boxes_valid(bccd_train, processor) -> None:
    transform = DetrTransform.for_training(processor)
    scales = train_scales(96)
    assert scales[0] < scales[-1] == 96
    for _ in range(5):
        item = bccd_train.with_transform(transform)[1]
        labels = item["labels"]
        boxes = labels["boxes"]
        assert len(boxes) == len(labels["class_labels"]) == len(bccd_train[1]["objects"]["bbox"])
        assert torch.all((boxes >= 0) & (boxes <= 1))
        assert torch.all(boxes[:, 2:] > 0)
        assert min(item["pixel_values"].shape[-2:]) in scales


def test_boxes_filtered_once_at_the_end_as_after_every_augmentation(bccd_train) -> None:
    ours = default_augmentation()
    params = {**ours.processors["bboxes"].params.to_dict_private(), "check_each_transform": True}
    params.pop("__class_fullname__", None)
    each = A.Compose(ours.transforms, bbox_params=A.BboxParams(**params))
    for i in range(len(bccd_train)):
        image, objects = np.array(bccd_train[i]["image"]), bccd_train[i]["objects"]
        height, width = image.shape[:2]
        # and two boxes reaching out of the image, which clipping shrinks
        boxes = objects["bbox"] + [[width - 8.0, height - 8.0, 20.0, 20.0], [-5.0, 4.0, 6.0, 9.0]]
        targets = {"category": objects["category"] + [0, 1], "iscrowd": [0] * len(boxes)}
        for seed in range(8):
            out = []
            for augmentation in (ours, each):
                augmentation.set_random_seed(1000 * i + seed)
                out.append(augmentation(image=image, bboxes=boxes, **targets))
            np.testing.assert_array_equal(out[0]["image"], out[1]["image"])
            np.testing.assert_allclose(out[0]["bboxes"], out[1]["bboxes"])
            assert list(out[0]["category"]) == list(out[1]["category"])


def test_min_scale_sets_the_multi_scale_range(bccd_train, processor) -> None:
    assert train_scales(800) == [480, 560, 640, 720, 800]  # DETR's range
    assert train_scales(800, min_scale=0.8) == [640, 720, 800]
    fixed = DetrTransform.for_training(processor, min_scale=1.0)
    assert fixed.scales == [{"shortest_edge": 96}]
    for i in range(3):
        assert min(bccd_train.with_transform(fixed)[i]["pixel_values"].shape[-2:]) == 96
    with pytest.raises(ValueError, match="min_scale"):
        train_scales(800, min_scale=0)


def test_collate_pads_to_largest_image_not_a_square() -> None:
    tall = {"pixel_values": torch.ones(3, 40, 20), "labels": {"id": 1}}
    wide = {"pixel_values": torch.full((3, 16, 30), 2.0), "labels": {"id": 2}}
    batch = collate_fn([tall, wide])
    assert batch["pixel_values"].shape == (2, 3, 40, 30)
    assert batch["pixel_mask"].shape == (2, 40, 30)
    assert batch["pixel_mask"][0].sum() == 40 * 20 and batch["pixel_mask"][1].sum() == 16 * 30
    assert np.all(batch["pixel_values"][0, :, :, 20:].numpy() == 0)
    assert np.all(batch["pixel_values"][1, :, 16:, :].numpy() == 0)  # below the wide one
    assert torch.all(batch["pixel_values"][1, :, :16, :30] == 2.0)
    assert [label["id"] for label in batch["labels"]] == [1, 2]
    assert batch["pixel_mask"].dtype == torch.uint8


def test_the_uint8_mask_gives_the_outputs_of_the_processors_int64_mask() -> None:
    torch.manual_seed(0)
    model = DetrForObjectDetection(tiny_detr_config()).eval()
    batch = collate_fn(
        [{"pixel_values": torch.randn(3, 64, 40)}, {"pixel_values": torch.randn(3, 32, 64)}]
    )
    with torch.no_grad():
        ours = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
        int64 = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"].long())
    assert torch.equal(ours.logits, int64.logits)
    assert torch.equal(ours.pred_boxes, int64.pred_boxes)


def test_training_augmentation_is_reproducible_from_the_seed(bccd_train, processor) -> None:
    def run(seed: int, epoch: int = 0) -> list[torch.Tensor]:
        random.seed(seed + 1)  # the global random state plays no part
        transform = DetrTransform.for_training(processor, seed=seed)
        transform.set_epoch(epoch)
        transformed = bccd_train.with_transform(transform)
        return [transformed[i]["labels"]["boxes"] for i in (0, 1, 0)]

    first, again = run(7), run(7)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    for other in (run(8), run(7, epoch=1)):
        assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, other))


def _big_photo_dataset(orientation: int):
    """One 1600x1200 JPEG (stored; EXIF ``orientation``) with a box, as load_detection_dataset
    would hold it: smooth content, like a photo, and annotations on the displayed image."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    stored = Image.fromarray(small).resize((1600, 1200), Image.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=92, exif=exif)
    width, height = (1200, 1600) if orientation in (5, 6, 7, 8) else (1600, 1200)
    record = {
        "image": {"bytes": buffer.getvalue(), "path": None},
        "image_id": 3,
        "width": width,
        "height": height,
        "objects": {
            "id": [1],
            "bbox": [[100.0, 240.0, 600.0, 400.0]],
            "category": [0],
            "area": [240000.0],
            "iscrowd": [False],
        },
    }
    return Dataset.from_list([record], features=detection_features(["cell"]))


@pytest.mark.parametrize("orientation", [1, 6])
def test_large_jpeg_is_decoded_reduced_with_the_same_result(processor, orientation) -> None:
    dataset = _big_photo_dataset(orientation)
    full_width, full_height = dataset[0]["image"].size  # datasets' own decoding
    transform = DetrTransform.for_evaluation(processor)  # shortest 96, longest 160

    value = dataset.cast_column("image", ImageFeature(decode=False))[0]["image"]
    reduced, size = decode_for_resize(value, transform.resized_size)
    assert size == (full_width, full_height)
    assert reduced.dtype == np.uint8
    assert reduced.shape == (full_height // 8, full_width // 8, 3)  # 1/8 still covers 160x120
    assert min(transform.resized_size(size)) <= min(reduced.shape[:2])

    ours = transform.apply_to(dataset)[0]
    reference = dataset.with_transform(transform)[0]  # every pixel decoded, then resized
    assert ours["pixel_values"].shape == reference["pixel_values"].shape
    assert (ours["pixel_values"] - reference["pixel_values"]).abs().mean() < 0.05
    for key in ("boxes", "class_labels", "orig_size", "size"):
        assert torch.allclose(
            ours["labels"][key].double(), reference["labels"][key].double(), atol=1e-5
        ), key
    assert ours["labels"]["orig_size"].tolist() == [full_height, full_width]
    assert ours["labels"]["area"].item() == pytest.approx(reference["labels"]["area"].item())


def test_training_decodes_for_the_largest_scale_and_keeps_boxes_inside(processor) -> None:
    dataset = _big_photo_dataset(1)
    transform = DetrTransform.for_training(
        DetrImageProcessor(size={"shortest_edge": 400, "longest_edge": 700}), seed=1
    )
    assert transform.resized_size((1600, 1200)) == (533, 400)  # scale 1/3, so draft 1/2
    for epoch in range(4):
        transform.set_epoch(epoch)
        item = transform.apply_to(dataset)[0]
        assert item["labels"]["orig_size"].tolist() == [1200, 1600]
        height, width = item["pixel_values"].shape[-2:]
        edges = [scale["shortest_edge"] for scale in transform.scales]
        assert min(height, width) in edges or max(height, width) == 700  # cropped
        boxes = item["labels"]["boxes"]
        assert boxes.shape == (1, 4) and torch.all((boxes >= 0) & (boxes <= 1))


def test_other_formats_and_unresized_processors_decode_in_full(tmp_path, processor) -> None:
    png = tmp_path / "photo.png"
    Image.new("RGB", (800, 600), "white").save(png)
    transform = DetrTransform.for_evaluation(processor)
    image, size = decode_for_resize({"path": str(png), "bytes": None}, transform.resized_size)
    assert image.shape == (600, 800, 3) and size == (800, 600)
    no_resize = DetrTransform.for_evaluation(DetrImageProcessor(do_resize=False))
    assert no_resize.resized_size((800, 600)) is None
    fixed = DetrTransform.for_evaluation(DetrImageProcessor(size={"height": 64, "width": 64}))
    assert fixed.resized_size((800, 600)) == (64, 64)
    capped = DetrTransform.for_evaluation(
        DetrImageProcessor(size={"max_height": 300, "max_width": 300})
    )  # the HF example's
    assert capped.resized_size((800, 600)) == (300, 225)


def test_a_processor_with_the_pil_backend_resizes_itself_to_the_same_result(bccd_train) -> None:
    """Only torchvision-backed processors are resized for from channel-last memory; another
    backend resizes the (augmented) image itself, boxes alike, at the same drawn scale."""
    size = {"shortest_edge": 96, "longest_edge": 160}
    items = {}
    for backend in (DetrImageProcessor, DetrImageProcessorPil):
        transform = DetrTransform.for_training(backend(size=size), seed=4)
        items[backend] = [transform.apply_to(bccd_train)[i] for i in range(4)]
    for ours, pil in zip(items[DetrImageProcessor], items[DetrImageProcessorPil], strict=True):
        assert ours["pixel_values"].shape == pil["pixel_values"].shape
        assert (ours["pixel_values"] - pil["pixel_values"]).abs().mean() < 0.05
        for key in ("boxes", "class_labels", "size", "orig_size", "area"):
            torch.testing.assert_close(ours["labels"][key], pil["labels"][key], rtol=1e-4, atol=0)


def _image_kinds(folder: Path) -> dict[str, Path]:
    """Files of the kinds datasets hold: camera JPEGs (turned by EXIF or not), other JPEGs,
    PNGs in several modes, turned by EXIF, and with 16 bits per channel."""
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize((80, 60))
    turned = Image.Exif()
    turned[0x0112] = 6
    files = {
        "rgb.jpg": lambda p: photo.save(p, quality=95),
        "turned.jpg": lambda p: photo.save(p, quality=95, exif=turned),
        "gray.jpg": lambda p: photo.convert("L").save(p),
        "cmyk.jpg": lambda p: photo.convert("CMYK").save(p),
        "rgb.png": lambda p: photo.save(p),
        "gray.png": lambda p: photo.convert("L").save(p),
        "alpha.png": lambda p: photo.convert("RGBA").save(p),
        "palette.png": lambda p: photo.convert("P").save(p),
        "turned.png": lambda p: photo.save(p, exif=turned),
        "deep-rgb.png": lambda p: cv2.imwrite(
            str(p), rng.integers(0, 65535, (6, 8, 3)).astype(np.uint16)
        ),
    }
    for name, write in files.items():
        write(folder / name)
    return {name: folder / name for name in files}


def test_decoding_for_resize_gives_the_pixels_datasets_decodes(tmp_path) -> None:
    """torchvision decodes RGB and grayscale JPEGs, Pillow the rest: the same RGB pixels,
    turned by EXIF, as ``datasets.Image(mode="RGB")``, from a path or from bytes."""
    feature = ImageFeature(mode="RGB")
    for name, path in _image_kinds(tmp_path).items():
        expected = np.array(feature.decode_example({"path": str(path), "bytes": None}))
        for value in (
            {"path": str(path), "bytes": None},
            {"path": None, "bytes": path.read_bytes()},
        ):
            pixels, size = decode_for_resize(value, lambda size: None)
            assert pixels.dtype == np.uint8 and pixels.shape == expected.shape, name
            assert size == (expected.shape[1], expected.shape[0]), name
            tolerance = 2 if name.endswith(".jpg") else 0  # libjpeg-turbo builds may round
            assert np.abs(pixels.astype(int) - expected).max() <= tolerance, name

    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((tmp_path / "rgb.jpg").read_bytes()[:300])
    with pytest.raises(IMAGE_ERRORS):  # torchvision refuses it; Pillow says what is wrong
        decode_for_resize({"path": str(truncated), "bytes": None}, lambda size: None)


def test_a_batch_decoded_on_threads_equals_one_decoded_in_turn(bccd_train, processor) -> None:
    """Without DataLoader workers a batch's images are decoded on torch's thread count."""

    def batch(threads: int) -> dict:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            transform = DetrTransform.for_training(processor, seed=3)
            items = transform.apply_to(bccd_train)[:6]
        finally:
            torch.set_num_threads(before)
        return collate_fn([dict(zip(items, values)) for values in zip(*items.values())])

    in_turn, on_threads = batch(1), batch(3)
    torch.testing.assert_close(on_threads["pixel_values"], in_turn["pixel_values"])
    for ours, reference in zip(on_threads["labels"], in_turn["labels"], strict=True):
        for key in ("boxes", "class_labels", "size", "orig_size", "image_id", "area"):
            torch.testing.assert_close(ours[key], reference[key])


def _decode_in_child(transform: DetrTransform, images: list, results) -> None:
    results.put(len(transform._decode_all(images)))


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_a_forked_child_decodes_with_threads_of_its_own(bccd_train, processor) -> None:
    """The decoding threads are per process: a child forked after the parent decoded (and so
    started its pool) would otherwise wait forever on threads that exist only in the parent."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        transform = DetrTransform.for_evaluation(processor)
        images = bccd_train.cast_column("image", ImageFeature(decode=False))["image"][:4]
        assert len(transform._decode_all(images)) == 4  # the parent's pool
        fork = multiprocessing.get_context("fork")
        results = fork.Queue()
        child = fork.Process(target=_decode_in_child, args=(transform, images, results))
        child.start()
        child.join(60)
        hung = child.is_alive()
        child.kill()
    finally:
        torch.set_num_threads(before)
    assert not hung and results.get(timeout=5) == 4


def test_an_image_truncated_after_the_checks_is_named(tmp_path) -> None:
    root = make_shapes_dataset(tmp_path / "data", splits={"train": 2, "valid": 1}, seed=0)
    data = load_detection_dataset(root)
    processor = load_image_processor("none-such", image_size=64, max_image_size=64)
    first = Path(data.splits["train"][0]["image"].filename)
    first.write_bytes(first.read_bytes()[:100])  # after the dataset was checked
    transformed = DetrTransform.for_evaluation(processor).apply_to(data.splits["train"])
    with pytest.raises(DatasetError, match=f"Cannot decode {first} any more"):
        transformed[0]
