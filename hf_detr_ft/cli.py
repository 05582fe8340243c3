"""The ``hf-detr-ft`` command.

``hf-detr-ft train`` takes exactly the flags of ``examples/train.py`` (every field of the
argument dataclasses, i.e. all of ``TrainingArguments``); ``hf-detr-ft demo`` runs the offline
demo. Mistakes in the user's input end in one clear line, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from typing import Any

from .errors import INTERRUPTED_EXIT_CODE, HfDetrFtError, TrainingInterrupted
from .wording import plural

COMMANDS = {
    "train": "fine-tune a DETR model on a COCO dataset folder (see `hf-detr-ft train --help`)",
    "demo": "offline demo: synthetic data, a few minutes of fine-tuning, mAP before/after",
    "push": "upload a finished output directory to the Hugging Face Hub (model, card, metrics)",
    "inspect": "check a dataset (any format): counts, problems, optional preview pictures",
    "convert": "write a dataset (any format) as a Roboflow-layout COCO folder",
    "evaluate": "COCO metrics of a fine-tuned model on a dataset split, overall and per class",
    "predict": "detect objects in images, folders or globs; pictures and one COCO JSON",
    "explain": "figure of the decoder's attention for the top detections of an image",
    "report": "plots of a run's losses and mAP, and sample predictions (from its output_dir)",
    "bench": "speed vs the stock Hugging Face recipe (runs benchmarks/run.py of a checkout)",
    "export": "export a fine-tuned model to ONNX (checked against PyTorch; int8/fp16 variants)",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="hf-detr-ft",
        description="Fine-tune DETR object detectors on your own data.",
        epilog="\n".join(f"  {name:<8} {text}" for name, text in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=COMMANDS, help="what to do")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the command")
    args = parser.parse_args(argv[:1])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        commands = {"train": train, "demo": demo, "push": push}
        commands.update(inspect=inspect, convert=convert)
        commands.update(evaluate=evaluate, predict=predict, explain=explain, report=report)
        commands.update(bench=bench, export=export)
        return commands[args.command](argv[1:])
    except TrainingInterrupted as err:
        from accelerate import PartialState

        if PartialState().is_main_process:
            print(f"hf-detr-ft {args.command}: {err}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except KeyboardInterrupt:
        print(f"hf-detr-ft {args.command}: interrupted.", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except (HfDetrFtError, FileExistsError) as err:
        print(f"hf-detr-ft {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine's, not the input's: a full disk, a read-only folder
        print(f"hf-detr-ft {args.command}: error: {err}", file=sys.stderr)
        return 1


def _bounded(kind: type, low: float, high: float | None = None) -> Callable[[str], Any]:
    """An argparse type: ``kind`` within ``[low, high]``; anything else is a usage error."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= (math.inf if high is None else high):  # also refuses NaN
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return parse


POSITIVE_INT = _bounded(int, 1)
NON_NEGATIVE_INT = _bounded(int, 0)
SCORE = _bounded(float, 0.0, 1.0)


def SCORE_OR_AUTO(text: str) -> float | str:  # noqa: N802 (an argparse type, named as those above)
    """``auto`` (the best-F1 score threshold) or a score between 0 and 1."""
    if text == "auto":
        return text
    try:
        return SCORE(text)
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a number: {err}") from None


def train(argv: list[str]) -> int:
    from .arguments import parse_train_args
    from .run import run_training
    from .training.console import run_summary

    model_args, data_args, training_args = parse_train_args(argv, prog="hf-detr-ft train")
    result = run_training(model_args, data_args, training_args)
    if training_args.process_index == 0:
        print(f"\n{run_summary(result, data_args.dataset_dir)}")
    return 0


