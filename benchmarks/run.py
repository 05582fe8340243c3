"""hf-detr-ft vs the stock Hugging Face recipe, side by side: ``python benchmarks/run.py``.

Sections (each prints rows of the table and fills the JSON written to ``--output``):
train throughput and padding, data pipeline throughput, evaluation time and memory, batched
predict vs the per-image pipeline, mAP after the same wall-clock training budget. Training
rates are medians over whole epochs after a warm-up epoch (an epoch is ``--steps`` steps, so
both sides time the same images even where our batches differ in shape). See README.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from measure import (  # noqa: E402
    PeakRSS,
    StepTimer,
    TimeBudget,
    epoch_rates,
    padded_fraction,
    peak_bf16_tflops,
    release_freed_memory,
    training_flops,
)
from stock import (  # noqa: E402
    StockTransform,
    stock_arguments,
    stock_collate,
    stock_compute_metrics,
    stock_processor,
    stock_trainer,
)
from workloads import (  # noqa: E402
    BCCD,
    bccd_images,
    finetune_with,
    image_files,
    mixed_aspect_images,
    our_trainer,
    phone_photos,
    save_random_model,
)

from hf_detr_ft.data.dataset import load_detection_dataset  # noqa: E402
from hf_detr_ft.data.synthetic import make_shapes_dataset  # noqa: E402
from hf_detr_ft.demo import DEMO_CHECKPOINT  # noqa: E402
from hf_detr_ft.evaluation.evaluate import evaluate  # noqa: E402
from hf_detr_ft.models.loading import load_image_processor  # noqa: E402
from hf_detr_ft.pipeline.collate import collate_fn  # noqa: E402
from hf_detr_ft.pipeline.transforms import DetrTransform  # noqa: E402

CAP, BATCH = 600, 2
#: Per mode: training steps per epoch (the training set is ``steps x BATCH`` images; one
#: warm-up epoch, then ``epochs`` timed ones; R50 at most ``r50_steps`` and ``r50_epochs``),
#: evaluation set sizes (mixed, phone photos, BCCD) and timed evaluations per side (in turns),
#: predicted images (BCCD, phone photos), pipeline batches and rounds (the pipeline and the
#: training it feeds, in turns), minutes of training per side at a fixed budget (0: no
#: learning section; a budget under a few minutes measures warm-up, not learning). ``smoke``
#: only checks that everything runs; the test suite runs ``quick`` with ``--steps 2``.
SIZES = {
    "full": {
        "steps": 16,
        "epochs": 3,
        "r50_steps": 6,
        "r50_epochs": 3,
        "eval": [50, 200, 800],
        "eval_photos": 50,
        "eval_bccd": 200,
        "eval_repeats": 3,
        "predict": 128,
        "predict_photos": 32,
        "pipeline": 16,
        "pipeline_rounds": 3,
        "budget": 4.0,
    },
    "quick": {
        "steps": 8,
        "epochs": 2,
        "r50_steps": 2,
        "r50_epochs": 1,
        "eval": [20, 50],
        "eval_photos": 16,
        "eval_bccd": 50,
        "eval_repeats": 1,
        "predict": 32,
        "predict_photos": 8,
        "pipeline": 8,
        "pipeline_rounds": 2,
        "budget": 0.0,
    },
    "smoke": {
        "steps": 2,
        "epochs": 1,
        "r50_steps": 1,
        "r50_epochs": 1,
        "eval": [4],
        "eval_photos": 2,
        "eval_bccd": 2,
        "eval_repeats": 1,
        "predict": 2,
        "predict_photos": 2,
        "pipeline": 1,
        "pipeline_rounds": 1,
        "budget": 0.1,
    },
}
#: The GPU section (runs where CUDA is): DETR-R50 at DETR's own 800x1333 in bf16, batch 8;
#: steps per epoch (BCCD: 8 x steps images) and timed epochs after a warm-up one, per mode.
GPU_SIZE, GPU_BATCH = (800, 1333), 8
GPU_STEPS = {"full": (25, 3), "quick": (8, 1), "smoke": (2, 1)}
#: The fixed-budget comparison: the demo's data (128 px shapes, seed 0), its batch and cap.
LEARNING_SPLITS = {"train": 400, "valid": 16, "test": 64}
LEARNING_SMOKE_SPLITS = {"train": 16, "valid": 4, "test": 8}
LEARNING_CAP, LEARNING_BATCH = 128, 8


def train_section(
    name: str, dataset, kind: str, steps: int, epochs: int, work: Path
) -> dict[str, Any]:
    """Train images/s (median over ``epochs`` timed epochs of ``steps`` steps, after one
    warm-up epoch), padded share and peak RSS of ours and the stock recipe."""
    dataset = dataset.select(range(min(len(dataset), steps * BATCH)))
    steps = -(-len(dataset) // BATCH)
    names = dataset.features["objects"]["category"].feature.names
    model_dir = save_random_model(kind, names, work / f"model-{kind}-{len(names)}")
    run = dict(max_steps=(1 + epochs) * steps, per_device_train_batch_size=BATCH)
    ours = our_trainer(model_dir, dataset, CAP, work / "ours", **run)
    stock = _stock_train_trainer(model_dir, dataset, work / "stock", **run)
    row = {}
    for side, trainer in (("ours", ours), ("stock", stock)):
        timer = StepTimer()
        trainer.add_callback(timer)
        batches = list(trainer.get_train_dataloader())
        release_freed_memory()
        with PeakRSS() as memory:
            trainer.train()
        rates = epoch_rates(timer.durations(), [len(b["labels"]) for b in batches])
        row[side] = {
            "images_per_s": statistics.median(rates[1:]),
            "epoch_images_per_s": rates,  # the first is the warm-up epoch
            "padded_fraction": statistics.mean(padded_fraction(b["pixel_mask"]) for b in batches),
            "peak_rss_mb": memory.peak_mb,
        }
    row["speedup"] = row["ours"]["images_per_s"] / row["stock"]["images_per_s"]
    _print(f"train {kind} {name}", row, "images_per_s", "padded_fraction", "peak_rss_mb")
    return row


def _stock_train_trainer(model_dir: Path, dataset, output_dir: Path, **args: Any):
    from transformers import AutoModelForObjectDetection

    processor = stock_processor(CAP)
    return stock_trainer(
        AutoModelForObjectDetection.from_pretrained(model_dir),
        stock_arguments(str(output_dir), **args),
        train=dataset.with_transform(StockTransform(processor)),
        processing_class=processor,
    )


def pipeline_section(
    dataset, photos, batches: int, rounds: int, model_rates: dict[str, float], work: Path
) -> dict[str, Any]:
    """Images/s of dataset + augmentation + processor + collate, no model: by worker count on
    BCCD, beside the tiny model's training on the same photos, and on phone-size photos ours
    (reduced JPEG decoding) vs every pixel decoded vs stock.
    """
    from hf_detr_ft.models.loading import load_image_processor

    processor = load_image_processor("none-such", image_size=CAP, max_image_size=CAP)
    transform = DetrTransform.for_training(processor)
    result: dict[str, Any] = {"model_images_per_s": model_rates}
    for workers in sorted({0, 1, min(os.cpu_count() or 1, 4)}):
        rate = _loading_rate(transform.apply_to(dataset), collate_fn, batches, workers)
        result[f"workers_{workers}"] = {"images_per_s": rate, "per_worker": rate / max(workers, 1)}
        print(f"pipeline workers={workers}: {rate:7.1f} images/s")
    result["beside_training"] = _pipeline_beside_training(dataset, rounds, work)
    photo_batches = len(photos) // BATCH - 1
    loaders = {
        "ours": (transform.apply_to(photos), collate_fn),
        "full_decoding": (photos.with_transform(transform), collate_fn),
        "stock": (photos.with_transform(StockTransform(stock_processor(CAP))), stock_collate),
    }
    row: dict[str, Any] = {
        side: {"images_per_s": _loading_rate(data, collate, photo_batches)}
        for side, (data, collate) in loaders.items()
    }
    row["speedup"] = row["ours"]["images_per_s"] / row["stock"]["images_per_s"]
    result["phone_photos"] = row
    print(
        f"pipeline phone photos (12 MP JPEG): ours {row['ours']['images_per_s']:.1f}, every pixel "
        f"decoded {row['full_decoding']['images_per_s']:.1f}, stock "
        f"{row['stock']['images_per_s']:.1f} images/s  ratio {row['speedup']:.2f}x",
        flush=True,
    )
    return result


def _pipeline_beside_training(dataset, rounds: int, work: Path) -> dict[str, Any]:
    """The training pipeline's images/s and the tiny model's training images/s (one warm-up
    epoch, one timed) with the same transform on the same photos (augmentation and scales as
    ``finetune`` trains), measured in turns ``rounds`` times: two rates measured minutes apart
    would carry the machine's drift (tens of percent) into their ratio."""
    names = dataset.features["objects"]["category"].feature.names
    model_dir = save_random_model("tiny", names, work / f"model-tiny-{len(names)}")
    steps = len(dataset) // BATCH
    dataset = dataset.select(range(steps * BATCH))
    trainer = our_trainer(
        model_dir,
        dataset,
        CAP,
        work / "ours-augmented",
        augment=True,
        max_steps=2 * steps,
        per_device_train_batch_size=BATCH,
    )
    pipeline, training = [], []
    for _ in range(rounds):
        pipeline.append(_loading_rate(trainer.train_dataset, collate_fn, steps - 1))
        timer = StepTimer()
        trainer.add_callback(timer)
        trainer.train()
        trainer.remove_callback(timer)
        training.append(epoch_rates(timer.durations(), [BATCH] * steps)[1])
    row = {
        "pipeline_images_per_s": statistics.median(pipeline),
        "training_images_per_s": statistics.median(training),
        "rounds": {"pipeline": pipeline, "training": training},
    }
    row["ratio"] = row["pipeline_images_per_s"] / row["training_images_per_s"]
    print(
        f"pipeline beside tiny training (BCCD, training transform, in turns): "
        f"{row['pipeline_images_per_s']:.1f} vs {row['training_images_per_s']:.1f} images/s  "
        f"ratio {row['ratio']:.2f}x",
        flush=True,
    )
    return row


