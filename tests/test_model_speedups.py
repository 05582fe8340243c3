"""Folded frozen BatchNorms and channels-last weights: same outputs, gradients and state dict;
a sped-up model still pickles; a renamed transformers layer skips only its own speed-up."""

from __future__ import annotations

import copy
import importlib.util
import logging
import pickle
from pathlib import Path

import pytest
import torch
from conftest import tiny_detr_config
from torch import nn
from transformers import DetrConfig, DetrForObjectDetection
from transformers.models.detr.modeling_detr import DetrFrozenBatchNorm2d
from transformers.models.resnet import modeling_resnet

from hf_detr_ft.models import speedups
from hf_detr_ft.models.loading import freeze_backbone_parts
from hf_detr_ft.models.speedups import (
    FrozenNormConv2d,
    _exact_fp32,
    apply_speedups,
    fold_frozen_batchnorm,
    inplace_resnet_activations,
)


def small_detr(backbone: str) -> DetrForObjectDetection:
    """A small DETR (timm ResNet-18 or the tests' transformers ResNet), no dropout, with frozen
    norm statistics drawn at random so that folding them is not a no-op."""
    torch.manual_seed(0)
    if backbone == "timm":
        config = DetrConfig(
            backbone="resnet18",
            use_pretrained_backbone=False,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_queries=10,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            num_labels=3,
        )
    else:
        config = tiny_detr_config(num_labels=3)
    config.dropout = config.attention_dropout = config.activation_dropout = 0.0
    model = DetrForObjectDetection(config)
    for norm in frozen_norms(model):
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.2)
        norm.running_mean.normal_(0, 0.2)
        norm.running_var.uniform_(0.5, 2.0)
    freeze_backbone_parts(model)  # as loaded for training: later stages train
    return model


def frozen_norms(model: nn.Module) -> list[DetrFrozenBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, DetrFrozenBatchNorm2d)]


def loss_and_gradients(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    pixels = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    labels = [
        {
            "class_labels": torch.tensor([0, 2]),
            "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]]),
        },
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.5]])},
    ]
    loss = model(pixel_values=pixels, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("backbone", ["timm", "transformers"])
def test_folding_keeps_outputs_and_gradients(backbone: str) -> None:
    model = small_detr(backbone)
    reference = copy.deepcopy(model)
    folded = fold_frozen_batchnorm(model)
    assert folded == len(frozen_norms(model)) > 0
    assert sum(isinstance(m, FrozenNormConv2d) for m in model.modules()) == folded

    pixels = torch.randn(1, 3, 80, 112)
    with torch.no_grad():
        expected, got = reference.eval()(pixel_values=pixels), model.eval()(pixel_values=pixels)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.pred_boxes, expected.pred_boxes, rtol=1e-4, atol=1e-5)

    loss, grads = loss_and_gradients(model)
    expected_loss, expected_grads = loss_and_gradients(reference)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-4, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    assert any("backbone" in name for name in grads)  # the folded convolutions do train
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_all_speedups_keep_outputs_and_gradients_of_a_transformers_resnet() -> None:
    model = small_detr("transformers")
    reference = copy.deepcopy(model)
    apply_speedups(model, channels_last=True)
    backbone = [m for m in model.model.backbone.modules() if isinstance(m, nn.ReLU)]
    assert backbone and all(relu.inplace for relu in backbone)  # tiny_detr_config's ResNet
    others = [m for m in model.modules() if isinstance(m, nn.ReLU) and m not in backbone]
    assert not any(relu.inplace for relu in others)  # modules not known to be safe
    assert inplace_resnet_activations(reference) == len(backbone)
    for relu in reference.modules():
        if isinstance(relu, nn.ReLU):
            relu.inplace = False

    pixels = torch.randn(2, 3, 80, 112)
    with torch.no_grad():
        expected, got = reference.eval()(pixel_values=pixels), model.eval()(pixel_values=pixels)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-5)
    loss, grads = loss_and_gradients(model)  # autograd would raise on a needed tensor overwritten
    expected_loss, expected_grads = loss_and_gradients(reference)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-4, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_state_dict_and_saved_checkpoint_unchanged(tmp_path: Path) -> None:
    model = small_detr("transformers")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = list(model.parameters())
    apply_speedups(model, channels_last=True)
    # the optimizer sees the same tensors
    assert all(a is b for a, b in zip(model.parameters(), parameters, strict=True))
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    convolutions = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convolutions)

    model.save_pretrained(tmp_path)
    reloaded = DetrForObjectDetection.from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, FrozenNormConv2d) for m in reloaded.modules())
    pixels = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(pixel_values=pixels).logits,
            reloaded(pixel_values=pixels).logits,
            rtol=1e-4,
            atol=1e-5,
        )


