"""Training report: plots of the loss terms and mAP over epochs, and sample predictions.

Written into ``output_dir`` at the end of :func:`~hf_detr_ft.run.run_training`, and on
demand (``hf-detr-ft report OUTPUT_DIR``) from the ``trainer_state.json`` a run leaves behind
(or that of its newest checkpoint, for a run that was stopped)::

    training_losses.png      loss, loss_ce, loss_bbox, loss_giou: training logs and evaluations
    training_map.png         mAP, mAP@50, mAP@75 of each evaluation
    sample_predictions.png   validation images: ground truth left, predictions right
    sample_predictions.json  what that picture draws (boxes, scores, the threshold) and how
                             many boxes land on each object, so the picture can be recounted

A training run also writes the error analysis of its final evaluation beside them
(:mod:`.error_report`: confusion matrix, PR and F1 curves, worst images); ``report`` does not
redo it, as it needs a new evaluation.

The curves come from the Trainer's ``log_history``: training entries carry DETR's loss terms
averaged over the logging interval (see :mod:`hf_detr_ft.training.trainer`), evaluation entries the
same terms with an ``eval_`` prefix and the COCO metrics.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedModel
from transformers.image_processing_utils import BaseImageProcessor
from transformers.utils import CONFIG_NAME

from ..errors import ReportError
from ..evaluation.error_analysis import boxes_per_object
from ..inference.detect import detect
from ..models.loading import check_model_classes, load_detector
from ..training.checkpoints import TRAINER_STATE_NAME, last_complete_checkpoint
from .output_files import claim_files, write_text_atomic
from .pictures import Boxes, save_comparison_grid, save_figure, subplots

logger = logging.getLogger(__name__)

LOSSES_PLOT = "training_losses.png"
MAP_PLOT = "training_map.png"
SAMPLES_PLOT = "sample_predictions.png"
SAMPLES_JSON = "sample_predictions.json"
TRAINING_REPORT_FILES = (LOSSES_PLOT, MAP_PLOT, SAMPLES_PLOT, SAMPLES_JSON)
LOSS_PANELS = {
    "loss": "total loss",
    "loss_ce": "classification (ce)",
    "loss_bbox": "box L1 (bbox)",
    "loss_giou": "generalised IoU (giou)",
}
MAP_CURVES = {"eval_map": "mAP@[.5:.95]", "eval_map_50": "mAP@.5", "eval_map_75": "mAP@.75"}


def read_log_history(output_dir: str | Path) -> list[dict[str, Any]]:
    """``log_history`` of ``output_dir/trainer_state.json``, else of its newest checkpoint."""
    root = Path(output_dir)
    state = root / TRAINER_STATE_NAME
    if not state.is_file() and (last := last_complete_checkpoint(root, with_optimizer=False)):
        state = Path(last) / TRAINER_STATE_NAME
    if not state.is_file():
        raise ReportError(
            f"No trainer_state.json in {root} or its checkpoints; is it the output_dir of a run?"
        )
    return json.loads(state.read_text())["log_history"]


def plot_training_curves(
    log_history: Sequence[dict[str, Any]], output_dir: str | Path
) -> list[Path]:
    """Write the loss and mAP plots (those with data) into ``output_dir``; return their paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = [e for e in log_history if "loss" in e and "epoch" in e]
    evals = [e for e in log_history if "eval_loss" in e and "epoch" in e]
    written = []
    if train or evals:
        fig, axes = subplots(1, len(LOSS_PANELS), figsize=(4.5 * len(LOSS_PANELS), 4))
        for ax, (term, title) in zip(axes, LOSS_PANELS.items()):
            _curve(ax, train, term, "train", marker=".")
            _curve(ax, evals, f"eval_{term}", "eval", marker="o")
            ax.set(title=title, xlabel="epoch")
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend()
        fig.tight_layout()
        written.append(save_figure(fig, out / LOSSES_PLOT))
    if any("eval_map" in e for e in evals):
        fig, ax = subplots(figsize=(6, 4))
        for key, label in MAP_CURVES.items():
            _curve(ax, evals, key, label, marker="o")
        ax.set(title="COCO mAP on the validation split", xlabel="epoch", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(save_figure(fig, out / MAP_PLOT))
    else:
        logger.info("No evaluation in the log history: no mAP plot.")
    return written


def save_sample_predictions(
    model: PreTrainedModel,
    image_processor: BaseImageProcessor,
    dataset: Dataset,
    path: str | Path,
    *,
    count: int = 4,
    threshold: float = 0.5,
) -> list[Path]:
    """The first ``count`` images of a detection split: ground truth next to predictions, as
    a picture at ``path`` and as JSON beside it (:data:`SAMPLES_JSON`)."""
    class_names = dataset.features["objects"]["category"].feature.names
    check_model_classes(model.config, class_names, "of this run", "the dataset given")
    samples = dataset.select(range(min(count, len(dataset))))
    images = list(samples["image"])
    truth = [Boxes.from_coco(o["bbox"], o["category"]) for o in samples["objects"]]
    found = detect(model, image_processor, images, threshold=threshold)
    predicted = [Boxes(d["boxes"].cpu(), d["labels"].tolist(), d["scores"].tolist()) for d in found]
    picture = save_comparison_grid(
        images,
        truth,
        predicted,
        class_names,
        path,
        title=f"validation images (score > {threshold})",
    )
    drawn = {
        "score_threshold": threshold,
        "boxes_per_object": boxes_per_object(
            [t.xyxy for t in truth], [p.xyxy for p in predicted]
        ).to_dict(),
        "images": [
            {
                "image_id": image_id,
                "ground_truth": _boxes_json(true_boxes, class_names),
                "predictions": _boxes_json(boxes, class_names),
            }
            for image_id, true_boxes, boxes in zip(samples["image_id"], truth, predicted)
        ],
    }
    table = Path(path).with_name(SAMPLES_JSON)
    write_text_atomic(table, json.dumps(drawn, indent=1) + "\n")
    return [picture, table]


def _boxes_json(boxes: Boxes, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """Boxes as JSON rows: class name, ``xyxy`` pixels (rounded to 0.1) and score if any."""
    scores = boxes.scores or [None] * len(boxes.labels)
    return [
        {"label": class_names[label], "box": [round(v, 1) for v in xyxy]}
        | ({"score": round(score, 4)} if score is not None else {})
        for xyxy, label, score in zip(boxes.xyxy.tolist(), boxes.labels, scores)
    ]


def write_training_report(
    output_dir: str | Path,
    validation: Dataset | None = None,
    model: PreTrainedModel | None = None,
    image_processor: BaseImageProcessor | None = None,
    *,
    num_samples: int = 4,
) -> list[Path]:
    """Write the report of the run in ``output_dir`` into it; return the files written.

    The sample grid needs ``validation`` (a split of :mod:`hf_detr_ft.data.dataset`, not
    transformed); the model and processor default to those saved in ``output_dir``.
    """
    history = read_log_history(output_dir)
    claim_files(output_dir, TRAINING_REPORT_FILES, run_outputs=TRAINING_REPORT_FILES)
    written = plot_training_curves(history, output_dir)
    if validation is not None and num_samples > 0:
        if model is None or image_processor is None:
            model, image_processor = load_detector(_saved_model(output_dir))
        written.extend(
            save_sample_predictions(
                model,
                image_processor,
                validation,
                Path(output_dir) / SAMPLES_PLOT,
                count=num_samples,
            )
        )
    logger.info("Training report: %s", ", ".join(str(p) for p in written))
    return written


def _saved_model(output_dir: str | Path) -> Path:
    """The final model of a run, or the newest checkpoint's for a run stopped before the end."""
    root = Path(output_dir)
    if (root / CONFIG_NAME).is_file():
        return root
    last = last_complete_checkpoint(root, with_optimizer=False)
    if last is None:
        raise ReportError(f"No model in {root} or its checkpoints to draw predictions with.")
    return Path(last)


def _curve(ax: Any, entries: Sequence[dict[str, Any]], key: str, label: str, **style: Any) -> None:
    points = [(e["epoch"], e[key]) for e in entries if key in e]
    if points:
        ax.plot(*zip(*points), label=label, **style)
