"""Under autocast the prediction heads run in fp32: full-precision boxes and logits; the model
still pickles, deep-copies and saves a plain transformers state dict."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from conftest import tiny_detr_config
from transformers import DetrForObjectDetection
from transformers.models.detr.modeling_detr import DetrMLPPredictionHead

from hf_detr_ft.models.mixed_precision import _fp32_class, keep_heads_in_fp32


def test_heads_give_fp32_boxes_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    model = DetrForObjectDetection(tiny_detr_config()).eval()
    pixels = torch.randn(2, 3, 64, 96)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def outputs(autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(pixel_values=pixels)
        return out.pred_boxes, out.logits

    exact_boxes, exact_logits = outputs(autocast=False)
    rounded_boxes, _ = outputs(autocast=True)
    assert rounded_boxes.dtype == torch.bfloat16

    assert keep_heads_in_fp32(model) == 2
    assert keep_heads_in_fp32(model) == 2  # once is enough: no second wrapper
    assert type(model.bbox_predictor).__mro__.count(type(model.bbox_predictor).__base__) == 1
    boxes, logits = outputs(autocast=True)
    assert boxes.dtype == logits.dtype == torch.float32
    # Only the bf16 trunk differs now, not the rounding of the boxes themselves.
    error = (boxes - exact_boxes).abs().max()
    assert error < (rounded_boxes.float() - exact_boxes).abs().max()
    # Without autocast nothing changes: same outputs, same state dict.
    assert torch.equal(outputs(autocast=False)[0], exact_boxes)
    assert torch.equal(outputs(autocast=False)[1], exact_logits)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def bf16_outputs(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.eval()(pixel_values=pixels)
    return out.pred_boxes, out.logits


def test_a_model_with_fp32_heads_pickles_and_deep_copies(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DetrForObjectDetection(tiny_detr_config())
    keep_heads_in_fp32(model)
    pixels = torch.randn(1, 3, 64, 96)
    expected = bf16_outputs(model, pixels)
    torch.save(model, tmp_path / "model.pt")
    _fp32_class.cache_clear()  # as in a fresh process: the fp32 classes are made again on load
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    for twin in (loaded, copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        head = twin.bbox_predictor
        assert isinstance(head, DetrMLPPredictionHead) and head is not model.bbox_predictor
        assert keep_heads_in_fp32(twin) == 2  # still recognised: no second wrapper
        assert type(head).__mro__.count(DetrMLPPredictionHead) == 1
        got = bf16_outputs(twin, pixels)
        assert all(t.dtype == torch.float32 for t in got)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_the_state_dict_loads_in_plain_transformers(tmp_path: Path) -> None:
    model = DetrForObjectDetection(tiny_detr_config())
    keep_heads_in_fp32(model)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    plain = DetrForObjectDetection(tiny_detr_config())
    plain.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True), strict=True)
    assert type(plain.bbox_predictor) is DetrMLPPredictionHead


def test_an_exception_in_a_head_leaves_autocast_on() -> None:
    model = DetrForObjectDetection(tiny_detr_config())
    keep_heads_in_fp32(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):
            model.bbox_predictor(torch.randn(2, 7))  # the wrong width: its first matmul fails
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
