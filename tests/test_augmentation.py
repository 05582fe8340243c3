"""``--augmentation``: presets and saved albumentations files, checked before training."""

from __future__ import annotations

import json
import random
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
from PIL import Image

from hf_detr_ft.arguments import DataArguments
from hf_detr_ft.cli import main as cli_main
from hf_detr_ft.data.preview import AUGMENTED_FILE
from hf_detr_ft.errors import ArgumentError
from hf_detr_ft.pipeline.augmentation import (
    PRESETS,
    augment,
    build_augmentation,
    describe_augmentation,
)

#: Boxes at the corners and the edges, where a transform most easily breaks them.
BOXES = [[0, 0, 20, 15], [108, 81, 20, 15], [40, 30, 30, 25], [90, 10, 25, 30], [0, 60, 12, 36]]


def _scene() -> tuple[np.ndarray, dict[str, list]]:
    """A black 128x96 image whose objects are white rectangles filling their boxes."""
    image = np.zeros((96, 128, 3), np.uint8)
    for x, y, w, h in BOXES:
        image[y : y + h, x : x + w] = 255
    objects = {"bbox": BOXES, "category": [0, 1, 2, 0, 1], "iscrowd": [0, 0, 0, 1, 0]}
    return image, objects


def _saved(pipeline: A.Compose | dict, path: Path) -> str:
    """``pipeline`` written as A.save writes it (a dict: its ``transform`` written as is)."""
    if isinstance(pipeline, dict):
        path.write_text(json.dumps({"__version__": A.__version__, "transform": pipeline}))
    else:
        A.save(pipeline, str(path), data_format="yaml" if path.suffix == ".yaml" else "json")
    return str(path)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@pytest.mark.parametrize("preset", ["default", "strong"])
def test_a_preset_saved_with_a_save_loads_as_the_same_pipeline(preset, suffix, tmp_path) -> None:
    pipeline = build_augmentation(preset)
    loaded = build_augmentation(_saved(pipeline, tmp_path / f"aug{suffix}"))
    assert A.to_dict(loaded) == A.to_dict(pipeline)
    # ... and augments as it does, from the same random state
    image, objects = _scene()
    for seed in range(5):
        ours = augment(pipeline, random.Random(seed), image, objects)
        theirs = augment(loaded, random.Random(seed), image, objects)
        assert np.array_equal(ours[0], theirs[0]) and ours[1] == theirs[1]


@pytest.mark.parametrize("spec", [*PRESETS, "file"])
def test_every_box_stays_valid_and_on_its_object(spec, tmp_path) -> None:
    if spec == "file":  # transforms beyond the presets': a flip, a shear and a zoomed crop
        pipeline = A.Compose(
            [
                A.VerticalFlip(p=0.5),
                A.Affine(shear=(-10, 10), p=1),
                A.RandomSizedBBoxSafeCrop(height=80, width=100, p=1),
            ]
        )
        spec = _saved(pipeline, tmp_path / "aug.json")
    pipeline = build_augmentation(spec)
    changed = 0
    for seed in range(40):
        image, objects = _scene()
        if pipeline is None:
            out, augmented = image, objects
        else:
            out, augmented = augment(pipeline, random.Random(seed), image, objects)
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
        height, width = out.shape[:2]
        boxes = augmented["bbox"]
        assert len(boxes) == len(augmented["category"]) == len(augmented["iscrowd"])
        assert len(augmented.get("area", boxes)) == len(boxes)
        changed += not np.array_equal(out, image)
        gray = out.mean(axis=2)
        for x, y, w, h in boxes:
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= width + 1e-3 and y + h <= height + 1e-3
            inside = gray[int(y) : int(np.ceil(y + h)), int(x) : int(np.ceil(x + w))]
            if w * h >= 64:  # not a sliver cut at the edge: the box still holds its object
                assert (inside > 100).mean() > 0.5, (spec, seed, (x, y, w, h))
    assert changed == 0 if spec == "none" else changed > 10


def test_a_file_gets_coco_boxes_and_keeps_its_box_filters(tmp_path) -> None:
    saved = A.Compose(
        [A.HorizontalFlip(p=1)],
        bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=0.4),
    )
    with pytest.warns(UserWarning, match="bbox_params format, label_fields, clip are replaced"):
        loaded = build_augmentation(_saved(saved, tmp_path / "voc.json"))
    params = loaded.processors["bboxes"].params
    assert (params.format, params.label_fields, params.clip) == (
        "coco",
        ["category", "iscrowd"],
        True,
    )
    assert params.min_visibility == 0.4
    out, objects = augment(loaded, random.Random(0), *_scene())
    assert objects["bbox"][0] == [108, 0, 20, 15]  # a COCO box, flipped


