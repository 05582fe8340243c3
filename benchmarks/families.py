"""A row per DETR-family model type, and RT-DETR ours vs the stock recipe.

Each type's smallest published architecture, trained and evaluated by hf-detr-ft's own path at
one common resolution; then RT-DETR trained by ours and by the stock recipe, in turns.

``python benchmarks/families.py`` (or ``benchmarks/run.py --families``); ``--smoke`` runs the
same code on the tests' tiny models (``tests/tiny_families.py``) in seconds.

* **Models.** :data:`ARCHITECTURES` rebuilds each type's smallest published checkpoint from its
  config (random weights; no backbone is pretrained, nothing is downloaded) and saves it with
  its family's image processor, as the checkpoint ships it. Each row prints the parameter
  count built here next to the published one.
* **Our side.** ``workloads.our_trainer``: :class:`~hf_detr_ft.training.trainer.DetrTrainer`
  with the family's recipe, :class:`~hf_detr_ft.pipeline.transforms.DetrTransform` (no
  augmentation, as every timed training here) and ``collate_fn``, the processor from
  :func:`~hf_detr_ft.models.loading.load_image_processor` at ``size``: shortest = longest edge
  ``size`` for the variable-size families (BCCD's 640x480 photos become 320x240 at 320),
  ``size x size`` for the fixed-size ones.
* **Rates.** Per model, per repeat: a fresh Trainer, ``warmup`` training steps untimed, then
  ``steps`` timed (images/s = batch / the median step's wall time: BCCD's photos all have one
  size, so every step has the same shape), then one ``evaluate()`` over the same images
  (images / its wall time; post-processing and COCO metrics included). The repeats run in
  turns over all the models (model 1, model 2, ..., model 1, ...), so the machine's drift
  meets every row alike; medians of the repeats are reported.
* **Ours vs stock** (:func:`head_to_head`): the transformers object-detection example's recipe
  (``stock.py``: ``AutoImageProcessor`` from the checkpoint with ``max_height``/``max_width``
  ``size``, padded to ``size x size``; ``transformers.Trainer``, its collate, one learning
  rate, 0 workers) against ours on the same saved model, trained in turns, rates from median
  steps as above; then evaluation (the example's ``compute_metrics`` against ours) and
  prediction (``pipeline("object-detection")`` image by image against ``hf_detr_ft.predict``)
  in turns (:func:`inference_head_to_head`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import StepTimer, padded_fraction, release_freed_memory  # noqa: E402
from stock import (  # noqa: E402
    StockTransform,
    stock_arguments,
    stock_compute_metrics,
    stock_trainer,
)
from transformers import (  # noqa: E402
    AutoImageProcessor,
    AutoModelForObjectDetection,
    ConditionalDetrConfig,
    ConditionalDetrImageProcessor,
    DabDetrConfig,
    DeformableDetrConfig,
    DeformableDetrImageProcessor,
    Deimv2Config,
    DetrConfig,
    DetrImageProcessor,
    DFineConfig,
    HGNetV2Config,
    LwDetrConfig,
    LwDetrViTConfig,
    PretrainedConfig,
    PrinterCallback,
    ResNetConfig,
    RfDetrConfig,
    RfDetrDinov2Config,
    RfDetrImageProcessor,
    RTDetrConfig,
    RTDetrImageProcessor,
    RTDetrResNetConfig,
    RTDetrV2Config,
    TableTransformerConfig,
    YolosConfig,
    YolosImageProcessor,
    pipeline,
)
from transformers.image_processing_utils import BaseImageProcessor  # noqa: E402
from workloads import bccd_images, image_files, our_trainer  # noqa: E402

from hf_detr_ft.inference.predict import predict  # noqa: E402
from hf_detr_ft.models.families import FAMILIES, family_of  # noqa: E402

BATCH = 2
#: Per mode: the common input size, untimed and timed training steps per repeat, repeats (in
#: turns over the models), and the head-to-head's untimed and timed steps per round, rounds.
SIZES = {
    "full": {
        "size": 320,
        "warmup": 2,
        "steps": 6,
        "repeats": 3,
        "h2h_warmup": 2,
        "h2h_steps": 8,
        "h2h_rounds": 5,
        "h2h_eval_images": 32,
        "h2h_predict_images": 16,
    },
    "quick": {
        "size": 320,
        "warmup": 1,
        "steps": 2,
        "repeats": 1,
        "h2h_warmup": 1,
        "h2h_steps": 3,
        "h2h_rounds": 1,
        "h2h_eval_images": 8,
        "h2h_predict_images": 4,
    },
    "smoke": {
        "size": 64,
        "warmup": 0,
        "steps": 1,
        "repeats": 1,
        "h2h_warmup": 0,
        "h2h_steps": 1,
        "h2h_rounds": 1,
        "h2h_eval_images": 4,
        "h2h_predict_images": 2,
    },
}
#: The types of the ours-vs-stock comparison, in the order they run.
HEAD_TO_HEAD_TYPES = ("rt_detr",)


@dataclass(frozen=True)
class Architecture:
    """The smallest published architecture of one model type."""

    model_type: str
    name: str
    #: The published checkpoint whose architecture :attr:`config` rebuilds.
    checkpoint: str
    #: Its parameter count as published, in millions.
    published_params_m: float
    #: Where the architecture and the count come from, and what is not certain.
    source: str
    #: ``labels`` (``id2label``, ``label2id``) -> the config, random weights.
    config: Callable[[dict[str, Any]], PretrainedConfig]
    #: The image processor the checkpoint ships (its size is overridden by our path).
    processor: Callable[[], BaseImageProcessor]


def _resnet18(out_features: list[str]) -> ResNetConfig:
    """ResNet-18 as a transformers ``ResNetConfig`` (timm's ``resnet18`` has the same layers)."""
    return ResNetConfig(
        embedding_size=64,
        hidden_sizes=[64, 128, 256, 512],
        depths=[2, 2, 2, 2],
        layer_type="basic",
        out_features=out_features,
    )


def _rt_detr_r18vd(config_class: type, labels: dict[str, Any], **extra: Any) -> PretrainedConfig:
    """RT-DETR(v2) r18vd: ResNet-18-vd (basic blocks, 2-2-2-2, the "vd" 3-conv stem and
    avg-pool shortcuts of ``RTDetrResNet``), hybrid encoder on 128/256/512 channels with
    expansion 0.5, 3 decoder layers; the rest RT-DETR's defaults (d_model 256, 300 queries,
    100 denoising queries)."""
    backbone = RTDetrResNetConfig(
        embedding_size=64,
        hidden_sizes=[64, 128, 256, 512],
        depths=[2, 2, 2, 2],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    return config_class(
        backbone_config=backbone,
        encoder_in_channels=[128, 256, 512],
        hidden_expansion=0.5,
        decoder_layers=3,
        **extra,
        **labels,
    )


def _hgnet_v2(stages: list[list[Any]], out_indices: list[int]) -> HGNetV2Config:
    """An HGNetV2 from the original repositories' stage table: per stage in, mid and out
    channels, blocks, downsample, light block, kernel size, layers; stem 3-16-16 (B0 and the
    DEIMv2 variants below it); learnable affine blocks (``use_lab``) as D-FINE and DEIMv2."""
    column = list(zip(*stages))
    return HGNetV2Config(
        stem_channels=[3, 16, 16],
        stage_in_channels=list(column[0]),
        stage_mid_channels=list(column[1]),
        stage_out_channels=list(column[2]),
        stage_num_blocks=list(column[3]),
        stage_downsample=list(column[4]),
        stage_light_block=list(column[5]),
        stage_kernel_size=list(column[6]),
        stage_numb_of_layers=list(column[7]),
        hidden_sizes=list(column[2]),
        depths=list(column[7]),
        out_indices=out_indices,
        use_learnable_affine_block=True,
    )


#: HGNetV2-B0's stages (D-FINE N and S, DEIMv2 N); DEIMv2-Atto's backbone is its first three
#: with a 256-channel, one-block, 3x3 third stage.
_HGNET_B0 = [
    [16, 16, 64, 1, False, False, 3, 3],
    [64, 32, 256, 1, True, False, 3, 3],
    [256, 64, 512, 2, True, True, 5, 3],
    [512, 128, 1024, 1, True, True, 5, 3],
]
_HGNET_ATTO = [*_HGNET_B0[:2], [256, 64, 256, 1, True, True, 3, 3]]


def _d_fine_nano(labels: dict[str, Any]) -> DFineConfig:
    """D-FINE-N (``dfine_hgnetv2_n_coco.yml``): HGNetV2-B0 stages 3-4 (strides 16, 32), hybrid
    encoder 128 wide (FFN 512, expansion 0.34, depth 0.5), decoder 128 wide, 3 layers,
    2 levels of 6 points, FFN 512, 300 queries."""
    return DFineConfig(
        backbone_config=_hgnet_v2(_HGNET_B0, [3, 4]),
        encoder_in_channels=[512, 1024],
        feat_strides=[16, 32],
        encoder_hidden_dim=128,
        encode_proj_layers=[1],
        encoder_ffn_dim=512,
        hidden_expansion=0.34,
        depth_mult=0.5,
        d_model=128,
        decoder_in_channels=[128, 128],
        num_feature_levels=2,
        decoder_n_points=[6, 6],
        decoder_layers=3,
        decoder_ffn_dim=512,
        **labels,
    )


def _deimv2_atto(labels: dict[str, Any]) -> Deimv2Config:
    """DEIMv2-Atto (``deimv2_hgnetv2_atto_coco.yml``): HGNetV2-Atto stage 3 (stride 16),
    LiteEncoder 64 wide (expansion 0.34, depth 0.5), decoder 64 wide, 3 layers, 2 levels
    (16, 32) of 4 and 2 points, FFN 160, 100 queries, shared box head, no gateway; 320x320."""
    return Deimv2Config(
        backbone_config=_hgnet_v2(_HGNET_ATTO, [3]),
        encoder_type="lite",
        encoder_in_channels=[256],
        feat_strides=[16, 32],
        encoder_hidden_dim=64,
        encode_proj_layers=[0],
        hidden_expansion=0.34,
        depth_mult=0.5,
        d_model=64,
        decoder_in_channels=[64, 64],
        num_feature_levels=2,
        decoder_n_points=[4, 2],
        decoder_layers=3,
        decoder_ffn_dim=160,
        decoder_activation_function="silu",
        num_queries=100,
        share_bbox_head=True,
        use_gateway=False,
        **labels,
    )


def _lw_detr_tiny(labels: dict[str, Any]) -> LwDetrConfig:
    """LW-DETR-tiny (``scripts/lwdetr_tiny_coco_train.sh``): ViT-tiny (192 wide, 12 heads,
    6 layers, windowed blocks 0/2/4, outputs of layers 1/3/5), P4 projector, 3 decoder layers,
    2 points, 100 queries x 13 groups."""
    backbone = LwDetrViTConfig(
        hidden_size=192,
        num_hidden_layers=6,
        num_attention_heads=12,
        mlp_ratio=4,
        image_size=1024,
        window_block_indices=[0, 2, 4],
        out_indices=[1, 3, 5],
        num_windows=16,
    )
    return LwDetrConfig(
        backbone_config=backbone,
        projector_scale_factors=[1.0],
        num_queries=100,
        decoder_n_points=2,
        decoder_layers=3,
        **labels,
    )


def _rf_detr_nano(labels: dict[str, Any]) -> RfDetrConfig:
    """RF-DETR-nano (``rfdetr/config.py`` ``RFDETRNanoConfig``): windowed DINOv2-small
    (384 wide, 12 layers, 6 heads, patch 16, 2x2 windows, outputs of layers 3/6/9/12, position
    embeddings for 384 px), P4 projector, 2 decoder layers, 2 points, 300 queries x 13 groups."""
    backbone = RfDetrDinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        patch_size=16,
        image_size=384,
        num_windows=2,
        out_features=["stage3", "stage6", "stage9", "stage12"],
    )
    return RfDetrConfig(
        backbone_config=backbone, decoder_layers=2, decoder_n_points=2, num_queries=300, **labels
    )


#: One row per model type, in the order of :data:`~hf_detr_ft.models.families.FAMILIES`.
ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        "detr",
        "DETR-R50",
        "facebook/detr-resnet-50",
        41.3,
        "DetrConfig() defaults (timm resnet50, 6+6 layers, 100 queries); 41.3M: model card",
        lambda labels: DetrConfig(**labels),
        DetrImageProcessor,
    ),
    Architecture(
        "table-transformer",
        "Table Transformer (R18)",
        "microsoft/table-transformer-detection",
        28.8,
        "ResNet-18 (as transformers ResNet), 6+6 layers, 15 queries, from the checkpoint's "
        "config as remembered (backbone resnet18, num_queries 15); 28.8M: its Hub page",
        lambda labels: TableTransformerConfig(
            backbone_config=_resnet18(["stage4"]), num_queries=15, **labels
        ),
        DetrImageProcessor,
    ),
    Architecture(
        "conditional_detr",
        "Conditional DETR-R50",
        "microsoft/conditional-detr-resnet-50",
        43.5,
        "ConditionalDetrConfig() defaults (timm resnet50, 300 queries); 43.5M: model card table "
        "(a mirror; 44M in the paper)",
        lambda labels: ConditionalDetrConfig(**labels),
        ConditionalDetrImageProcessor,
    ),
    Architecture(
        "dab-detr",
        "DAB-DETR-R50",
        "IDEA-Research/dab-detr-resnet-50",
        44.0,
        "DabDetrConfig() defaults (timm resnet50, 300 queries); 44M: DAB-DETR paper (Table 2)",
        lambda labels: DabDetrConfig(**labels),
        ConditionalDetrImageProcessor,
    ),
    Architecture(
        "deformable_detr",
        "Deformable DETR-R50",
        "SenseTime/deformable-detr",
        40.0,
        "DeformableDetrConfig() defaults (timm resnet50, 4 levels, 300 queries, no box "
        "refinement); 40M: Deformable DETR paper (Table 1)",
        lambda labels: DeformableDetrConfig(**labels),
        DeformableDetrImageProcessor,
    ),
    Architecture(
        "yolos",
        "YOLOS-Ti",
        "hustvl/yolos-tiny",
        6.5,
        "ViT-tiny: hidden 192, 12 layers, 3 heads, MLP 768, patch 16, 100 detection tokens, "
        "position embeddings for 800x1333 (interpolated); 6.5M: YOLOS paper / model card",
        lambda labels: YolosConfig(
            hidden_size=192,
            num_hidden_layers=12,
            num_attention_heads=3,
            intermediate_size=768,
            image_size=[800, 1333],
            patch_size=16,
            num_detection_tokens=100,
            use_mid_position_embeddings=False,
            **labels,
        ),
        YolosImageProcessor,
    ),
    Architecture(
        "rt_detr",
        "RT-DETR-R18vd",
        "PekingU/rtdetr_r18vd",
        20.0,
        "reconstructed from the original rtdetr_r18vd config (PResNet-18vd, HybridEncoder "
        "128/256/512 expansion 0.5, 3 decoder layers) on transformers' RT-DETR defaults, not "
        "read from the Hub config; 20M: RT-DETR model zoo",
        lambda labels: _rt_detr_r18vd(RTDetrConfig, labels),
        RTDetrImageProcessor,
    ),
    Architecture(
        "rt_detr_v2",
        "RT-DETRv2-R18vd",
        "PekingU/rtdetr_v2_r18vd",
        20.0,
        "as RT-DETR-R18vd with RT-DETRv2's decoder (3 levels, 4 points, offset scale 0.5, "
        "transformers' defaults); 20M: RT-DETRv2 model zoo",
        lambda labels: _rt_detr_r18vd(RTDetrV2Config, labels, decoder_n_levels=3),
        RTDetrImageProcessor,
    ),
    Architecture(
        "d_fine",
        "D-FINE-N",
        "ustc-community/dfine-nano-coco",
        4.0,
        "HGNetV2-B0, from the original dfine_hgnetv2_n_coco.yml as remembered; 4M: D-FINE "
        "README (3.8M in RF-DETR's comparison table)",
        _d_fine_nano,
        RTDetrImageProcessor,
    ),
    Architecture(
        "deimv2",
        "DEIMv2-Atto",
        "Intellindust/DEIMv2_HGNetv2_ATTO_COCO",
        0.49,
        "HGNetV2-Atto, deimv2_hgnetv2_atto_coco.yml (read) and transformers' conversion table "
        "(read); decoder heads 8 and reg_max 32 are transformers' defaults, not checked against "
        "the original base config; 0.49M: DEIMv2 README; the checkpoint id is not certain",
        _deimv2_atto,
        RTDetrImageProcessor,
    ),
    Architecture(
        "lw_detr",
        "LW-DETR-tiny",
        "AnnaZhang/lwdetr_tiny_60e_coco",
        12.1,
        "the original scripts/lwdetr_tiny_coco_train.sh (read: ViT-tiny 6 layers, windows "
        "0/2/4, outputs 1/3/5, P4, 3 decoder layers, 2 points, 100 queries x 13 groups); 12 "
        "heads: transformers' LW-DETR ViT default, not checked; 12.1M: LW-DETR README",
        _lw_detr_tiny,
        lambda: DeformableDetrImageProcessor(size={"height": 640, "width": 640}),
    ),
    Architecture(
        "rf_detr",
        "RF-DETR-nano",
        "Roboflow/rf-detr-nano",
        30.5,
        "rf-detr's RFDETRNanoConfig and RFDETRBaseConfig (read: dinov2_windowed_small, patch "
        "16, 2 windows, outputs 3/6/9/12, 2 decoder layers, 2 points, 300 queries, P4, 384 px); "
        "30.5M: RF-DETR README",
        _rf_detr_nano,
        lambda: RfDetrImageProcessor(size={"height": 384, "width": 384}),
    ),
)
BY_TYPE = {a.model_type: a for a in ARCHITECTURES}