def test_a_copy_uses_its_own_norms_and_folding_twice_changes_nothing() -> None:
    model = small_detr("transformers")
    apply_speedups(model)
    assert fold_frozen_batchnorm(model) == 0
    twin = copy.deepcopy(model).eval()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = twin(pixel_values=pixels).logits
        for norm in frozen_norms(model):
            norm.running_var.mul_(4.0)  # the original changes, the copy must not
        assert torch.equal(twin(pixel_values=pixels).logits, expected)
        assert not torch.allclose(model.eval()(pixel_values=pixels).logits, expected)


class NormBeforeConv(nn.Module):
    """Registers a convolution, then the norm that it actually applies *before* it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = DetrFrozenBatchNorm2d(3)
        self.norm.running_mean.fill_(0.5)
        self.norm.weight.fill_(2.0)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(pixel_values))


def test_a_norm_not_applied_after_its_convolution_is_left_alone() -> None:
    model = NormBeforeConv()
    pixels = torch.randn(1, 3, 16, 16)
    expected = model(pixels)
    assert fold_frozen_batchnorm(model) == 0
    assert type(model.conv) is nn.Conv2d
    torch.testing.assert_close(model(pixels), expected)


def test_the_check_runs_without_tf32_on_a_gpu_and_restores_it() -> None:
    # cuDNN's default TF32 rounding alone would fail the folded model's output check.
    flags = (torch.backends.cudnn, torch.backends.cuda.matmul)
    saved = [f.allow_tf32 for f in flags]
    try:
        for f in flags:
            f.allow_tf32 = True
        with _exact_fp32(torch.device("cuda")):
            assert not any(f.allow_tf32 for f in flags)
        assert all(f.allow_tf32 for f in flags)
        with _exact_fp32(torch.device("cpu")):
            assert all(f.allow_tf32 for f in flags)
    finally:
        for f, value in zip(flags, saved):
            f.allow_tf32 = value


def test_a_sped_up_model_pickles_and_deep_copies(tmp_path: Path) -> None:
    model = small_detr("transformers").eval()
    apply_speedups(model)
    pixels = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    for twin in (loaded, copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        convs = [m for m in twin.modules() if isinstance(m, FrozenNormConv2d)]
        assert len(convs) == len(frozen_norms(model)) > 0
        own_norms = set(frozen_norms(twin))
        assert all(conv.__dict__["folded_norm"] in own_norms for conv in convs)
        with torch.no_grad():
            assert torch.equal(twin.eval()(pixel_values=pixels).logits, expected)


def test_without_transformers_resnet_layers_the_inplace_relus_are_skipped_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As if transformers renamed a layer: importing the module still works, the speed-up is
    # skipped with one log line, and the rest still applies. The models are built first, as
    # transformers' own ResNet code uses the name.
    models = [small_detr("transformers").eval() for _ in range(2)]
    reference = copy.deepcopy(models[0])
    monkeypatch.delattr(modeling_resnet, "ResNetBasicLayer")
    spec = importlib.util.spec_from_file_location(
        "hf_detr_ft.models.fresh_speedups", speedups.__file__
    )
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)  # a fresh import of the module, without the name
    caplog.set_level(logging.INFO)
    for model in models:
        fresh.apply_speedups(model)
    relus = [m for model in models for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and not any(relu.inplace for relu in relus)
    assert any(type(m).__name__ == "FrozenNormConv2d" for m in models[0].modules())
    pixels = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(
            models[0](pixel_values=pixels).logits, reference.eval()(pixel_values=pixels).logits
        )
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1
    assert "in-place ReLU" in skipped[0] and "ResNetBasicLayer" in skipped[0]
