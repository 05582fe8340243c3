"""The model card: ``README.md`` in the output directory, written on every save.

The Hub reads the card's YAML header (``huggingface_hub.ModelCardData``): ``library_name``,
``pipeline_tag``, ``base_model``, ``datasets``, ``license``, ``tags`` and a ``model-index`` with
the COCO metrics (``huggingface_hub.EvalResult``), so the repo page shows them. The body tells a
reader what the model detects and how well (per-class AP), how it was trained, on what data
(images and boxes per split and class), what its predictions look like, and how to run it
(with the ONNX export's files and check when ``onnx/`` holds one).

:class:`ModelCardCallback` rewrites the card on every checkpoint save and before every Hub push
(with the latest evaluation); :func:`~hf_detr_ft.run.run_training` sets the final metrics
(``metrics.json``) once training is over, so the published card carries those.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import CONFIG_NAME

from ..arguments import effective_batch_size
from ..data.dataset_report import REPORT_JSON, split_stats
from ..evaluation.coco_metrics import SUMMARY_METRICS
from ..models.thresholds import SCORE_THRESHOLD
from ..wording import plural
from .error_report import CONFUSION_PLOT, PR_PLOT
from .onnx_export import EXPORT_DIR, exported_files
from .onnx_usage import CHECK_FILE
from .output_files import write_text_atomic
from .training_report import SAMPLES_PLOT

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
EXAMPLE_IMAGE = "example.jpg"
TAGS = ["object-detection", "detr", "vision", "hf-detr-ft"]
PLACEHOLDER_REPO_ID = "your-username/your-model"
#: Pictures of the final evaluation's error analysis shown in the card, by their alt text.
ANALYSIS_PLOTS = {"Confusion matrix": CONFUSION_PLOT, "Precision-recall per class": PR_PLOT}

METRIC_NAMES = {
    "map": "mAP@[.5:.95]",
    "map_50": "mAP@.5",
    "map_75": "mAP@.75",
    "map_small": "mAP (small objects)",
    "map_medium": "mAP (medium objects)",
    "map_large": "mAP (large objects)",
    "mar_1": "mAR@1",
    "mar_10": "mAR@10",
    "mar_100": "mAR@100",
    "mar_small": "mAR@100 (small objects)",
    "mar_medium": "mAR@100 (medium objects)",
    "mar_large": "mAR@100 (large objects)",
}

TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A DETR object detector fine-tuned with hf-detr-ft from {{ base_model_text }}
on {{ dataset_text }}. It detects {{ class_names | length }} classes:
{{ class_names | join(", ") }}.

## Usage

```python
{{ usage }}
```

`pipeline` returns one dict per detection: `label`, `score` and `box` (`xmin`, `ymin`, `xmax`,
`ymax` in pixels). Pass your own image as a path, URL or `PIL.Image`; `example.jpg` is one image
of the evaluation split.
{{ onnx_section }}
## Evaluation

{% if metrics_source -%}
COCO metrics (pycocotools) on the **{{ metrics_split }}** split{{ metrics_source }}. -1 means the
split has no object in that category or size range.

| metric | value |
|---|---|
{% for name, value in summary_rows -%}
| {{ name }} | {{ value }} |
{% endfor %}
Per class (AP@[.5:.95], AR@100):

| class | AP | AR |
|---|---|---|
{% for name, ap, ar in class_rows -%}
| {{ name }} | {{ ap }} | {{ ar }} |
{% endfor %}
{%- if score_threshold is not none %}
Score threshold: **{{ score_threshold }}**, the one of best F1 (mean over classes) on this
split, saved in `config.json` as `score_threshold` (each class's own in
`score_threshold_per_class`): pass `threshold=detector.model.config.score_threshold` to the
pipeline, or `--threshold auto` to `hf-detr-ft predict`.
{% endif %}
{%- for title, picture in analysis_plots %}
![{{ title }}]({{ picture }})
{% endfor %}
{%- else -%}
Not evaluated yet.
{%- endif %}
{% if has_sample_predictions %}
### Sample predictions

![Ground truth (left) and predictions (right) on evaluation images]({{ sample_predictions }})
{% endif %}
## Training data

{% if split_rows -%}
| split | images | boxes |{% for name in class_names %} {{ name }} |{% endfor %}
|---|---|---|{% for name in class_names %}---|{% endfor %}
{% for split, images, boxes, per_class in split_rows -%}
| {{ split }} | {{ images }} | {{ boxes }} |{% for count in per_class %} {{ count }} |{% endfor %}
{% endfor %}
{%- else -%}
No dataset summary was recorded.
{%- endif %}
{% if has_dataset_report %}
The full validation report of the data is in [`{{ dataset_report }}`]({{ dataset_report }}).
{% endif %}
## Training procedure

| hyper-parameter | value |
|---|---|
{% for name, value in hyperparameters -%}
| {{ name }} | {{ value }} |
{% endfor %}
{% if history_rows %}
### Evaluation during training

| epoch | step | eval loss | mAP | mAP@.5 |
|---|---|---|---|---|
{% for row in history_rows -%}
| {{ row | join(" | ") }} |
{% endfor %}
{%- endif %}
"""