def _loading_rate(data, collate, batches: int, workers: int = 0) -> float:
    """Images/s of ``batches`` batches from a DataLoader, after its first batch."""
    loader = DataLoader(data, batch_size=BATCH, collate_fn=collate, num_workers=workers)
    iterator = iter(loader)
    next(iterator)  # workers started, first batch decoded
    start = time.perf_counter()
    count = sum(len(b["labels"]) for b, _ in zip(iterator, range(batches)))
    return count / (time.perf_counter() - start)


def eval_section(
    counts: list[int], photos: int, bccd: int, repeats: int, work: Path
) -> dict[str, Any]:
    """Evaluation wall time and peak memory growth, ours (streamed) vs gather-everything, on
    ``counts`` mixed-aspect images (PNG), ``bccd`` real BCCD photos (640x480 JPEG) and
    ``photos`` phone-size photos: the median of ``repeats`` evaluations per side, the sides
    in turns (so that the machine's drift meets both), after one untimed evaluation each (the
    first in a process pays one-time costs: thread pools, first kernels)."""
    result = {}
    evaluations = [
        (str(count), mixed_aspect_images(work / "eval-data", count, seed=1)) for count in counts
    ]
    evaluations.append((f"{bccd} BCCD photos", bccd_images(bccd)))
    evaluations.append((f"{photos} photos", phone_photos(work / "photos", photos)))
    for index, (label, dataset) in enumerate(evaluations):
        names = dataset.features["objects"]["category"].feature.names
        model_dir = save_random_model("tiny", names, work / f"model-tiny-{len(names)}")
        ours = our_trainer(model_dir, dataset, CAP, work / "ours", per_device_eval_batch_size=8)
        stock = _stock_eval_trainer(model_dir, dataset, work / "stock")
        sides = {"ours": ours, "stock": stock}
        if index == 0:
            for trainer in sides.values():
                trainer.evaluate()
        runs: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
        for _ in range(repeats):
            for side, trainer in sides.items():
                release_freed_memory()
                start = time.perf_counter()
                with PeakRSS() as memory:
                    metrics = trainer.evaluate()
                runs[side].append(
                    {
                        "seconds": time.perf_counter() - start,
                        "peak_growth_mb": memory.growth_mb,
                        "map": metrics.get("eval_map", -1.0),
                    }
                )
        row: dict[str, Any] = {
            side: {
                "seconds": statistics.median(run["seconds"] for run in timed),
                "peak_growth_mb": max(run["peak_growth_mb"] for run in timed),
                "map": timed[-1]["map"],
                "all_seconds": [run["seconds"] for run in timed],
            }
            for side, timed in runs.items()
        }
        row["speedup"] = row["stock"]["seconds"] / row["ours"]["seconds"]
        result[label] = row
        _print(
            f"eval {label}" + (" images" if label.isdigit() else ""),
            row,
            "seconds",
            "peak_growth_mb",
        )
    return result


