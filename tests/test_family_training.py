"""Every DETR-family type trains through ``DetrTrainer``: its optimizer groups, ``class_error``
(softmax and sigmoid models, the queries each family matches in training), the loss terms it
logs and its heads in fp32 under autocast, each from the family table, not from model types."""

from __future__ import annotations

import copy
import math
import pickle
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_trainer
from tiny_families import FAMILY_TYPES, save_tiny_model, tiny_config
from transformers import AutoModelForObjectDetection, PretrainedConfig

from hf_detr_ft.data.synthetic import DEMO_CLASSES
from hf_detr_ft.models.families import family_of
from hf_detr_ft.models.mixed_precision import _Fp32Forward, keep_heads_in_fp32
from hf_detr_ft.training.trainer import (
    DetrTrainer,
    count_class_errors,
    main_loss_terms,
    matched_queries,
)

CLASSES = list(DEMO_CLASSES)
NEAR, MIDDLE, FAR = [0.25, 0.25, 0.2, 0.2], [0.5, 0.5, 0.3, 0.3], [0.8, 0.8, 0.1, 0.1]
SHIFTED = [0.3, 0.25, 0.2, 0.2]  # NEAR moved by a quarter of its width
LR, LR_BACKBONE, WEIGHT_DECAY = 1e-4, 2e-5, 1e-4

DETR_TERMS = {"loss_ce", "loss_bbox", "loss_giou", "cardinality_error"}
MAIN_TERMS = {
    **dict.fromkeys(FAMILY_TYPES, DETR_TERMS),
    **dict.fromkeys(("rt_detr", "rt_detr_v2", "d_fine"), {"loss_vfl", "loss_bbox", "loss_giou"}),
    "deimv2": {"loss_mal", "loss_bbox", "loss_giou"},
}


def _target(classes: list[int], boxes: list[list[float]]) -> dict[str, torch.Tensor]:
    return {"class_labels": torch.tensor(classes), "boxes": torch.tensor(boxes)}


def _sigmoid_logits(queries: list[dict[int, float]], num_labels: int = 3) -> torch.Tensor:
    """One image's ``[queries, num_labels]`` logits: -6 (score ~0) except the given ones."""
    logits = torch.full((len(queries), num_labels), -6.0)
    for query, scores in enumerate(queries):
        for cls, value in scores.items():
            logits[query, cls] = value
    return logits


def test_class_errors_of_sigmoid_scores() -> None:
    # Image 0: class 0 at NEAR, class 1 at MIDDLE. Query 0 sits on the first with the right
    # class; query 2 sits on the second, scoring class 1 but class 2 higher: 1 wrong of 2.
    # Image 1: class 2 at NEAR; query 1 finds it right. Queries elsewhere score nothing.
    config = tiny_config("deformable_detr", CLASSES)
    labels = [_target([0, 1], [NEAR, MIDDLE]), _target([2], [NEAR])]
    logits = torch.stack(
        [
            _sigmoid_logits([{0: 6.0}, {}, {1: 2.0, 2: 6.0}, {}]),
            _sigmoid_logits([{1: 6.0}, {2: 6.0}, {}, {}]),
        ]
    )
    boxes = torch.tensor([[NEAR, FAR, MIDDLE, FAR], [FAR, NEAR, FAR, FAR]])
    assert count_class_errors(logits, boxes, labels, config) == (1, 3)
    # All right: the last class is a class here, not "no object" as in DETR's softmax.
    logits[0, 2] = _sigmoid_logits([{1: 6.0}])[0]
    assert count_class_errors(logits, boxes, labels, config) == (0, 3)


@pytest.mark.parametrize(
    ("model_type", "queries", "honest", "tempting", "expected"),
    [
        ("deformable_detr", 12, 0, 11, (1, 1)),  # all: every query may be matched
        ("rt_detr", 4 + 12, 4, 0, (0, 1)),  # last: 4 denoising queries first, never matched
        ("lw_detr", 2 * 12, 0, 12, (0, 1)),  # first: group 0 (queries 0-11) only
    ],
    ids=["all", "last", "first"],
)
def test_only_the_queries_the_family_matches_count(
    model_type: str, queries: int, honest: int, tempting: int, expected: tuple[int, int]
) -> None:
    # The honest query (one of the model's own) finds the object, slightly off, with the right
    # class. The "tempting" query sits exactly on it and scores its class, but another class
    # higher: the matcher prefers it wherever it may pick it, and it is wrong.
    config = tiny_config(model_type, CLASSES)
    assert family_of(config).num_queries(config) == 12
    scores: list[dict[int, float]] = [{} for _ in range(queries)]
    scores[honest], scores[tempting] = {1: 6.0}, {1: 6.0, 2: 8.0}
    boxes = [FAR] * queries
    boxes[honest], boxes[tempting] = SHIFTED, NEAR
    logits, pred_boxes = _sigmoid_logits(scores)[None], torch.tensor([boxes])
    assert matched_queries(logits, config).shape == (1, 12, 3)
    assert count_class_errors(logits, pred_boxes, [_target([1], [NEAR])], config) == expected


