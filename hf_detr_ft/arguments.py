"""The arguments of a fine-tuning run, as dataclasses for ``HfArgumentParser``.

``ModelArguments`` and ``DataArguments`` hold what is specific to this library;
``DetrTrainingArguments`` is ``transformers.TrainingArguments`` with best-model selection by COCO
mAP. The recipe options (learning rates, weight decay, gradient clipping, warm-up, weight
average, image sizes, multi-scale range) default to ``None``: the model family's published
recipe fills them (:func:`apply_family_recipe`, :mod:`hf_detr_ft.models.families`), and any
value the user gives wins. Every ``TrainingArguments`` option stays available, with the same
flag on ``hf-detr-ft train`` and ``examples/train.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, IntervalStrategy, TrainingArguments
from transformers.trainer_utils import SaveStrategy

from .artifacts.onnx_export import FORMATS as EXPORT_FORMATS
from .artifacts.onnx_export import QUANTIZATIONS
from .errors import ArgumentError
from .models.families import Family
from .models.loading import DEFAULT_MODEL
from .pipeline.augmentation import build_augmentation

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "Checkpoint to start from: a Hub id or a local save_pretrained folder."},
    )
    revision: str | None = field(
        default=None,
        metadata={"help": "Hub revision (branch, tag, commit).", "aliases": ["--model_revision"]},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modelling code from the checkpoint's repo."}
    )
    num_queries: int | None = field(
        default=None,
        metadata={
            "help": "Object queries, i.e. the most objects the model can find in one image "
            "(default: the checkpoint's, 100 for detr-resnet-50). Another value re-initialises "
            "the query embeddings, which are then learned from scratch."
        },
    )
    ignore_mismatched_sizes: bool = field(
        default=True,
        metadata={
            "help": "Re-initialise the checkpoint's tensors whose shape differs from the "
            "model's: the class head, for a new label map (the transformers example's flag, "
            "on by default here). false makes such a difference an error instead."
        },
    )
    freeze_backbone: bool = field(
        default=False,
        metadata={
            "help": "Keep the whole backbone frozen (default: only the stem the model family's "
            "recipe freezes). Skips the backbone's backward pass (about a third of a small "
            "model's step on a CPU); for data close to what the checkpoint was trained on."
        },
    )
    export: str | None = field(
        default=None,
        metadata={
            "help": "At the end of training, also export the saved model: onnx writes "
            "output_dir/onnx (model.onnx, checked against PyTorch on the evaluation split, and "
            "a README to run it with onnxruntime alone); see docs/export.md.",
            "choices": list(EXPORT_FORMATS),
        },
    )
    export_quantize: str = field(
        default="none",
        metadata={
            "help": "With --export: also write a quantized file (dynamic-int8 or static-int8 "
            "for CPUs, fp16 for GPUs) beside model.onnx.",
            "choices": list(QUANTIZATIONS),
        },
    )

    def __post_init__(self) -> None:
        _check_at_least("num_queries", self.num_queries, 1, optional=True)
        if self.export is not None and self.export not in EXPORT_FORMATS:
            raise ArgumentError(
                f"export must be one of {', '.join(EXPORT_FORMATS)}, got {self.export!r}."
            )
        if self.export_quantize not in QUANTIZATIONS:
            raise ArgumentError(
                f"export_quantize must be one of {', '.join(QUANTIZATIONS)}, got "
                f"{self.export_quantize!r}."
            )


@dataclass
class DataArguments:
    dataset_dir: str = field(
        metadata={
            "help": "Dataset folder (COCO, Pascal VOC, YOLO, a datasets save_to_disk folder or "
            "Parquet files) or a Hub dataset id (see docs/datasets.md). Also --dataset_name, "
            "as the transformers example scripts call it.",
            "aliases": ["--dataset_name"],
        }
    )
    num_classes: int | None = field(
        default=None,
        metadata={"help": "Number of object classes; checked against the annotations."},
    )
    dataset_layout: str = field(
        default="auto", metadata={"help": "COCO folder layout: auto, roboflow or coco."}
    )
    dataset_format: str = field(
        default="auto",
        metadata={"help": "Dataset format: auto (detected), coco, voc, yolo or hf (datasets)."},
    )
    strict: bool = field(
        default=False,
        metadata={"help": "Make every dropped image or box an error instead of a counted warning."},
    )
    dataset_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where a COCO folder's checked splits are kept as Arrow files, built once "
            "and memory-mapped by later runs and other processes. Default: $HF_DETR_FT_CACHE, "
            "else ~/.cache/hf_detr_ft/datasets (see docs/datasets.md)."
        },
    )
    dataset_cache: bool = field(
        default=True,
        metadata={"help": "Use the dataset cache (--no_dataset_cache reads the folder anew)."},
    )
    validation_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Share of training images split off when there is no validation split "
            "(also --train_val_split, as in the transformers example).",
            "aliases": ["--train_val_split"],
        },
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the training split of a Hub dataset (or a folder of Parquet files) "
            "instead of reading it whole, for datasets too big for the disk: needs --max_steps "
            "and step-based evaluation and saving; validation and test are read whole (see "
            "docs/datasets.md, Streaming)."
        },
    )
    shuffle_buffer: int = field(
        default=1000,
        metadata={
            "help": "With --streaming: rows held in memory to shuffle the stream (larger: "
            "better mixed, more memory; the rows hold encoded images)."
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Input size: the shortest image edge after resizing (DETR, Conditional, "
            "DAB, Deformable DETR, YOLOS) or the side of the square input (RT-DETR, D-FINE, "
            "DEIMv2, LW-DETR, RF-DETR; rounded to the model's stride). Default: the "
            "checkpoint's own size (DETR 800, RT-DETR 640, ...)."
        },
    )
    max_image_size: int | None = field(
        default=None,
        metadata={
            "help": "Longest image edge after resizing, at most; wins over image_size (e.g. "
            "600 alone: every image's longest edge 600, as the transformers example's "
            "--image_square_size, also accepted; square inputs: the side at most). "
            "Default: the checkpoint's (DETR 1333).",
            "aliases": ["--image_square_size"],
        },
    )
    min_scale: float | None = field(
        default=None,
        metadata={
            "help": "Multi-scale training: sizes are drawn from min_scale x image_size up to "
            "the family's largest scale (1 for DETR; 1.25 for RT-DETR's square sizes). Default: "
            "the family's recipe (DETR 0.6, RT-DETR 0.75); 1 with DETR turns it off."
        },
    )
    image_cache_mb: float | None = field(
        default=None,
        metadata={
            "help": "Memory in MB for decoded training images kept between epochs, so that "
            "each is decoded once (only without DataLoader workers, the CPU default). Default: "
            "an eighth of the machine's memory, at most 4096, divided among the machine's "
            "training processes; 0 decodes every epoch."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training images (for quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N images of each evaluation split."}
    )
    augmentation: str = field(
        default="default",
        metadata={
            "help": "Training augmentation: none, default (flip, box-safe crop, brightness/"
            "contrast), strong (default + scale/shift/rotate, colour jitter, blur) or a "
            ".json/.yaml file saved with albumentations' A.save (checked before training; "
            "see docs/training.md)."
        },
    )

    def __post_init__(self) -> None:
        for name in (
            "image_size",
            "max_image_size",
            "num_classes",
            "max_train_samples",
            "max_eval_samples",
            "shuffle_buffer",
        ):
            _check_at_least(name, getattr(self, name), 1, optional=True)
        for name in ("image_size", "max_image_size"):
            if (getattr(self, name) or 0) > MAX_IMAGE_SIDE:
                raise ArgumentError(
                    f"{name} must be at most {MAX_IMAGE_SIDE} pixels, got {getattr(self, name)}: "
                    "larger than any detector's input (DETR trains at 800, RT-DETR at 640)."
                )
        if not 0 <= self.validation_fraction < 1:
            raise ArgumentError(
                f"validation_fraction must be at least 0 and below 1, got "
                f"{self.validation_fraction}."
            )
        if self.min_scale is not None and not 0 < self.min_scale <= 1:
            raise ArgumentError(f"min_scale must be in (0, 1], got {self.min_scale}.")
        _check_at_least("image_cache_mb", self.image_cache_mb, 0, optional=True)
        build_augmentation(self.augmentation)  # a bad preset or file: refused before any data


@dataclass
class DetrTrainingArguments(TrainingArguments):
    output_dir: str | None = field(
        default="detr-finetuned", metadata={"help": "Where checkpoints and the final model go."}
    )
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the transformer and heads (default: the family's "
            "recipe, DETR 1e-4)."
        },
    )
    lr_backbone: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the backbone (default: the family's recipe, DETR 1e-5; "
            "LW-DETR and RF-DETR: the ViT's last layer, earlier layers decay)."
        },
    )
    weight_decay: float | None = field(
        default=None, metadata={"help": "AdamW weight decay (default: the family's, 1e-4)."}
    )
    max_grad_norm: float | None = field(
        default=None,
        metadata={"help": "Gradient clipping, max norm (default: the family's, 0.1)."},
    )
    warmup_steps: float | None = field(
        default=None,
        metadata={
            "help": "Linear warm-up steps (a float below 1: a share of the run). Default: the "
            "family's recipe (RT-DETR 2000, D-FINE 500, DETR none), at most a tenth of the run."
        },
    )
    num_train_epochs: float = field(default=30.0, metadata={"help": "Training epochs."})
    per_device_train_batch_size: int = field(
        default=4, metadata={"help": "Images per device per step."}
    )
    per_device_eval_batch_size: int = field(
        default=4, metadata={"help": "Images per device per eval step."}
    )
    eval_strategy: str = field(
        default="epoch", metadata={"help": "When to evaluate: no, steps, epoch."}
    )
    save_strategy: str = field(
        default="epoch", metadata={"help": "When to save: no, steps, epoch, best."}
    )
    save_total_limit: int | None = field(
        default=2, metadata={"help": "Checkpoints kept (best one always kept)."}
    )
    load_best_model_at_end: bool | None = field(
        default=None,
        metadata={
            "help": "Finish with the best checkpoint (default: on when the run evaluates and "
            "saves at the same points; off with eval_strategy no)."
        },
    )
    metric_for_best_model: str | None = field(
        default="eval_map", metadata={"help": "Metric that picks the best checkpoint."}
    )
    greater_is_better: bool | None = field(
        default=True, metadata={"help": "Whether a larger metric is better."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the transform needs the raw columns."}
    )
    dataloader_num_workers: int = field(
        default_factory=lambda: default_num_workers(),
        metadata={
            "help": "Processes that decode and augment images (default: up to 4 with a GPU; on "
            "a CPU a quarter of the cores, so 0 on small machines: see benchmarks/README.md)."
        },
    )
    dataloader_pin_memory: bool = field(
        default_factory=torch.cuda.is_available,
        metadata={"help": "Pin batches in memory (default: only when CUDA is available)."},
    )
    label_names: list[str] | None = field(
        default_factory=lambda: ["labels"], metadata={"help": "Label keys."}
    )
    group_by_aspect_ratio: bool = field(
        default=True,
        metadata={
            "help": "Batch images of similar aspect ratio together, in training and evaluation "
            "(less padding; see hf_detr_ft/sampler.py). Every image is still seen once per epoch."
        },
    )
    auto_mixed_precision: bool = field(
        default=True,
        metadata={
            "help": "When neither --bf16 nor --fp16 is given (nor accelerate's or DeepSpeed's "
            "own mixed precision): bf16 autocast on GPUs that compute in bf16 (compute "
            "capability 8.0+), fp16 with loss scaling on older ones (7.x), none on CPUs, where "
            "bf16 pays only with AMX (benchmarks/README.md). false: fp32 unless asked."
        },
    )
    channels_last: bool = field(
        default=True,
        metadata={
            "help": "Store convolution weights channels-last (NHWC): faster convolutions with "
            "oneDNN on CPUs and with bf16/fp16 on GPUs (see benchmarks/README.md)."
        },
    )
    ema_decay: float | None = field(
        default=None,
        metadata={
            "help": "Keep an exponential moving average of the weights with this decay (e.g. "
            "0.993) and evaluate, select, save and push it instead of the last weights (0: off; "
            "not with FSDP or DeepSpeed; see hf_detr_ft/training/ema.py). Default: the "
            "family's recipe (on for RT-DETR, D-FINE, LW-DETR, RF-DETR; off for DETR)."
        },
    )
    ema_tau: float | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps over which the average's decay ramps up to ema_decay: "
            "decay x (1 - exp(-step / ema_tau)). Default: the family's recipe (100; RT-DETR "
            "2000, D-FINE 1000)."
        },
    )
    hub_license: str | None = field(
        default="apache-2.0",
        metadata={"help": "License in the model card (default: that of facebook/detr-resnet-50)."},
    )
    hub_dataset_id: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id of the training data, for the model card's metadata."},
    )

    not_learning_check_after: float = field(
        default=0.25,
        metadata={
            "help": "Share of training after which a training class_error that has not improved "
            "is reported with its likely causes (0 turns the check off)."
        },
    )
    stop_if_not_learning: bool = field(
        default=False,
        metadata={"help": "Stop training (instead of only warning) when that check fails."},
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop training when metric_for_best_model (mAP) has not improved by more "
            "than early_stopping_threshold for this many evaluations in a row (default: off)."
        },
    )
    early_stopping_threshold: float = field(
        default=0.0,
        metadata={"help": "The least change of the metric that counts as an improvement."},
    )
    verbose: bool = field(
        default=False,
        metadata={
            "help": "Also print every log as a dict and the metric dumps, as transformers does "
            "(by default: one table row per evaluation; every log is in train_log.jsonl)."
        },
    )

    def __post_init__(self) -> None:
        if self.auto_mixed_precision and not self._mixed_precision_configured():
            chosen = mixed_precision_for(_cuda_capability(self.use_cpu))
            self.bf16, self.fp16 = chosen == "bf16", chosen == "fp16"
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            _check_at_least(name, getattr(self, name), 1)
        if self.max_steps <= 0 and not 0 < self.num_train_epochs < math.inf:  # NaN too
            raise ArgumentError(
                f"num_train_epochs must be positive and finite (or max_steps set), got "
                f"{self.num_train_epochs}: the run would train nothing."
            )
        for name in ("learning_rate", "lr_backbone", "weight_decay", "max_grad_norm"):
            _check_at_least(name, getattr(self, name), 0, optional=True)
        # transformers checks warmup_steps >= 0; None (the recipe's, see get_warmup_steps) waits.
        self.warmup_from_recipe = self.warmup_steps is None
        if self.warmup_from_recipe:
            self.warmup_steps = 0
        if self.load_best_model_at_end is None:
            self.load_best_model_at_end = _best_checkpoint_available(self)
        super().__post_init__()
        _check_trackers(self.report_to)
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ArgumentError(
                f"ema_decay must be at least 0 (off) and below 1, got {self.ema_decay}."
            )
        if self.ema_tau is not None and not 0 < self.ema_tau < math.inf:
            raise ArgumentError(f"ema_tau must be positive and finite, got {self.ema_tau}.")
        _check_early_stopping(self)

    def _mixed_precision_configured(self) -> bool:
        """Mixed precision chosen by the user: a flag, accelerate's config (its environment
        variable, also for FSDP; ``accelerate launch`` sets it to "no" when nothing is
        configured, which is not a choice) or DeepSpeed (its config has its own fp16/bf16)."""
        accelerate_choice = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        deepspeed = (
            self.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        )
        return bool(self.bf16 or self.fp16 or deepspeed or accelerate_choice != "no")

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """A recipe's warm-up (written for COCO schedules of ~500k steps) is at most a tenth
        of this run, so that a short fine-tune still trains at its learning rate."""
        steps = super().get_warmup_steps(num_training_steps)
        if getattr(self, "warmup_from_recipe", False):
            return min(steps, math.ceil(num_training_steps / 10))
        return steps

    def __getstate__(self) -> dict:
        """Pickle without tokens: the Trainer saves these arguments in training_args.bin."""
        state = self.__dict__.copy()
        state.update({key: None for key in state if key.endswith("_token")})
        return state


def _best_checkpoint_available(args: DetrTrainingArguments) -> bool:
    """Whether the run saves a checkpoint wherever it evaluates, so that the best one can be
    loaded at the end: the default of ``load_best_model_at_end``. transformers refuses the
    option otherwise, so a run without evaluation (or saving at other points) simply finishes
    with its last weights instead of failing on a default the user never set."""
    evaluation = IntervalStrategy(args.eval_strategy)
    saving = SaveStrategy(args.save_strategy)
    if evaluation == IntervalStrategy.NO or saving == SaveStrategy.NO:
        return False
    if saving == SaveStrategy.BEST:
        return True
    if saving.value != evaluation.value:
        return False
    if evaluation == IntervalStrategy.STEPS:
        eval_steps = args.eval_steps or args.logging_steps
        return eval_steps >= 1 and args.save_steps >= 1 and args.save_steps % eval_steps == 0
    return True


def _check_early_stopping(args: DetrTrainingArguments) -> None:
    """Early stopping watches ``metric_for_best_model`` at each evaluation: refuse settings
    without either (transformers' callback would only fail once training starts)."""
    _check_at_least("early_stopping_patience", args.early_stopping_patience, 1, optional=True)
    _check_at_least("early_stopping_threshold", args.early_stopping_threshold, 0)
    if args.early_stopping_patience is None:
        return
    if args.eval_strategy == IntervalStrategy.NO:
        raise ArgumentError(
            "early_stopping_patience needs evaluations to watch, but eval_strategy is 'no': "
            "set eval_strategy to epoch or steps."
        )
    if args.metric_for_best_model is None:
        raise ArgumentError(
            "early_stopping_patience watches metric_for_best_model, which is not set: set it "
            "(e.g. eval_map)."
        )


def _check_at_least(name: str, value: float | None, low: float, optional: bool = False) -> None:
    """Refuse a number below ``low``, NaN or infinity (and ``None`` unless ``optional``)."""
    if value is None and optional:
        return
    if value is None or not math.isfinite(value) or value < low:
        raise ArgumentError(f"{name} must be a number of at least {low:g}, got {value}.")


#: The largest image side accepted: beyond it, a run needs more memory than any machine has.
MAX_IMAGE_SIDE = 8192

#: The training options a family's recipe fills when the user leaves them unset.
RECIPE_OPTIONS = (
    "learning_rate",
    "lr_backbone",
    "weight_decay",
    "max_grad_norm",
    "ema_decay",
    "ema_tau",
)


def apply_family_recipe(args: TrainingArguments, family: Family) -> dict[str, float]:
    """Fill the training options left unset (``None``) from ``family``'s recipe, and its
    warm-up where the user gave none; returns what was filled. Values the user set win."""
    filled = {
        name: getattr(family.recipe, name)
        for name in RECIPE_OPTIONS
        if getattr(args, name, None) is None
    }
    if (
        getattr(args, "warmup_from_recipe", False)
        and args.warmup_steps != family.recipe.warmup_steps
    ):
        filled["warmup_steps"] = family.recipe.warmup_steps
    for name, value in filled.items():
        setattr(args, name, value)
    if filled:
        values = ", ".join(f"{name} {value:g}" for name, value in filled.items())
        logger.info("%s recipe (%s): %s.", family.name, family.recipe.source, values)
    return filled


def apply_family_data_defaults(args: DataArguments, family: Family) -> None:
    """The family's multi-scale range where the user set no ``min_scale``."""
    if args.min_scale is None:
        args.min_scale = family.recipe.train_scales[0]


def _check_trackers(report_to: list[str] | str | None) -> None:
    """Refuse ``--report_to`` trackers that are not installed, before any data is loaded
    (the Trainer would only fail once it starts)."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    wanted = [report_to] if isinstance(report_to, str) else list(report_to or [])
    available = set(get_available_reporting_integrations())
    missing = [name for name in wanted if name in INTEGRATION_TO_CALLBACK and name not in available]
    if missing:
        raise ArgumentError(
            f"report_to names {', '.join(missing)}, which is not installed here: install it "
            f"(pip install {' '.join(missing)}) or pass --report_to none."
        )


def effective_batch_size(args: TrainingArguments) -> int:
    """Images per optimizer step: per device x processes x gradient accumulation."""
    return args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps


def mixed_precision_for(cuda_capability: tuple[int, int] | None) -> str:
    """``auto_mixed_precision``'s choice for a GPU of this compute capability (``None``: no
    GPU): ``"bf16"`` from Ampere (8.0) on, ``"fp16"`` for Volta and Turing (7.x), whose
    tensor cores have no bf16, else ``"no"``."""
    if cuda_capability is None:
        return "no"
    if cuda_capability >= (8, 0):
        return "bf16"
    return "fp16" if cuda_capability >= (7, 0) else "no"


def _cuda_capability(use_cpu: bool) -> tuple[int, int] | None:
    if use_cpu or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()


def default_num_workers() -> int:
    """Data workers by default: a quarter of the cores on a CPU, up to 4 with a GPU. On a CPU the
    model's step takes far longer than loading its batch in the main process, so workers would
    only take cores from the model (measured in benchmarks/README.md); a GPU leaves the cores
    free for decoding and augmenting."""
    cores = os.cpu_count() or 1
    return min(4, cores if torch.cuda.is_available() else cores // 4)


def parse_train_args(
    argv: list[str] | None = None, prog: str | None = None
) -> tuple[ModelArguments, DataArguments, DetrTrainingArguments]:
    """Parse command-line flags (or one JSON/YAML file of them) into the three dataclasses.

    Every mistake becomes one :class:`ArgumentError` line: an unknown flag or key (with the
    closest known name), a missing or unreadable config file, and a combination of values
    that ``TrainingArguments`` refuses.
    """
    classes = (ModelArguments, DataArguments, DetrTrainingArguments)
    parser = HfArgumentParser(classes, prog=prog)
    is_file = bool(argv) and len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml"))
    try:
        if not is_file:
            return parser.parse_args_into_dataclasses(args=argv)
        if not Path(argv[0]).is_file():
            raise ArgumentError(f"Config file {argv[0]} does not exist.")
        parse_file = parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file
        return parse_file(argv[0])
    except ArgumentError:
        raise
    except (ValueError, TypeError, OSError) as err:  # unknown keys, refused combinations
        where = f" in {argv[0]}" if is_file else ""
        raise ArgumentError(f"{_with_suggestions(str(err), classes)}{where}") from err


def _with_suggestions(message: str, classes: tuple[type, ...]) -> str:
    """``message`` on one line, with the closest known option for each unknown one it names."""
    known = {f.name for cls in classes for f in dataclasses.fields(cls) if f.init}
    unknown = re.findall(r"'-*([A-Za-z_][\w-]*)'", message) if "not used" in message else []
    hints = [
        f"{name!r}: did you mean {close[0]!r}?"
        for name in unknown
        if (close := difflib.get_close_matches(name, known, n=1))
    ]
    return " ".join([" ".join(message.split()), *hints])
