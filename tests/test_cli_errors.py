"""Every numeric flag, every command: a bad value is one line on stderr and exit status 2.

Values are checked before any data or model is loaded, so the dataset and model given here
need not exist: a value that slipped through would end in a "does not exist" error (or a
traceback) instead of naming the flag.
"""

from __future__ import annotations

import importlib.util

import pytest

from hf_detr_ft.cli import main

BAD_NUMBERS = ["0", "-1", "nan", "inf", "1e12"]
TRAIN = ["train", "--dataset_dir", "no-such-data", "--model_name_or_path", "no-such-model"]
#: flag -> the values among BAD_NUMBERS that are fine for it (everything else is refused).
TRAIN_FLAGS = {
    "--per_device_train_batch_size": {"1e12"},  # not an int: refused by argparse too
    "--per_device_eval_batch_size": set(),
    "--learning_rate": {"0", "1e12"},
    "--lr_backbone": {"0", "1e12"},
    "--weight_decay": {"0", "1e12"},
    "--max_grad_norm": {"0", "1e12"},
    "--image_size": set(),
    "--max_image_size": set(),
    "--num_train_epochs": {"1e12"},
    "--min_scale": set(),
    "--validation_fraction": {"0"},
    "--ema_decay": {"0"},
    "--ema_tau": {"1e12"},
    "--max_train_samples": set(),
    "--max_eval_samples": set(),
    "--shuffle_buffer": set(),
    "--num_classes": set(),
    "--num_queries": set(),
    "--image_cache_mb": {"0", "1e12"},
    "--early_stopping_patience": {"1e12"},  # not an int: refused by argparse too
    "--early_stopping_threshold": {"0", "1e12"},
}
OTHER_COMMANDS = {
    ("predict", "x.jpg", "--model", "m"): {
        "--threshold": {"0"},
        "--batch_size": set(),
        "--tile": set(),  # at least 32
        "--overlap": {"0"},  # at most 0.9
        "--tile_nms_iou": {"0"},
    },
    ("evaluate", "--model", "m", "--dataset_dir", "d"): {
        "--batch_size": set(),
        "--threshold": {"0"},
        "--iou_threshold": set(),  # 0 is a number but not one of COCO's IoU thresholds
        "--num_worst": {"0"},
    },
    ("explain", "x.jpg", "--model", "m"): {"--top_k": set()},
    ("inspect", "no-such-data"): {
        "--preview": {"0"},
        "--num_classes": set(),
        "--augmented": {"0"},
        "--seed": {"0"},
    },
    ("report", "no-such-run"): {"--num_samples": {"0"}},
    ("demo",): {"--seed": {"0"}},
}
CASES = [
    (TRAIN, flag, value)
    for flag, fine in TRAIN_FLAGS.items()
    for value in BAD_NUMBERS
    if value not in fine
] + [
    (list(command), flag, value)
    for command, flags in OTHER_COMMANDS.items()
    for flag, fine in flags.items()
    for value in BAD_NUMBERS
    if value not in fine
]


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse's own usage error: one line too
        return int(stop.code)


@pytest.mark.parametrize(("command", "flag", "value"), CASES)
def test_a_bad_number_is_one_line_and_exit_2(command, flag, value, capsys, tmp_path) -> None:
    output_dir = [] if command[0] in {"explain", "report"} else ["--output_dir", str(tmp_path)]
    status = _run([*command, flag, value, *output_dir])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert "Traceback" not in "\n".join(err) and err, err
    assert flag.lstrip("-") in err[-1] and "does not exist" not in err[-1], err[-1]
    assert not any(tmp_path.iterdir())  # nothing written


def test_unknown_flags_and_config_keys_name_the_closest_option(tmp_path, capsys) -> None:
    assert _run([*TRAIN, "--learnig_rate", "1e-4"]) == 2
    assert "did you mean 'learning_rate'?" in capsys.readouterr().err
    config = tmp_path / "run.yaml"
    config.write_text("dataset_dir: data\nnum_train_epoch: 3\n")
    assert _run(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'num_train_epochs'?" in err and str(config) in err
    assert _run(["train", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_combination_transformers_refuses_is_one_line(capsys) -> None:
    argv = [*TRAIN, "--save_strategy", "no", "--load_best_model_at_end", "true"]
    assert _run(argv) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "load_best_model_at_end requires the save and eval strategy to match" in line


def test_a_tracker_that_is_not_installed_is_one_line(capsys) -> None:
    assert importlib.util.find_spec("wandb") is None  # no dependency of the project
    assert _run([*TRAIN, "--report_to", "wandb"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "report_to names wandb, which is not installed" in line