def _tiny_families() -> Any:
    """The tests' tiny models (``tests/tiny_families.py``), for ``--smoke``."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import tiny_families

    return tiny_families


def save_family_model(
    model_type: str, class_names: list[str], folder: Path, *, tiny: bool = False
) -> tuple[Path, int]:
    """The model of ``model_type`` (its smallest published architecture, or the tests' tiny
    one), random weights (seed 0), saved once with its processor; returns the folder and the
    parameter count."""
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        if tiny:
            tiny_families = _tiny_families()
            config = tiny_families.tiny_config(model_type, class_names)
            processor = tiny_families.tiny_image_processor(model_type)
        else:
            id2label = dict(enumerate(class_names))
            labels = {"id2label": id2label, "label2id": {n: i for i, n in id2label.items()}}
            config = BY_TYPE[model_type].config(labels)
            processor = BY_TYPE[model_type].processor()
        model = AutoModelForObjectDetection.from_config(config)
        # Tied heads (DEIMv2's shared box head) share tensors: save them as copies.
        state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        model.save_pretrained(folder, state_dict=state)
        processor.save_pretrained(folder)
        (folder / "parameters.txt").write_text(str(sum(p.numel() for p in model.parameters())))
    return folder, int((folder / "parameters.txt").read_text())


def _measure_once(
    model_dir: Path, data, size: int, warmup: int, steps: int, output_dir: Path, trim: bool
) -> dict[str, Any]:
    """One repeat of one model: ``warmup`` + ``steps`` training steps (a fresh Trainer) and one
    evaluation of ``data``; ``trim``: from a trimmed heap (``measure.release_freed_memory``,
    half a second of ``gc.collect`` each: not in smoke runs)."""
    trainer = our_trainer(
        model_dir,
        data,
        size,
        output_dir,
        image_size=size,
        max_steps=warmup + steps,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
    )
    trainer.remove_callback(PrinterCallback)  # the Trainer's log lines, per step
    timer = StepTimer()
    trainer.add_callback(timer)
    if trim:
        release_freed_memory()
    trainer.train()
    timed = timer.durations()[warmup:]
    start = time.perf_counter()
    trainer.evaluate()
    eval_seconds = time.perf_counter() - start
    batch = next(iter(trainer.get_eval_dataloader()))
    return {
        # Every step has the same input shape, so the median step is a fair rate, and one
        # that a burst of other jobs on the shared cores does not move.
        "train_images_per_s": BATCH / statistics.median(timed),
        "step_seconds": timed,
        "eval_images_per_s": len(data) / eval_seconds,
        "input_size": list(batch["pixel_values"].shape[-2:]),
        "load_1min": os.getloadavg()[0],  # other jobs on the machine show here
    }


def families_section(mode: str, work: Path, types: list[str] | None = None) -> dict[str, Any]:
    """Training and evaluation images/s of every model type (see the module docstring)."""
    sizes = SIZES[mode]
    tiny = mode == "smoke"
    types = types or [t for family in FAMILIES for t in family.model_types]
    data = bccd_images((sizes["warmup"] + sizes["steps"]) * BATCH)
    names = data.features["objects"]["category"].feature.names
    models = {
        t: save_family_model(t, names, work / f"family-{t}{'-tiny' if tiny else ''}", tiny=tiny)
        for t in types
    }
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in types}
    for repeat in range(sizes["repeats"]):
        for model_type, (model_dir, _) in models.items():
            run = _measure_once(
                model_dir,
                data,
                sizes["size"],
                sizes["warmup"],
                sizes["steps"],
                work / "ours",
                trim=not tiny,
            )
            runs[model_type].append(run)
            print(
                f"  repeat {repeat + 1} {model_type:18} train {run['train_images_per_s']:6.2f}"
                f"  eval {run['eval_images_per_s']:6.2f} images/s",
                flush=True,
            )
    rows = {}
    for model_type, (_, params) in models.items():
        architecture = BY_TYPE[model_type]
        timed = runs[model_type]
        rows[model_type] = {
            "family": family_of(model_type).name,
            "model_type": model_type,
            "architecture": "tiny (tests)" if tiny else architecture.name,
            "checkpoint": architecture.checkpoint,
            "parameters_m": params / 1e6,
            "published_parameters_m": None if tiny else architecture.published_params_m,
            "input_size": timed[0]["input_size"],
            "train_images_per_s": statistics.median(r["train_images_per_s"] for r in timed),
            "eval_images_per_s": statistics.median(r["eval_images_per_s"] for r in timed),
            "repeats": timed,
        }
    _print_table(rows)
    return {"settings": {"mode": mode, "batch": BATCH, **sizes}, "rows": rows}


def _print_table(rows: dict[str, dict[str, Any]]) -> None:
    print(
        f"{'family':28} {'type':18} {'architecture':24} {'params M (published)':>21} {'input':>9} "
        f"{'train img/s':>11} {'eval img/s':>10}"
    )
    for row in rows.values():
        published = row["published_parameters_m"]
        params = f"{row['parameters_m']:.2f}" + (f" ({published:g})" if published else "")
        height, width = row["input_size"]
        print(
            f"{row['family']:28} {row['model_type']:18} {row['architecture']:24} {params:>21} "
            f"{f'{height}x{width}':>9} {row['train_images_per_s']:11.2f} "
            f"{row['eval_images_per_s']:10.2f}",
            flush=True,
        )


def stock_processor_for(model_dir: Path, size: int) -> BaseImageProcessor:
    """The example's processor for any checkpoint: ``AutoImageProcessor.from_pretrained`` with
    the longest edge at most ``size`` and every image padded to ``size x size``."""
    return AutoImageProcessor.from_pretrained(
        model_dir,
        do_resize=True,
        size={"max_height": size, "max_width": size},
        do_pad=True,
        pad_size={"height": size, "width": size},
    )


def stock_trainer_for(
    model_dir: Path, dataset, size: int, output_dir: Path, evaluation: bool = False, **args: Any
):
    """The transformers example's recipe for any checkpoint (``stock.py`` generalised from
    DETR): :func:`stock_processor_for`, ``AutoModelForObjectDetection``, a plain Trainer;
    with ``evaluation``, ``dataset`` is its evaluation set, scored by the example's
    ``compute_metrics`` (every output gathered, post-processed and scored at the end)."""
    processor = stock_processor_for(model_dir, size)
    data = dataset.with_transform(StockTransform(processor))
    return stock_trainer(
        AutoModelForObjectDetection.from_pretrained(model_dir),
        stock_arguments(str(output_dir), **args),
        **({"evaluation": data} if evaluation else {"train": data}),
        processing_class=processor,
        **({"compute_metrics": stock_compute_metrics(processor, dataset)} if evaluation else {}),
    )


def head_to_head(model_type: str, mode: str, work: Path) -> dict[str, Any]:
    """Training images/s of ours and of the stock recipe on the same saved model at the common
    size: ``h2h_rounds`` rounds, each side in turn with a fresh Trainer, ``h2h_warmup`` steps
    untimed, then ``h2h_steps`` timed. A round's rate is the batch over its median step (both
    sides feed ``size x size`` inputs, so every step has the same shape); the result is the
    median over the rounds, next to the median of the rounds' ratios (each round's two sides
    ran minutes apart at most, so the machine's drift cancels in them)."""
    sizes = SIZES[mode]
    warmup, steps, size = sizes["h2h_warmup"], sizes["h2h_steps"], sizes["size"]
    data = bccd_images((warmup + steps) * BATCH)
    names = data.features["objects"]["category"].feature.names
    tiny = mode == "smoke"
    model_dir, params = save_family_model(
        model_type, names, work / f"family-{model_type}{'-tiny' if tiny else ''}", tiny=tiny
    )
    run = dict(max_steps=warmup + steps, per_device_train_batch_size=BATCH)
    builders = {
        "ours": lambda: our_trainer(
            model_dir, data, size, work / "h2h-ours", image_size=size, **run
        ),
        "stock": lambda: stock_trainer_for(model_dir, data, size, work / "h2h-stock", **run),
    }
    rounds: dict[str, list[dict[str, Any]]] = {side: [] for side in builders}
    for _ in range(sizes["h2h_rounds"]):
        for side, build in builders.items():
            trainer = build()
            trainer.remove_callback(PrinterCallback)
            timer = StepTimer()
            trainer.add_callback(timer)
            batch = next(iter(trainer.get_train_dataloader()))
            if not tiny:
                release_freed_memory()
            trainer.train()
            timed = timer.durations()[warmup:]
            rounds[side].append(
                {
                    "images_per_s": BATCH / statistics.median(timed),
                    "step_seconds": timed,
                    "input_size": list(batch["pixel_values"].shape[-2:]),
                    "padded_fraction": padded_fraction(batch["pixel_mask"]),
                    "load_1min": os.getloadavg()[0],
                }
            )
            del trainer
    row: dict[str, Any] = {
        "model_type": model_type,
        "architecture": "tiny (tests)" if tiny else BY_TYPE[model_type].name,
        "parameters_m": params / 1e6,
        "warmup_steps": warmup,
        "timed_steps": steps,
    }
    for side, timed in rounds.items():
        row[side] = {
            "images_per_s": statistics.median(r["images_per_s"] for r in timed),
            "input_size": timed[0]["input_size"],
            "padded_fraction": timed[0]["padded_fraction"],
            "rounds": timed,
        }
    row["speedup"] = row["ours"]["images_per_s"] / row["stock"]["images_per_s"]
    row["round_speedups"] = [
        o["images_per_s"] / s["images_per_s"] for o, s in zip(rounds["ours"], rounds["stock"])
    ]
    row["median_round_speedup"] = statistics.median(row["round_speedups"])
    print(
        f"train {row['architecture']} {size}px ours vs stock: {row['ours']['images_per_s']:.2f} "
        f"vs {row['stock']['images_per_s']:.2f} images/s  ratio {row['speedup']:.2f}x  (rounds "
        + ", ".join(f"{r:.2f}x" for r in row["round_speedups"])
        + ")",
        flush=True,
    )
    return row


