"""Loading a checkpoint with a new label map: only the class head is re-learned."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DetrConfig, DetrForObjectDetection

from hf_detr_ft.errors import ModelLoadError
from hf_detr_ft.models.loading import (
    DEFAULT_MODEL,
    load_detector,
    load_image_processor,
    load_model,
)


@pytest.fixture(scope="module")
def detr_r50_91_classes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The facebook/detr-resnet-50 architecture (91 COCO classes), random init, saved locally."""
    path = tmp_path_factory.mktemp("detr-r50")
    model = DetrForObjectDetection(DetrConfig(num_labels=91, use_pretrained_backbone=False))
    model.save_pretrained(path)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def test_only_the_class_head_is_reinitialised(detr_r50_91_classes, caplog) -> None:
    path, original = detr_r50_91_classes
    with caplog.at_level(logging.INFO, logger="hf_detr_ft"):
        model = load_model(path, ["RBC", "WBC", "Platelets"])
    assert model.config.id2label == {0: "RBC", 1: "WBC", 2: "Platelets"}
    assert model.config.label2id == {"RBC": 0, "WBC": 1, "Platelets": 2}
    loaded = model.state_dict()
    assert loaded.keys() == original.keys()
    changed = {k for k in loaded if not torch.equal(loaded[k], original[k])}
    assert changed == {"class_labels_classifier.weight", "class_labels_classifier.bias"}
    assert loaded["class_labels_classifier.weight"].shape == (4, 256)  # 3 classes + no-object
    assert "class_labels_classifier.weight" in caplog.text
    assert "class_labels_classifier.bias" in caplog.text


@pytest.mark.parametrize("backbone", ["timm", "transformers"])
def test_backbone_stem_and_first_stage_frozen_rest_trained(
    backbone: str, tiny_model_dir: Path, detr_r50_91_classes
) -> None:
    path = detr_r50_91_classes[0] if backbone == "timm" else tiny_model_dir
    model = load_model(path, ["a", "b"])
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    stem = [n for n in trainable if re.search(r"backbone\.model\.(conv1|embedder)\.", n)]
    first = [n for n in trainable if ".layer1." in n or ".stages.0." in n]
    later = [n for n in trainable if ".layer4." in n or ".stages.3." in n]
    assert stem and first and later
    assert not any(trainable[n] for n in stem + first)
    assert all(trainable[n] for n in later)
    assert all(trainable[n] for n in trainable if "backbone" not in n)


def test_ignore_mismatched_sizes_off_keeps_every_tensor_or_refuses(tiny_model_dir: Path) -> None:
    saved = DetrForObjectDetection.from_pretrained(tiny_model_dir).state_dict()
    names = [f"class {i}" for i in range(saved["class_labels_classifier.bias"].numel() - 1)]
    model = load_model(tiny_model_dir, names, ignore_mismatched_sizes=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    with pytest.raises(ModelLoadError, match=r"2 classes with ignore_mismatched_sizes off"):
        load_model(tiny_model_dir, ["a", "b"], ignore_mismatched_sizes=False)


def test_unreachable_default_checkpoint_says_how_to_use_a_local_folder() -> None:
    with pytest.raises(ModelLoadError) as err:
        load_model(DEFAULT_MODEL, ["a"])
    message = str(err.value)
    assert DEFAULT_MODEL in message and "local" in message and "model=" in message


def test_image_processor_sizes_and_default(tiny_model_dir: Path, tmp_path: Path) -> None:
    processor = load_image_processor(tiny_model_dir, image_size=200, max_image_size=300)
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (200, 300)
    capped = load_image_processor(tiny_model_dir, max_image_size=60)  # image_size 800
    pixels = capped(images=np.zeros((48, 64, 3), dtype=np.uint8), return_tensors="pt")
    assert pixels["pixel_values"].shape[-2:] == (45, 60)  # longest edge capped, aspect kept
    with pytest.raises(ValueError, match="positive"):
        load_image_processor(tiny_model_dir, image_size=0)
    fallback = load_image_processor(tmp_path, image_size=100, max_image_size=150)
    assert type(fallback).__name__ == "DetrImageProcessor"
    assert fallback.size["shortest_edge"] == 100


def test_corrupt_weights_and_other_models_are_one_clear_error(tiny_model_dir, tmp_path) -> None:
    corrupt = Path(shutil.copytree(tiny_model_dir, tmp_path / "corrupt"))
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for load in (lambda: load_model(corrupt, ["a"]), lambda: load_detector(corrupt)):
        with pytest.raises(ModelLoadError, match="Cannot load a model from the folder"):
            load()
    text = tmp_path / "bert"
    text.mkdir()
    (text / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="'bert' is not a DETR-family detector"):
        load_model(text, ["a"])
