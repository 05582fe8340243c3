"""Build the small pretrained DETR-family model that the offline demo starts from.

Why: a DETR trained from random weights learns far too slowly on a CPU for a demo, and with
transformers' frozen BatchNorm it does not learn classes at all (a frozen BatchNorm with
random-init statistics is the identity, so the backbone has no normalization; see
``/work/shared/notes/tiny-detr-on-cpu.md``). This script therefore pretrains a tiny DETR with
*trainable* ``nn.BatchNorm2d`` in the backbone on synthetic shapes of classes that are disjoint
from :data:`hf_detr_ft.data.synthetic.DEMO_CLASSES`, then copies the learned BatchNorm weight, bias
and running statistics back into transformers' ``DetrFrozenBatchNorm2d`` modules, so that the
saved checkpoint is an ordinary ``DetrForObjectDetection`` checkpoint (safetensors, fp32) plus
its ``DetrImageProcessor``. The demo then swaps the class head for its own classes and
fine-tunes, exactly like a user fine-tuning facebook/detr-resnet-50 on their data.

How the shipped checkpoint ``hf_detr_ft/assets/demo_detr/`` was made (2 shared CPU cores,
torch 2.14.1, transformers 5.24), in two stages::

    # 1. a DETR with trainable BatchNorm learns the backbone (30 min)
    python scripts/make_demo_checkpoint.py --minutes 30 --output /tmp/demo_stage1
    # 2. a Conditional DETR on that backbone learns the transformer (50 min, 1 thread)
    python scripts/make_demo_checkpoint.py --family conditional_detr \
        --init-backbone /tmp/demo_stage1 --minutes 50 --threads 1 \
        --output hf_detr_ft/assets/demo_detr
    # 3. for the demo's fine-tuning: "focal_alpha": 0.45 in its config.json (docs/demo.md)

Stage 1 (the demo's checkpoint until 2026-12-02; git history has it) made 4,945 steps of 16
images under a load average of 3-6 and reached mAP@[.5:.95] 0.208 / mAP50 0.440 on 200
held-out images of the pretraining classes; continuing that DETR for 30 more minutes reached
only 0.371 / 0.655. Stage 2 made 5,538 steps (load average 2-7): held-out mAP50 0.052 after
10 min, 0.529 after 20, 0.851 after 30, 0.906 after 40 and **mAP 0.736 / mAP50 0.920** at the
end; identical after re-freezing BatchNorm (max logit change 1e-6) and after reloading the
saved checkpoint. 4.9 MB (1.21 M parameters, fp32). Conditional DETR (sigmoid focal classes,
conditional cross-attention) converges several times faster than DETR, which is what a CPU
budget needs; its boxes and classes then fine-tune to the demo's classes in minutes.

``--family`` picks the family (``detr`` or ``conditional_detr``), ``--num-queries`` the
object queries (10: the demo's images hold 1-3 objects), ``--init-backbone CHECKPOINT``
starts from the backbone of an earlier checkpoint of this script and ``--init-from
CHECKPOINT`` continues training a whole checkpoint of the same family and size.

Preprocessing is what the library does: each image goes through ``DetrImageProcessor`` on its
own (``do_pad=False``) with its COCO-detection annotations, which gives normalized pixels and
normalized (cx, cy, w, h) boxes; a batch is then padded with zeros at the bottom/right and gets
a ``pixel_mask``. Augmentation is a random flip / 90-degree rotation of the preprocessed tensor
(all eight symmetries of the square; every shape kind stays the same kind under them).

Note on transformers 5.23: ``DetrConvEncoder`` freezes backbone parameters whose name lacks
"stage.1/2/3", but the HF ResNet backbone names them ``encoder.stages.N``, so *every* backbone
parameter ends up frozen when a model is built from a config. This script re-enables them all
for pretraining. (``from_pretrained`` on the saved checkpoint, by contrast, was measured to
leave every backbone parameter trainable.)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForObjectDetection,
    ConditionalDetrConfig,
    ConditionalDetrForObjectDetection,
    ConditionalDetrImageProcessor,
    DetrConfig,
    DetrForObjectDetection,
    DetrImageProcessor,
    ResNetConfig,
)
from transformers.models.conditional_detr import modeling_conditional_detr  # noqa: E402
from transformers.models.detr import modeling_detr  # noqa: E402

from hf_detr_ft.data.synthetic import DEMO_CLASSES, SHAPES, render_shapes_image  # noqa: E402

#: Shape kinds the checkpoint is pretrained on: everything the generator draws except the
#: demo's classes, so that the demo really learns new classes.
PRETRAIN_CLASSES: tuple[str, ...] = tuple(s for s in SHAPES if s not in DEMO_CLASSES)

DEFAULT_OUTPUT = REPO_ROOT / "hf_detr_ft" / "assets" / "demo_detr"

#: Shape generator settings shared by pretraining and the demo.
IMAGE_SIZE = 128

#: Loss terms printed while training (the auxiliary-decoder-layer terms are left out).
LOGGED = ("loss", "loss_ce", "loss_bbox", "loss_giou")
MIN_SIZE, MAX_SIZE = 16, 40


#: The two families the script can build: (config, model, image processor, modeling module).
#: Conditional DETR (sigmoid focal classes, conditional cross-attention) converges several
#: times faster than DETR, which is what a short CPU budget needs.
FAMILIES = {
    "detr": (DetrConfig, DetrForObjectDetection, DetrImageProcessor, modeling_detr),
    "conditional_detr": (
        ConditionalDetrConfig,
        ConditionalDetrForObjectDetection,
        ConditionalDetrImageProcessor,
        modeling_conditional_detr,
    ),
}


def build_model(
    id2label: dict[int, str], family: str = "detr", num_queries: int = 10
) -> DetrForObjectDetection:
    """The tiny detector: a 3-stage basic-block ResNet (stride 16) and a 2+2-layer transformer.

    Stride 16 instead of DETR's 32 gives an 8x8 feature map for 128 px images, which the
    small objects (16-40 px) need for precise boxes; the whole model is ~1 M parameters and a
    training step of 16 images takes ~0.1 s on 2 CPU cores.
    """
    backbone_config = ResNetConfig(
        num_channels=3,
        embedding_size=32,
        hidden_sizes=[48, 96, 192],
        depths=[1, 1, 1],
        layer_type="basic",
        out_features=["stage3"],
    )
    config_class, model_class, _, _ = FAMILIES[family]
    config = config_class(
        backbone_config=backbone_config,
        d_model=96,
        encoder_layers=2,
        decoder_layers=2,
        encoder_ffn_dim=192,
        decoder_ffn_dim=192,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        num_queries=num_queries,
        dropout=0.0,
        auxiliary_loss=True,
        id2label=dict(id2label),
        label2id={v: k for k, v in id2label.items()},
    )
    return model_class(config)


def make_processor(image_size: int = IMAGE_SIZE, family: str = "detr") -> DetrImageProcessor:
    """The checkpoint's image processor: resize to ``image_size``, ImageNet mean/std."""
    processor_class = FAMILIES[family][2]
    return processor_class(size={"shortest_edge": image_size, "longest_edge": image_size})