def test_only_the_main_loss_terms_are_logged() -> None:
    names = [
        *DETR_TERMS,
        *(f"{t}_0" for t in DETR_TERMS),  # DETR's and LW-DETR's per-layer terms
        "loss_ce_enc",  # LW-DETR's encoder proposals
        "loss_vfl",
        "loss_fgl",
        "loss_vfl_aux_0",
        "loss_vfl_aux_11",
        "loss_vfl_dn_3",
        "loss_ddf_dn_0",
        "loss_fgl_aux_2",
    ]
    terms = main_loss_terms({name: torch.tensor(1.0) for name in names})
    assert set(terms) == DETR_TERMS | {"loss_vfl", "loss_fgl"}
    assert main_loss_terms(None) == {}


def _expected_rate(name: str, config: PretrainedConfig, vit_layers: int) -> float:
    """A parameter's rate: ViT layer ``i`` of ``L`` at ``decay**(L - i)``, the embeddings below
    the first layer at ``decay**(L + 1)``."""
    family = family_of(config)
    decay = family.recipe.layer_decay
    if not family.is_backbone(name):
        return LR
    if decay is None:
        return LR_BACKBONE
    layer = family.backbone_layer_of(name)
    depth = {None: vit_layers + 1, **{i: vit_layers - i for i in range(vit_layers)}}[layer]
    return LR_BACKBONE * decay**depth


def _check_optimizer_groups(trainer: DetrTrainer) -> None:
    """Every trainable parameter in one group at its family's rate, frozen ones left out."""
    model, config = trainer.model, trainer.model.config
    family = family_of(config)
    groups = trainer.create_optimizer().param_groups
    rate_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(rate_of) == len(trainable) == sum(len(g["params"]) for g in groups)
    assert groups[0]["lr"] == LR  # what the Trainer logs as learning_rate
    assert len({(g["lr"], g["weight_decay"]) for g in groups}) == len(groups)  # merged
    vit_layers = getattr(getattr(config, "backbone_config", None), "num_hidden_layers", 0)
    for name, param in trainable:
        assert rate_of[id(param)] == pytest.approx(_expected_rate(name, config, vit_layers)), name
    rates, decay = {g["lr"] for g in groups}, family.recipe.layer_decay
    if family.backbone is None:  # YOLOS: the ViT is the detector, one rate
        assert rates == {LR}
    elif decay is None:
        assert rates == {LR, LR_BACKBONE}
    else:  # LW-DETR, RF-DETR: a 2-layer ViT, its embeddings below the first layer
        assert vit_layers == 2 and decay < 1
        assert sorted(rates) == pytest.approx([LR_BACKBONE * decay**d for d in (3, 2, 1)] + [LR])


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_every_family_trains_with_its_groups_and_signals(
    model_type: str, shapes_dir: Path, tmp_path: Path
) -> None:
    model_dir = save_tiny_model(model_type, tmp_path / "model", CLASSES)
    trainer = tiny_trainer(
        model_dir,
        shapes_dir,
        tmp_path / "out",
        train_images=4,
        use_cpu=True,
        learning_rate=LR,
        lr_backbone=LR_BACKBONE,
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=0.1,
        warmup_steps=0,
        ema_decay=0.0,
        max_steps=2,
        logging_steps=1,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=3,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
    )
    _check_optimizer_groups(trainer)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    metrics = trainer.evaluate()
    assert len(logs) == 2
    for values, prefix in [*((log, "") for log in logs), (metrics, "eval_")]:
        assert 0 <= values[f"{prefix}class_error"] <= 100
        logged = {k.removeprefix(prefix) for k in values if k.startswith(prefix + "loss_")}
        logged |= {"cardinality_error"} & {k.removeprefix(prefix) for k in values}
        assert logged == MAIN_TERMS[model_type]
        assert all(math.isfinite(v) for v in values.values() if isinstance(v, float))
    assert not any(re.search(r"_(aux|dn|enc)|_\d+$", key) for key in logs[0])


def _bf16_outputs(model: torch.nn.Module, pixels: torch.Tensor, labels: list) -> list:
    """``(logits, pred_boxes)`` of a training and an evaluation forward under bf16 autocast."""
    outputs = []
    for training in (True, False):
        model.train(training)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(pixel_values=pixels, labels=copy.deepcopy(labels))
        outputs += [out.logits, out.pred_boxes]
    return outputs


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_every_family_has_fp32_heads_under_bf16_autocast(model_type: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForObjectDetection.from_config(tiny_config(model_type, CLASSES))
    family = family_of(model.config)
    heads = keep_heads_in_fp32(model)
    assert heads > 0
    assert keep_heads_in_fp32(model) == heads  # once is enough: no second wrapper
    twin = copy.deepcopy(model)  # before training forwards move BatchNorm statistics
    assert keep_heads_in_fp32(twin) == heads
    pixels = torch.rand(2, 3, 64, 64)
    labels = [_target([0], [MIDDLE]), _target([1, 2], [NEAR, FAR])]
    torch.manual_seed(1)  # dropout, RT-DETR's denoising queries
    expected = _bf16_outputs(model, pixels, labels)
    assert all(t.dtype == torch.float32 for t in expected)
    torch.manual_seed(1)
    assert all(torch.equal(a, b) for a, b in zip(_bf16_outputs(twin, pixels, labels), expected))
    for name, head in model.named_modules():
        if family.is_head(name):  # each head pickles as the fp32 subclass of its own class
            base = type(head)._fp32_base
            loaded = pickle.loads(pickle.dumps(head))
            assert isinstance(loaded, _Fp32Forward) and type(loaded).__mro__.count(base) == 1
