"""What differs between the model types of the DETR family, in one table.

Every stage asks this module instead of branching on ``model_type``: the input sizes a model
takes (:attr:`Family.square_input`, :meth:`Family.size_multiple`), how its classes are scored
(softmax with a no-object class, or sigmoid/focal), where its matcher costs and query count
live in the config, which modules are its prediction heads and its backbone, what stays frozen,
whether ``explain`` can draw its attention, and the defaults of its published fine-tuning
recipe (:class:`Recipe`, each with its source). docs/training.md shows the same table.

A type outside :data:`FAMILIES` gets one :class:`~hf_detr_ft.errors.ModelLoadError` naming the
supported types (:func:`family_of`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelLoadError


@dataclass(frozen=True)
class Recipe:
    """A family's fine-tuning defaults: what a run uses unless the user sets a value."""

    learning_rate: float
    lr_backbone: float
    weight_decay: float
    max_grad_norm: float
    #: 0 turns the weight average off.
    ema_decay: float
    #: Steps over which the average's decay ramps up (RT-DETR's and D-FINE's EMA "warmups").
    ema_tau: float
    warmup_steps: int
    #: Layer-wise learning-rate decay of a ViT backbone (None: one rate for the backbone).
    layer_decay: float | None
    #: Multi-scale training: the drawn size is ``factor x image_size`` for factors in this range.
    train_scales: tuple[float, float]
    source: str


def _fixed(multiple: int) -> Callable[[Any], int]:
    return lambda config: multiple


def _vit_windows(per_side: Callable[[Any], int]) -> Callable[[Any], int]:
    """Windowed ViTs: every side a whole number of windows of whole patches."""

    def multiple(config: Any) -> int:
        backbone = config.backbone_config
        return backbone.patch_size * per_side(backbone)

    return multiple


