"""What a run prints: one table row per evaluation, no log dicts, a summary that ends it."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from hf_detr_ft.cli import main as cli_main
from hf_detr_ft.training.console import COLUMNS, TRAIN_LOG, duration, table_row
from hf_detr_ft.wording import plural


def _train(shapes_dir: Path, model_dir: Path, out: Path, *extra: str) -> list[str]:
    """Two training steps, an evaluation before training and after each step."""
    return [
        "train",
        "--dataset_dir",
        str(shapes_dir),
        "--model_name_or_path",
        str(model_dir),
        "--output_dir",
        str(out),
        "--image_size",
        "64",
        "--max_image_size",
        "64",
        "--max_steps",
        "2",
        "--logging_steps",
        "1",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "1",
        "--eval_on_start",
        "true",
        "--save_strategy",
        "no",
        "--load_best_model_at_end",
        "false",
        "--report_to",
        "none",
        *extra,
    ]


def test_the_console_is_a_table_of_evaluations_and_a_summary(
    tiny_model_dir, shapes_dir, tmp_path, capsys
) -> None:
    out = tmp_path / "out"
    assert cli_main(_train(shapes_dir, tiny_model_dir, out)) == 0
    printed = capsys.readouterr()
    console = printed.out + printed.err
    assert "{'" not in console and "***** train metrics" not in console  # no dict dumps
    lines = printed.out.splitlines()
    assert lines.count(table_row(list(COLUMNS))) == 1
    rows = [line.split() for line in lines if re.match(r"\s+\d+\.\d\s+\d+/2\s", line)]
    assert [row[1] for row in rows] == ["0/2", "1/2", "2/2"]  # before training, each step
    for row in rows:
        assert len(row) == len(COLUMNS)
        assert re.fullmatch(r"\d+\.\d{3}", row[5]) and re.fullmatch(r"\d+:\d\d", row[7])
    assert rows[0][2] == "-" and re.fullmatch(r"\d+\.\d{3}", rows[1][2])  # no training loss yet

    summary = printed.out[printed.out.index("== Fine-tuning finished") :]
    assert "(test split)" in summary and "(2 steps, " in summary
    pictures = re.findall(r"\S+\.png", summary)
    assert pictures and all(Path(picture).is_file() for picture in pictures)
    model = re.search(r"model\s+(\S+)", summary).group(1)
    assert (Path(model) / "model.safetensors").is_file()
    commands = re.findall(r"(hf-detr-ft (?:evaluate|predict|push) .+)", summary)
    assert [shlex.split(c)[1] for c in commands] == ["evaluate", "predict", "push"]
    assert f"--model {out} --dataset_dir {shapes_dir} --split test" in commands[0]

    logs = [json.loads(line) for line in (out / TRAIN_LOG).read_text().splitlines()]
    assert sum("eval_map" in log for log in logs) == 4  # 3 during training, the final one
    assert sum("loss" in log and "grad_norm" in log for log in logs) == 2


def test_verbose_prints_the_dicts_too(tiny_model_dir, shapes_dir, tmp_path, capsys) -> None:
    argv = _train(shapes_dir, tiny_model_dir, tmp_path / "out", "--verbose", "true")
    assert cli_main(argv) == 0
    printed = capsys.readouterr()
    assert "'eval_map':" in printed.out + printed.err
    assert "***** train metrics *****" in printed.out
    assert table_row(list(COLUMNS)) in printed.out
    assert "== Fine-tuning finished" in printed.out


@pytest.mark.parametrize(
    ("count", "noun", "expected"),
    [(1, "box", "1 box"), (2, "box", "2 boxes"), (0, "image", "0 images"), (1, "class", "1 class")],
)
def test_plural(count: int, noun: str, expected: str) -> None:
    assert plural(count, noun) == expected


def test_durations_read_as_clock_times() -> None:
    assert [duration(s) for s in (4.4, 65, 3725)] == ["0:04", "1:05", "1:02:05"]
