"""``DetrTrainer``: ``transformers.Trainer`` with DETR's optimizer and COCO evaluation.

* Optimizer: the Trainer's own (``--optim``, AdamW by default) with four parameter groups:
  backbone / rest x weight decay / none. The backbone learns at ``lr_backbone``, the rest at
  ``learning_rate``, as in DETR. The scheduler scales both.
* Checkpoint loading (resume, best model at the end): transformers 5 saves DETR weights under
  the checkpoint format's key names, which the Trainer's raw ``load_state_dict`` does not map
  back, so it would silently keep the current weights. Weights are loaded through
  ``from_pretrained``, which applies the key mapping.
* Multi-process loss: see :mod:`hf_detr_ft.compat` (box losses were scaled by the process
  count in transformers 5).
* Evaluation: each batch is post-processed right away and fed to a
  :class:`~hf_detr_ft.evaluation.CocoEvaluator`; the Trainer's own loop still prepares the
  model (DDP, FSDP, DeepSpeed) and averages the loss. Metrics: ``eval_loss``, DETR's loss terms
  (``eval_loss_ce``, ``eval_loss_bbox``, ``eval_loss_giou``, ``eval_cardinality_error``), the 12
  COCO numbers (``eval_map`` ...) and ``eval_ap_<class>`` / ``eval_ar_<class>``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import EvalLoopOutput
from transformers.utils import SAFE_WEIGHTS_NAME

from .compat import fix_object_detection_loss_normalisation
from .evaluation import CocoEvaluator

fix_object_detection_loss_normalisation()


def is_backbone_parameter(name: str) -> bool:
    """DETR-family models keep their CNN under a module named ``backbone``."""
    return "backbone" in name


class DetrTrainer(Trainer):
    """A Trainer for DETR-family detectors; pass the image processor as ``processing_class``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._evaluator: CocoEvaluator | None = None
        self._eval_loss_terms: dict[str, float] = defaultdict(float)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        lr_backbone = getattr(self.args, "lr_backbone", self.args.learning_rate)
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = defaultdict(list)
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                groups[(is_backbone_parameter(name), name in decay)].append(param)
        param_groups = [
            {
                "params": params,
                "lr": lr_backbone if in_backbone else self.args.learning_rate,
                "weight_decay": self.args.weight_decay if decays else 0.0,
            }
            for (in_backbone, decays), params in sorted(groups.items())
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        if not self._load_saved_weights(resume_from_checkpoint, model or self.model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not self._load_saved_weights(self.state.best_model_checkpoint, self.model_wrapped):
            super()._load_best_model()

    def _load_saved_weights(self, checkpoint: str, model: nn.Module) -> bool:
        """Load a ``save_pretrained`` checkpoint's weights in place; False if not applicable."""
        weights_file = os.path.join(checkpoint, SAFE_WEIGHTS_NAME)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not os.path.isfile(weights_file):
            return False
        model = self.accelerator.unwrap_model(model)
        saved = type(model).from_pretrained(checkpoint, dtype=model.dtype)
        model.load_state_dict(saved.state_dict())
        return True

    def evaluation_loop(
        self,
        dataloader: torch.utils.data.DataLoader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        self._evaluator = CocoEvaluator.from_dataset(dataloader.dataset)
        self._eval_loss_terms = defaultdict(float)
        try:
            output = super().evaluation_loop(
                dataloader, description, True, ignore_keys, metric_key_prefix
            )
            metrics = {**self._gather_loss_terms(), **self._evaluator.compute()}
        finally:
            self._evaluator = None
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in metrics.items()})
        return output

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, None, None]:
        """Forward one batch, feed its post-processed detections to the COCO evaluator."""
        inputs = self._prepare_inputs(inputs)
        labels = inputs["labels"]
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**inputs)
        if self._evaluator is not None:
            orig_sizes = torch.stack([target["orig_size"] for target in labels])
            results = self.processing_class.post_process_object_detection(
                outputs, threshold=0.0, target_sizes=orig_sizes
            )
            self._evaluator.update([int(target["image_id"]) for target in labels], results)
            for name, value in (outputs.loss_dict or {}).items():
                self._eval_loss_terms[name] += float(value) * len(labels)
            self._eval_loss_terms["_images"] += len(labels)
        loss = outputs.loss.detach() if outputs.loss is not None else None
        return loss, None, None

    def _gather_loss_terms(self) -> dict[str, float]:
        """Mean of each DETR loss term over the evaluation images of all processes."""
        totals: dict[str, float] = defaultdict(float)
        for part in gather_object([dict(self._eval_loss_terms)]):
            for name, value in part.items():
                totals[name] += value
        images = totals.pop("_images", 0)
        return {name: value / images for name, value in totals.items()} if images else {}
