"""Runs that die (SIGKILL, Ctrl-C, a failing save) resume to exactly where they would have been.

The runs are real `hf-detr-ft train` subprocesses on a tiny model: 16 training images, batch 2,
2 epochs (16 steps), a checkpoint and an evaluation every 3 steps and at the end, at most 2
checkpoints kept (plus the best).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForObjectDetection, Trainer

from hf_detr_ft import finetune
from hf_detr_ft.errors import INTERRUPTED_EXIT_CODE
from hf_detr_ft.training.checkpoints import last_complete_checkpoint, missing_parts

SECRET = "hf_SECRETtokenThatMustNeverBeSaved"
LAST_SAVED = "checkpoint-16"  # the newest checkpoint: saved every 3 steps and at the end


def _command(shapes_dir: Path, model_dir: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "hf_detr_ft.cli",
        "train",
        "--dataset_dir",
        str(shapes_dir),
        "--num_classes",
        "3",
        "--model_name_or_path",
        str(model_dir),
        "--output_dir",
        str(out),
        "--num_train_epochs",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--per_device_eval_batch_size",
        "3",
        "--image_size",
        "64",
        "--max_image_size",
        "64",
        "--save_strategy",
        "steps",
        "--save_steps",
        "3",
        "--save_total_limit",
        "2",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "3",
        "--logging_steps",
        "1",
        "--dataloader_num_workers",
        "0",
        "--disable_tqdm",
        "true",
        "--report_to",
        "none",
        "--hub_token",
        SECRET,
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _start_and_signal(command: list[str], out: Path, sig: int) -> subprocess.CompletedProcess:
    """Start a run, send ``sig`` once its first checkpoint is complete, wait for the end."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    deadline = time.monotonic() + 240
    while last_complete_checkpoint(out) is None and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=240)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _training_losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def _assert_same_run(out: Path, reference: Path) -> None:
    """Same final weights, newest checkpoint, per-step losses and final metrics."""
    for name in ("model.safetensors", f"{LAST_SAVED}/model.safetensors"):
        ours, theirs = load_file(out / name), load_file(reference / name)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.allclose(ours[key], theirs[key], atol=1e-6, rtol=0), (name, key)
    assert _training_losses(out) == pytest.approx(_training_losses(reference), abs=1e-6)
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (out, reference))
    for key, value in theirs.items():
        if isinstance(value, float) and "runtime" not in key and "per_second" not in key:
            assert ours[key] == pytest.approx(value, abs=1e-6), key


@pytest.fixture(scope="module")
def reference(tiny_model_dir, shapes_dir, tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted run, and its console output."""
    out = tmp_path_factory.mktemp("resume") / "uninterrupted"
    done = _run(_command(shapes_dir, tiny_model_dir, out))
    return out, done.stdout + done.stderr


def test_sigkilled_run_resumes_to_the_uninterrupted_result(
    reference, tiny_model_dir, shapes_dir, tmp_path
) -> None:
    out = tmp_path / "killed"
    command = _command(shapes_dir, tiny_model_dir, out)
    killed = _start_and_signal(command, out, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()  # it died before the end
    saved = last_complete_checkpoint(out)

    resumed = _run(command)  # the same command
    assert f"Resuming from {saved}" in resumed.stderr
    _assert_same_run(out, reference[0])


def test_ctrl_c_saves_a_checkpoint_exits_130_and_resumes_exactly(
    reference, tiny_model_dir, shapes_dir, tmp_path
) -> None:
    out = tmp_path / "interrupted"
    command = _command(shapes_dir, tiny_model_dir, out)
    stopped = _start_and_signal(command, out, signal.SIGINT)
    assert stopped.returncode == INTERRUPTED_EXIT_CODE, stopped.stderr[-4000:]
    assert "Traceback" not in stopped.stderr
    message = next(line for line in stopped.stderr.splitlines() if "Training interrupted" in line)
    assert "Run the same command again to resume" in message
    assert "--resume_from_checkpoint" in message
    saved = last_complete_checkpoint(out)
    assert saved is not None and saved in message
    assert not (out / "metrics.json").exists()

    resumed = _run(command)
    assert f"Resuming from {saved}" in resumed.stderr
    _assert_same_run(out, reference[0])


def test_best_checkpoint_is_kept_and_loaded_and_no_secret_is_saved(reference) -> None:
    out, console = reference
    state = json.loads((out / "trainer_state.json").read_text())
    evaluations = [e for e in state["log_history"] if "eval_map" in e]
    best = Path(state["best_model_checkpoint"])
    # The best checkpoint by mAP survives save_total_limit=2 next to the newest one ...
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted({best.name, LAST_SAVED})
    assert state["best_metric"] == max(e["eval_map"] for e in evaluations)
    best_step = next(e["step"] for e in evaluations if e["eval_map"] == state["best_metric"])
    assert best.name == f"checkpoint-{best_step}"
    # ... and is the final model.
    final, kept = load_file(out / "model.safetensors"), load_file(best / "model.safetensors")
    assert all(torch.equal(final[key], kept[key]) for key in final)

    # Weights only as safetensors; the hub token nowhere, in no file and no log line.
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix == ".bin" and p.name != "training_args.bin"]
    assert SECRET not in console
    assert not [p for p in files if SECRET.encode() in p.read_bytes()]


def test_a_failed_save_leaves_the_previous_checkpoint_and_resume_uses_it(
    tiny_model_dir, shapes_dir, tmp_path, monkeypatch, caplog
) -> None:
    out = tmp_path / "failed-save"
    options = dict(
        model=tiny_model_dir,
        output_dir=out,
        num_train_epochs=1,
        per_device_train_batch_size=2,
        image_size=64,
        max_image_size=64,
        save_strategy="steps",
        save_steps=2,
        eval_strategy="no",
        load_best_model_at_end=False,
        report_to="none",
        disable_tqdm=True,
    )
    save = Trainer._save_optimizer_and_scheduler

    def disk_full_at_step_4(trainer: Trainer, output_dir: str) -> None:
        if trainer.state.global_step == 4:  # after the weights were written
            raise OSError(28, "No space left on device")
        save(trainer, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", disk_full_at_step_4)
    with pytest.raises(OSError, match="No space left"):
        finetune(shapes_dir, 3, **options)
    assert (out / "checkpoint-4" / "model.safetensors").is_file()  # looks half done ...
    assert "trainer_state.json (written last)" in missing_parts(out / "checkpoint-4")
    with caplog.at_level(logging.WARNING):
        assert last_complete_checkpoint(out) == str(out / "checkpoint-2")  # ... and is skipped
    assert "checkpoint-4: incomplete" in caplog.text
    AutoModelForObjectDetection.from_pretrained(out / "checkpoint-2")  # still loadable

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", save)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = finetune(shapes_dir, 3, **options)
    assert f"Resuming from {out / 'checkpoint-2'}" in caplog.text
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 8
    kept = sorted(out.glob("checkpoint-*"))  # checkpoint-4 was saved again, then rotated out
    assert [p.name for p in kept] == ["checkpoint-6", "checkpoint-8"]
    assert all(missing_parts(p) == [] for p in kept)
    assert "eval_map" in result.metrics