def copy_backbone(model: nn.Module, checkpoint: Path) -> None:
    """Start from the backbone (weights and frozen BatchNorm statistics) of an earlier
    checkpoint with the same ResNet, e.g. the DETR this script made before: its features of
    filled shapes are what the new model needs, and they cost most of a pretraining budget."""
    source = AutoModelForObjectDetection.from_pretrained(checkpoint)
    model.model.backbone.load_state_dict(source.model.backbone.state_dict())


def unfreeze_batchnorm(module: nn.Module) -> None:
    """Replace every frozen BatchNorm under ``module`` by a trainable BatchNorm2d."""
    frozen = (
        modeling_detr.DetrFrozenBatchNorm2d,
        modeling_conditional_detr.ConditionalDetrFrozenBatchNorm2d,
    )
    for name, child in module.named_children():
        if isinstance(child, frozen):
            bn = nn.BatchNorm2d(child.weight.numel())
            with torch.no_grad():
                bn.weight.copy_(child.weight)
                bn.bias.copy_(child.bias)
                bn.running_mean.copy_(child.running_mean)
                bn.running_var.copy_(child.running_var)
            module._modules[name] = bn
        else:
            unfreeze_batchnorm(child)


def refreeze_batchnorm(module: nn.Module, family: str = "detr") -> None:
    """Copy trained BatchNorm2d weights and statistics back into the family's frozen BatchNorm."""
    with torch.no_grad():
        FAMILIES[family][3].replace_batch_norm(module)


# --------------------------------------------------------------------------- data


