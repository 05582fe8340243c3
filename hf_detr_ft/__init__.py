"""hf-detr-ft: fine-tune DETR-family object detectors on your own data.

The path data takes, one module a step::

    layouts            dataset folder      -> annotation files per split
    formats            COCO/VOC/YOLO/hf    -> COCO content per split (formats.coco_writer back)
    coco_annotations   annotation files    -> checked annotation records + label map
    dataset            records             -> datasets.DatasetDict
    validation         DatasetDict         -> dataset report (counts, every problem)
    transforms         examples            -> pixel_values + DETR targets
    collate            examples            -> padded batch + pixel_mask
    modeling           checkpoint          -> model with the new label map
    model_speedups,    model               -> the same model, cheaper (folded norms, NHWC);
      mixed_precision                         its heads in fp32 under autocast
    trainer            batches             -> DetrTrainer (DETR optimizer, COCO evaluation)
    evaluation         detections          -> COCO metrics (pycocotools)
    finetune           all of the above    -> output_dir (model, processor, metrics)
    inference, visualize, demo, cli
    model_evaluation, predict, explain, report   (metrics, pictures, attention, plots)
"""

from .arguments import DataArguments, DetrTrainingArguments, ModelArguments
from .collate import collate_fn
from .dataset import DetectionDataset, load_detection_dataset
from .errors import DatasetError, HfDetrFtError, ModelLoadError
from .evaluation import CocoEvaluator
from .explain import explain
from .finetune import FinetuneResult, finetune, run_training
from .model_evaluation import EvaluationResult, evaluate
from .modeling import DEFAULT_MODEL, load_image_processor, load_model
from .predict import ImagePrediction, predict
from .report import write_training_report
from .synthetic import make_shapes_dataset
from .trainer import DetrTrainer
from .transforms import DetrTransform

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "CocoEvaluator",
    "DataArguments",
    "DatasetError",
    "DetectionDataset",
    "DetrTrainer",
    "DetrTrainingArguments",
    "DetrTransform",
    "EvaluationResult",
    "FinetuneResult",
    "HfDetrFtError",
    "ImagePrediction",
    "ModelArguments",
    "ModelLoadError",
    "collate_fn",
    "evaluate",
    "explain",
    "finetune",
    "load_detection_dataset",
    "load_image_processor",
    "load_model",
    "make_shapes_dataset",
    "predict",
    "run_training",
    "write_training_report",
]