def inference_head_to_head(model_type: str, mode: str, work: Path) -> dict[str, Any]:
    """Evaluation and prediction with the saved model, ours vs the stock recipe, in turns
    (``h2h_rounds`` rounds, after one untimed round): our Trainer's ``evaluate()`` against the
    stock Trainer's (the example's ``compute_metrics``: every output gathered, post-processed
    and scored at the end), both at the common size, batches of 8; ``hf_detr_ft.predict``
    (its default batch: on a CPU up to a megapixel of input, 2 images at RT-DETR's 640x640)
    against ``pipeline("object-detection")`` called image by image, both at the saved
    processor's size and loading the model inside the timing. Seconds per side: the median of
    the rounds."""
    sizes = SIZES[mode]
    size, tiny = sizes["size"], mode == "smoke"
    data = bccd_images(sizes["h2h_eval_images"])
    names = data.features["objects"]["category"].feature.names
    model_dir, _ = save_family_model(
        model_type, names, work / f"family-{model_type}{'-tiny' if tiny else ''}", tiny=tiny
    )
    files = image_files(data)[: sizes["h2h_predict_images"]]
    batch = {"per_device_eval_batch_size": 8}
    evaluators = {
        "ours": our_trainer(model_dir, data, size, work / "eval-ours", image_size=size, **batch),
        "stock": stock_trainer_for(model_dir, data, size, work / "eval-stock", True, **batch),
    }
    for trainer in evaluators.values():
        trainer.remove_callback(PrinterCallback)  # the metrics, printed per evaluation

    def stock_predict() -> None:
        detector = pipeline("object-detection", model=str(model_dir), device="cpu")
        for path in files:
            detector(str(path), threshold=0.5)

    tasks = {
        "evaluate": {side: trainer.evaluate for side, trainer in evaluators.items()},
        "predict": {
            "ours": lambda: predict(model_dir, files, threshold=0.5, device="cpu"),
            "stock": stock_predict,
        },
    }
    seconds: dict[str, dict[str, list[float]]] = {task: {"ours": [], "stock": []} for task in tasks}
    for round_ in range(sizes["h2h_rounds"] + 1):
        for task, sides in tasks.items():
            for side, run in sides.items():
                if not tiny:
                    release_freed_memory()
                start = time.perf_counter()
                run()
                if round_ > 0:  # the first round pays one-time costs (threads, first kernels)
                    seconds[task][side].append(time.perf_counter() - start)
    row: dict[str, Any] = {"model_type": model_type}
    for task, counts in (("evaluate", len(data)), ("predict", len(files))):
        ours, stock = (statistics.median(seconds[task][side]) for side in ("ours", "stock"))
        row[task] = {
            "images": counts,
            "ours_images_per_s": counts / ours,
            "stock_images_per_s": counts / stock,
            "speedup": stock / ours,
            "seconds": seconds[task],
        }
        print(
            f"{task} {model_type} ours vs stock: {counts / ours:.2f} vs {counts / stock:.2f} "
            f"images/s  ratio {stock / ours:.2f}x",
            flush=True,
        )
    return row