def preprocess(
    processor: DetrImageProcessor,
    image,
    objects: Sequence[tuple[int, list[float]]],
    image_id: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One image through the processor, as the library does (no padding; 0-based labels)."""
    annotations = {
        "image_id": image_id,
        "annotations": [
            {"bbox": box, "category_id": cls, "area": box[2] * box[3], "iscrowd": 0}
            for cls, box in objects
        ],
    }
    enc = processor(images=image, annotations=annotations, do_pad=False, return_tensors="pt")
    labels = enc["labels"][0]
    return enc["pixel_values"][0], {
        "class_labels": labels["class_labels"].long(),
        "boxes": labels["boxes"].float(),
    }


def render_pool(
    n: int,
    classes: Sequence[str],
    processor: DetrImageProcessor,
    seed: int,
    max_objects: int = 3,
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], list]:
    """Render and preprocess ``n`` images; returns pixels, targets and the raw annotations."""
    rng = np.random.default_rng(seed)
    pixels, targets, raw = [], [], []
    for i in range(n):
        image, objects = render_shapes_image(
            rng,
            classes,
            image_size=IMAGE_SIZE,
            max_objects=max_objects,
            min_size=MIN_SIZE,
            max_size=MAX_SIZE,
        )
        pv, tgt = preprocess(processor, image, objects, image_id=i)
        pixels.append(pv)
        targets.append(tgt)
        raw.append((image, objects))
    return pixels, targets, raw


def augment(
    pixels: torch.Tensor, target: dict[str, torch.Tensor], gen: torch.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Random horizontal flip, vertical flip and transpose (the 8 symmetries of a square)."""
    boxes = target["boxes"].clone()  # normalized cx, cy, w, h
    flags = torch.randint(0, 2, (3,), generator=gen).tolist()
    if flags[0]:
        pixels = pixels.flip(-1)
        boxes[:, 0] = 1.0 - boxes[:, 0]
    if flags[1]:
        pixels = pixels.flip(-2)
        boxes[:, 1] = 1.0 - boxes[:, 1]
    if flags[2]:
        pixels = pixels.transpose(-1, -2)
        boxes = boxes[:, [1, 0, 3, 2]]
    return pixels, {"class_labels": target["class_labels"], "boxes": boxes}


def collate(pixels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a list of (3, H, W) tensors with zeros at the bottom/right; build the pixel mask."""
    h = max(p.shape[1] for p in pixels)
    w = max(p.shape[2] for p in pixels)
    batch = torch.zeros(len(pixels), 3, h, w)
    mask = torch.zeros(len(pixels), h, w, dtype=torch.long)
    for i, p in enumerate(pixels):
        batch[i, :, : p.shape[1], : p.shape[2]] = p
        mask[i, : p.shape[1], : p.shape[2]] = 1
    return batch, mask


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_map(
    model: DetrForObjectDetection,
    processor: DetrImageProcessor,
    pixels: Sequence[torch.Tensor],
    raw: Sequence[tuple[object, list[tuple[int, list[float]]]]],
    num_classes: int,
    batch_size: int = 32,
) -> dict[str, float]:
    """COCO mAP@[.5:.95] and mAP50 (pycocotools) of ``model`` on preprocessed images.

    Category ids in the in-memory COCO ground truth are ``label + 1`` as in a Roboflow export.
    Every query's best non-"no object" class is kept as a detection (threshold 0), as usual for
    mAP.
    """
    was_training = model.training
    model.eval()
    gt = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1, "name": str(i)} for i in range(num_classes)],
    }
    dets = []
    for i, (image, objects) in enumerate(raw):
        width, height = image.size
        gt["images"].append({"id": i, "width": width, "height": height})
        for cls, box in objects:
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": i,
                    "category_id": cls + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    for start in range(0, len(pixels), batch_size):
        chunk = list(pixels[start : start + batch_size])
        batch, mask = collate(chunk)
        outputs = model(pixel_values=batch, pixel_mask=mask)
        sizes = [(raw[start + k][0].size[1], raw[start + k][0].size[0]) for k in range(len(chunk))]
        results = processor.post_process_object_detection(
            outputs, threshold=0.0, target_sizes=sizes
        )
        for k, res in enumerate(results):
            for score, label, box in zip(
                res["scores"].tolist(), res["labels"].tolist(), res["boxes"].tolist(), strict=True
            ):
                x0, y0, x1, y1 = box
                dets.append(
                    {
                        "image_id": start + k,
                        "category_id": int(label) + 1,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": float(score),
                    }
                )
    model.train(was_training)
    if not dets:
        return {"map": 0.0, "map_50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map": float(ev.stats[0]), "map_50": float(ev.stats[1])}


# --------------------------------------------------------------------------- training


def lr_factor(step: int, fraction_done: float, warmup_steps: int = 200) -> float:
    """Linear warm-up, then cosine decay to 5% over the wall-clock budget."""
    warm = min(1.0, (step + 1) / warmup_steps)
    cosine = 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, fraction_done)))
    return warm * cosine


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-clock training budget")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--pool-size", type=int, default=6000, help="distinct training images")
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--eval-every", type=float, default=5.0, help="minutes between evals")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="detr")
    parser.add_argument("--num-queries", type=int, default=10)
    parser.add_argument(
        "--init-backbone", type=Path, help="start from this checkpoint's backbone (same ResNet)"
    )
    parser.add_argument(
        "--init-from", type=Path, help="continue training this checkpoint (same family and size)"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()

    processor = make_processor(family=args.family)
    id2label = dict(enumerate(PRETRAIN_CLASSES))
    model = build_model(id2label, args.family, args.num_queries)
    if args.init_backbone:
        copy_backbone(model, args.init_backbone)
    if args.init_from:
        model.load_state_dict(
            AutoModelForObjectDetection.from_pretrained(args.init_from).state_dict()
        )
    unfreeze_batchnorm(model.model.backbone)
    for p in model.parameters():
        p.requires_grad_(True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"classes {PRETRAIN_CLASSES}; {n_params / 1e6:.2f} M parameters", flush=True)

    train_px, train_tg, _ = render_pool(
        args.pool_size, PRETRAIN_CLASSES, processor, seed=args.seed, max_objects=4
    )
    eval_px, _, eval_raw = render_pool(
        args.eval_images, PRETRAIN_CLASSES, processor, seed=args.seed + 10_000
    )
    print(
        f"rendered {len(train_px)} train / {len(eval_px)} eval images in {time.time() - t0:.0f} s",
        flush=True,
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    budget = args.minutes * 60.0
    t_start = time.time()
    next_eval = args.eval_every * 60.0
    step, running = 0, {}
    model.train()
    while True:
        elapsed = time.time() - t_start
        if elapsed >= budget:
            break
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(step, elapsed / budget)
        idx = torch.randint(0, len(train_px), (args.batch_size,), generator=gen).tolist()
        items = [augment(train_px[i], train_tg[i], gen) for i in idx]
        batch, mask = collate([px for px, _ in items])
        out = model(pixel_values=batch, pixel_mask=mask, labels=[t for _, t in items])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        step += 1
        for k, v in {"loss": out.loss, **out.loss_dict}.items():
            if k in LOGGED:
                running[k] = running.get(k, 0.0) + v.item()
        if step % 200 == 0:
            parts = " ".join(f"{k} {running[k] / 200:.3f}" for k in LOGGED if k in running)
            print(
                f"step {step} {elapsed / 60:.1f} min lr {optimizer.param_groups[0]['lr']:.2e} "
                f"{parts}",
                flush=True,
            )
            running = {}
        if elapsed >= next_eval:
            m = evaluate_map(model, processor, eval_px, eval_raw, len(PRETRAIN_CLASSES))
            print(
                f"  eval @ {elapsed / 60:.1f} min, step {step}: mAP {m['map']:.3f} "
                f"mAP50 {m['map_50']:.3f}",
                flush=True,
            )
            next_eval += args.eval_every * 60.0

    train_minutes = (time.time() - t_start) / 60
    model.eval()
    m_bn = evaluate_map(model, processor, eval_px, eval_raw, len(PRETRAIN_CLASSES))
    probe, probe_mask = collate(eval_px[:8])
    with torch.no_grad():
        before = model(pixel_values=probe, pixel_mask=probe_mask).logits
        refreeze_batchnorm(model.model.backbone, args.family)
        after = model(pixel_values=probe, pixel_mask=probe_mask).logits
    print(f"re-froze BatchNorm; max logit change {(after - before).abs().max().item():.2e}")
    m_frozen = evaluate_map(model, processor, eval_px, eval_raw, len(PRETRAIN_CLASSES))
    print(
        f"trained {step} steps in {train_minutes:.1f} min; held-out mAP {m_bn['map']:.3f} "
        f"(after re-freezing BatchNorm: {m_frozen['map']:.3f}, mAP50 {m_frozen['map_50']:.3f})",
        flush=True,
    )

    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)

    # Reload as an ordinary checkpoint to prove it round-trips.
    reloaded = AutoModelForObjectDetection.from_pretrained(args.output)
    m_reload = evaluate_map(reloaded, processor, eval_px, eval_raw, len(PRETRAIN_CLASSES))
    size_mb = sum(f.stat().st_size for f in args.output.iterdir()) / 1e6
    print(
        f"saved to {args.output} ({size_mb:.1f} MB); reloaded held-out "
        f"mAP {m_reload['map']:.3f} mAP50 {m_reload['map_50']:.3f}; "
        f"total {(time.time() - t0) / 60:.1f} min",
        flush=True,
    )


if __name__ == "__main__":
    main()
