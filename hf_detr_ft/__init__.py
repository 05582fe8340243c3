"""hf-detr-ft: fine-tune DETR-family object detectors on your own data.

The path data takes, one module a step::

    layouts            dataset folder      -> annotation files per split
    coco_annotations   annotation files    -> annotation records + label map
    dataset            records             -> datasets.DatasetDict
    transforms         examples            -> pixel_values + DETR targets
    collate            examples            -> padded batch + pixel_mask
    modeling           checkpoint          -> model with the new label map
    trainer            batches             -> DetrTrainer (DETR optimizer, COCO evaluation)
    evaluation         detections          -> COCO metrics (pycocotools)
    finetune           all of the above    -> output_dir (model, processor, metrics)
    inference, visualize, demo, cli
"""

from .arguments import DataArguments, DetrTrainingArguments, ModelArguments
from .collate import collate_fn
from .dataset import DetectionDataset, load_detection_dataset
from .errors import DatasetError, HfDetrFtError, ModelLoadError
from .evaluation import CocoEvaluator
from .finetune import FinetuneResult, finetune, run_training
from .modeling import DEFAULT_MODEL, load_image_processor, load_model
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
    "FinetuneResult",
    "HfDetrFtError",
    "ModelArguments",
    "ModelLoadError",
    "collate_fn",
    "finetune",
    "load_detection_dataset",
    "load_image_processor",
    "load_model",
    "make_shapes_dataset",
    "run_training",
]
