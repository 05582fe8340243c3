"""Tiny, randomly initialised models of every DETR-family object-detection type, for tests.

Each :func:`tiny_config` is the smallest config of its ``model_type`` that still builds the real
architecture (backbone, encoder, decoder, heads, losses): one or two layers, ``d_model`` 32,
a few queries, a tiny CNN (transformers ``ResNet`` / ``RTDetrResNet`` / ``HGNetV2``) or ViT
backbone built from its config. Nothing is downloaded: no backbone is pretrained, no timm
weights are fetched. :func:`save_tiny_model` saves one, with its family's own image processor
set up for a small input the model accepts, to a folder ``from_pretrained`` can load.

Run ``python tests/tiny_families.py FOLDER`` to build all of them into ``FOLDER`` and print
their parameter counts, sizes on disk and build times.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import (
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
)
from transformers.image_processing_utils import BaseImageProcessor

#: Every DETR-family ``model_type`` that ``AutoModelForObjectDetection`` builds.
FAMILY_TYPES: tuple[str, ...] = (
    "detr",
    "conditional_detr",
    "deformable_detr",
    "dab-detr",
    "table-transformer",
    "yolos",
    "rt_detr",
    "rt_detr_v2",
    "d_fine",
    "deimv2",
    "lw_detr",
    "rf_detr",
)

D_MODEL = 32
NUM_QUERIES = 12

#: Families whose saved processor resizes to a fixed ``image_size`` square: their models need
#: sides that are multiples of 32 (RT-DETR family: stride-32 FPN; tiny LW-DETR / RF-DETR: patch
#: 16 x 2 windows) and ignore or cannot use padding. The others resize the shortest and longest
#: edge to ``image_size`` (YOLOS: sides rounded down to multiples of 16) and pad the batch.
FIXED_SIZE_TYPES = frozenset({"rt_detr", "rt_detr_v2", "d_fine", "deimv2", "lw_detr", "rf_detr"})


def _resnet(out_features: list[str]) -> ResNetConfig:
    """A 4-stage transformers ResNet with 1 basic block a stage (~100k parameters)."""
    return ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16, 32, 64],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=out_features,
    )


def _rt_detr_resnet() -> RTDetrResNetConfig:
    return RTDetrResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16, 32, 64],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_indices=[2, 3, 4],
    )


def _hgnet_v2() -> HGNetV2Config:
    return HGNetV2Config(
        stem_channels=[3, 8, 8],
        stage_in_channels=[8, 16, 32, 64],
        stage_mid_channels=[8, 8, 16, 16],
        stage_out_channels=[16, 32, 64, 64],
        stage_num_blocks=[1, 1, 1, 1],
        stage_downsample=[False, True, True, True],
        stage_light_block=[False, False, True, True],
        stage_kernel_size=[3, 3, 5, 5],
        stage_numb_of_layers=[1, 1, 1, 1],
        hidden_sizes=[16, 32, 64, 64],
        depths=[1, 1, 1, 1],
        out_indices=[2, 3, 4],
    )


def _detr_common() -> dict:
    """Sizes shared by DETR, Conditional DETR, DAB-DETR and Table Transformer."""
    return dict(
        num_queries=NUM_QUERIES,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        auxiliary_loss=True,
    )


def _rt_detr_common(backbone: PretrainedConfig, in_channels: list[int]) -> dict:
    """Sizes shared by RT-DETR (v1, v2), D-FINE and DEIMv2."""
    return dict(
        backbone_config=backbone,
        encoder_hidden_dim=D_MODEL,
        encoder_in_channels=in_channels,
        feat_strides=[8, 16, 32],
        encoder_layers=1,
        encoder_ffn_dim=64,
        encoder_attention_heads=2,
        d_model=D_MODEL,
        num_queries=NUM_QUERIES,
        decoder_in_channels=[D_MODEL] * 3,
        decoder_ffn_dim=64,
        num_feature_levels=3,
        decoder_n_points=2,
        decoder_layers=2,
        decoder_attention_heads=2,
        num_denoising=4,
    )


def tiny_config(model_type: str, class_names: list[str]) -> PretrainedConfig:
    """A tiny random config of ``model_type`` (one of :data:`FAMILY_TYPES`) for ``class_names``."""
    id2label = dict(enumerate(class_names))
    labels = dict(id2label=id2label, label2id={name: i for i, name in id2label.items()})
    if model_type == "detr":
        config = DetrConfig(
            backbone_config=_resnet(["stage4"]), d_model=D_MODEL, **_detr_common(), **labels
        )
    elif model_type == "table-transformer":
        config = TableTransformerConfig(
            backbone_config=_resnet(["stage4"]), d_model=D_MODEL, **_detr_common(), **labels
        )
    elif model_type == "conditional_detr":
        config = ConditionalDetrConfig(
            backbone_config=_resnet(["stage4"]), d_model=D_MODEL, **_detr_common(), **labels
        )
    elif model_type == "dab-detr":
        config = DabDetrConfig(
            backbone_config=_resnet(["stage4"]), hidden_size=D_MODEL, **_detr_common(), **labels
        )
    elif model_type == "deformable_detr":
        config = DeformableDetrConfig(
            backbone_config=_resnet(["stage3", "stage4"]),
            d_model=D_MODEL,
            num_queries=NUM_QUERIES,
            encoder_layers=1,
            decoder_layers=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            num_feature_levels=2,
            encoder_n_points=2,
            decoder_n_points=2,
            auxiliary_loss=True,
            **labels,
        )
    elif model_type == "yolos":
        config = YolosConfig(
            hidden_size=D_MODEL,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=[64, 64],
            patch_size=16,
            num_detection_tokens=NUM_QUERIES,
            use_mid_position_embeddings=False,
            # transformers' YOLOS auxiliary loss is broken (it applies the heads to
            # ``outputs.hidden_states``, None or a tuple): keep it off.
            auxiliary_loss=False,
            **labels,
        )
    elif model_type == "rt_detr":
        config = RTDetrConfig(**_rt_detr_common(_rt_detr_resnet(), [16, 32, 64]), **labels)
    elif model_type == "rt_detr_v2":
        config = RTDetrV2Config(
            **_rt_detr_common(_rt_detr_resnet(), [16, 32, 64]), decoder_n_levels=3, **labels
        )
    elif model_type == "d_fine":
        config = DFineConfig(
            **_rt_detr_common(_hgnet_v2(), [32, 64, 64]),
            depth_mult=0.34,
            hidden_expansion=0.5,
            lqe_hidden_dim=16,
            **labels,
        )
    elif model_type == "deimv2":
        config = Deimv2Config(
            **_rt_detr_common(_hgnet_v2(), [32, 64, 64]),
            depth_mult=0.34,
            hidden_expansion=0.5,
            lqe_hidden_dim=16,
            **labels,
        )
    elif model_type == "lw_detr":
        backbone = LwDetrViTConfig(
            hidden_size=D_MODEL,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_ratio=2,
            image_size=64,
            pretrain_image_size=64,
            patch_size=16,
            window_block_indices=[0],
            out_indices=[1, 2],
            num_windows=4,
        )
        config = LwDetrConfig(
            backbone_config=backbone,
            projector_scale_factors=[1.0],
            d_model=D_MODEL,
            c2f_num_blocks=1,
            decoder_ffn_dim=64,
            decoder_layers=2,
            decoder_self_attention_heads=2,
            decoder_cross_attention_heads=2,
            decoder_n_points=2,
            num_queries=NUM_QUERIES,
            group_detr=2,
            **labels,
        )
    elif model_type == "rf_detr":
        backbone = RfDetrDinov2Config(
            hidden_size=D_MODEL,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_ratio=2,
            image_size=64,
            patch_size=16,
            num_windows=2,
            out_features=["stage1", "stage2"],
        )
        config = RfDetrConfig(
            backbone_config=backbone,
            d_model=D_MODEL,
            c2f_num_blocks=1,
            decoder_ffn_dim=64,
            decoder_layers=2,
            decoder_self_attention_heads=2,
            decoder_cross_attention_heads=2,
            decoder_n_points=2,
            num_queries=NUM_QUERIES,
            group_detr=2,
            intermediate_size=64,
            **labels,
        )
    else:
        raise ValueError(f"Unknown model_type {model_type!r}; expected one of {FAMILY_TYPES}.")
    return config


def tiny_image_processor(model_type: str, image_size: int = 64) -> BaseImageProcessor:
    """The family's own image processor, resizing to inputs of about ``image_size`` pixels.

    ``image_size`` should be a multiple of 32 and at least 64: smaller inputs leave the
    two-stage models (RT-DETR family, LW-DETR, RF-DETR) fewer encoder tokens than queries.
    """
    fixed = {"height": image_size, "width": image_size}
    edges = {"shortest_edge": image_size, "longest_edge": image_size}
    if model_type in ("detr", "table-transformer"):
        return DetrImageProcessor(size=edges)
    if model_type in ("conditional_detr", "dab-detr"):  # dab-detr: as its Hub checkpoints
        return ConditionalDetrImageProcessor(size=edges)
    if model_type == "deformable_detr":
        return DeformableDetrImageProcessor(size=edges)
    if model_type == "yolos":
        return YolosImageProcessor(size=edges)
    if model_type in ("rt_detr", "rt_detr_v2", "d_fine", "deimv2"):
        return RTDetrImageProcessor(size=fixed)
    if model_type == "lw_detr":
        return DeformableDetrImageProcessor(size=fixed)
    if model_type == "rf_detr":
        return RfDetrImageProcessor(size=fixed)
    raise ValueError(f"Unknown model_type {model_type!r}; expected one of {FAMILY_TYPES}.")


def save_tiny_model(
    model_type: str, path: str | Path, class_names: list[str], image_size: int = 64
) -> Path:
    """Build a random tiny ``model_type`` model and save it and its image processor to ``path``.

    The weights depend only on ``model_type`` and ``class_names`` (``torch.manual_seed(0)``).
    """
    path = Path(path)
    torch.manual_seed(0)
    model = AutoModelForObjectDetection.from_config(tiny_config(model_type, class_names))
    model.save_pretrained(path)
    tiny_image_processor(model_type, image_size).save_pretrained(path)
    return path


def _main(folder: str) -> None:
    root = Path(folder)
    total = 0.0
    for model_type in FAMILY_TYPES:
        start = time.perf_counter()
        path = save_tiny_model(model_type, root / model_type, ["circle", "square", "triangle"])
        seconds = time.perf_counter() - start
        total += seconds
        model = AutoModelForObjectDetection.from_pretrained(path)
        params = sum(p.numel() for p in model.parameters())
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"{model_type:18} {params:>9,} parameters {size / 1e6:6.2f} MB {seconds:5.2f} s")
    print(f"{'all':18} {total:5.2f} s")


if __name__ == "__main__":
    _main(sys.argv[1] if len(sys.argv) > 1 else "tiny-families")
