"""``--streaming``: a local Parquet dataset (as the Hub stores one) trained from an
``IterableDataset``, in one process and in two, evaluated on its materialised splits."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import datasets
import pytest
from conftest import ONE_STEP, two_process_launch
from datasets import Image as ImageFeature
from transformers import TrainerCallback

from hf_detr_ft.arguments import parse_train_args
from hf_detr_ft.cli import main
from hf_detr_ft.data.dataset import load_detection_dataset
from hf_detr_ft.data.streaming import load_streaming_dataset
from hf_detr_ft.errors import ArgumentError, DatasetError
from hf_detr_ft.run import finetune

#: Steps evaluated and saved by, as a stream has no epochs.
BY_STEPS = dict(
    ONE_STEP,
    max_steps=2,
    eval_strategy="steps",
    eval_steps=2,
    save_strategy="steps",
    save_steps=2,
    per_device_train_batch_size=2,
    per_device_eval_batch_size=3,
    disable_tqdm=True,
)


@pytest.fixture(scope="module")
def parquet_dir(shapes_dir, tmp_path_factory) -> Path:
    """The shapes folder as Parquet files with the images inside: train in two files of 10
    and 6 images (processes reading one each end their passes at different steps),
    validation (6) and test (5) in one each."""
    root = tmp_path_factory.mktemp("parquet")
    for split, dataset in load_detection_dataset(shapes_dir).splits.items():
        embedded = dataset.cast_column("image", ImageFeature(decode=False)).map(
            lambda row: {"image": {"bytes": Path(row["image"]["path"]).read_bytes(), "path": None}}
        )
        parts = [range(10), range(10, 16)] if split == "train" else [range(len(embedded))]
        for i, rows in enumerate(parts):
            name = f"{split}-{i:05d}-of-{len(parts):05d}.parquet"
            embedded.select(rows).to_parquet(str(root / "data" / name))
    return root


class SeenImages(TrainerCallback):
    """Writes the image ids this process's training data loader reads, and its dataset's type."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs) -> None:
        dataset = train_dataloader.dataset  # as accelerate prepared it for this process
        ids = sorted(int(example["labels"]["image_id"]) for example in dataset)
        record = {"type": type(dataset).__name__, "ids": ids}
        path = self.folder / f"seen-{args.process_index}.json"
        path.write_text(json.dumps(record))


def test_a_stream_trains_and_resumes(parquet_dir, tiny_model_dir, tmp_path) -> None:
    out = tmp_path / "out"
    run = dict(model=tiny_model_dir, output_dir=out, streaming=True, shuffle_buffer=4)
    one_step = {**BY_STEPS, "max_steps": 1, "eval_strategy": "no", "save_steps": 1}
    result = finetune(parquet_dir, 3, callbacks=[SeenImages(tmp_path)], **run, **one_step)

    seen = json.loads((tmp_path / "seen-0.json").read_text())
    assert seen["type"] == "IterableDataset"  # streamed, not materialised
    assert seen["ids"] == list(range(16))  # one process reads every training image
    assert result.eval_split == "test" and 0 <= result.metrics["eval_map"] <= 1
    report = json.loads((out / "dataset_report.json").read_text())
    assert {split: stats["images"] for split, stats in report["splits"].items()} == {
        "validation": 6,
        "test": 5,
    }

    resumed = finetune(parquet_dir, 3, **run, **{**one_step, "max_steps": 2})
    assert resumed.log_history[-1]["step"] == 2  # past the skipped batch of checkpoint-1