def _stock_eval_trainer(model_dir: Path, dataset, output_dir: Path):
    from transformers import AutoModelForObjectDetection

    processor = stock_processor(CAP)
    return stock_trainer(
        AutoModelForObjectDetection.from_pretrained(model_dir),
        stock_arguments(str(output_dir), per_device_eval_batch_size=8),
        evaluation=dataset.with_transform(StockTransform(processor)),
        compute_metrics=stock_compute_metrics(processor, dataset),
    )


def predict_section(files: list[Path], label: str, work: Path) -> dict[str, Any]:
    """Batched ``predict`` vs ``pipeline("object-detection")`` called image by image."""
    from transformers import DetrImageProcessor, pipeline

    from hf_detr_ft.inference.predict import predict

    model_dir = save_random_model("tiny", ["RBC", "WBC", "Platelets"], work / "model-predict")
    size = {"shortest_edge": CAP, "longest_edge": CAP}
    DetrImageProcessor(size=size).save_pretrained(model_dir)
    start = time.perf_counter()
    predict(model_dir, files, threshold=0.5, batch_size=8, device="cpu")
    ours = len(files) / (time.perf_counter() - start)
    start = time.perf_counter()  # both sides load the model from its folder inside the timing
    detector = pipeline("object-detection", model=str(model_dir), device="cpu")
    for path in files:
        detector(str(path), threshold=0.5)
    stock = len(files) / (time.perf_counter() - start)
    row = {"ours": {"images_per_s": ours}, "stock": {"images_per_s": stock}}
    row["speedup"] = ours / stock
    _print(f"predict tiny {label}", row, "images_per_s")
    return row


