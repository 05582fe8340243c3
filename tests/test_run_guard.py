"""A rerun never mixes two runs, and one run at a time writes to an output folder."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hf_detr_ft import finetune
from hf_detr_ft.cli import main as cli_main
from hf_detr_ft.data.synthetic import make_shapes_dataset
from hf_detr_ft.errors import ArgumentError, OutputDirError
from hf_detr_ft.training.run_guard import LOCK_FILE, RUN_RECORD, OutputDirLock

QUICK = dict(
    max_steps=2,
    save_steps=2,
    save_strategy="steps",
    eval_strategy="no",
    load_best_model_at_end=False,
    image_size=64,
    max_image_size=64,
    report_to="none",
    disable_tqdm=True,
)


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, shapes_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("guard") / "out"
    finetune(shapes_dir, 3, model=tiny_model_dir, output_dir=out, **QUICK)
    assert (out / "checkpoint-2").is_dir() and not (out / LOCK_FILE).exists()
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_rerun_with_another_class_order_is_refused(trained, tiny_model_dir, tmp_path) -> None:
    other = make_shapes_dataset(tmp_path / "other", splits={"train": 8, "valid": 4}, seed=1)
    renamed = {"circle": "triangle", "triangle": "circle"}
    for split in ("train", "valid"):  # the same ids and boxes, two class names swapped
        path = other / split / "_annotations.coco.json"
        content = json.loads(path.read_text())
        for category in content["categories"]:
            category["name"] = renamed.get(category["name"], category["name"])
        path.write_text(json.dumps(content))
    before = _snapshot(trained)
    with pytest.raises(ArgumentError, match=r"classes \['circle', 'square', 'triangle'\]") as err:
        finetune(other, 3, model=tiny_model_dir, output_dir=trained, **{**QUICK, "max_steps": 4})
    assert "--resume_from_checkpoint" in str(err.value) and "new --output_dir" in str(err.value)
    assert _snapshot(trained) == before  # nothing of the first run was touched


def test_a_rerun_from_another_starting_model_is_refused(trained, shapes_dir) -> None:
    """Starting from the output folder itself is another model than the run's own start."""
    with pytest.raises(ArgumentError, match="starting model"):
        finetune(shapes_dir, 3, model=trained, output_dir=trained, **{**QUICK, "max_steps": 4})
    record = json.loads((trained / RUN_RECORD).read_text())
    assert record["class_names"] == ["circle", "square", "triangle"] and len(record["data"]) == 64


def test_the_same_run_resumes(trained, tiny_model_dir, shapes_dir, caplog) -> None:
    finetune(shapes_dir, 3, model=tiny_model_dir, output_dir=trained, **{**QUICK, "max_steps": 4})
    assert f"Resuming from {trained / 'checkpoint-2'}" in caplog.text
    assert json.loads((trained / "trainer_state.json").read_text())["global_step"] == 4


def test_a_second_run_into_a_busy_folder_stops(tiny_model_dir, shapes_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["train", "--dataset_dir", str(shapes_dir), "--model_name_or_path", str(tiny_model_dir)]
    with OutputDirLock(out):
        assert cli_main([*argv, "--output_dir", str(out), "--max_steps", "1"]) == 2
    message = capsys.readouterr().err
    assert "Another run (process" in message and "is writing to" in message
    assert not (out / LOCK_FILE).exists()


def test_a_stale_lock_is_taken_over(tmp_path, caplog) -> None:
    code = "import os; print(os.getpid())"
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    gone = int(done.stdout)
    with OutputDirLock(tmp_path):
        pass
    (tmp_path / LOCK_FILE).write_text(
        json.dumps({"pid": gone, "host": socket.gethostname(), "started": 0})
    )
    with OutputDirLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] != gone
    assert "is gone" in caplog.text and not (tmp_path / LOCK_FILE).exists()
    with OutputDirLock(tmp_path), pytest.raises(OutputDirError):
        OutputDirLock(tmp_path).__enter__()


@pytest.mark.parametrize("epochs", ["0", "-1", "nan"])
def test_training_that_would_do_nothing_is_refused(epochs, tmp_path, capsys) -> None:
    argv = ["train", "--dataset_dir", str(tmp_path), "--num_train_epochs", epochs]
    assert cli_main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
    assert "num_train_epochs must be positive" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