@dataclass(frozen=True)
class Family:
    """One row of the table (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]
    #: The image processor class used when a checkpoint has no ``preprocessor_config.json``.
    processor: str
    #: Fixed square inputs, every image resized to ``image_size x image_size`` (no padding),
    #: rather than shortest edge ``image_size``, longest at most ``max_image_size``.
    square_input: bool
    default_image_size: int
    #: Config -> every input side must be a multiple of this.
    size_multiple: Callable[[Any], int]
    #: Sigmoid (focal) class scores without a no-object class, rather than softmax with one.
    sigmoid_classes: bool
    #: Config attributes of the Hungarian matcher's class, box and GIoU costs.
    matcher_costs: tuple[str, str, str]
    #: Config attribute of the number of object queries (detection tokens for YOLOS).
    query_count: str
    #: Which of the training outputs' queries are the ``query_count`` matched ones: ``all``,
    #: ``last`` (denoising queries come first) or ``first`` (group DETR: group 0 first).
    training_queries: str
    #: Regular expressions of the prediction heads' module names (run in fp32 under autocast).
    heads: tuple[str, ...]
    #: Parameters that learn at ``lr_backbone`` (None: no backbone group).
    backbone: str | None
    #: Parameters kept frozen when fine-tuning (None: nothing).
    frozen: str | None
    #: Captures the ViT layer index of a backbone parameter (for ``Recipe.layer_decay``).
    backbone_layer: str | None
    #: The decoder's cross-attention is a dense map over the feature map (``explain`` draws it).
    dense_cross_attention: bool
    recipe: Recipe
    checkpoints: tuple[str, ...] = field(default=())
    #: Config -> a config that builds a working model, with what was changed, or None when it
    #: does already (transformers' default config of a type may build none: LW-DETR's).
    repair_config: Callable[[Any], tuple[Any, str] | None] = lambda config: None
    #: Whether the processor shrinks images with antialiasing (torchvision's default); RF-DETR's
    #: rescales to floats first and resizes without it, so our own resize must do the same.
    resize_antialias: bool = True

    def num_queries(self, config: Any) -> int:
        return getattr(config, self.query_count)

    def matcher_cost_values(self, config: Any) -> tuple[float, float, float]:
        return tuple(float(getattr(config, name)) for name in self.matcher_costs)

    def is_head(self, module_name: str) -> bool:
        return any(re.fullmatch(pattern, module_name) for pattern in self.heads)

    def is_backbone(self, parameter_name: str) -> bool:
        return self.backbone is not None and re.search(self.backbone, parameter_name) is not None

    def is_frozen(self, parameter_name: str) -> bool:
        return self.frozen is not None and re.search(self.frozen, parameter_name) is not None

    def backbone_layer_of(self, parameter_name: str) -> int | None:
        if self.backbone_layer is None:
            return None
        found = re.search(self.backbone_layer, parameter_name)
        return int(found.group(1)) if found else None


_DETR_RECIPE = Recipe(
    learning_rate=1e-4,
    lr_backbone=1e-5,
    weight_decay=1e-4,
    max_grad_norm=0.1,
    ema_decay=0.0,
    ema_tau=100.0,
    warmup_steps=0,
    layer_decay=None,
    train_scales=(0.6, 1.0),
    source="facebookresearch/detr main.py defaults; multi-scale 480-800 of 800 (DETR paper)",
)
_DEFORMABLE_RECIPE = Recipe(
    learning_rate=2e-4,
    lr_backbone=2e-5,
    weight_decay=1e-4,
    max_grad_norm=0.1,
    ema_decay=0.0,
    ema_tau=100.0,
    warmup_steps=0,
    layer_decay=None,
    train_scales=(0.6, 1.0),
    source="fundamentalvision/Deformable-DETR main.py defaults",
)
_RT_DETR_RECIPE = Recipe(
    learning_rate=1e-4,
    lr_backbone=1e-5,
    weight_decay=1e-4,
    max_grad_norm=0.1,
    ema_decay=0.9999,
    ema_tau=2000.0,
    warmup_steps=2000,
    layer_decay=None,
    train_scales=(0.75, 1.25),
    source="lyuwenyu/RT-DETR rtdetrv2_pytorch configs (optimizer.yml, dataloader.yml: 480-800 "
    "square sizes of 640 in steps of 32)",
)
_D_FINE_RECIPE = Recipe(
    learning_rate=2e-4,
    lr_backbone=2e-5,
    weight_decay=1e-4,
    max_grad_norm=0.1,
    ema_decay=0.9999,
    ema_tau=1000.0,
    warmup_steps=500,
    layer_decay=None,
    train_scales=(0.75, 1.25),
    source="Peterande/D-FINE configs/dfine/include (optimizer.yml, dataloader.yml)",
)
_LW_DETR_RECIPE = Recipe(
    learning_rate=1e-4,
    lr_backbone=1.5e-4,
    weight_decay=1e-4,
    max_grad_norm=0.1,
    ema_decay=0.993,
    ema_tau=100.0,
    warmup_steps=0,
    layer_decay=0.8,
    train_scales=(0.75, 1.25),
    source="Atten4Vis/LW-DETR scripts/lwdetr_small_coco_train.sh and roboflow/rf-detr "
    "rfdetr/config.py (lr_encoder 1.5e-4, layer decay 0.8, EMA 0.993)",
)
_YOLOS_RECIPE = Recipe(
    learning_rate=2.5e-5,
    lr_backbone=2.5e-5,
    weight_decay=1e-4,
    max_grad_norm=0.1,
    ema_decay=0.0,
    ema_tau=100.0,
    warmup_steps=0,
    layer_decay=None,
    train_scales=(0.6, 1.0),
    source="hustvl/YOLOS README (YOLOS-S fine-tuning: AdamW 2.5e-5, DETR's other defaults)",
)

_DETR_HEADS = (r"class_labels_classifier", r"bbox_predictor")
_RT_DETR_HEADS = (
    r"model\.decoder\.(class_embed|bbox_embed)\.\d+",
    r"model\.decoder\.pre_bbox_head",
    r"model\.enc_(score|bbox)_head",
)


def _lw_detr_projector(config: Any) -> tuple[Any, str] | None:
    """transformers' ``LwDetrConfig()`` has no projector level (``projector_scale_factors``
    ``[]``), so the model it builds fails on every image; LW-DETR-tiny, -small and -medium use
    one level at stride 16 (``[1.0]``; Atten4Vis/LW-DETR ``--projector_scale P4``)."""
    if config.projector_scale_factors:
        return None
    derived = ("projector_in_channels", "projector_out_channels", "num_feature_levels")
    values = {k: v for k, v in config.to_dict().items() if k not in derived}
    repaired = type(config).from_dict({**values, "projector_scale_factors": [1.0]})
    return repaired, "projector_scale_factors [] -> [1.0] (one feature level, as LW-DETR-tiny)"


_RT_DETR_COSTS = ("matcher_class_cost", "matcher_bbox_cost", "matcher_giou_cost")
_DETR_COSTS = ("class_cost", "bbox_cost", "giou_cost")
#: DETR's backbone: every ResNet stage but the stem and the first learns (``train_backbone``).
#: Names as in timm (``layer2``-``layer4``) and transformers (``stages.1``-).
_RESNET_STEM = r"backbone\.(?!.*\.(layer[2-9]|stages\.[1-9])\.)"

FAMILIES: tuple[Family, ...] = (
    Family(
        name="DETR",
        model_types=("detr", "table-transformer"),
        processor="DetrImageProcessor",
        square_input=False,
        default_image_size=800,
        size_multiple=_fixed(1),
        sigmoid_classes=False,
        matcher_costs=_DETR_COSTS,
        query_count="num_queries",
        training_queries="all",
        heads=_DETR_HEADS,
        backbone=r"backbone\.",
        frozen=_RESNET_STEM,
        backbone_layer=None,
        dense_cross_attention=True,
        recipe=_DETR_RECIPE,
        checkpoints=("facebook/detr-resnet-50", "facebook/detr-resnet-101"),
    ),
    Family(
        name="Conditional DETR / DAB-DETR",
        model_types=("conditional_detr", "dab-detr"),
        processor="ConditionalDetrImageProcessor",
        square_input=False,
        default_image_size=800,
        size_multiple=_fixed(1),
        sigmoid_classes=True,
        matcher_costs=_DETR_COSTS,
        query_count="num_queries",
        training_queries="all",
        # DAB-DETR's box head is also its decoder's anchor refinement (one module, two names).
        heads=(
            r"class_labels_classifier",
            r"class_embed",
            r"(model\.decoder\.)?bbox_(predictor|embed)",
        ),
        backbone=r"backbone\.",
        frozen=_RESNET_STEM,
        backbone_layer=None,
        dense_cross_attention=True,
        recipe=_DETR_RECIPE,
        checkpoints=("microsoft/conditional-detr-resnet-50", "IDEA-Research/dab-detr-resnet-50"),
    ),
    Family(
        name="Deformable DETR",
        model_types=("deformable_detr",),
        processor="DeformableDetrImageProcessor",
        square_input=False,
        default_image_size=800,
        size_multiple=_fixed(1),
        sigmoid_classes=True,
        matcher_costs=_DETR_COSTS,
        query_count="num_queries",
        training_queries="all",
        heads=(r"(model\.decoder\.)?(class_embed|bbox_embed)\.\d+",),
        backbone=r"backbone\.",
        frozen=_RESNET_STEM,
        backbone_layer=None,
        dense_cross_attention=False,
        recipe=_DEFORMABLE_RECIPE,
        checkpoints=("SenseTime/deformable-detr", "SenseTime/deformable-detr-with-box-refine"),
    ),
    Family(
        name="YOLOS",
        model_types=("yolos",),
        processor="YolosImageProcessor",
        square_input=False,
        default_image_size=800,
        size_multiple=_fixed(16),
        sigmoid_classes=False,
        matcher_costs=_DETR_COSTS,
        query_count="num_detection_tokens",
        training_queries="all",
        heads=_DETR_HEADS,
        backbone=None,  # the ViT is the whole detector: one rate for all of it
        frozen=None,
        backbone_layer=None,
        dense_cross_attention=False,
        recipe=_YOLOS_RECIPE,
        checkpoints=("hustvl/yolos-small", "hustvl/yolos-tiny", "hustvl/yolos-base"),
    ),
    Family(
        name="RT-DETR",
        model_types=("rt_detr", "rt_detr_v2"),
        processor="RTDetrImageProcessor",
        square_input=True,
        default_image_size=640,
        size_multiple=_fixed(32),
        sigmoid_classes=True,
        matcher_costs=_RT_DETR_COSTS,
        query_count="num_queries",
        training_queries="last",
        heads=_RT_DETR_HEADS,
        backbone=r"backbone\.",
        frozen=r"backbone\.model\.embedder\.",
        backbone_layer=None,
        dense_cross_attention=False,
        recipe=_RT_DETR_RECIPE,
        checkpoints=("PekingU/rtdetr_v2_r18vd", "PekingU/rtdetr_r50vd", "PekingU/rtdetr_r18vd"),
    ),
    Family(
        name="D-FINE / DEIMv2",
        model_types=("d_fine", "deimv2"),
        processor="RTDetrImageProcessor",
        square_input=True,
        default_image_size=640,
        size_multiple=_fixed(32),
        sigmoid_classes=True,
        matcher_costs=_RT_DETR_COSTS,
        query_count="num_queries",
        training_queries="last",
        heads=_RT_DETR_HEADS,
        backbone=r"(backbone|conv_encoder)\.(model|backbone)\.",
        frozen=r"(backbone|conv_encoder)\.model\.embedder\.",
        backbone_layer=None,
        dense_cross_attention=False,
        recipe=_D_FINE_RECIPE,
        checkpoints=("ustc-community/dfine-small-coco", "ustc-community/dfine-nano-coco"),
    ),
    Family(
        name="LW-DETR",
        model_types=("lw_detr",),
        processor="DeformableDetrImageProcessor",
        square_input=True,
        default_image_size=640,
        size_multiple=_vit_windows(lambda vit: math.isqrt(vit.num_windows)),
        sigmoid_classes=True,
        matcher_costs=_DETR_COSTS,
        query_count="num_queries",
        training_queries="first",
        heads=(r"class_embed", r"bbox_embed", r"model\.enc_out_(class|bbox)_embed\.\d+"),
        backbone=r"backbone\.backbone\.",
        frozen=None,
        backbone_layer=r"backbone\.backbone\.encoder\.layer\.(\d+)\.",
        dense_cross_attention=False,
        recipe=_LW_DETR_RECIPE,
        checkpoints=("AnnaZhang/lwdetr_small_60e_coco", "AnnaZhang/lwdetr_tiny_60e_coco"),
        repair_config=_lw_detr_projector,
    ),
    Family(
        name="RF-DETR",
        model_types=("rf_detr",),
        processor="RfDetrImageProcessor",
        square_input=True,
        default_image_size=560,
        size_multiple=_vit_windows(lambda vit: vit.num_windows),
        sigmoid_classes=True,
        matcher_costs=_DETR_COSTS,
        query_count="num_queries",
        training_queries="first",
        heads=(r"class_embed", r"bbox_embed", r"model\.enc_out_(class|bbox)_embed\.\d+"),
        backbone=r"backbone\.backbone\.",
        frozen=None,
        backbone_layer=r"backbone\.backbone\.encoder\.layer\.(\d+)\.",
        dense_cross_attention=False,
        recipe=_LW_DETR_RECIPE,
        checkpoints=("Roboflow/rf-detr-small", "Roboflow/rf-detr-nano", "Roboflow/rf-detr-medium"),
        resize_antialias=False,
    ),
)

SUPPORTED_TYPES = tuple(t for family in FAMILIES for t in family.model_types)


def resizes_with_antialias(image_processor: Any) -> bool:
    """Whether ``image_processor`` (of any family's processor class) resizes with
    antialiasing; a processor class no family names is assumed to, as torchvision does."""
    name = type(image_processor).__name__
    return all(f.resize_antialias for f in FAMILIES if f.processor == name)


_BY_TYPE = {t: family for family in FAMILIES for t in family.model_types}


def family_of(config: Any) -> Family:
    """The family of a model config (or a ``model_type`` string); an error names the others."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    family = _BY_TYPE.get(model_type)
    if family is None:
        raise ModelLoadError(
            f"Model type {model_type!r} is not a DETR-family detector hf-detr-ft fine-tunes; "
            f"supported: {', '.join(SUPPORTED_TYPES)}."
        )
    return family