def _leaf(name: str, **args) -> dict:
    return {"__class_fullname__": name, "p": 0.5, **args}


REFUSED = {
    "unknown transform": (_leaf("HorizontalFlipp"), "unknown transform 'HorizontalFlipp'"),
    "bad argument": (_leaf("Affine", scale="big"), "Affine: bad argument: scale='big'"),
    "out of range": (_leaf("Blur", p=3), "Blur: bad argument: p=3"),
    "missing argument": (_leaf("RandomSizedBBoxSafeCrop"), "missing argument height"),
    "unknown argument": (_leaf("Rotate", angle=10), "'angle' are not valid for transform Rotate"),
    "cannot carry boxes": (_leaf("ToTensorV2"), "ToTensorV2 cannot carry boxes"),
    "needs a mask": (_leaf("MaskDropout"), "MaskDropout cannot be applied to a training image"),
    "normalises": (_leaf("Normalize"), "Normalize turns the image into a ndarray of float32"),
    "in a group": (
        {"__class_fullname__": "OneOf", "p": 1, "transforms": [_leaf("Blur"), _leaf("Nope")]},
        "unknown transform 'Nope'",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_bad_file_is_one_error_naming_the_transform(case, tmp_path) -> None:
    transform, message = REFUSED[case]
    pipeline = {"__class_fullname__": "Compose", "p": 1.0, "transforms": [transform]}
    path = _saved(pipeline, tmp_path / "aug.json")
    with pytest.raises(ArgumentError) as refused:
        build_augmentation(path)
    assert message in str(refused.value) and path in str(refused.value)
    assert "\n" not in str(refused.value)


def test_what_is_not_a_preset_or_a_pipeline_file_is_refused(tmp_path) -> None:
    with pytest.raises(ArgumentError, match="augmentation must be none, default, strong or a"):
        build_augmentation("heavy")
    with pytest.raises(ArgumentError, match="does not exist"):
        build_augmentation(str(tmp_path / "missing.yaml"))
    (tmp_path / "flags.json").write_text('{"learning_rate": 1}')
    with pytest.raises(ArgumentError, match="is not an albumentations pipeline"):
        build_augmentation(str(tmp_path / "flags.json"))
    (tmp_path / "broken.yaml").write_text("transform: [")
    with pytest.raises(ArgumentError, match="cannot be read"):
        build_augmentation(str(tmp_path / "broken.yaml"))
    with pytest.raises(ArgumentError, match="ToTensorV2 cannot carry boxes"):  # when parsed
        DataArguments(
            dataset_dir="data", augmentation=_saved(_leaf("ToTensorV2"), tmp_path / "t.json")
        )


def test_the_card_names_the_augmentation_and_its_transforms(tmp_path) -> None:
    assert describe_augmentation("none") == "none"
    assert describe_augmentation("strong") == (
        "strong: HorizontalFlip, BBoxSafeRandomCrop, Affine, ColorJitter, "
        "OneOf(GaussianBlur, MotionBlur)"
    )
    path = _saved(A.Compose([A.VerticalFlip(p=0.5)]), tmp_path / "mine.yaml")
    assert describe_augmentation(path) == "mine.yaml: VerticalFlip"


def test_train_refuses_a_bbox_unsafe_file_in_one_line(tmp_path, capsys) -> None:
    path = _saved(_leaf("ToTensorV2"), tmp_path / "aug.json")
    out = tmp_path / "out"
    argv = ["train", "--dataset_dir", "no-such-data", "--augmentation", path]
    assert cli_main([*argv, "--output_dir", str(out)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("hf-detr-ft train: error: augmentation file") and "ToTensorV2" in line
    assert not out.exists()


def test_inspect_draws_what_the_training_will_see(shapes_dir, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    argv = ["inspect", str(shapes_dir), "--output_dir", str(out), "--augmented", "6"]
    assert cli_main([*argv, "--augmentation", "strong"]) == 0
    picture = out / AUGMENTED_FILE
    assert str(picture) in capsys.readouterr().out
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.width >= 800  # a grid of 4 columns
    bad = _saved(_leaf("Normalize"), tmp_path / "n.json")
    assert cli_main([*argv, "--augmentation", bad, "--output_dir", str(tmp_path / "x")]) == 2
    assert "Normalize" in capsys.readouterr().err and not (tmp_path / "x").exists()