def run_families(mode: str, work: Path, types: list[str] | None = None) -> dict[str, Any]:
    """The families table, then ours vs stock for :data:`HEAD_TO_HEAD_TYPES`."""
    start, threads = time.perf_counter(), torch.get_num_threads()
    if mode == "smoke":
        # What is loaded so far stays: each Trainer.train() and evaluate() collects garbage
        # (accelerate's free_memory), a third of a second each over these objects otherwise.
        gc.freeze()
        # The tiny models gain nothing from a second thread, and on cores that other jobs
        # share each of their thousands of small operations would wait for it.
        torch.set_num_threads(1)
    try:
        result = families_section(mode, work, types)
        result["head_to_head"] = {t: head_to_head(t, mode, work) for t in HEAD_TO_HEAD_TYPES}
        result["inference_head_to_head"] = {
            t: inference_head_to_head(t, mode, work) for t in HEAD_TO_HEAD_TYPES
        }
    finally:
        torch.set_num_threads(threads)
    result["seconds"] = time.perf_counter() - start
    result["threads"] = 1 if mode == "smoke" else threads
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the tests' tiny models, seconds")
    parser.add_argument("--quick", action="store_true", help="one repeat, fewer steps")
    parser.add_argument("--types", help="comma-separated model types (default: all)")
    parser.add_argument("--output", default="benchmarks/families.json", help="JSON written here")
    args = parser.parse_args(argv)
    types = args.types.split(",") if args.types else None
    with tempfile.TemporaryDirectory() as tmp:
        mode = "smoke" if args.smoke else "quick" if args.quick else "full"
        result = run_families(mode, Path(tmp), types)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
