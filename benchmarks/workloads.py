"""What the benchmark runs on: the datasets (BCCD photos, the same photos at phone size, a
generated mixed-aspect set), the models (the tests' tiny DETR, DETR-R50 random init) and our
side of each comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image
from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig, TrainerCallback

from hf_detr_ft.arguments import DetrTrainingArguments, default_num_workers
from hf_detr_ft.data.dataset import detection_features, load_detection_dataset
from hf_detr_ft.data.synthetic import DEMO_CLASSES, make_shapes_dataset
from hf_detr_ft.demo import DEMO_CHECKPOINT, DEMO_SETTINGS
from hf_detr_ft.models.loading import load_image_processor, load_model
from hf_detr_ft.pipeline.collate import collate_fn
from hf_detr_ft.pipeline.image_cache import DecodedImageCache, default_cache_mb
from hf_detr_ft.pipeline.transforms import DetrTransform
from hf_detr_ft.run import finetune
from hf_detr_ft.training.trainer import DetrTrainer

REPO = Path(__file__).resolve().parents[1]
BCCD = REPO.parent / "shared" / "datasets" / "bccd"
#: Phone camera size (12 MP, 4:3), to which :func:`phone_photos` scales the BCCD photos.
PHONE_SIZE = (4032, 3024)
#: (width, height): portrait, landscape and panorama photos as phones and drones take them.
MIXED_SHAPES = [(480, 640), (640, 480), (1200, 300), (360, 640), (640, 360), (1000, 250)]


def bccd_images(limit: int) -> Dataset:
    """The first ``limit`` BCCD training photos (640x480 blood smears, Pascal VOC)."""
    data = load_detection_dataset(BCCD, dataset_format="voc", validation_fraction=0)
    train = data.splits["train"]
    return train.select(range(min(limit, len(train))))


def image_files(dataset: Dataset) -> list[Path]:
    """The image files of a dataset that holds its images as files."""
    paths = dataset.cast_column("image", ImageFeature(decode=False))["image"]
    return [Path(image["path"]) for image in paths]


def phone_photos(root: Path, count: int) -> Dataset:
    """The first ``count`` BCCD photos scaled up to :data:`PHONE_SIZE` and saved as JPEG
    (quality 90), boxes scaled with them: what a dataset of phone photos costs to decode."""
    source = bccd_images(count)
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for example in source:
        image = example["image"]
        sx, sy = PHONE_SIZE[0] / image.width, PHONE_SIZE[1] / image.height
        path = root / f"{example['image_id']}.jpg"
        if not path.exists():
            image.resize(PHONE_SIZE, Image.BICUBIC).save(path, format="JPEG", quality=90)
        objects = dict(example["objects"])
        objects["bbox"] = [[x * sx, y * sy, w * sx, h * sy] for x, y, w, h in objects["bbox"]]
        objects["area"] = [area * sx * sy for area in objects["area"]]
        records.append(
            {
                "image": {"path": str(path), "bytes": None},
                "image_id": example["image_id"],
                "width": PHONE_SIZE[0],
                "height": PHONE_SIZE[1],
                "objects": objects,
            }
        )
    names = source.features["objects"]["category"].feature.names
    return Dataset.from_list(records, features=detection_features(names))


def mixed_aspect_images(root: Path, count: int, seed: int = 0) -> Dataset:
    """``count`` generated shape images cycling through :data:`MIXED_SHAPES`."""
    folder = make_shapes_dataset(
        root / f"mixed-{count}",
        splits={"train": count},
        image_shapes=MIXED_SHAPES,
        min_size=24,
        max_size=96,
        max_objects=6,
        seed=seed,
    )
    return load_detection_dataset(folder, validation_fraction=0).splits["train"]


def model_config(kind: str, num_labels: int) -> DetrConfig:
    """``tiny``: the tests' ~0.3 M-parameter DETR; ``r50``: ``DetrConfig()`` (DETR-R50)."""
    if kind == "r50":
        return DetrConfig(num_labels=num_labels)
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


def save_random_model(kind: str, class_names: list[str], folder: Path) -> Path:
    """A randomly initialised model saved once, so that both recipes start from the same one."""
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        config = model_config(kind, len(class_names))
        config.id2label = dict(enumerate(class_names))
        config.label2id = {name: i for i, name in config.id2label.items()}
        DetrForObjectDetection(config).save_pretrained(folder)
    return folder


def our_trainer(
    model_dir: Path,
    dataset: Dataset,
    cap: int,
    output_dir: Path,
    augment: bool = False,
    image_size: int | None = None,
    **args: Any,
) -> DetrTrainer:
    """hf-detr-ft's Trainer on ``dataset`` (training and evaluation), its processor at the
    same longest-edge cap as the stock one (shortest edge ``image_size``, default the cap).
    Trained without augmentation, as the stock recipe trains (decoded images kept between
    epochs, as in training), unless ``augment``: then with the library's training transform,
    as ``finetune``."""
    processor = load_image_processor(model_dir, image_size=image_size or cap, max_image_size=cap)
    names = dataset.features["objects"]["category"].feature.names
    data = DetrTransform.for_evaluation(processor).apply_to(dataset)
    # Unaugmented, the training transform is the evaluation one plus training's image cache.
    training = (
        DetrTransform.for_training(processor)
        if augment
        else DetrTransform(processor, image_cache=DecodedImageCache(default_cache_mb()))
    )
    train = training.apply_to(dataset)
    settings = dict(
        output_dir=str(output_dir),
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        eval_strategy="no",
        load_best_model_at_end=False,
        logging_steps=1000,
        use_cpu=not torch.cuda.is_available(),
        auto_mixed_precision=False,  # the stock recipe's fp32 (on a GPU too), unless args say
    )
    settings.update(args)
    # Workers (with a GPU) kept between the benchmark's short epochs, whose time would
    # otherwise be their start; without augmentation they repeat nothing.
    workers = settings.get("dataloader_num_workers", default_num_workers())
    settings.setdefault("dataloader_persistent_workers", not augment and workers > 0)
    return DetrTrainer(
        model=load_model(model_dir, names),
        args=DetrTrainingArguments(**settings),
        train_dataset=train,
        eval_dataset=data,
        processing_class=processor,
        data_collator=collate_fn,
    )


def finetune_with(callback: TrainerCallback, data_dir: Path, output_dir: Path, **args: Any) -> Path:
    """The library's own path, ``finetune()`` with the demo's settings from the demo checkpoint,
    with ``callback`` added to its Trainer; ``args`` override settings. Returns the model folder.
    """
    settings = {**DEMO_SETTINGS, "disable_tqdm": True, **args}
    result = finetune(
        data_dir,
        len(DEMO_CLASSES),
        model=DEMO_CHECKPOINT,
        output_dir=output_dir,
        callbacks=[callback],
        **settings,
    )
    return result.output_dir
