"""Shared fixtures: everything offline, tiny models built from configs, data made on the spot."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The dataset cache is off unless a test passes cache_dir: tests rewrite images in place
# between loads (which the cache key does not see) and would fill the user's ~/.cache.
os.environ["HF_DETR_FT_CACHE"] = "off"

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402
from transformers import (  # noqa: E402
    DetrConfig,
    DetrForObjectDetection,
    DetrImageProcessor,
    ResNetConfig,
    set_seed,
)

from hf_detr_ft.arguments import DetrTrainingArguments  # noqa: E402
from hf_detr_ft.data.dataset import load_detection_dataset  # noqa: E402
from hf_detr_ft.data.synthetic import make_shapes_dataset  # noqa: E402
from hf_detr_ft.models.loading import load_image_processor, load_model  # noqa: E402
from hf_detr_ft.pipeline.collate import collate_fn  # noqa: E402
from hf_detr_ft.pipeline.transforms import DetrTransform  # noqa: E402
from hf_detr_ft.training.trainer import DetrTrainer  # noqa: E402

BCCD = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "bccd"
TINY_IMAGE_SIZE = 64


#: One training step, nothing evaluated or saved in between: a run folder, quickly.
ONE_STEP = dict(
    max_steps=1,
    image_size=64,
    max_image_size=64,
    eval_strategy="no",
    save_strategy="no",
    load_best_model_at_end=False,
    report_to="none",
)


def two_process_launch(port: int, *program: str) -> list[str]:
    """``accelerate launch`` of ``program`` (a script and its arguments, or ``-m module ...``)
    on two CPU processes (gloo), without mixed precision or dynamo; each test its own port."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        *program,
    ]


def tiny_detr_config(num_labels: int = 5) -> DetrConfig:
    """A ~0.3 M-parameter DETR with a small HF ResNet backbone (no download needed)."""
    backbone = ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage4"],
    )
    return DetrConfig(
        backbone_config=backbone,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=10,
        num_labels=num_labels,
    )


def tiny_trainer(
    model_dir: Path,
    data_dir: Path,
    output_dir: Path,
    *,
    max_image_size: int = TINY_IMAGE_SIZE,
    train_images: int | None = None,
    eval_split: str = "validation",
    callbacks: list | None = None,
    **args,
) -> DetrTrainer:
    """A DetrTrainer for the tiny model on a dataset folder, without augmentation (a fixed
    problem): the first ``train_images`` training images, ``eval_split`` for evaluation."""
    set_seed(0)  # the new class head is drawn at random when the model is loaded
    data = load_detection_dataset(data_dir)
    processor = load_image_processor(
        model_dir, image_size=TINY_IMAGE_SIZE, max_image_size=max_image_size
    )
    transform = DetrTransform.for_evaluation(processor)
    train = data.splits["train"]
    if train_images is not None:
        train = train.select(range(train_images))
    return DetrTrainer(
        model=load_model(model_dir, data.class_names),
        args=DetrTrainingArguments(
            output_dir=str(output_dir), report_to="none", disable_tqdm=True, **args
        ),
        train_dataset=transform.apply_to(train),
        eval_dataset=transform.apply_to(data.splits[eval_split]),
        processing_class=processor,
        data_collator=collate_fn,
        callbacks=callbacks,
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DETR saved with save_pretrained, plus its image processor."""
    path = tmp_path_factory.mktemp("tiny-detr")
    torch.manual_seed(0)  # the same tiny model in every test session
    DetrForObjectDetection(tiny_detr_config()).save_pretrained(path)
    size = {"shortest_edge": TINY_IMAGE_SIZE, "longest_edge": TINY_IMAGE_SIZE}
    DetrImageProcessor(size=size).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic Roboflow-layout COCO folder with train/valid/test."""
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes_dataset(root, splits={"train": 16, "valid": 6, "test": 5}, seed=1)


def write_coco_json(
    path: Path, images: list[dict], annotations: list[dict], categories: list[dict]
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path


def voc_to_coco(names: list[str], image_dir: Path, classes: list[str]) -> tuple[list, list]:
    """COCO images/annotations for some BCCD images (VOC corners are 1-based, inclusive)."""
    images, annotations = [], []
    for image_id, name in enumerate(names, start=1):
        root = ET.parse(BCCD / "Annotations" / f"{name}.xml").getroot()
        size = root.find("size")
        images.append(
            {
                "id": image_id,
                "file_name": str(image_dir / f"{name}.jpg"),
                "width": int(size.findtext("width")),
                "height": int(size.findtext("height")),
            }
        )
        for obj in root.iter("object"):
            box = obj.find("bndbox")
            x0, y0, x1, y1 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": classes.index(obj.findtext("name")) + 1,
                    "bbox": [x0 - 1, y0 - 1, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    return images, annotations


@pytest.fixture(scope="session")
def bccd_coco_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A handful of real BCCD photos as a Roboflow-style COCO folder (images read in place)."""
    if not BCCD.is_dir():
        pytest.skip(f"real data not found at {BCCD}")
    root = tmp_path_factory.mktemp("bccd-coco")
    classes = ["RBC", "WBC", "Platelets"]
    categories = [{"id": 0, "name": "cells", "supercategory": "none"}] + [
        {"id": i + 1, "name": c, "supercategory": "cells"} for i, c in enumerate(classes)
    ]
    split_names = {
        "train": ["BloodImage_00000", "BloodImage_00001", "BloodImage_00002", "BloodImage_00338"],
        "valid": ["BloodImage_00003", "BloodImage_00004", "BloodImage_00343"],
    }
    for split, names in split_names.items():
        names = [n for n in names if (BCCD / "Annotations" / f"{n}.xml").exists()]
        images, annotations = voc_to_coco(names, BCCD / "JPEGImages", classes)
        write_coco_json(root / split / "_annotations.coco.json", images, annotations, categories)
    return root


def cocoeval_stats(
    annotation_file: Path, results: Path | list[dict], cat_ids: list[int] | None = None
) -> np.ndarray:
    """The reference: pycocotools alone (its 12 summary numbers), optionally for some classes."""
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(annotation_file))
        detections = truth.loadRes(str(results) if isinstance(results, Path) else results)
        coco_eval = COCOeval(truth, detections, "bbox")
        if cat_ids is not None:
            coco_eval.params.catIds = cat_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats
