"""A COCO-scale dataset folder, generated in half a minute, and the cost of loading it.

    python benchmarks/coco_scale.py generate /tmp/coco-scale --images 118287
    python benchmarks/coco_scale.py measure /tmp/coco-scale --cache-dir /tmp/coco-cache
    python benchmarks/coco_scale.py measure /tmp/coco-scale --cache-dir /tmp/c2 --processes 2

``generate`` writes a Roboflow-layout folder (``train/``, ``valid/``, ``test/``, each with
``_annotations.coco.json``) with COCO-2017's proportions: 80 classes, about 7 boxes per image,
640x480 images. Every image is a hard link to one small valid JPEG, so the headers that loading
reads are real while the disk holds a single file (118k names cost ~30 MB of inodes).

``measure`` runs the loading a training run starts with (``load_detection_dataset``, the dataset
report, the pre-flight's annotation scan) in a fresh process, twice: the first run builds the
dataset cache, the second maps it; ``--processes 2`` starts two at once, as a two-process
training run does (one builds, the other waits and maps). It prints the time and memory of
each; numbers are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

WIDTH, HEIGHT, CLASSES, BOXES_PER_IMAGE = 640, 480, 80, 7
LINKS_PER_FILE = 60_000


def generate(root: Path, images: int, eval_images: int = 500, seed: int = 0) -> None:
    """Write the folder: ``images`` training images, ``eval_images`` each for valid and test."""
    root.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (WIDTH, HEIGHT), (90, 120, 150)).save(buffer, format="JPEG", quality=50)
    links = 0
    rng = random.Random(seed)
    categories = [
        {"id": i + 1, "name": f"class_{i:02d}", "supercategory": "none"} for i in range(CLASSES)
    ]
    for split, count in (("train", images), ("valid", eval_images), ("test", eval_images)):
        folder = root / split
        folder.mkdir(exist_ok=True)
        entries, annotations = [], []
        for image_id in range(count):
            name = f"{image_id:07d}.jpg"
            target = folder / name
            if not target.exists():
                source = root / f"image-{links // LINKS_PER_FILE}.jpg"  # filesystems cap links
                if not source.exists():
                    source.write_bytes(buffer.getvalue())
                os.link(source, target)
                links += 1
            entries.append({"id": image_id, "file_name": name, "width": WIDTH, "height": HEIGHT})
            for _ in range(rng.randint(1, round(2 * BOXES_PER_IMAGE) - 1)):
                w, h = rng.uniform(8, 300), rng.uniform(8, 300)
                x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
                annotations.append(
                    {
                        "id": len(annotations),
                        "image_id": image_id,
                        "category_id": rng.randint(1, CLASSES),
                        "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                        "area": round(w * h, 2),
                        "iscrowd": 0,
                    }
                )
        coco = {"images": entries, "annotations": annotations, "categories": categories}
        (folder / "_annotations.coco.json").write_text(json.dumps(coco))
        print(f"{split}: {count} images, {len(annotations)} boxes")


def load_once(dataset: str, cache_dir: str | None) -> None:
    """What a run does before its first step, minus the model: dataset, report, pre-flight.

    Prints seconds and memory of each part as JSON: ``import_s`` (the data package: datasets,
    pyarrow, Pillow; not torch), ``load_s`` / ``load_cpu_s`` (wall and CPU seconds of
    ``load_detection_dataset``: the build on a miss), ``load_peak_rss_mb`` (the process's
    high-water mark by then: what ``hf-detr-ft inspect`` peaks at), then the report and the
    pre-flight's scan (``ready_s``, ``ready_cpu_s``: wall and CPU seconds after the imports,
    the pre-flight's import of transformers and torch excluded), ``data_rss_mb`` (resident
    memory added by the data, report and pre-flight, that import excluded) and
    ``peak_rss_mb`` (the high-water mark with torch and transformers imported, as in a
    training run).
    """
    start = time.perf_counter()
    from hf_detr_ft.data.dataset import load_detection_dataset
    from hf_detr_ft.data.dataset_report import build_report

    imported, before, cpu = time.perf_counter(), _rss_mb(), _cpu_s()
    data = load_detection_dataset(dataset, cache_dir=cache_dir)
    loaded, load_cpu = time.perf_counter(), _cpu_s()
    load_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = build_report(data)
    after_report, rss_report, cpu_report = time.perf_counter(), _rss_mb(), _cpu_s()
    from hf_detr_ft.training.preflight import _scan  # imports transformers and torch

    scan_start, torch_mb, torch_cpu = (
        time.perf_counter(),
        _rss_mb() - rss_report,
        _cpu_s() - cpu_report,
    )
    for split in data.splits.values():
        _scan(split, {"shortest_edge": 800, "longest_edge": 1333})
    done = time.perf_counter()
    preflight_import_s = scan_start - after_report
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "import_s": round(imported - start, 1),
        "load_s": round(loaded - imported, 1),
        "load_cpu_s": round(load_cpu - cpu, 1),
        "load_peak_rss_mb": round(load_peak_mb),
        "report_and_preflight_s": round(done - loaded - preflight_import_s, 1),
        "ready_s": round(done - imported - preflight_import_s, 1),
        "ready_cpu_s": round(_cpu_s() - cpu - torch_cpu, 1),
        "data_rss_mb": round(_rss_mb() - before - torch_mb),
        "peak_rss_mb": round(peak_mb),
        "images": {name: s.images for name, s in report.splits.items()},
    }
    print(json.dumps(result))


def _cpu_s() -> float:
    """CPU seconds of this process, all threads: what a busy shared machine cannot inflate."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1]) / 1024


def measure(dataset: str, cache_dir: str, runs: int = 2, processes: int = 1) -> None:
    """``runs`` runs in turn (the first builds the cache, the others map it), each of
    ``processes`` fresh processes started together (as the processes of one training run)."""
    command = [sys.executable, __file__, "load", dataset, "--cache-dir", cache_dir]
    for run in range(runs):
        start = time.perf_counter()
        started = [
            subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(processes)
        ]
        outputs = [p.communicate()[0].strip() for p in started]
        wall = time.perf_counter() - start
        for i, out in enumerate(outputs):
            print(f"run {run + 1} process {i + 1}: {out}")
        print(
            f"run {run + 1}: wall {wall:.1f} s for {processes} process(es), Python start included"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["generate", "measure", "load"])
    parser.add_argument("folder")
    parser.add_argument("--images", type=int, default=118_287)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()
    if args.command == "generate":
        generate(Path(args.folder), args.images)
    elif args.command == "load":
        load_once(args.folder, args.cache_dir)
    else:
        measure(args.folder, args.cache_dir, args.runs, args.processes)


if __name__ == "__main__":
    main()
