"""``DetrTrainer``: ``transformers.Trainer`` with DETR's optimizer and COCO evaluation.

* Optimizer: the Trainer's own (``--optim``, AdamW by default) with one parameter group per
  learning rate and weight decay (:func:`parameter_learning_rates`). The family's backbone
  (:meth:`~models.families.Family.is_backbone`) learns at ``lr_backbone``, the rest at
  ``learning_rate``, as in DETR; a ViT backbone with a layer decay in its family's recipe
  (LW-DETR, RF-DETR) learns slower the closer a layer is to the input. Frozen parameters are
  left out. The scheduler scales every group.
* Checkpoint loading (resume, best model at the end): transformers 5 saves DETR weights under
  the checkpoint format's key names, which the Trainer's raw ``load_state_dict`` does not map
  back, so it would silently keep the current weights. Weights are loaded through
  ``from_pretrained``, which applies the key mapping.
* Checkpoints: a kill while saving never leaves a checkpoint that looks complete, and
  evaluation does not move the random state, so resumed runs continue exactly (see
  :mod:`hf_detr_ft.training.checkpoints`).
* Speed: the model's frozen BatchNorms are folded into its convolutions and, with
  ``channels_last`` (the default), its convolution weights stored NHWC
  (:mod:`hf_detr_ft.models.speedups`; same outputs, same state dict).
* Mixed precision (``bf16``, ``fp16``; chosen for the GPU by ``auto_mixed_precision``): the
  class and box heads run in fp32 (:mod:`hf_detr_ft.models.mixed_precision`), so boxes keep their
  precision.
* Multi-process loss: losses are computed inside
  :func:`~training.loss_normalisation.corrected_loss_normalisation`, which, only where the installed
  transformers needs it, corrects the box losses that transformers 5 scales by the process count.
* Weight average (``ema_decay`` > 0): an EMA of the weights (:mod:`hf_detr_ft.training.ema`) is what
  evaluation scores, checkpoints and the final save hold, best-model selection picks and the
  Hub gets; each checkpoint also keeps the optimizer's own weights, so a resume is exact. After
  ``train()`` the model holds the average.
* Hub: the repo is created and the final push made through :mod:`hf_detr_ft.artifacts.hub` (clear
  errors, only the files a model repo needs, the card of ``ModelCardCallback`` kept); the
  Trainer's own checkpoint pushes (``hub_strategy``) are unchanged.
* Training batches: with ``group_by_aspect_ratio`` (the default) each batch holds images of
  similar aspect ratio (:mod:`hf_detr_ft.pipeline.sampler`), so padding to the batch's largest image
  wastes few pixels; accelerate still deals whole batches to the processes. Evaluation
  images are sorted by aspect ratio for the same reason.
* Evaluation: each batch is post-processed right away and fed to a
  :class:`~evaluation.coco_metrics.CocoEvaluator`; the Trainer's own loop still prepares the
  model (DDP, FSDP, DeepSpeed) and averages the loss. Metrics: ``eval_loss``, DETR's loss terms
  (``eval_loss_ce``, ``eval_loss_bbox``, ``eval_loss_giou``, ``eval_cardinality_error``), the 12
  COCO numbers (``eval_map`` ...) and ``eval_ap_<class>`` / ``eval_ar_<class>``.
* Training signals (what the original DETR logs, so a run that does not learn shows it): every
  training log adds the model's main loss terms (DETR: ``loss_ce``, ``loss_bbox``,
  ``loss_giou``, ``cardinality_error``; RT-DETR: ``loss_vfl``, ``loss_bbox``, ``loss_giou``,
  already weighted by transformers) and ``class_error``, averaged over the logging interval
  (the Trainer adds ``grad_norm``); evaluation adds ``eval_class_error``. ``class_error`` is
  the percentage of Hungarian-matched queries whose top class is wrong (100 - accuracy), see
  :func:`count_class_errors`.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import datasets
import torch
from accelerate.utils import gather_object
from torch import nn
from transformers import PretrainedConfig, Trainer
from transformers.loss.loss_for_object_detection import HungarianMatcher
from transformers.loss.loss_rt_detr import RTDetrHungarianMatcher
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalLoopOutput
from transformers.utils import SAFE_WEIGHTS_NAME

from ..arguments import apply_family_recipe
from ..artifacts.hub import create_hub_repo, push_output_dir
from ..errors import ArgumentError
from ..evaluation.coco_metrics import CocoEvaluator
from ..models.families import Family, family_of
from ..models.mixed_precision import keep_heads_in_fp32
from ..models.speedups import apply_speedups
from ..pipeline.sampler import AspectRatioGroupedSampler, AspectRatioSortedSampler
from .checkpoints import discard_checkpoint, random_state_kept
from .console import use_console
from .ema import (
    UpdateAverageCallback,
    WeightAverage,
    load_training_weights,
    save_training_weights,
)
from .loss_normalisation import corrected_loss_normalisation

#: The focal class cost's alpha and gamma where a family's config has no matcher values of its
#: own: what transformers' Deformable DETR and LW-DETR matchers hard-code (``focal_alpha`` in
#: their configs weighs the loss, not the matching).
FOCAL_MATCHER_ALPHA = 0.25
FOCAL_MATCHER_GAMMA = 2.0

#: Loss-dict names of the auxiliary terms: per decoder layer (``_0``, ``_aux_0``), denoising
#: (``_dn_0``) and encoder proposals (``_enc``). Only the main terms are logged.
_AUXILIARY_TERM = re.compile(r"_(aux|dn|enc)(_\d+)?$|_\d+$")


def is_backbone_parameter(name: str, config: PretrainedConfig) -> bool:
    """Whether parameter ``name`` learns at ``lr_backbone``: its family's backbone pattern
    (not every family names its backbone ``backbone``, and LW-DETR's neck sits under one)."""
    return family_of(config).is_backbone(name)


def parameter_learning_rates(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    config: PretrainedConfig,
    learning_rate: float,
    lr_backbone: float,
) -> dict[str, float]:
    """The learning rate of each trainable parameter, by name (frozen ones are left out).

    Backbone parameters learn at ``lr_backbone``. With a layer decay ``d`` in the family's
    recipe, layer ``i`` of a ViT backbone of ``L`` layers learns at ``lr_backbone * d**(L - i)``
    and what has no layer index (the embeddings) at ``lr_backbone * d**(L + 1)``: the layers
    nearest the input hold the most general pretrained features, so they move least.
    """
    family = family_of(config)
    named = list(named_parameters)
    layers = {family.backbone_layer_of(name) for name, _ in named if family.is_backbone(name)}
    num_layers = len(layers - {None})
    return {
        name: (
            _backbone_rate(family, name, lr_backbone, num_layers)
            if family.is_backbone(name)
            else learning_rate
        )
        for name, param in named
        if param.requires_grad
    }


def _backbone_rate(family: Family, name: str, lr_backbone: float, num_layers: int) -> float:
    """``lr_backbone``, decayed by the parameter's depth in a ViT backbone (see above)."""
    decay = family.recipe.layer_decay
    if decay is None or not num_layers:
        return lr_backbone
    layer = family.backbone_layer_of(name)
    return lr_backbone * decay ** (num_layers + 1 if layer is None else num_layers - layer)


def matched_queries(tensor: torch.Tensor, config: PretrainedConfig) -> torch.Tensor:
    """The ``[batch, queries, ...]`` outputs of the model's own queries, those its matching and
    its predictions use: in training RT-DETR's outputs start with denoising queries and group
    DETR's (LW-DETR, RF-DETR) hold every group, group 0 first (the one kept for inference)."""
    family = family_of(config)
    count = family.num_queries(config)
    rule = family.training_queries
    chosen = {"all": slice(None), "first": slice(None, count), "last": slice(-count, None)}
    if rule not in chosen:
        raise ValueError(f"Unknown training_queries rule {rule!r} of {family.name}.")
    return tensor[:, chosen[rule]]


def _matcher(config: PretrainedConfig) -> nn.Module:
    """The Hungarian matcher of the model's loss: softmax class cost (DETR, with a no-object
    class) or focal class cost on sigmoid scores, with the model's matching costs."""
    family = family_of(config)
    class_cost, bbox_cost, giou_cost = family.matcher_cost_values(config)
    if not family.sigmoid_classes:
        return HungarianMatcher(class_cost=class_cost, bbox_cost=bbox_cost, giou_cost=giou_cost)
    focal = SimpleNamespace(
        matcher_class_cost=class_cost,
        matcher_bbox_cost=bbox_cost,
        matcher_giou_cost=giou_cost,
        use_focal_loss=True,
        matcher_alpha=getattr(config, "matcher_alpha", FOCAL_MATCHER_ALPHA),
        matcher_gamma=getattr(config, "matcher_gamma", FOCAL_MATCHER_GAMMA),
    )
    return RTDetrHungarianMatcher(focal)


def count_class_errors(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    labels: list[dict[str, torch.Tensor]],
    config: PretrainedConfig,
) -> tuple[int, int]:
    """``(wrong, matched)``: matched queries whose top class is wrong, and all matched queries.

    The model's own queries (:func:`matched_queries`) are matched to the targets by the
    matcher of its loss, with its matching costs (:func:`_matcher`). A matched query is wrong
    when its highest logit is not its target's class: over every class and no-object for
    softmax models, over the classes' sigmoid scores for the others. DETR logs
    ``100 * wrong / matched`` as ``class_error``.
    """
    if not any(len(target["class_labels"]) for target in labels):
        return 0, 0  # nothing to match (and the matcher cannot take an empty batch)
    logits = matched_queries(logits.detach(), config)
    pred_boxes = matched_queries(pred_boxes.detach(), config)
    indices = _matcher(config)({"logits": logits, "pred_boxes": pred_boxes}, labels)
    wrong = matched = 0
    for image_logits, target, (queries, targets) in zip(logits, labels, indices):
        predicted = image_logits[queries].argmax(-1)
        wrong += int((predicted != target["class_labels"][targets].to(predicted.device)).sum())
        matched += len(queries)
    return wrong, matched


def main_loss_terms(loss_dict: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The loss terms of the final predictions, without the per-layer, denoising and encoder
    copies (RT-DETR has dozens of them; a log of every one hides the ones that matter)."""
    return {name: v for name, v in (loss_dict or {}).items() if not _AUXILIARY_TERM.search(name)}


def add_training_signals(
    totals: dict[str, float], outputs: Any, labels: list[dict], config: PretrainedConfig
) -> None:
    """Add one batch's main loss terms (weighted by its images) and class errors to ``totals``."""
    for name, value in main_loss_terms(outputs.loss_dict).items():
        totals[name] += float(value.detach()) * len(labels)
    totals["_images"] += len(labels)
    wrong, matched = count_class_errors(outputs.logits, outputs.pred_boxes, labels, config)
    totals["_wrong"] += wrong
    totals["_matched"] += matched


def training_signal_means(totals: dict[str, float]) -> dict[str, float]:
    """Per-image means of the loss terms and ``class_error`` (percent) from summed ``totals``."""
    totals = dict(totals)
    images, wrong, matched = (totals.pop(k, 0) for k in ("_images", "_wrong", "_matched"))
    means = {name: value / images for name, value in totals.items()} if images else {}
    if matched:
        means["class_error"] = 100.0 * wrong / matched
    return means


class DetrTrainer(Trainer):
    """A Trainer for DETR-family detectors; pass the image processor as ``processing_class``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.model is not None:
            # Options left unset take the family's recipe (the optimizer, clipping and weight
            # average below read them).
            apply_family_recipe(self.args, family_of(self.model.config))
            apply_speedups(self.model, channels_last=getattr(self.args, "channels_last", True))
            keep_heads_in_fp32(self.model)  # however autocast is turned on: flags, accelerate
        use_console(self, verbose=getattr(self.args, "verbose", False))
        self._weight_average = self._create_weight_average()
        self._evaluator: CocoEvaluator | None = None
        #: The evaluator of the last evaluation (its detections and pycocotools accumulation),
        #: for the error analysis after the final one (``run._finish``, ``evaluate``).
        self.last_evaluator: CocoEvaluator | None = None
        self._eval_loss_terms: dict[str, float] = defaultdict(float)
        self._train_signals: dict[str, float] = defaultdict(float)
        self._parameter_count: tuple[nn.Module, int] | None = None  # the model, its count

    def _create_weight_average(self) -> WeightAverage | None:
        """The EMA of the weights asked for by ``ema_decay``, updated after each optimizer step."""
        decay = getattr(self.args, "ema_decay", None) or 0.0
        if not decay or self.model is None:
            return None
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ArgumentError(
                "ema_decay works with one or several processes (DDP), not with FSDP or DeepSpeed, "
                "which shard the parameters; train without --ema_decay there."
            )
        average = WeightAverage(self.model, decay, self.args.ema_tau)
        self.add_callback(UpdateAverageCallback(average))
        return average

    def _averaged(self) -> AbstractContextManager:
        """Inside, the model holds the weight average (when there is one)."""
        average = self._weight_average
        return average.swapped_in() if average is not None else nullcontext()

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's training; then, with a weight average, the model takes its values."""
        output = super().train(*args, **kwargs)
        if self._weight_average is not None:
            self._weight_average.apply()
        return output

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's estimate for ``total_flos`` (6 x input elements x parameters), with the
        parameters counted once: the Trainer counts them at every step, walking every module
        each time (measured in benchmarks/README.md)."""
        pixels = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
        if pixels is None or not hasattr(self.model, "num_parameters"):
            return 0
        if self._parameter_count is None or self._parameter_count[0] is not self.model:
            self._parameter_count = (self.model, self.model.num_parameters(exclude_embeddings=True))
        return 6 * pixels.numel() * self._parameter_count[1]

    def _get_train_sampler(
        self, train_dataset: datasets.Dataset | None = None
    ) -> torch.utils.data.Sampler | None:
        """Aspect-ratio grouped order when asked for and the data has width/height columns."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        sizes = self._image_sizes(dataset)
        if sizes is None or self.args.train_sampling_strategy != "random":
            return super()._get_train_sampler(train_dataset)
        seed = self.args.seed if self.args.data_seed is None else self.args.data_seed
        return AspectRatioGroupedSampler(*sizes, self._train_batch_size, seed=seed)

    def _get_eval_sampler(self, eval_dataset: datasets.Dataset) -> torch.utils.data.Sampler | None:
        """Evaluation batches of similar aspect ratio (a fixed order), when asked for."""
        sizes = self._image_sizes(eval_dataset)
        if sizes is None:
            return super()._get_eval_sampler(eval_dataset)
        return AspectRatioSortedSampler(*sizes, self.args.eval_batch_size)

    def _image_sizes(self, dataset: Any) -> tuple[list[int], list[int]] | None:
        """The images' widths and heights with ``group_by_aspect_ratio``, if the data has them."""
        if not (
            getattr(self.args, "group_by_aspect_ratio", False)
            and isinstance(dataset, datasets.Dataset)
            and {"width", "height"} <= set(dataset.column_names)
        ):
            return None
        sizes = dataset.with_format(None).select_columns(["width", "height"])
        return sizes["width"], sizes["height"]

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer over one group per (learning rate, weight decay) pair."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(self._parameter_groups(opt_model), **optimizer_kwargs)
        return self.optimizer

    def _parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Trainable parameters grouped by rate (:func:`parameter_learning_rates`) and weight
        decay (none for biases and norms, as the Trainer decides), ``learning_rate`` first:
        the Trainer logs the first group's rate as ``learning_rate``."""
        decay = set(self.get_decay_parameter_names(model))
        config = self.accelerator.unwrap_model(model).config
        lr_backbone = getattr(self.args, "lr_backbone", self.args.learning_rate)
        rates = parameter_learning_rates(
            model.named_parameters(), config, self.args.learning_rate, lr_backbone
        )
        groups: dict[tuple[float, float], list[nn.Parameter]] = defaultdict(list)
        for name, param in model.named_parameters():
            if name in rates:
                weight_decay = self.args.weight_decay if name in decay else 0.0
                groups[(rates[name], weight_decay)].append(param)
        order = sorted(groups, key=lambda key: (key[0] != self.args.learning_rate, -key[0], key[1]))
        return [{"params": groups[lr, wd], "lr": lr, "weight_decay": wd} for lr, wd in order]

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        """Load the checkpoint's model (with EMA: the average, which the EMA restarts from),
        then the optimizer's own weights when the checkpoint kept them aside."""
        if not self._load_saved_weights(resume_from_checkpoint, model or self.model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self._weight_average is not None:
            self._weight_average.restart()
        load_training_weights(self.model, resume_from_checkpoint)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """The Trainer's save, into a folder cleared of any earlier save of the same step."""
        folder = os.path.join(
            self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        if self.args.should_save and os.path.isdir(folder):
            discard_checkpoint(folder)  # e.g. a save of this step killed before the resume
        if self.args.should_save and self._weight_average is not None:
            os.makedirs(folder, exist_ok=True)  # before trainer_state.json marks it complete
            save_training_weights(self._weight_average, folder)
        self.accelerator.wait_for_everyone()
        super()._save_checkpoint(model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's save, of the weight average when there is one."""
        with self._averaged():
            super().save_model(output_dir, _internal_call)

    def _save_rng_state(self, output_dir: str) -> None:
        """Save, then wait: trainer_state.json comes next and must mean "every file written"."""
        super()._save_rng_state(output_dir)
        self.accelerator.wait_for_everyone()

    def _load_best_model(self) -> None:
        if not self._load_saved_weights(self.state.best_model_checkpoint, self.model_wrapped):
            super()._load_best_model()
        if self._weight_average is not None:
            self._weight_average.restart()  # the best checkpoint's model is an average

    def _load_saved_weights(self, checkpoint: str, model: nn.Module) -> bool:
        """Load a ``save_pretrained`` checkpoint's weights in place; False if not applicable."""
        weights_file = os.path.join(checkpoint, SAFE_WEIGHTS_NAME)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not os.path.isfile(weights_file):
            return False
        model = self.accelerator.unwrap_model(model)
        saved = type(model).from_pretrained(checkpoint, dtype=model.dtype)
        model.load_state_dict(saved.state_dict())
        return True

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create the Hub repo through :mod:`artifacts.hub`: clear errors before training."""
        if not self.is_world_process_zero():
            return
        self.hub_model_id = create_hub_repo(
            self.args.hub_model_id or Path(self.args.output_dir).absolute().name,
            private=self.args.hub_private_repo if private is None else private,
            token=self.args.hub_token if token is None else token,
        )
        self.push_in_progress = None

    def push_to_hub(
        self,
        commit_message: str = "End of training",
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        *,
        save: bool = True,
    ) -> str | None:
        """Save and upload ``output_dir`` with :func:`hf_detr_ft.artifacts.hub.push_output_dir`.

        ``save=False`` uploads ``output_dir`` as it is (the end of ``run_training`` has saved
        the final model already, and written its report beside it).

        Unlike ``Trainer.push_to_hub`` this keeps the card written by ``ModelCardCallback``
        (``on_push_begin``), uploads only the files a model repo needs, blocks until done and
        raises a :class:`~hf_detr_ft.artifacts.hub.HubError` that says how to push again later.
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        if save:
            self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self._finish_current_push()
        return push_output_dir(
            self.args.output_dir,
            self.hub_model_id,
            private=self.args.hub_private_repo if private is None else private,
            revision=revision or self.args.hub_revision,
            token=self.args.hub_token if token is None else token,
            commit_message=commit_message,
        )

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
            with random_state_kept(), self._averaged():
                output = super().evaluation_loop(
                    dataloader, description, True, ignore_keys, metric_key_prefix
                )
            metrics = {
                **self._gather_loss_terms(self._eval_loss_terms),
                **self._evaluator.compute(),
            }
        finally:
            self.last_evaluator, self._evaluator = self._evaluator, None
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
        with torch.no_grad(), self.compute_loss_context_manager(), corrected_loss_normalisation():
            outputs = model(**inputs)
        if self._evaluator is not None:
            orig_sizes = torch.stack([target["orig_size"] for target in labels])
            results = self.processing_class.post_process_object_detection(
                outputs, threshold=0.0, target_sizes=orig_sizes
            )
            self._evaluator.update([int(target["image_id"]) for target in labels], results)
            add_training_signals(self._eval_loss_terms, outputs, labels, self.model.config)
        loss = outputs.loss.detach() if outputs.loss is not None else None
        return loss, None, None

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The Trainer's loss; also adds the batch's DETR signals to the next training log."""
        labels = inputs["labels"]
        with corrected_loss_normalisation():
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        add_training_signals(self._train_signals, outputs, labels, self.model.config)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the DETR signals averaged since the last training log to a training log."""
        if "loss" in logs:  # the Trainer's periodic training log, reached by every process
            logs.update(self._gather_loss_terms(self._train_signals))
            self._train_signals = defaultdict(float)
        super().log(logs, start_time)

    def _gather_loss_terms(self, sums: dict[str, float]) -> dict[str, float]:
        """Means of DETR's loss terms and class_error over the images of all processes."""
        totals: dict[str, float] = defaultdict(float)
        for part in gather_object([dict(sums)]):
            for name, value in part.items():
                totals[name] += value
        return training_signal_means(totals)