@dataclass
class CardContext:
    """What the card says beyond the output directory: where the model and the data came from.

    ``splits`` are the datasets actually used (after ``max_*_samples``), so the summary counts
    what the model saw. ``hyperparameters`` are shown as given, in order.
    """

    class_names: list[str]
    eval_split: str
    base_model: str | None = None
    dataset_name: str | None = None
    dataset_dir: str | None = None
    license: str | None = None
    splits: Mapping[str, Dataset] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)


def dataset_summary(splits: Mapping[str, Dataset], class_names: list[str]) -> dict[str, dict]:
    """Images, boxes and boxes per class of each split (reads only the ``objects`` column)."""
    summary = {}
    for split, data in splits.items():
        stats = split_stats(data, class_names)
        summary[split] = {
            "images": stats.images,
            "boxes": stats.boxes,
            "boxes_per_class": stats.boxes_per_class,
        }
    return summary


def hub_model_id_or_none(name: str | None) -> str | None:
    """``name`` if it can be a Hub repo id and is not a local folder; else None.

    A local starting checkpoint cannot be the card's ``base_model`` (the Hub would reject it).
    """
    if not name or Path(name).expanduser().exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def eval_results(
    metrics: Mapping[str, Any], dataset_type: str, dataset_name: str, split: str
) -> list[EvalResult]:
    """The COCO summary metrics as ``model-index`` entries (type = key without ``eval_``).

    -1 (pycocotools' "no ground truth in this category or size range") is left out: it is not
    a score and the Hub would show it as one.
    """
    return [
        EvalResult(
            task_type="object-detection",
            task_name="Object Detection",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=key,
            metric_name=METRIC_NAMES[key],
            metric_value=metrics[f"eval_{key}"],
        )
        for key in SUMMARY_METRICS
        if f"eval_{key}" in metrics and metrics[f"eval_{key}"] != -1
    ]


def usage_snippet(repo_id: str) -> str:
    """Code that runs as written once the model is at ``repo_id`` (a Hub id or a local folder)."""
    return f"""from transformers import pipeline
from transformers.utils import cached_file

model_id = "{repo_id}"
detector = pipeline("object-detection", model=model_id)
image = cached_file(model_id, "{EXAMPLE_IMAGE}")  # or your own image: path, URL or PIL.Image
for detection in detector(image, threshold=0.5):
    print(detection["label"], round(detection["score"], 3), detection["box"])"""


def build_model_card(
    output_dir: str | Path,
    context: CardContext,
    *,
    metrics: Mapping[str, Any] | None = None,
    final: bool = False,
    log_history: list[dict[str, Any]] | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """The card of the model in ``output_dir``; ``metrics`` with ``eval_`` keys, if evaluated.

    ``final`` says the metrics are the end-of-training evaluation (``metrics.json``) rather
    than the latest evaluation during training.
    """
    output_dir = Path(output_dir)
    repo_id = repo_id or PLACEHOLDER_REPO_ID
    model_name = repo_id.split("/")[-1] if repo_id != PLACEHOLDER_REPO_ID else output_dir.name
    dataset_label = context.dataset_name or Path(context.dataset_dir or "custom").name
    metrics = dict(metrics or {})
    # During training the Trainer evaluates on the validation split; at the end, on eval_split.
    metrics_split = context.eval_split if final else "validation"
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="object-detection",
        base_model=hub_model_id_or_none(context.base_model),
        datasets=[context.dataset_name] if context.dataset_name else None,
        license=context.license,
        tags=list(TAGS),
        eval_results=eval_results(
            metrics,
            dataset_type=context.dataset_name or "imagefolder",
            dataset_name=dataset_label,
            split=metrics_split,
        )
        or None,
    )
    summary = dataset_summary(context.splits, context.class_names)
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        model_name=model_name,
        base_model_text=_base_model_text(context.base_model),
        dataset_text=_dataset_text(context, summary),
        class_names=context.class_names,
        usage=usage_snippet(repo_id),
        metrics_split=metrics_split,
        metrics_source=_metrics_source(metrics, final),
        summary_rows=[
            (METRIC_NAMES[key], _number(metrics[f"eval_{key}"]))
            for key in SUMMARY_METRICS
            if f"eval_{key}" in metrics
        ],
        class_rows=[
            (
                name,
                _number(metrics.get(f"eval_ap_{name}")),
                _number(metrics.get(f"eval_ar_{name}")),
            )
            for name in context.class_names
        ],
        score_threshold=_score_threshold(output_dir) if final else None,
        analysis_plots=[
            (title, name.format(split=metrics_split))
            for title, name in ANALYSIS_PLOTS.items()
            if final and (output_dir / name.format(split=metrics_split)).is_file()
        ],
        has_sample_predictions=(output_dir / SAMPLES_PLOT).is_file(),
        sample_predictions=SAMPLES_PLOT,
        split_rows=[
            (
                split,
                counts["images"],
                counts["boxes"],
                [counts["boxes_per_class"][name] for name in context.class_names],
            )
            for split, counts in summary.items()
        ],
        has_dataset_report=(output_dir / REPORT_JSON).is_file(),
        dataset_report=REPORT_JSON,
        hyperparameters=list(context.hyperparameters.items()),
        history_rows=_history_rows(log_history or []),
        onnx_section=onnx_card_section(output_dir),
    )


