"""The offline demo: make a synthetic dataset, fine-tune a small DETR on it, show the result.

Everything happens locally in a few minutes on a laptop CPU: :func:`make_shapes_dataset`
writes a Roboflow-style COCO folder, :func:`finetune` fine-tunes the small pretrained
checkpoint shipped in ``hf_detr_ft/assets/demo_detr`` (made by ``scripts/make_demo_checkpoint.py``
on other shapes, so its class head is replaced and re-learned exactly as with
``facebook/detr-resnet-50``), and the demo reports mAP before and after fine-tuning and draws
predictions next to the ground truth.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .artifacts.pictures import Boxes
from .artifacts.training_report import SAMPLES_PLOT
from .data.dataset import load_detection_dataset
from .data.synthetic import DEMO_CLASSES, make_shapes_dataset
from .errors import TrainingInterrupted
from .evaluation.error_analysis import BoxesPerObject, boxes_per_object
from .inference.detect import detect
from .models.loading import load_detector
from .run import METRICS_FILE, FinetuneResult, finetune
from .training.checkpoints import last_complete_checkpoint
from .training.console import run_summary

DEMO_CHECKPOINT = Path(__file__).parent / "assets" / "demo_detr"
_MARKER = ".hf-detr-ft-demo"

#: Small images and a short schedule: enough for clear learning on a CPU (measured in
#: docs/demo.md).
DEMO_SETTINGS = {
    "image_size": 128,
    "max_image_size": 128,
    "min_scale": 1.0,  # objects of 16-40 px: downscaling them only makes them harder to see
    "num_train_epochs": 15,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "learning_rate": 5e-4,
    "lr_backbone": 5e-5,
    "lr_scheduler_type": "cosine",
    "logging_steps": 25,
    "save_total_limit": 1,
    "eval_on_start": True,
    "report_to": "none",
}
DEMO_SPLITS = {"train": 400, "valid": 64}
_BATCH = 16


@dataclass
class DemoResult:
    output_dir: Path
    map_before: float
    map_after: float
    map50_before: float
    map50_after: float
    picture: Path
    run: FinetuneResult
    data_dir: Path
    boxes: BoxesPerObject  # on every validation image, at the picture's threshold

    def summary(self) -> str:
        """The run's summary block, headed by what the demo shows: mAP before and after."""
        headline = [
            "  fine-tuned a small pretrained detector on synthetic circles, squares, triangles",
            f"  mAP       {self.map_before:.3f} before -> {self.map_after:.3f} after",
            f"  mAP@.5    {self.map50_before:.3f} before -> {self.map50_after:.3f} after",
            f"  boxes     {_boxes_line(self.boxes)}",
            f"  picture   {self.picture} (ground truth left, predictions right)",
        ]
        return run_summary(
            self.run,
            self.data_dir,
            title="hf-detr-ft demo finished",
            headline=headline,
            predict_inputs=str(self.data_dir / "valid"),
        )


def run_demo(
    output_dir: str | Path = "hf-detr-ft-demo", *, seed: int = 0, verbose: bool = False
) -> DemoResult:
    """Run the whole demo in ``output_dir``. Re-running replaces an earlier demo's output,
    except a demo stopped with Ctrl-C with the same seed, which continues where it stopped."""
    output_dir = Path(output_dir)
    _prepare(output_dir, seed)
    data_dir = make_shapes_dataset(output_dir / "data", splits=DEMO_SPLITS, seed=seed)
    try:
        result = finetune(
            data_dir,
            num_classes=len(DEMO_CLASSES),
            model=DEMO_CHECKPOINT,
            output_dir=output_dir / "model",
            seed=seed,
            verbose=verbose,
            **DEMO_SETTINGS,
        )
    except TrainingInterrupted as stopped:
        rerun = f"hf-detr-ft demo --output_dir {output_dir}" + (f" --seed {seed}" if seed else "")
        raise TrainingInterrupted(
            f"Demo interrupted (Ctrl-C); its last checkpoint is saved. Run `{rerun}` again to "
            f"continue from it."
        ) from stopped
    before = next(entry for entry in result.log_history if "eval_map" in entry)
    picture = result.output_dir / SAMPLES_PLOT  # written by the training report
    return DemoResult(
        output_dir=output_dir,
        map_before=before["eval_map"],
        map_after=result.metrics["eval_map"],
        map50_before=before["eval_map_50"],
        map50_after=result.metrics["eval_map_50"],
        picture=picture,
        run=result,
        data_dir=data_dir,
        boxes=_count_boxes_per_object(result.output_dir, data_dir),
    )


def _count_boxes_per_object(model_dir: Path, data_dir: Path) -> BoxesPerObject:
    """Boxes per object over all validation images at the picture's (and ``predict``'s
    default) score threshold: whether each object gets one clean box."""
    model, processor = load_detector(model_dir)
    validation = load_detection_dataset(data_dir).splits["validation"]
    truth, found = [], []
    for start in range(0, len(validation), _BATCH):
        batch = validation.select(range(start, min(start + _BATCH, len(validation))))
        truth += [Boxes.from_coco(o["bbox"], o["category"]).xyxy for o in batch["objects"]]
        found += [d["boxes"].cpu() for d in detect(model, processor, list(batch["image"]))]
    return boxes_per_object(truth, found)


def _boxes_line(boxes: BoxesPerObject) -> str:
    objects = len(boxes.counts)
    share = boxes.single / objects if objects else 1.0
    return (
        f"one box on {boxes.single} of {objects} validation objects ({share:.0%}), "
        f"{boxes.duplicated} with more, {boxes.missed} missed"
    )


def _prepare(output_dir: Path, seed: int) -> None:
    """Start from scratch, but only ever delete a folder an earlier demo created, and keep a
    demo of the same seed that was stopped before the end (it resumes)."""
    marker = output_dir / _MARKER
    if output_dir.exists() and any(output_dir.iterdir()):
        if not marker.exists():
            raise FileExistsError(
                f"{output_dir} exists and was not made by the demo; pass another --output_dir."
            )
        model = output_dir / "model"
        stopped = last_complete_checkpoint(model) and not (model / METRICS_FILE).exists()
        if stopped and marker.read_text().strip() == str(seed):
            return
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{seed}\n")
