"""The benchmark script runs end to end (``--quick --steps 2``) and writes the JSON the README
quotes."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BCCD

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_quick_run_writes_its_json(tmp_path) -> None:
    if not BCCD.is_dir():
        pytest.skip(f"real data not found at {BCCD}")
    output = tmp_path / "results.json"
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "run.py"),
        "--quick",
        "--steps",
        "2",
        "--budget-minutes",
        "0.1",
        "--output",
        str(output),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(output.read_text())

    assert set(results["train"]) == {"tiny/bccd", "tiny/mixed", "tiny/photos", "r50/bccd"}
    for row in results["train"].values():
        for side in ("ours", "stock"):
            assert row[side]["images_per_s"] > 0 and row[side]["peak_rss_mb"] > 0
            assert 0 <= row[side]["padded_fraction"] < 1
        assert row["speedup"] > 0
    # the stock recipe pads 640x480 photos to 600x600 squares: 25 % padding
    assert results["train"]["tiny/bccd"]["stock"]["padded_fraction"] == pytest.approx(0.25)
    assert results["train"]["tiny/bccd"]["ours"]["padded_fraction"] == 0
    assert results["pipeline"]["workers_0"]["images_per_s"] > 0
    beside = results["pipeline"]["beside_training"]
    assert beside["pipeline_images_per_s"] > 0 and beside["training_images_per_s"] > 0
    photos = results["pipeline"]["phone_photos"]
    assert all(photos[side]["images_per_s"] > 0 for side in ("ours", "full_decoding", "stock"))
    assert set(results["eval"]) == {"20", "50", "50 BCCD photos", "16 photos"}
    for row in [*results["eval"].values(), results["predict"], results["predict_photos"]]:
        assert row["speedup"] > 0
    assert all(row["ours"]["seconds"] > 0 for row in results["eval"].values())
    for row in (results["predict"], results["predict_photos"]):
        assert row["ours"]["images_per_s"] > 0 and row["stock"]["images_per_s"] > 0
    # fixed-budget learning: both sides trained until the clock stopped them, then evaluated
    for side in ("ours", "stock"):
        row = results["learning"][side]
        assert row["steps"] > 0 and row["images_seen"] == 8 * row["steps"]
        assert 0 <= row["map"] <= row["map_50"] <= 1


def test_benchmark_families_smoke_run_has_a_row_per_type(tmp_path) -> None:
    # The families section on the tests' tiny models: a row per model type (and so per family)
    # with positive rates, and RT-DETR's ours-vs-stock head-to-head; nothing else runs.
    if not BCCD.is_dir():
        pytest.skip(f"real data not found at {BCCD}")
    from hf_detr_ft.models.families import FAMILIES, SUPPORTED_TYPES

    output = tmp_path / "results.json"
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "run.py"),
        "--smoke",
        "--families-only",
        "--output",
        str(output),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(output.read_text())

    assert "train" not in results and "learning" not in results
    rows = results["families"]["rows"]
    assert set(rows) == set(SUPPORTED_TYPES)
    assert {row["family"] for row in rows.values()} == {family.name for family in FAMILIES}
    for row in rows.values():
        assert row["train_images_per_s"] > 0 and row["eval_images_per_s"] > 0
        assert row["parameters_m"] > 0 and len(row["input_size"]) == 2
    head_to_head = results["families"]["head_to_head"]["rt_detr"]
    for side in ("ours", "stock"):
        assert head_to_head[side]["images_per_s"] > 0
        assert head_to_head[side]["input_size"] == [64, 64]  # the common size, both sides
    assert head_to_head["speedup"] > 0
    inference = results["families"]["inference_head_to_head"]["rt_detr"]
    for task in ("evaluate", "predict"):
        assert inference[task]["ours_images_per_s"] > 0 and inference[task]["speedup"] > 0


def test_gpu_section_counts_flops_and_rates(tmp_path, monkeypatch) -> None:
    # Made for DETR-R50 in bf16 on a GPU; the same code on the tiny model, fp32, on the CPU.
    if not BCCD.is_dir():
        pytest.skip(f"real data not found at {BCCD}")
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    run = importlib.import_module("run")
    row = run.gpu_section("tiny", (64, 96), 2, 2, 1, tmp_path, bf16=False, peak_tflops=0.5)
    assert row["device"] == "cpu" and row["input_size"] == [64, 85]  # BCCD's 640x480
    assert row["images_per_s"] > 0 and len(row["epoch_images_per_s"]) == 2
    # forward + backward of the tiny DETR: more than its forward's multiply-adds alone
    assert 1e7 < row["flops_per_image"] < 1e10
    achieved = row["flops_per_image"] * row["images_per_s"] / 1e12
    assert row["achieved_tflops"] == pytest.approx(achieved)
    assert row["fraction_of_peak"] == pytest.approx(achieved / 0.5)
    assert run.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert run.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert run.peak_bf16_tflops("Some Future GPU") is None
