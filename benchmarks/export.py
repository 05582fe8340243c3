"""The exported model on ONNX Runtime vs the PyTorch model: ``python benchmarks/export.py``.

For each model (``--models``): export it (``hf_detr_ft.export``, dynamic batch, every
quantization: fp32, dynamic-int8, static-int8 calibrated on the check images, fp16), then time
``hf_detr_ft.predict`` on the same images, batch and threads for the PyTorch model and each
ONNX file (end to end: decoding, pre-processing, the model, post-processing; the median of
``--repeats`` runs after a warm-up run), and the model's forward pass alone on one prepared
batch. With ``--dataset_dir``, also ``hf_detr_ft.evaluate`` of every variant on its evaluation
split (the mAP cost of quantization). Prints a table and writes ``--output`` (JSON).

``--families`` instead exports the tiny random model of every type the project fine-tunes
(``tests/tiny_families.py``) and prints the status table of docs/export.md.

Models: ``demo`` (the demo's starting checkpoint, ``hf_detr_ft/assets/demo_detr``, 128 px),
``r50`` (DETR-R50, random weights, shortest edge 512 / longest 683 to keep CPU runs short), or
a model folder (e.g. a fine-tuned ``output_dir``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hf_detr_ft.artifacts.onnx_export import export  # noqa: E402
from hf_detr_ft.demo import DEMO_CHECKPOINT  # noqa: E402
from hf_detr_ft.evaluation.evaluate import evaluate  # noqa: E402
from hf_detr_ft.inference.detect import prepare_batch  # noqa: E402
from hf_detr_ft.inference.onnx_runtime import load_onnx_detector  # noqa: E402
from hf_detr_ft.inference.predict import open_image, predict  # noqa: E402
from hf_detr_ft.models.loading import load_detector  # noqa: E402

BCCD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "bccd" / "JPEGImages"
VARIANTS = ("dynamic-int8", "static-int8", "fp16")


def r50_model(folder: Path) -> Path:
    """DETR-R50 with random weights, shortest edge 512 (saved once)."""
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        names = {0: "RBC", 1: "WBC", 2: "Platelets"}
        config = DetrConfig(id2label=names, label2id={v: k for k, v in names.items()})
        DetrForObjectDetection(config).save_pretrained(folder)
        DetrImageProcessor(size={"shortest_edge": 512, "longest_edge": 683}).save_pretrained(folder)
    return folder


@contextlib.contextmanager
def spinning_threads() -> Iterator[None]:
    """Sessions made inside keep ONNX Runtime's default: threads that spin between runs
    (hf-detr-ft turns spinning off)."""
    import onnxruntime as ort

    original = ort.InferenceSession.__init__

    def init(self: Any, path: Any, options: Any = None, *args: Any, **kwargs: Any) -> None:
        if options is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        original(self, path, options, *args, **kwargs)

    ort.set_default_logger_severity(3)  # not the note that the setting is replaced
    try:
        with mock.patch.object(ort.InferenceSession, "__init__", init):
            yield
    finally:
        ort.set_default_logger_severity(2)


def rounds(functions: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median seconds of each function over ``repeats`` rounds (each function once a round,
    in turn), after a warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for round_ in range(repeats + 1):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def benchmark_model(
    name: str, model_dir: Path, files: list[Path], args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    out = work / f"{name}-onnx"
    result = export(
        model_dir,
        out,
        dynamic_batch=True,
        quantize=list(VARIANTS),
        images=None if args.dataset_dir else files[: args.batch],
        dataset_dir=args.dataset_dir,
    )
    variants = {"pytorch": model_dir, **{k: v for k, v in result.files.items()}}
    sizes = {k: v.stat().st_size / 1e6 for k, v in result.files.items()}
    weights = sorted(model_dir.glob("*.safetensors"))
    sizes["pytorch"] = sum(p.stat().st_size for p in weights) / 1e6

    # The model alone, on one prepared batch of the benchmark's images, and predict end to end;
    # the variants take turns in every round, so that a change in the machine's load (shared
    # cores) falls on all of them alike.
    detector, processor = load_detector(model_dir, device="cpu")
    batch = prepare_batch(processor, [open_image(p) for p in files[: args.batch]]).inputs
    runners = {"pytorch": torch.inference_mode()(lambda: detector(**batch))}
    for variant, path in result.files.items():
        onnx_detector = load_onnx_detector(path)[0]
        runners[variant] = lambda d=onnx_detector: d.run(**batch)
    forward = rounds(runners, args.repeats)
    predicts = {
        variant: lambda m=model: predict(
            m, files, threshold=0.5, batch_size=args.batch, device="cpu"
        )
        for variant, model in variants.items()
    }

    def spinning() -> None:
        with spinning_threads():
            predicts["fp32"]()

    seconds = rounds({**predicts, "fp32, spinning threads": spinning}, args.repeats)

    rows = {}
    for variant, model in variants.items():
        rows[variant] = {
            "file": Path(model).name if variant != "pytorch" else "model.safetensors",
            "size_mb": round(sizes[variant], 2),
            "predict_images_per_s": round(len(files) / seconds[variant], 2),
            "forward_ms_per_batch": round(forward[variant] * 1000, 1),
        }
        if variant != "pytorch":
            check = result.check.variants[variant]
            rows[variant]["max_score_diff"] = check.max_score_diff
            rows[variant]["max_box_diff_px"] = check.max_box_diff_px
        if args.dataset_dir is not None:
            metrics = evaluate(model, args.dataset_dir, args.split, batch_size=args.batch).metrics
            rows[variant]["map"] = round(metrics["map"], 4)
            rows[variant]["map_50"] = round(metrics["map_50"], 4)
    rows["fp32, spinning threads"] = {
        **rows["fp32"],
        "predict_images_per_s": round(len(files) / seconds["fp32, spinning threads"], 2),
    }
    base = rows["pytorch"]
    for row in rows.values():
        row["predict_speedup"] = round(
            row["predict_images_per_s"] / base["predict_images_per_s"], 2
        )
        row["forward_speedup"] = round(
            base["forward_ms_per_batch"] / row["forward_ms_per_batch"], 2
        )
        if "map" in row:
            row["map_change"] = round(row["map"] - base["map"], 4)
    return {"model": str(model_dir), "opset": result.check.opset, "variants": rows}


def print_table(name: str, found: dict[str, Any], images: int, args: argparse.Namespace) -> None:
    print(
        f"\n{name}: predict on {images} images, batch {args.batch}, {torch.get_num_threads()} "
        f"threads (PyTorch and ONNX Runtime), median of {args.repeats}"
    )
    header = (
        "| variant | file | MB | predict images/s | vs PyTorch | forward ms/batch | vs PyTorch |"
    )
    with_map = "map" in found["variants"]["pytorch"]
    print(header + (" mAP | change |" if with_map else ""))
    print("|---" * (9 if with_map else 7) + "|")
    for variant, row in found["variants"].items():
        line = (
            f"| {variant} | {row['file']} | {row['size_mb']:.1f} | "
            f"{row['predict_images_per_s']:.1f} | {row['predict_speedup']:.2f}x | "
            f"{row['forward_ms_per_batch']:.1f} | {row['forward_speedup']:.2f}x |"
        )
        if with_map:
            line += f" {row['map']:.4f} | {row.get('map_change', 0):+.4f} |"
        print(line)


def families(work: Path) -> dict[str, Any]:
    """Export every tiny family type; its status, opset, parity and time."""
    import onnx
    from tiny_families import FAMILY_TYPES, save_tiny_model
    from transformers import AutoModelForObjectDetection

    from hf_detr_ft.errors import HfDetrFtError

    found = {}
    for model_type in FAMILY_TYPES:
        folder = save_tiny_model(model_type, work / model_type, ["a", "b", "c"])
        # Random heads: an untrained RT-DETR scores every position alike, and ties are broken
        # differently by ONNX Runtime and torch.
        model = AutoModelForObjectDetection.from_pretrained(folder)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
        model.save_pretrained(folder)
        start = time.perf_counter()
        try:
            result = export(folder, images=sorted(BCCD.glob("*.jpg"))[:2] or None)
        except HfDetrFtError as err:
            found[model_type] = {"status": "fails", "error": str(err)}
        else:
            fp32 = result.check.variants["fp32"]
            graph = onnx.load(str(result.files["fp32"])).graph
            found[model_type] = {
                "status": "exports",
                "opset": result.check.opset,
                "inputs": {
                    i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                    for i in graph.input
                },
                "max_score_diff": fp32.max_score_diff,
                "max_box_diff": fp32.max_box_diff,
                "snippet_agrees": f"{result.check.snippet['images_agreeing']}/"
                f"{result.check.snippet['images']}",
                "seconds": round(time.perf_counter() - start, 1),
            }
        print(model_type, json.dumps(found[model_type]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo", help="demo, r50 or model folders, commas")
    parser.add_argument("--images", type=int, default=32, help="BCCD images to predict on")
    parser.add_argument("--batch", type=int, default=8, help="images per batch")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    parser.add_argument("--dataset_dir", help="also evaluate every variant on this dataset")
    parser.add_argument("--split", default="validation", help="the split to evaluate")
    parser.add_argument("--families", action="store_true", help="export every tiny type")
    parser.add_argument("--output", default="benchmarks/export_results.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "batch": args.batch}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        if args.families:
            results["families"] = families(work)
        else:
            files = sorted(BCCD.glob("*.jpg"))[: args.images]
            for name in args.models.split(","):
                folder = {"demo": DEMO_CHECKPOINT, "r50": None}.get(name, Path(name))
                folder = r50_model(work / "r50") if folder is None else folder
                results[name] = benchmark_model(name, Path(folder), files, args, work)
                print_table(name, results[name], len(files), args)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nWrote {args.output}")


if __name__ == "__main__":
    main()