def test_two_processes_read_disjoint_images_and_evaluate(
    parquet_dir, tiny_model_dir, tmp_path
) -> None:
    out = tmp_path / "out"
    script = tmp_path / "train.py"
    script.write_text(
        "import sys\nfrom pathlib import Path\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_streaming import BY_STEPS, SeenImages\n"
        "from hf_detr_ft.run import finetune\n"
        f"finetune({str(parquet_dir)!r}, 3, model={str(tiny_model_dir)!r}, "
        f"output_dir={str(out)!r}, streaming=True, use_cpu=True, "
        f"callbacks=[SeenImages(Path({str(tmp_path)!r}))], **{{**BY_STEPS, 'max_steps': 4}})\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = two_process_launch(29547, str(script))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]

    seen = [json.loads((tmp_path / f"seen-{rank}.json").read_text()) for rank in (0, 1)]
    assert {record["type"] for record in seen} == {"IterableDataset"}  # a Parquet file each
    ranks = [record["ids"] for record in seen]
    assert ranks[0] and ranks[1] and not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == list(range(16))
    state = json.loads((out / "trainer_state.json").read_text())
    # 5 and 3 batches of 2 a pass: one process starts its second pass at step 4, no hang
    assert state["global_step"] == 4
    # evaluated on the materialised validation split every 2 steps (and on test at the end)
    assert [log["step"] for log in state["log_history"] if "eval_map" in log] == [2, 4]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_split"] == "test" and 0 <= metrics["eval_map"] <= 1


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"max_steps": -1}, "--max_steps"),
        ({"eval_strategy": "epoch", "save_strategy": "epoch"}, "--eval_strategy"),
    ],
)
def test_what_a_stream_cannot_do_is_refused_before_loading(
    parquet_dir, tmp_path, change, named
) -> None:
    with pytest.raises(ArgumentError, match=named):
        finetune(parquet_dir, streaming=True, output_dir=tmp_path, **{**BY_STEPS, **change})


def test_streaming_a_coco_folder_is_one_line(shapes_dir, tmp_path, capsys) -> None:
    argv = ["train", "--dataset_dir", str(shapes_dir), "--streaming", "true", "--max_steps", "2"]
    argv += ["--output_dir", str(tmp_path / "out"), "--eval_strategy", "no"]
    assert main([*argv, "--save_strategy", "no", "--load_best_model_at_end", "false"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "--streaming reads a Hub dataset id or a folder of Parquet files" in line
    assert "a COCO folder" in line
    assert not (tmp_path / "out").exists()


def test_streaming_needs_a_validation_split(parquet_dir, tmp_path) -> None:
    for part in (parquet_dir / "data").glob("train-*"):
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / part.name).write_bytes(part.read_bytes())
    with pytest.raises(DatasetError, match="needs a train and a validation split"):
        finetune(tmp_path, streaming=True, output_dir=tmp_path / "out", **BY_STEPS)


def test_streaming_options_in_a_config_file(tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "dataset_dir: owner/data\nstreaming: true\nshuffle_buffer: 64\nmax_steps: 9\n"
    )
    _, data_args, training_args = parse_train_args([str(config)])
    assert (data_args.streaming, data_args.shuffle_buffer, training_args.max_steps) == (True, 64, 9)


def test_bad_boxes_in_a_stream_are_dropped_and_counted(shapes_dir, tmp_path, caplog) -> None:
    splits = load_detection_dataset(shapes_dir).splits
    for split in ("train", "validation"):
        rows = splits[split].cast_column("image", ImageFeature(decode=False)).to_list()
        for row in rows:
            row["image"] = {"bytes": Path(row["image"]["path"]).read_bytes(), "path": None}
        rows[0]["objects"]["bbox"][0] = [1.0, 1.0, 0.0, 5.0]  # no width
        dataset = datasets.Dataset.from_list(rows, features=splits[split].features)
        dataset.to_parquet(str(tmp_path / "data" / f"{split}-00000-of-00001.parquet"))

    data = load_streaming_dataset(str(tmp_path), 3, shuffle_buffer=1)
    boxes = {row["image_id"]: len(row["objects"]["bbox"]) for row in data.train_stream}
    original = {row["image_id"]: len(row["objects"]["bbox"]) for row in splits["train"]}
    first = splits["train"][0]["image_id"]
    assert boxes == {**original, first: original[first] - 1}
    assert "1 boxes with zero, negative or NaN size dropped" in caplog.text
    assert len(data.splits["validation"]) == len(splits["validation"])
    assert data.skipped["validation"].counts["boxes with zero, negative or NaN size dropped"] == 1