def learning_section(
    minutes: float, splits: dict[str, int], work: Path, seed: int = 0
) -> dict[str, Any]:
    """Test mAP after the same wall-clock training time from the demo checkpoint (class head
    re-initialised), ours vs the stock recipe; both final models evaluated by ``evaluate``.
    ``seed`` is both sides' training seed (class head, data order); the data is always seed 0.

    Both sides train at the same time, each in its own process on half the cores, so that
    other jobs on the machine slow both alike: trained one after the other on shared cores,
    the side that met a busy minute did 22 steps where the other did 600 (README.md).
    """
    data_dir = make_shapes_dataset(work / "learning-data", splits=splits, seed=0)
    threads = max(1, torch.get_num_threads() // 2)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=spawn) as pool:
        jobs = {
            side: pool.submit(_learn_side, side, minutes * 60, data_dir, work / side, threads, seed)
            for side in ("ours", "stock")
        }
        trained = {side: job.result() for side, job in jobs.items()}
    row: dict[str, Any] = {
        "budget_minutes": minutes,
        "seed": seed,
        "threads_per_side": threads,
        "load_1min": os.getloadavg()[0],
    }
    for side, (model_dir, steps) in trained.items():
        found = evaluate(model_dir, data_dir, "test", batch_size=16, device="cpu").metrics
        row[side] = {
            "map": found["map"],
            "map_50": found["map_50"],
            "steps": steps,
            "images_seen": steps * LEARNING_BATCH,
        }
        print(
            f"learning {minutes:g} min, {side:<5} mAP {found['map']:.3f}  mAP50 "
            f"{found['map_50']:.3f}  steps {steps}  (load {row['load_1min']:.1f})",
            flush=True,
        )
    return row


def _learn_side(
    side: str, seconds: float, data_dir: Path, output_dir: Path, threads: int, seed: int
) -> tuple[Path, int]:
    """One side of :func:`learning_section` in its own process: model folder, steps done."""
    torch.set_num_threads(threads)
    budget = TimeBudget(seconds)
    learn = _learn_ours if side == "ours" else _learn_stock
    return learn(budget, data_dir, output_dir, seed), budget.steps


def _learn_ours(budget: TimeBudget, data_dir: Path, output_dir: Path, seed: int) -> Path:
    """``finetune()`` with the demo's settings; no evaluation or checkpoints on the clock."""
    return finetune_with(
        budget,
        data_dir,
        output_dir,
        seed=seed,
        num_train_epochs=10_000,
        lr_scheduler_type="constant",
        eval_on_start=False,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
    )


def _learn_stock(budget: TimeBudget, data_dir: Path, output_dir: Path, seed: int) -> Path:
    """The stock recipe from the same checkpoint; saved with our 128 px processor, so that
    both models are evaluated on identical inputs (the test images are 128 px squares)."""
    from transformers import AutoModelForObjectDetection, set_seed

    data = load_detection_dataset(data_dir)
    names = data.class_names
    set_seed(seed)
    model = AutoModelForObjectDetection.from_pretrained(
        DEMO_CHECKPOINT,
        id2label=dict(enumerate(names)),
        ignore_mismatched_sizes=True,
        label2id={name: i for i, name in enumerate(names)},
    )
    processor = stock_processor(LEARNING_CAP)
    args = stock_arguments(
        str(output_dir),
        per_device_train_batch_size=LEARNING_BATCH,
        num_train_epochs=10_000,
        lr_scheduler_type="constant",
        seed=seed,
        logging_steps=100,
    )
    train = data.splits["train"].with_transform(StockTransform(processor))
    stock_trainer(model, args, train=train, processing_class=processor, callbacks=[budget]).train()
    folder = output_dir / "model"
    model.save_pretrained(folder)
    cap = {"image_size": LEARNING_CAP, "max_image_size": LEARNING_CAP}
    load_image_processor(DEMO_CHECKPOINT, **cap).save_pretrained(folder)
    return folder


def gpu_section(
    kind: str,
    size: tuple[int, int],
    batch: int,
    steps: int,
    epochs: int,
    work: Path,
    *,
    bf16: bool,
    peak_tflops: float | None = None,
) -> dict[str, Any]:
    """Our training's images/s (median over ``epochs`` timed epochs after a warm-up one) on
    BCCD resized to ``size`` (shortest, longest edge), its achieved FLOP rate
    (:func:`measure.training_flops` per image x images/s) and the share of the device's bf16
    peak (``peak_tflops``, else :data:`measure.PEAK_BF16_TFLOPS`). Made for DETR-R50 in bf16
    on a GPU; it runs anywhere (the tests run the tiny model in fp32 on the CPU)."""
    dataset = bccd_images(steps * batch)
    names = dataset.features["objects"]["category"].feature.names
    model_dir = save_random_model(kind, names, work / f"model-{kind}-{len(names)}")
    trainer = our_trainer(
        model_dir,
        dataset,
        size[1],
        work / "gpu",
        image_size=size[0],
        bf16=bf16,
        max_steps=(1 + epochs) * steps,
        per_device_train_batch_size=batch,
    )
    timer = StepTimer()
    trainer.add_callback(timer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # of this section, not the ones before it
    batch_sizes, first = [], None
    for loaded in trainer.get_train_dataloader():
        batch_sizes.append(len(loaded["labels"]))
        first = loaded if first is None else first
    trainer.train()
    rates = epoch_rates(timer.durations(), batch_sizes)
    flops_per_image = training_flops(trainer, first) / len(first["labels"])
    device = trainer.args.device
    on_gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    peak = peak_tflops or (peak_bf16_tflops(name) if bf16 and on_gpu else None)
    images_per_s = statistics.median(rates[1:] or rates)
    achieved = flops_per_image * images_per_s / 1e12
    row = {
        "device": name,
        "model": kind,
        "bf16": bf16,
        "batch": batch,
        "input_size": list(first["pixel_values"].shape[-2:]),
        "workers": trainer.args.dataloader_num_workers,
        "images_per_s": images_per_s,
        "epoch_images_per_s": rates,
        "flops_per_image": flops_per_image,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "fraction_of_peak": achieved / peak if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None,
    }
    share = f"{100 * achieved / peak:.1f} % of its {peak:.0f} peak" if peak else "peak not known"
    print(
        f"gpu train {kind} {'bf16' if bf16 else 'fp32'} {row['input_size']} batch {batch} on "
        f"{name}: {images_per_s:.1f} images/s, {flops_per_image / 1e9:.1f} GFLOP per image, "
        f"{achieved:.2f} TFLOP/s ({share})",
        flush=True,
    )
    return row


def _print(label: str, row: dict[str, Any], *keys: str) -> None:
    cells = "  ".join(f"{key} {row['ours'][key]:9.3f} vs {row['stock'][key]:9.3f}" for key in keys)
    print(f"{label:<28} {cells}  ratio {row['speedup']:.2f}x", flush=True)


def speed_sections(sizes: dict[str, Any], models: list[str], quick: bool, work: Path) -> dict:
    """Train, pipeline, evaluation and predict sections (everything timed step by step)."""
    images = sizes["steps"] * BATCH
    datasets = {
        "bccd": bccd_images(images),
        "mixed": mixed_aspect_images(work / "train-data", images),
        "photos": phone_photos(work / "photos", max(images, 2 * BATCH)),
    }
    train = {}
    for kind in models:
        for name, dataset in datasets.items():
            if kind == "r50" and (name == "photos" or (quick and name != "bccd")):
                continue  # R50 steps take seconds on 2 CPU cores
            steps, epochs = sizes["steps"], sizes["epochs"]
            if kind == "r50":
                steps, epochs = min(steps, sizes["r50_steps"]), min(epochs, sizes["r50_epochs"])
            train[f"{kind}/{name}"] = train_section(name, dataset, kind, steps, epochs, work)
    rates = {k: v["ours"]["images_per_s"] for k, v in train.items()}
    return {
        "train": train,
        "pipeline": pipeline_section(
            bccd_images((sizes["pipeline"] + 1) * BATCH),
            datasets["photos"],
            sizes["pipeline"],
            sizes["pipeline_rounds"],
            rates,
            work,
        ),
        "eval": eval_section(
            sizes["eval"], sizes["eval_photos"], sizes["eval_bccd"], sizes["eval_repeats"], work
        ),
        "predict": predict_section(
            sorted((BCCD / "JPEGImages").glob("*.jpg"))[: sizes["predict"]], "BCCD", work
        ),
        "predict_photos": predict_section(
            image_files(phone_photos(work / "photos", sizes["predict_photos"])), "photos", work
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (~2 min, 2 cores)")
    parser.add_argument("--smoke", action="store_true", help="tiny counts: checks it all runs")
    parser.add_argument("--steps", type=int, help="training steps per epoch (the training set)")
    parser.add_argument("--epochs", type=int, help="timed training epochs after a warm-up one")
    parser.add_argument("--models", default="tiny,r50", help="comma-separated: tiny, r50")
    parser.add_argument("--output", default="benchmarks/results.json", help="JSON written here")
    parser.add_argument(
        "--budget-minutes",
        type=float,
        help="training time per side in the learning section (full: 4, --quick: 0 = skipped)",
    )
    parser.add_argument("--learning-only", action="store_true", help="only the learning section")
    parser.add_argument(
        "--families",
        action="store_true",
        help="also the families section (families.py: a row per model type, RT-DETR ours vs "
        "stock; ~10 min, --smoke: the tests' tiny models)",
    )
    parser.add_argument("--families-only", action="store_true", help="only the families section")
    parser.add_argument("--seed", type=int, default=0, help="training seed of the learning section")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="the GPU's bf16 peak for the GPU section (default: the published one for its name)",
    )
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes = dict(SIZES[mode])
    sizes.update({k: getattr(args, k) for k in ("steps", "epochs") if getattr(args, k)})
    models = args.models.split(",")
    quick = args.quick or args.smoke
    settings = {**sizes, "cap": CAP, "batch": BATCH, "threads": torch.get_num_threads()}
    results: dict[str, Any] = {"settings": {**vars(args), **settings}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not (args.learning_only or args.families_only):
            results.update(speed_sections(sizes, models, quick, work))
            if torch.cuda.is_available():
                results["gpu"] = gpu_section(
                    "r50",
                    GPU_SIZE,
                    GPU_BATCH,
                    *GPU_STEPS[mode],
                    work,
                    bf16=True,
                    peak_tflops=args.peak_tflops,
                )
        if args.families or args.families_only:
            from families import run_families

            results["families"] = run_families(mode, work)
        minutes = sizes["budget"] if args.budget_minutes is None else args.budget_minutes
        if minutes > 0 and not args.families_only:
            splits = LEARNING_SMOKE_SPLITS if args.smoke else LEARNING_SPLITS
            results["learning"] = learning_section(minutes, splits, work, args.seed)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
