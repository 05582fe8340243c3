"""Pre-flight checks: find what makes DETR not learn before hours of training are spent.

Run after the dataset is loaded and the model configured, before training
(:func:`run_preflight`). Each check looks for a known cause of a DETR run whose ``class_error``
stays near 100 % or whose mAP stays at 0:

* **Objects per image vs ``num_queries``.** DETR predicts at most ``num_queries`` objects per
  image; the rest of a crowded image can never be matched or found. More boxes than queries is
  an error naming the image; above :data:`NEAR_QUERY_LIMIT` of the queries, a warning.
* **Object size after resizing.** Images are resized as DETR's processor does (shortest edge
  ``image_size``, longest at most ``max_image_size``); a box whose shorter side ends up below
  :data:`TINY_OBJECT_PIXELS` pixels is a fraction of one cell of the backbone's stride-32
  feature map and cannot be learned. They are counted and a resolution is suggested.
* **Classes.** Boxes and images per class in training, the smallest/largest class ratio,
  classes with very few images, and classes that the evaluation splits have but training lacks.
* **Batch size and learning rates** against DETR's recipe (1e-4, backbone 1e-5, batch 64 in
  the paper; learning rates scale roughly linearly with the batch).

The result, a :class:`PreflightReport`, is printed as a short report and saved as
``preflight_report.json`` and ``preflight_report.txt`` in the output directory; errors then
raise :class:`PreflightError`, so a run that cannot work stops before training.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset
from datasets import Image as ImageFeature
from transformers import PretrainedConfig, TrainingArguments

from ..arguments import DataArguments, apply_family_recipe, effective_batch_size
from ..data.dataset_report import SplitStats, arrow_columns, split_stats
from ..errors import PreflightError
from ..models.families import Recipe, family_of
from ..pipeline.transforms import DEFAULT_MIN_SCALE, resized_size
from ..wording import plural

PREFLIGHT_REPORT = "preflight_report"

#: Boxes whose shorter side is below this many pixels after resizing cannot be learned.
TINY_OBJECT_PIXELS = 4.0
#: Share of ``num_queries`` above which the largest object count gets a warning.
NEAR_QUERY_LIMIT = 0.8
#: Smallest/largest class box-count ratio below which the classes are called imbalanced.
IMBALANCE_RATIO = 0.1
#: Fewer training images than this for a class is too few to learn it well.
FEW_IMAGES_PER_CLASS = 20
#: The original DETR recipe (Carion et al. 2020): AdamW at these rates for a batch of 64.
DETR_LEARNING_RATE, DETR_LR_BACKBONE, DETR_BATCH_SIZE = 1e-4, 1e-5, 64
#: How far (as a factor) the learning rate may be from the recipe before it is flagged.
LR_TOLERANCE = 3.0


@dataclass
class PreflightReport:
    """What the checks found: errors stop the run, warnings and notes are advice."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: dict[str, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def to_text(self) -> str:
        counts = f"{plural(len(self.errors), 'error')}, {plural(len(self.warnings), 'warning')}"
        lines = [f"hf-detr-ft pre-flight checks: {counts}"]
        lines += [f"  {name:<18} {text}" for name, text in self.summary.items()]
        lines += [f"ERROR: {text}" for text in self.errors]
        lines += [f"WARNING: {text}" for text in self.warnings]
        lines += [f"note: {text}" for text in self.notes]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "errors": self.errors,
            "warnings": self.warnings,
            "notes": self.notes,
            "summary": self.summary,
            **self.stats,
        }

    def save(self, output_dir: str | Path) -> Path:
        """Write ``preflight_report.json`` and ``.txt`` into ``output_dir``; return the JSON."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / f"{PREFLIGHT_REPORT}.txt").write_text(self.to_text())
        path = output_dir / f"{PREFLIGHT_REPORT}.json"
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


def run_preflight(
    splits: Mapping[str, Dataset],
    config: PretrainedConfig,
    data_args: DataArguments,
    training_args: TrainingArguments,
    size_rule: Mapping[str, int] | None = None,
    *,
    freeze_backbone: bool = False,
) -> PreflightReport:
    """Check, print and save the report (main process), then raise if a check failed.

    ``splits`` are the splits as they will be used (after ``max_*_samples``); ``data_args``
    gives ``image_size``, ``max_image_size`` and ``min_scale``; ``size_rule`` is the image
    processor's ``size`` (default: shortest edge ``image_size``, longest ``max_image_size``);
    ``freeze_backbone``: the whole backbone stays frozen (``--freeze_backbone``).
    """
    report = preflight_checks(
        splits,
        config,
        image_size=data_args.image_size,
        max_image_size=data_args.max_image_size,
        training_args=training_args,
        min_scale=data_args.min_scale or DEFAULT_MIN_SCALE,
        size_rule=size_rule,
        freeze_backbone=freeze_backbone,
    )
    if training_args.process_index == 0:
        saved = report.save(training_args.output_dir)
        print(report.to_text() + f"(saved to {saved} and {saved.with_suffix('.txt')})")
    if report.errors:
        raise PreflightError(" ".join(report.errors))
    return report


def preflight_checks(
    splits: Mapping[str, Dataset],
    config: PretrainedConfig,
    *,
    image_size: int,
    max_image_size: int,
    training_args: TrainingArguments,
    min_scale: float = DEFAULT_MIN_SCALE,
    size_rule: Mapping[str, int] | None = None,
    freeze_backbone: bool = False,
) -> PreflightReport:
    """Run every check on ``splits`` (``train`` first) for a model with ``config``.

    ``min_scale`` is the smallest training scale (``--min_scale``), named in the warning about
    tiny objects. Boxes are measured at the size the image processor's ``size_rule`` resizes
    to (default: shortest edge ``image_size``, longest at most ``max_image_size``). With
    ``freeze_backbone`` the backbone's learning rate is not checked (it learns nothing).
    """
    class_names = [config.id2label[i] for i in range(len(config.id2label))]
    family = family_of(config)
    apply_family_recipe(training_args, family)  # the learning rates the run will use
    num_queries = family.num_queries(config)
    rule = size_rule or {"shortest_edge": image_size, "longest_edge": max_image_size}
    scans = {name: _scan(split, rule) for name, split in splits.items()}
    # Crowd boxes are left out: DETR's targets drop them, so they teach no class.
    classes = {
        name: split_stats(split, class_names, count_crowd=False) for name, split in splits.items()
    }
    report = PreflightReport()
    report.stats.update(
        num_queries=num_queries,
        image_size=image_size,
        max_image_size=max_image_size,
        tiny_object_pixels=TINY_OBJECT_PIXELS,
        splits={
            name: {
                **scan.stats(),
                "boxes_per_class": classes[name].boxes_per_class,
                "images_per_class": classes[name].images_per_class,
            }
            for name, scan in scans.items()
        },
    )
    _check_queries(report, splits, scans, num_queries)
    _check_image_shapes(report, splits, scans)
    _check_object_sizes(report, scans, image_size, max_image_size, min_scale)
    _check_classes(report, classes)
    _check_batch_and_learning_rates(report, training_args, family.recipe, freeze_backbone)
    return report


@dataclass
class _SplitScan:
    """Per-split counts gathered in one pass over the annotations (no image is decoded)."""

    images: int = 0
    boxes: int = 0
    max_boxes: int = 0
    max_boxes_row: int = 0
    images_by_box_count: Counter = field(default_factory=Counter)  # boxes per image -> images
    box_sides: np.ndarray = field(default_factory=lambda: np.zeros(0))  # shorter side, resized
    #: Rows of images that resizing makes less than a pixel high or wide, with that size.
    vanishing: list[tuple[int, tuple[int, int], tuple[int, int]]] = field(default_factory=list)

    def tiny(self) -> int:
        return int((self.box_sides < TINY_OBJECT_PIXELS).sum())

    def stats(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "boxes": self.boxes,
            "max_boxes_per_image": self.max_boxes,
            "tiny_boxes": self.tiny(),
            "smallest_box_side_px": round(float(self.box_sides.min()), 2)
            if len(self.box_sides)
            else None,
        }


def _scan(split: Dataset, size_rule: Mapping[str, int]) -> _SplitScan:
    """Counted on the Arrow columns at once: COCO-scale splits have ~10^6 boxes."""
    table = arrow_columns(split, ["width", "height", "objects"])
    sizes = np.stack([table[name].to_numpy() for name in ("width", "height")], axis=1)
    objects = table.column("objects").combine_chunks()
    bbox = pc.struct_field(objects, "bbox")
    rows = pc.list_parent_indices(bbox).to_numpy(zero_copy_only=False)
    boxes = pc.list_flatten(pc.list_flatten(bbox)).to_numpy(zero_copy_only=False).reshape(-1, 4)
    crowd = pc.list_flatten(pc.struct_field(objects, "iscrowd"))
    # DETR's processor drops crowd boxes from the targets, so they take no query.
    kept = ~crowd.to_numpy(zero_copy_only=False).astype(bool)
    rows, boxes = rows[kept], boxes[kept]
    # resized as the processor does, once per distinct image size
    distinct, inverse = np.unique(sizes, axis=0, return_inverse=True)
    resized = np.array(
        [resized_size(size_rule, (int(w), int(h))) for w, h in distinct], dtype=np.int64
    ).reshape(-1, 2)[inverse.reshape(-1)]
    counts = np.bincount(rows, minlength=len(sizes))
    scan = _SplitScan(images=len(sizes), boxes=int(len(rows)))
    if len(counts):
        scan.max_boxes, scan.max_boxes_row = int(counts.max()), int(counts.argmax())
    scan.images_by_box_count.update(Counter(counts.tolist()))
    for row in np.flatnonzero(resized.min(axis=1) < 1):
        scan.vanishing.append(
            (int(row), tuple(map(int, sizes[row])), tuple(map(int, resized[row])))
        )
    scale = resized / sizes
    scan.box_sides = np.minimum(boxes[:, 2] * scale[rows, 0], boxes[:, 3] * scale[rows, 1])
    return scan


def _image_name(split: Dataset, row: int) -> str:
    """The image file of ``row`` (read without decoding the image), with its image id."""
    example = split.select([row])
    if "image" in example.column_names:
        example = example.cast_column("image", ImageFeature(decode=False))
        image = example[0]["image"]
        return f"{image.get('path') or 'in-memory image'} (image_id {example[0]['image_id']})"
    return f"image_id {example[0]['image_id']}"


def _check_queries(
    report: PreflightReport,
    splits: Mapping[str, Dataset],
    scans: dict[str, _SplitScan],
    num_queries: int,
) -> None:
    name, scan = max(scans.items(), key=lambda item: item[1].max_boxes)
    image = _image_name(splits[name], scan.max_boxes_row) if scan.images else "none"
    report.stats["max_boxes"] = {"split": name, "image": image, "boxes": scan.max_boxes}
    report.summary["objects per image"] = (
        f"at most {scan.max_boxes} ({name} image {image}); num_queries {num_queries}"
    )
    suggested = max(num_queries, math.ceil(scan.max_boxes / NEAR_QUERY_LIMIT / 10) * 10)
    raise_it = (
        f"Raise num_queries, e.g. --num_queries {suggested} (finetune(..., num_queries="
        f"{suggested})); this re-initialises the model's query embeddings, which are then "
        f"learned from scratch."
    )
    crowded = []
    for split_name, split_scan in scans.items():
        if split_scan.max_boxes > num_queries:
            over = sum(
                n for boxes, n in split_scan.images_by_box_count.items() if boxes > num_queries
            )
            worst = _image_name(splits[split_name], split_scan.max_boxes_row)
            crowded.append(
                f"the {split_name} image {worst} has {split_scan.max_boxes} objects "
                f"({plural(over, f'{split_name} image')} {'has' if over == 1 else 'have'} more "
                f"than {num_queries})"
            )
    if crowded:
        report.errors.append(
            f"More objects than num_queries={num_queries} in one image: {'; '.join(crowded)}. "
            f"DETR predicts at most num_queries objects per image, so the rest can never be "
            f"found. {raise_it}"
        )
    if not report.errors and scan.max_boxes > NEAR_QUERY_LIMIT * num_queries:
        report.warnings.append(
            f"The {name} image {image} has {scan.max_boxes} objects, close to "
            f"num_queries={num_queries}: DETR needs spare queries (most of them predict "
            f"'no object'), and recall suffers near the limit. {raise_it}"
        )


def _check_image_shapes(
    report: PreflightReport, splits: Mapping[str, Dataset], scans: dict[str, _SplitScan]
) -> None:
    """Images so elongated that resizing leaves them less than a pixel wide or high."""
    found = [(name, item) for name, scan in scans.items() for item in scan.vanishing]
    if not found:
        return
    name, (row, (width, height), (new_width, new_height)) = found[0]
    report.errors.append(
        f"{plural(len(found), 'image')} {'vanishes' if len(found) == 1 else 'vanish'} when "
        f"resized, e.g. the {name} image "
        f"{_image_name(splits[name], row)}: {width}x{height} pixels becomes "
        f"{new_width}x{new_height}. Remove such strips from the dataset, or raise "
        f"--max_image_size so that their short side stays at least a pixel."
    )


def _check_object_sizes(
    report: PreflightReport,
    scans: dict[str, _SplitScan],
    image_size: int,
    max_image_size: int,
    min_scale: float,
) -> None:
    sides = np.sort(np.concatenate([scan.box_sides for scan in scans.values()]))
    tiny = {name: scan.tiny() for name, scan in scans.items()}
    total_tiny = sum(tiny.values())
    per_split = ", ".join(f"{name} {count}" for name, count in tiny.items())
    report.summary["tiny objects"] = (
        f"{total_tiny} of {len(sides)} boxes under {TINY_OBJECT_PIXELS:g} px at image_size "
        f"{image_size} / max_image_size {max_image_size} ({per_split})"
    )
    report.stats["tiny_boxes"] = {"total": total_tiny, "boxes": len(sides), **tiny}
    visible = sides[sides > 0]  # 0: an image that vanishes (an error)
    if not total_tiny or not len(visible):
        return
    # Scale so that all but the smallest 1 % of the boxes (all of them if fewer are tiny)
    # reach the threshold; scaling both sizes by f scales every resized image by f.
    reference = visible[len(visible) // 100]
    factor = TINY_OBJECT_PIXELS / (reference if reference < TINY_OBJECT_PIXELS else visible[0])
    new_size = math.ceil(image_size * factor / 32) * 32
    new_max = math.ceil(max_image_size * factor / 32) * 32
    report.stats["suggested_image_size"] = new_size
    report.stats["suggested_max_image_size"] = new_max
    report.warnings.append(
        f"{total_tiny} of {len(sides)} boxes ({per_split}) are smaller than "
        f"{TINY_OBJECT_PIXELS:g} pixels after resizing to image_size {image_size} / "
        f"max_image_size {max_image_size} (smallest {sides[0]:.1f} px; training scales go down "
        f"to {min_scale:.0%} of that): DETR cannot learn them. Use a higher resolution, e.g. "
        f"--image_size {new_size} --max_image_size {new_max}, or crop the images into tiles."
    )


def _check_classes(report: PreflightReport, classes: dict[str, SplitStats]) -> None:
    train = classes.get("train")
    if train is None:
        return
    boxes, images = train.boxes_per_class, train.images_per_class
    smallest, largest = min(boxes, key=boxes.get), max(boxes, key=boxes.get)
    ratio = boxes[smallest] / boxes[largest] if boxes[largest] else 0.0
    report.stats["class_balance"] = {
        "smallest_class": smallest,
        "largest_class": largest,
        "smallest_to_largest": round(ratio, 4),
    }
    counts = ", ".join(
        f"{name} {plural(boxes[name], 'box')} / {plural(images[name], 'image')}" for name in boxes
    )
    report.summary["classes (train)"] = f"{counts}; smallest/largest {ratio:.3f}"

    absent = [name for name, count in boxes.items() if not count]
    if absent:
        report.warnings.append(
            f"Classes with no training boxes cannot be learned: {', '.join(absent)}."
        )
    if len(boxes) > 1 and 0 < ratio < IMBALANCE_RATIO:
        report.warnings.append(
            f"Imbalanced classes: {smallest} has {boxes[smallest]} training boxes, {largest} "
            f"{boxes[largest]} (ratio {ratio:.3f}). The rare class may never be predicted; "
            f"collect more of it, or oversample the images that contain it."
        )
    few = [f"{name} ({n})" for name, n in images.items() if 0 < n < FEW_IMAGES_PER_CLASS]
    if few:
        report.warnings.append(
            f"Few training images for: {', '.join(few)} (fewer than {FEW_IMAGES_PER_CLASS} "
            f"each). Detection transformers learn slowly from small datasets: expect many epochs "
            f"(100+), and more data if class_error stays high."
        )
    for split_name, stats in classes.items():
        missing = [
            name
            for name, count in stats.boxes_per_class.items()
            if split_name != "train" and count and not boxes[name]
        ]
        if missing:
            report.warnings.append(
                f"The {split_name} split has classes that training never shows: "
                f"{', '.join(missing)}; their AP will be 0. Check the label map and the split."
            )


def _check_batch_and_learning_rates(
    report: PreflightReport, args: TrainingArguments, family_recipe: Recipe, frozen: bool
) -> None:
    batch = effective_batch_size(args)
    lr, lr_backbone = args.learning_rate, getattr(args, "lr_backbone", args.learning_rate)
    scaled = DETR_LEARNING_RATE * batch / DETR_BATCH_SIZE  # linear scaling of the recipe
    report.stats["batch"] = {
        "per_device": args.per_device_train_batch_size,
        "processes": args.world_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "effective": batch,
        "learning_rate": lr,
        "lr_backbone": lr_backbone,
        "recipe_learning_rate_linearly_scaled": scaled,
    }
    backbone = "backbone frozen" if frozen else f"lr_backbone {lr_backbone:g}"
    report.summary["batch and lr"] = (
        f"effective batch {batch} ({args.per_device_train_batch_size} per device x "
        f"{plural(args.world_size, 'process')} x {args.gradient_accumulation_steps} accumulation); "
        f"learning_rate {lr:g}, {backbone} (DETR: {DETR_LEARNING_RATE:g} / "
        f"{DETR_LR_BACKBONE:g} at batch {DETR_BATCH_SIZE})"
    )
    recipe = (
        f"DETR trains at {DETR_LEARNING_RATE:g} (backbone {DETR_LR_BACKBONE:g}) with a batch "
        f"of {DETR_BATCH_SIZE}; scaled linearly that is {scaled:.2g} at batch {batch}"
    )
    highest = DETR_LEARNING_RATE * max(1.0, batch / DETR_BATCH_SIZE) * LR_TOLERANCE
    if lr > highest:
        report.warnings.append(
            f"learning_rate {lr:g} is high for an effective batch of {batch} ({recipe}). "
            f"Expect a diverging loss (NaN) or a class_error that does not fall; try "
            f"--learning_rate {DETR_LEARNING_RATE * max(1.0, batch / DETR_BATCH_SIZE):g}."
        )
    elif lr < scaled / LR_TOLERANCE:
        report.notes.append(
            f"learning_rate {lr:g} is low for an effective batch of {batch} ({recipe}); "
            f"training may need many more steps."
        )
    elif batch < DETR_BATCH_SIZE and lr > scaled * LR_TOLERANCE:
        report.notes.append(
            f"{recipe}; fine-tuning usually keeps {DETR_LEARNING_RATE:g} at small batches "
            f"thanks to gradient clipping, but lower learning_rate if the loss spikes."
        )
    # A faster backbone is a mistake for most families, but the recipe of some (LW-DETR's and
    # RF-DETR's ViT encoders: 1.5e-4 against 1e-4) trains it so.
    if not frozen and lr_backbone > lr and family_recipe.lr_backbone <= family_recipe.learning_rate:
        report.warnings.append(
            f"lr_backbone {lr_backbone:g} is higher than learning_rate {lr:g}: the pretrained "
            f"backbone should learn about 10x slower than the transformer (this family's "
            f"recipe: {family_recipe.lr_backbone:g} vs {family_recipe.learning_rate:g})."
        )
    if not args.max_grad_norm or args.max_grad_norm > 1:
        report.notes.append(
            f"max_grad_norm {args.max_grad_norm:g}: DETR clips gradients at 0.1, which keeps "
            f"its training stable; without it the loss diverges more easily."
        )
    check_after = getattr(args, "not_learning_check_after", 0.0)
    if not 0 <= check_after <= 1:
        report.errors.append(
            f"not_learning_check_after must be a share of training between 0 and 1, "
            f"got {check_after}."
        )
