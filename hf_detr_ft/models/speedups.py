"""Make a loaded detector cheaper to run without changing what it computes or saves.

Three changes, applied by :func:`apply_speedups` to every model the library trains, evaluates
or predicts with (what each one gains is measured in benchmarks/README.md):

* **Frozen BatchNorm folded into the convolution before it.** DETR's backbone normalises with
  frozen statistics (``DetrFrozenBatchNorm2d``: ``x * scale + shift`` with constant ``scale``
  and ``shift``), i.e. two extra passes over every feature map forward and two backward.
  Folded, the convolution runs with ``weight * scale`` and bias ``shift`` (computed from the
  current parameters at each call, so the weight still trains): one pass instead of three.
  Parameters and buffers stay where they were, so the state dict, checkpoints and the
  optimizer see exactly the same tensors; only ``forward`` changes. The folded convolution's
  class, :class:`FrozenNormConv2d`, and the norm's pass-through ``forward`` are module-level
  names, so a folded model still pickles (``torch.save`` of the whole model) and deep-copies.
* **In-place ReLUs in transformers' ResNet backbone**, as timm's and torchvision's ResNets
  have: each one overwrites the freshly computed convolution (or residual sum) it follows
  instead of writing a new feature map; nothing else reads that tensor, forward or backward.
  That holds for the layer classes named in :data:`INPLACE_RELU_LAYERS`; they are looked up
  when the speed-up is applied, and if transformers no longer has one of them (renamed or
  moved) the speed-up is skipped with one log line instead of breaking the import.
* **Channels-last convolution weights** (optional): oneDNN on CPUs and cuDNN with bf16/fp16
  on GPUs run NHWC convolutions faster; PyTorch then runs every convolution channels-last.

Folding relies on a convolution being registered right before the norm layer applied to its
output (true of timm's and transformers' ResNets). It is checked on a small random image
(on a GPU without TF32, which alone changes outputs by ~1e-3) before it is kept: if the
model's outputs change, it is undone and the model runs as loaded.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from .families import family_of
from .input_sizes import FIRST_SIDE, eval_mode, smallest_input_side

logger = logging.getLogger(__name__)

#: Where transformers defines the ResNet layers whose ReLUs may run in place.
RESNET_MODULE = "transformers.models.resnet.modeling_resnet"
#: Those layers: conv, norm, activation (``ResNetConvLayer``), or residual added, then
#: activation (``ResNetBasicLayer``, ``ResNetBottleNeckLayer``).
INPLACE_RELU_LAYERS = ("ResNetConvLayer", "ResNetBasicLayer", "ResNetBottleNeckLayer")
#: The reasons a speed-up was skipped for, logged once each per process.
_reported_skips: set[str] = set()

#: The variance epsilon of transformers' frozen norms (torchvision's has an ``eps`` attribute).
_FROZEN_NORM_EPS = 1e-5
_NORM_BUFFERS = ("weight", "bias", "running_mean", "running_var")


class FrozenNormConv2d(nn.Conv2d):
    """A ``Conv2d`` that applies the frozen norm layer after it as part of its own convolution.

    The norm is referenced (``folded_norm``), not registered as a child, so it keeps its place
    in the module tree and the state dict.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        norm = self.__dict__["folded_norm"]
        scale = norm.weight * (norm.running_var + getattr(norm, "eps", _FROZEN_NORM_EPS)).rsqrt()
        shift = norm.bias - norm.running_mean * scale
        weight = self.weight * scale.reshape(-1, 1, 1, 1)
        bias = shift if self.bias is None else self.bias * scale + shift
        return self._conv_forward(input, weight, bias)


def apply_speedups(model: nn.Module, *, channels_last: bool = True) -> None:
    """Fold frozen norms into convolutions, make the ResNet's ReLUs in-place and, with
    ``channels_last``, store conv weights NHWC."""
    folded = fold_frozen_batchnorm(model)
    if folded:
        logger.info("Folded %d frozen BatchNorm layers into their convolutions.", folded)
    inplace_resnet_activations(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)


def inplace_resnet_activations(model: nn.Module) -> int:
    """Make the ReLU of every transformers ResNet layer in-place; returns how many.

    In those layers (``ResNetConvLayer``: conv, norm, activation; ``ResNetBasicLayer`` and
    ``ResNetBottleNeckLayer``: residual added in place, then activation) the activation's input
    is a new tensor that only the activation reads, so overwriting it changes no output and no
    gradient; other modules' activations are left as they are. Returns 0 (and logs why, once)
    when transformers no longer defines one of those layers.
    """
    layers = _resnet_layer_classes()
    if layers is None:
        return 0
    activations = [
        module.activation
        for module in model.modules()
        if isinstance(module, layers) and type(module.activation) is nn.ReLU
    ]
    for activation in activations:
        activation.inplace = True
    return len(activations)


