"""Under autocast the prediction heads run in fp32: full-precision boxes and logits."""

from __future__ import annotations

import torch
from conftest import tiny_detr_config
from transformers import DetrForObjectDetection

from hf_detr_ft.models.mixed_precision import keep_heads_in_fp32


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