def push(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hf-detr-ft push", description=COMMANDS["push"])
    parser.add_argument("output_dir", help="the output_dir of a finished run")
    parser.add_argument("--repo_id", required=True, help="Hub repo: name, user/name or org/name")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", help="branch to push to (created if needed)")
    parser.add_argument(
        "--checkpoint",
        action="store_true",
        help="also upload the newest checkpoint (optimizer state included) as last-checkpoint/",
    )
    args = parser.parse_args(argv)

    from .artifacts.hub import push_output_dir

    url = push_output_dir(
        args.output_dir,
        args.repo_id,
        private=args.private or None,
        revision=args.revision,
        include_checkpoint=args.checkpoint,
    )
    print(f"Pushed {args.output_dir} to {url}")
    return 0


def _dataset_parser(command: str) -> argparse.ArgumentParser:
    """The options every dataset command shares (those of ``load_detection_dataset``)."""
    parser = argparse.ArgumentParser(prog=f"hf-detr-ft {command}", description=COMMANDS[command])
    parser.add_argument("--dataset_format", default="auto", help="auto, coco, voc, yolo or hf")
    parser.add_argument("--dataset_layout", default="auto", help="COCO: auto, roboflow or coco")
    parser.add_argument("--strict", action="store_true", help="make every drop an error")
    parser.add_argument(
        "--dataset_cache_dir", help="dataset cache folder (default: $HF_DETR_FT_CACHE or ~/.cache)"
    )
    parser.add_argument(
        "--no_dataset_cache", action="store_true", help="read the folder, not the dataset cache"
    )
    return parser


def inspect(argv: list[str]) -> int:
    parser = _dataset_parser("inspect")
    parser.add_argument("dataset", help="dataset folder or Hugging Face Hub id")
    parser.add_argument("--num_classes", type=POSITIVE_INT, help="check the number of classes")
    parser.add_argument(
        "--preview", type=NON_NEGATIVE_INT, default=0, metavar="N", help="draw N images"
    )
    parser.add_argument(
        "--augmented",
        type=NON_NEGATIVE_INT,
        default=0,
        metavar="N",
        help="draw N training images as the training augments them",
    )
    parser.add_argument(
        "--augmentation",
        default="default",
        help="with --augmented: none, default, strong or an A.save file, as train's",
    )
    parser.add_argument(
        "--seed", type=NON_NEGATIVE_INT, default=42, help="with --augmented: the training's seed"
    )
    parser.add_argument("--output_dir", default="dataset-report", help="where files go")
    args = parser.parse_args(argv)

    from .artifacts.output_files import claim_files
    from .data.dataset import load_detection_dataset
    from .data.dataset_report import REPORT_JSON, REPORT_TEXT, build_report

    if args.augmented:
        from .data.preview import AUGMENTED_FILE, save_augmented_samples
        from .errors import DatasetError
        from .pipeline.augmentation import augmented_samples, build_augmentation

        build_augmentation(args.augmentation)  # a bad preset or file: before the data loads

    data = load_detection_dataset(
        args.dataset,
        args.num_classes,
        layout=args.dataset_layout,
        dataset_format=args.dataset_format,
        validation_fraction=0,
        strict=args.strict,
        cache=not args.no_dataset_cache,
        cache_dir=args.dataset_cache_dir,
    )
    report = build_report(data)
    names = [REPORT_JSON, REPORT_TEXT]
    if args.preview:
        from .data.preview import CHART_FILE, save_class_chart, write_preview

        names.append(CHART_FILE)
    if args.augmented:
        if "train" not in data.splits:
            raise DatasetError(f"{args.dataset} has no train split for --augmented to draw.")
        names.append(AUGMENTED_FILE)
    claim_files(args.output_dir, names)
    json_path, _ = report.write(args.output_dir)
    print(f"{report.table()}\n\nReport with every problem: {json_path}")
    if args.preview:
        pictures = write_preview(data, args.output_dir, args.preview)
        chart = save_class_chart(report, f"{args.output_dir}/{CHART_FILE}")
        shown = plural(len(pictures), "picture")
        print(f"Preview: {shown} in {pictures[0].parent}; chart: {chart}")
    if args.augmented:
        samples = augmented_samples(
            data.splits["train"], args.augmentation, args.augmented, args.seed
        )
        title = f"Training images, augmentation {args.augmentation} (seed {args.seed})"
        path = save_augmented_samples(
            samples, data.class_names, f"{args.output_dir}/{AUGMENTED_FILE}", title
        )
        print(f"Augmented training images: {path}")
    return 0


def convert(argv: list[str]) -> int:
    parser = _dataset_parser("convert")
    parser.add_argument("source", help="dataset folder or Hugging Face Hub id")
    parser.add_argument("destination", help="new folder to write")
    parser.add_argument("--to", default="coco", choices=["coco"], help="output format")
    args = parser.parse_args(argv)

    from .data.dataset import load_detection_dataset
    from .data.formats.coco_writer import write_coco_folder

    data = load_detection_dataset(
        args.source,
        layout=args.dataset_layout,
        dataset_format=args.dataset_format,
        validation_fraction=0,
        strict=args.strict,
        cache=not args.no_dataset_cache,
        cache_dir=args.dataset_cache_dir,
    )
    root = write_coco_folder(data, args.destination)
    sizes = ", ".join(f"{split} {len(ds)}" for split, ds in data.splits.items())
    print(f"Wrote {root} (COCO, Roboflow layout; images: {sizes}; classes {data.class_names})")
    return 0


def demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hf-detr-ft demo", description=COMMANDS["demo"])
    parser.add_argument("--output_dir", default="hf-detr-ft-demo", help="where to write everything")
    parser.add_argument(
        "--seed", type=NON_NEGATIVE_INT, default=0, help="seed of the data and the training"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="also print every log as a dict (as transformers)"
    )
    args = parser.parse_args(argv)

    from .demo import run_demo

    result = run_demo(args.output_dir, seed=args.seed, verbose=args.verbose)
    print(f"\n{result.summary()}")
    return 0


def evaluate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hf-detr-ft evaluate", description=COMMANDS["evaluate"])
    parser.add_argument("--model", required=True, help="fine-tuned model folder or Hub id")
    parser.add_argument("--dataset_dir", required=True, help="dataset folder or Hub dataset")
    parser.add_argument("--split", default="test", help="train, validation or test (default)")
    parser.add_argument(
        "--output_dir",
        help="where evaluation_<split>.json goes (default: the model folder, else here)",
    )
    parser.add_argument(
        "--save_predictions",
        action="store_true",
        help="also write predictions_<split>.json: COCO results in the dataset's original ids",
    )
    parser.add_argument(
        "--batch_size",
        type=POSITIVE_INT,
        help="images per device per step (default: 8 on a GPU; on a CPU up to 1 megapixel of "
        "model input, at most 8)",
    )
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is there")
    parser.add_argument(
        "--threshold",
        type=SCORE_OR_AUTO,
        default="auto",
        help="score threshold of the confusion matrix (default auto: the one of best F1)",
    )
    parser.add_argument(
        "--iou_threshold",
        type=SCORE,
        default=0.5,
        help="IoU of a match (confusion matrix, PR curves): 0.5 (default), 0.55, ..., 0.95",
    )
    parser.add_argument(
        "--num_worst",
        type=NON_NEGATIVE_INT,
        default=4,
        help="draw the N images with most errors (default 4; 0: none)",
    )
    args = parser.parse_args(argv)

    from pathlib import Path

    from accelerate import PartialState

    from .evaluation.evaluate import EVALUATION_FILE
    from .evaluation.evaluate import evaluate as evaluate_model

    output_dir = args.output_dir or (args.model if Path(args.model).is_dir() else ".")
    result = evaluate_model(
        args.model,
        args.dataset_dir,
        args.split,
        output_dir=output_dir,
        save_predictions=args.save_predictions,
        batch_size=args.batch_size,
        device="cpu" if args.cpu else None,
        threshold=args.threshold,
        iou_threshold=args.iou_threshold,
        num_worst=args.num_worst,
    )
    if PartialState().is_main_process:
        saved = Path(output_dir) / EVALUATION_FILE.format(split=result.split)
        print(f"\n{result.table()}\n\nSaved to {saved} (error analysis beside it)")
    return 0


def predict(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hf-detr-ft predict", description=COMMANDS["predict"])
    parser.add_argument(
        "inputs", nargs="+", help="images, videos (.mp4 .avi .mov .mkv .webm), folders or globs"
    )
    parser.add_argument("--model", required=True, help="fine-tuned model folder or Hub id")
    parser.add_argument(
        "--threshold",
        type=SCORE_OR_AUTO,
        default=0.5,
        help="lowest score kept (auto: the best-F1 one saved with the model)",
    )
    parser.add_argument("--output_dir", default="predictions", help="pictures + predictions.json")
    parser.add_argument(
        "--batch_size",
        type=POSITIVE_INT,
        help="images per forward pass (default: 8 on a GPU; on a CPU up to 1 megapixel of "
        "model input, at most 8)",
    )
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is there")
    parser.add_argument(
        "--tile",
        type=_bounded(int, 32),
        metavar="SIZE",
        help="also run SIZE x SIZE pixel tiles of each image (small objects in large images)",
    )
    parser.add_argument(
        "--overlap",
        type=_bounded(float, 0.0, 0.9),
        help="with --tile: overlap of neighbouring tiles, a fraction of SIZE (default 0.2)",
    )
    parser.add_argument(
        "--tile_nms_iou",
        type=SCORE,
        help="with --tile: IoU above which boxes of one class are merged (default 0.5)",
    )
    args = parser.parse_args(argv)
    tiling = {"overlap": args.overlap, "tile_nms_iou": args.tile_nms_iou}
    if args.tile is None and (given := [f"--{k}" for k, v in tiling.items() if v is not None]):
        parser.error(f"{' and '.join(given)} {'need' if given[1:] else 'needs'} --tile SIZE")
    tiling = {k: v for k, v in tiling.items() if v is not None}  # else predict's defaults

    from .inference.predict import PREDICTIONS_FILE
    from .inference.predict import predict as predict_images
    from .inference.video import VideoPrediction

    found = predict_images(
        args.model,
        args.inputs,
        threshold=args.threshold,
        output_dir=args.output_dir,
        batch_size=args.batch_size,
        device="cpu" if args.cpu else None,
        tile=args.tile,
        **tiling,
    )
    videos = [p for p in found if isinstance(p, VideoPrediction)]
    frames = [frame for video in videos for frame in video.frames]
    images = [p for p in found if not isinstance(p, VideoPrediction)]
    boxes = sum(len(p.boxes.labels) for p in [*images, *frames])
    in_videos = (
        f" and {plural(len(frames), 'frame')} of {plural(len(videos), 'video')}" if videos else ""
    )
    written = f"pictures and {PREDICTIONS_FILE}" if images else "annotated videos and JSON"
    score = "the saved best-F1 threshold" if args.threshold == "auto" else args.threshold
    print(
        f"{plural(boxes, 'object')} (score >= {score}) in "
        f"{plural(len(images), 'image')}{in_videos}; {written} in {args.output_dir}"
    )
    return 0


def export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hf-detr-ft export", description=COMMANDS["export"])
    parser.add_argument("model", help="a fine-tuned model folder (config.json, weights)")
    parser.add_argument("--output_dir", help="where the files go (default: MODEL/onnx)")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="export format")
    parser.add_argument(
        "--opset", type=_bounded(int, 14, 20), help="ONNX opset (default 17; 18 where needed)"
    )
    parser.add_argument(
        "--dynamic_batch", action="store_true", help="any batch size (default: batches of 1)"
    )
    parser.add_argument(
        "--image_size", type=POSITIVE_INT, help="input size as in training (default: the model's)"
    )
    parser.add_argument("--max_image_size", type=POSITIVE_INT, help="longest edge at most")
    parser.add_argument(
        "--quantize",
        nargs="+",
        default=["none"],
        choices=["none", "dynamic-int8", "static-int8", "fp16"],
        help="also write quantized files (int8 for CPUs, fp16 for GPUs); see docs/export.md",
    )
    parser.add_argument(
        "--images", nargs="+", help="images, folders or globs to check the export on"
    )
    parser.add_argument("--dataset_dir", help="check on this dataset's evaluation split")
    parser.add_argument(
        "--num_check_images", type=POSITIVE_INT, default=8, help="images to check on"
    )
    parser.add_argument(
        "--score_tolerance", type=_bounded(float, 0.0), default=1e-3, help="largest score change"
    )
    parser.add_argument(
        "--box_tolerance",
        type=_bounded(float, 0.0),
        default=1e-3,
        help="largest box change, a fraction of the image side",
    )
    args = parser.parse_args(argv)

    from .artifacts.onnx_export import describe
    from .artifacts.onnx_export import export as export_model

    result = export_model(
        args.model,
        args.output_dir,
        format=args.format,
        opset=args.opset,
        dynamic_batch=args.dynamic_batch,
        image_size=args.image_size,
        max_image_size=args.max_image_size,
        quantize=args.quantize,
        images=args.images,
        dataset_dir=args.dataset_dir,
        num_check_images=args.num_check_images,
        score_tolerance=args.score_tolerance,
        box_tolerance=args.box_tolerance,
    )
    print(f"{result.check.table()}\n{describe(result)}")
    return 0


def explain(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hf-detr-ft explain", description=COMMANDS["explain"])
    parser.add_argument("image", help="an image file")
    parser.add_argument("--model", required=True, help="fine-tuned model folder or Hub id")
    parser.add_argument("--output", help="the figure's path (default: <image>_attention.png)")
    parser.add_argument("--top_k", type=POSITIVE_INT, default=4, help="how many detections to show")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is there")
    args = parser.parse_args(argv)

    from .inference.explain import explain as explain_image

    path = explain_image(
        args.model, args.image, args.output, top_k=args.top_k, device="cpu" if args.cpu else None
    )
    print(f"Attention of the top {args.top_k} detections: {path}")
    return 0


def report(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hf-detr-ft report", description=COMMANDS["report"])
    parser.add_argument("output_dir", help="the output_dir of a run (or of a stopped run)")
    parser.add_argument(
        "--dataset_dir", help="its dataset, for sample_predictions.png (validation images)"
    )
    parser.add_argument(
        "--num_samples", type=NON_NEGATIVE_INT, default=4, help="validation images to show"
    )
    args = parser.parse_args(argv)

    from .artifacts.training_report import write_training_report

    validation = None
    if args.dataset_dir:
        from .data.dataset import load_detection_dataset

        validation = load_detection_dataset(args.dataset_dir).splits["validation"]
    written = write_training_report(args.output_dir, validation, num_samples=args.num_samples)
    print("Wrote " + ", ".join(str(path) for path in written))
    return 0


def bench(argv: list[str]) -> int:
    """Run ``benchmarks/run.py`` with the same flags (it lives in the repository, not the
    package: it needs the checkout's ``benchmarks/`` folder and the BCCD data beside it)."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
    if not script.is_file():
        raise HfDetrFtError(
            f"{script} not found: `hf-detr-ft bench` runs from a source checkout "
            "(pip install -e '.[bench]')."
        )
    return subprocess.run([sys.executable, str(script), *argv]).returncode


if __name__ == "__main__":
    sys.exit(main())