def _resnet_layer_classes() -> tuple[type[nn.Module], ...] | None:
    """The classes of :data:`INPLACE_RELU_LAYERS`, or None if transformers lacks one: the
    in-place argument was made for those classes' code, so a renamed or restructured module
    is not assumed to be safe."""
    try:
        module = importlib.import_module(RESNET_MODULE)
    except ImportError:
        module = None
    classes = [getattr(module, name, None) for name in INPLACE_RELU_LAYERS]
    missing = [name for name, cls in zip(INPLACE_RELU_LAYERS, classes) if cls is None]
    if missing:
        _log_skip_once(
            f"Speed-up skipped: in-place ReLUs in transformers' ResNet backbone "
            f"({RESNET_MODULE} has no {', '.join(missing)})."
        )
        return None
    return tuple(classes)


def _log_skip_once(message: str) -> None:
    if message not in _reported_skips:
        _reported_skips.add(message)
        logger.warning(message)


def fold_frozen_batchnorm(model: nn.Module) -> int:
    """Fold every frozen norm layer into the ``Conv2d`` registered just before it.

    Returns how many were folded: 0 when the model has none, cannot run on ``pixel_values``
    alone, or would compute other outputs on a 64x64 random image (then nothing is changed).
    """
    pairs = [
        (conv, norm)
        for parent in model.modules()
        for conv, norm in _neighbours(parent)
        if type(conv) is nn.Conv2d and _is_frozen_norm(norm)
    ]
    if not pairs:
        return 0
    side = _side_it_runs_on(model)
    reference = None if side is None else _outputs_on_random_image(model, side)
    if reference is None:
        return 0
    for conv, norm in pairs:
        conv.__class__ = FrozenNormConv2d
        conv.__dict__["folded_norm"] = norm
        norm.forward = _already_applied
    if _same_outputs(reference, _outputs_on_random_image(model, side)):
        return len(pairs)
    for conv, norm in pairs:
        conv.__class__ = nn.Conv2d
        del conv.__dict__["folded_norm"], norm.__dict__["forward"]
    logger.info("Frozen BatchNorm layers left unfolded: this model's outputs would change.")
    return 0


def _already_applied(input: torch.Tensor) -> torch.Tensor:
    """The folded norm's forward: its convolution has already normalised ``input``."""
    return input


def _neighbours(parent: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    children = list(parent.children())
    return list(zip(children, children[1:]))


def _is_frozen_norm(module: nn.Module) -> bool:
    """DETR-family ``*FrozenBatchNorm2d`` layers (transformers and torchvision)."""
    buffers = dict(module.named_buffers(recurse=False))
    return type(module).__name__.endswith("FrozenBatchNorm2d") and all(
        name in buffers for name in _NORM_BUFFERS
    )


def _side_it_runs_on(model: nn.Module) -> int | None:
    """The smallest square side the model runs on: 64 px for most, more for two-stage models
    with many queries (RT-DETR's 300: 128 px); None if it runs on none (see input_sizes)."""
    try:
        multiple = family_of(model.config).size_multiple(model.config)
        return smallest_input_side(model, multiple, requested=FIRST_SIDE)
    except Exception as err:  # an optional speed-up never stops a run
        logger.debug("Cannot find an input size this model runs on: %s", err)
        return None


@torch.no_grad()
def _outputs_on_random_image(model: nn.Module, side: int) -> list[torch.Tensor] | None:
    """The model's floating-point outputs on a fixed random ``side x side`` image (None if it
    cannot run on just ``pixel_values``)."""
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, side, side, generator=generator)
    pixels = pixels.to(parameter.device, parameter.dtype)
    try:
        with eval_mode(model), _exact_fp32(parameter.device):
            outputs = model(pixel_values=pixels)
    except Exception as err:  # an optional speed-up never stops a run (e.g. ZeRO-3 shards)
        logger.debug("Cannot check folded norms on this model: %s", err)
        return None
    values = outputs.values() if isinstance(outputs, dict) else outputs
    return [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]


@contextlib.contextmanager
def _exact_fp32(device: torch.device) -> Iterator[None]:
    """On a GPU, fp32 convolutions and matmuls without TF32 while inside: cuDNN rounds fp32
    convolutions to TF32 by default (~1e-3 relative), which alone would fail the check of the
    folded model's outputs against the unfolded ones."""
    if device.type != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


def _same_outputs(before: list[torch.Tensor], after: list[torch.Tensor] | None) -> bool:
    return after is not None and all(
        torch.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(before, after, strict=True)
    )