def write_model_card(
    output_dir: str | Path,
    context: CardContext,
    *,
    metrics: Mapping[str, Any] | None = None,
    final: bool = False,
    log_history: list[dict[str, Any]] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write ``README.md`` (and ``example.jpg``, the usage snippet's image) into ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_example_image(output_dir / EXAMPLE_IMAGE, context)
    card = build_model_card(
        output_dir,
        context,
        metrics=metrics,
        final=final,
        log_history=log_history,
        repo_id=repo_id,
    )
    path = output_dir / CARD_FILE
    card.save(path)
    return path


class ModelCardCallback(TrainerCallback):
    """Keeps ``output_dir/README.md`` current: on every save and before every Hub push.

    Until :attr:`final_metrics` is set (by ``run_training`` after the final evaluation), the
    card shows the latest evaluation logged during training. :attr:`repo_id` (the Trainer's
    ``hub_model_id`` once the repo exists) goes into the usage snippet. The history table stops
    at the end of training: later evaluations (the final one, on the test split) are not part
    of it.
    """

    def __init__(self, context: CardContext, repo_id: str | None = None) -> None:
        self.context = context
        self.repo_id = repo_id
        self.final_metrics: dict[str, Any] | None = None
        self._history: list[dict[str, Any]] | None = None

    def write(self, args: TrainingArguments, state: TrainerState) -> Path | None:
        """Write the card from the main process; returns its path there, None elsewhere."""
        if not state.is_world_process_zero:
            return None
        latest = next((log for log in reversed(state.log_history) if "eval_map" in log), None)
        return write_model_card(
            args.output_dir,
            self.context,
            metrics=self.final_metrics or latest,
            final=self.final_metrics is not None,
            log_history=state.log_history if self._history is None else self._history,
            repo_id=self.repo_id,
        )

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        self._history = list(state.log_history)

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        self.write(args, state)

    def on_push_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        self.write(args, state)


def _write_example_image(path: Path, context: CardContext) -> None:
    """The first image of the evaluation split, for the usage snippet (written once)."""
    data = context.splits.get(context.eval_split)
    if path.exists() or data is None or len(data) == 0:
        return
    data[0]["image"].convert("RGB").save(path, format="JPEG", quality=90)


ONNX_SECTION = "### ONNX"


def onnx_card_section(output_dir: str | Path) -> str:
    """The card's section on the ONNX export in ``output_dir/onnx`` ("" without one)."""
    folder = Path(output_dir) / EXPORT_DIR
    files = exported_files(folder)
    if not files:
        return ""
    rows = "\n".join(
        f"| `{EXPORT_DIR}/{path.name}` | {path.stat().st_size / 1e6:.1f} MB |" for path in files
    )
    return (
        f"\n{ONNX_SECTION}\n\n`{EXPORT_DIR}/` holds the model exported to ONNX"
        f"{_onnx_check_text(folder)}:\n\n| file | size |\n|---|---|\n{rows}\n\n"
        f"`{EXPORT_DIR}/README.md` shows how to run it with onnxruntime alone (inputs, outputs, "
        f"pre- and post-processing in numpy); `hf-detr-ft predict --model "
        f"{EXPORT_DIR}/model.onnx` runs it too.\n"
    )


def refresh_onnx_section(output_dir: str | Path) -> bool:
    """Put the current :func:`onnx_card_section` into an existing hf-detr-ft card (after an
    export outside training); returns whether the card was rewritten."""
    path = Path(output_dir) / CARD_FILE
    try:
        text = path.read_text()
    except OSError:
        return False
    if "hf-detr-ft" not in text or "\n## Evaluation" not in text:
        return False  # not a card this package wrote
    start = text.find(f"\n{ONNX_SECTION}\n")
    end = text.index("\n## Evaluation")
    head = text[:start] if 0 <= start < end else text[:end]
    write_text_atomic(path, f"{head.rstrip()}\n{onnx_card_section(output_dir)}{text[end:]}")
    return True


def _onnx_check_text(folder: Path) -> str:
    """What the export's check found, for the card (empty without a readable check)."""
    try:
        check = json.loads((folder / CHECK_FILE).read_text())
        fp32 = check["variants"]["fp32"]
        return (
            f" (opset {check['opset']}) and checked against this PyTorch model on "
            f"{len(check['images'])} images: largest score difference "
            f"{fp32['max_score_diff']:.1e}, largest box difference "
            f"{fp32['max_box_diff_px']:.2g} px (`{EXPORT_DIR}/{CHECK_FILE}`)"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _score_threshold(output_dir: Path) -> str | None:
    """The best-F1 score threshold saved in the model's config, formatted; None without one."""
    try:
        value = json.loads((output_dir / CONFIG_NAME).read_text()).get(SCORE_THRESHOLD)
    except (OSError, ValueError):
        return None
    return None if value is None else f"{value:.3f}"


def _base_model_text(base_model: str | None) -> str:
    hub_id = hub_model_id_or_none(base_model)
    if hub_id:
        return f"[{hub_id}](https://huggingface.co/{hub_id})"
    return "a local checkpoint" if base_model else "an unknown checkpoint"


def _dataset_text(context: CardContext, summary: Mapping[str, dict]) -> str:
    images = sum(counts["images"] for counts in summary.values())
    if context.dataset_name:
        name = f"[{context.dataset_name}](https://huggingface.co/datasets/{context.dataset_name})"
    else:
        name = f"the dataset `{Path(context.dataset_dir or 'custom').name}`"
    return f"{name} ({plural(images, 'image')})" if images else name


def _metrics_source(metrics: Mapping[str, Any], final: bool) -> str:
    if "eval_map" not in metrics:
        return ""
    if final:
        return " at the end of training (`metrics.json`)"
    step, epoch = metrics.get("step"), metrics.get("epoch")
    where = f"epoch {epoch:g}" if epoch is not None else f"step {step}"
    return f", latest evaluation during training ({where})"


def _history_rows(log_history: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            _number(log.get("epoch"), 2),
            str(log.get("step", "")),
            _number(log.get("eval_loss")),
            _number(log["eval_map"]),
            _number(log.get("eval_map_50")),
        ]
        for log in log_history
        if "eval_map" in log
    ]


def _number(value: Any, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def training_hyperparameters(
    args: TrainingArguments,
    *,
    image_size: int,
    max_image_size: int,
    augmentation: str | None = None,
) -> dict[str, Any]:
    """The settings a reader needs to reproduce the run, in the order the card lists them;
    ``augmentation``: the preset or file and its transforms
    (:func:`~hf_detr_ft.pipeline.augmentation.describe_augmentation`)."""
    total_batch = effective_batch_size(args)
    length = {"max_steps": args.max_steps} if args.max_steps > 0 else {}
    ema_decay = getattr(args, "ema_decay", 0.0)
    average = {"ema_decay": ema_decay, "ema_tau": args.ema_tau} if ema_decay else {}
    patience = getattr(args, "early_stopping_patience", None)
    stopping = (
        {
            "early_stopping": f"patience {patience}, threshold "
            f"{args.early_stopping_threshold:g} on {args.metric_for_best_model}"
        }
        if patience
        else {}
    )
    return {
        "learning_rate": args.learning_rate,
        "lr_backbone": getattr(args, "lr_backbone", args.learning_rate),
        "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm,
        **average,
        "optimizer": getattr(args.optim, "value", args.optim),
        "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        "warmup_steps": args.warmup_steps,
        "num_train_epochs": args.num_train_epochs,
        **length,
        **stopping,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "total_train_batch_size": total_batch,
        "mixed_precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "no",
        "seed": args.seed,
        "image_size (shortest edge)": image_size,
        "max_image_size (longest edge)": max_image_size,
        **({"augmentation": augmentation} if augmentation else {}),
    }
