"""The model card of a real run, read as the Hub reads it, and its usage snippet run as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load
from PIL import Image
from transformers import TrainerState

from hf_detr_ft.arguments import DetrTrainingArguments
from hf_detr_ft.artifacts.model_card import (
    PLACEHOLDER_REPO_ID,
    CardContext,
    ModelCardCallback,
    write_model_card,
)
from hf_detr_ft.data.splits import ROBOFLOW_FOLDERS as SPLIT_FOLDERS
from hf_detr_ft.data.synthetic import DEMO_CLASSES
from hf_detr_ft.evaluation.coco_metrics import SUMMARY_METRICS
from hf_detr_ft.run import METRICS_FILE, finetune


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, shapes_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("card-run") / "out"
    finetune(
        shapes_dir,
        3,
        model=tiny_model_dir,
        output_dir=out,
        num_train_epochs=2,
        per_device_train_batch_size=8,
        image_size=64,
        max_image_size=64,
        learning_rate=3e-4,
        report_to="none",
        disable_tqdm=True,
    )
    return out


def test_card_metadata_is_what_the_hub_reads(run_dir) -> None:
    metadata = metadata_load(run_dir / "README.md")
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "object-detection"
    assert metadata["license"] == "apache-2.0"
    assert {"object-detection", "detr"} <= set(metadata["tags"])
    assert "base_model" not in metadata  # a local starting checkpoint is no Hub id

    card = ModelCard.load(run_dir / "README.md")
    saved = json.loads((run_dir / METRICS_FILE).read_text())
    results = card.data.eval_results
    assert {r.task_type for r in results} == {"object-detection"}
    assert {r.dataset_split for r in results} == {saved["eval_split"]} == {"test"}
    # model-index holds every COCO summary number of metrics.json except "no ground truth" (-1).
    assert {r.metric_type: r.metric_value for r in results} == {
        key: saved[f"eval_{key}"] for key in SUMMARY_METRICS if saved[f"eval_{key}"] != -1
    }
    [index] = metadata["model-index"]
    assert index["name"] == card.data.model_name == "out"


def _annotation_counts(shapes_dir: Path) -> dict[str, tuple[int, int, list[int]]]:
    """Images, boxes and boxes per class of each split, straight from the COCO files."""
    counts = {}
    for split, folder in SPLIT_FOLDERS.items():
        coco = json.loads((shapes_dir / folder / "_annotations.coco.json").read_text())
        names = {c["id"]: c["name"] for c in coco["categories"]}
        per_class = Counter(names[a["category_id"]] for a in coco["annotations"])
        counts[split] = (
            len(coco["images"]),
            len(coco["annotations"]),
            [per_class[name] for name in DEMO_CLASSES],
        )
    return counts


def _table_row(text: str, first_cell: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {first_cell} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_card_body_has_classes_per_class_ap_data_and_training(run_dir, shapes_dir) -> None:
    text = ModelCard.load(run_dir / "README.md").text
    saved = json.loads((run_dir / METRICS_FILE).read_text())
    assert "It detects 3 classes:\ncircle, square, triangle." in text
    for name in DEMO_CLASSES:
        assert _table_row(text, name)[:2] == [
            f"{saved[f'eval_ap_{name}']:.4f}",
            f"{saved[f'eval_ar_{name}']:.4f}",
        ]
    assert _table_row(text, "mAP@[.5:.95]") == [f"{saved['eval_map']:.4f}"]
    for split, (images, boxes, per_class) in _annotation_counts(shapes_dir).items():
        assert _table_row(text, split) == [str(images), str(boxes), *map(str, per_class)]
    assert _table_row(text, "learning_rate") == ["0.0003"]
    assert _table_row(text, "image_size (shortest edge)") == ["64"]
    # One row per epoch, without the final evaluation (on the test split).
    history = text.split("### Evaluation during training")[1].splitlines()
    assert [row.split("|")[1].strip() for row in history if re.match(r"\| \d", row)] == [
        "1.00",
        "2.00",
    ]


def test_usage_snippet_runs_as_written_against_the_output_dir(run_dir, tmp_path) -> None:
    text = ModelCard.load(run_dir / "README.md").text
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert f'"{PLACEHOLDER_REPO_ID}"' in snippet
    snippet = snippet.replace(PLACEHOLDER_REPO_ID, str(run_dir))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", snippet + "\nprint('snippet done')"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("snippet done")
    assert Image.open(run_dir / "example.jpg").format == "JPEG"


def _context(**overrides) -> CardContext:
    return CardContext(class_names=list(DEMO_CLASSES), eval_split="test", **overrides)


def test_hub_base_model_and_dataset_go_into_the_metadata(tmp_path) -> None:
    metrics = {f"eval_{key}": 0.25 for key in SUMMARY_METRICS} | {"eval_map_large": -1.0}
    write_model_card(
        tmp_path,
        _context(base_model="facebook/detr-resnet-50", dataset_name="org/shapes", license="mit"),
        metrics=metrics,
        final=True,
        repo_id="someone/shapes-detr",
    )
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "facebook/detr-resnet-50"
    assert card.data.datasets == ["org/shapes"] and card.data.license == "mit"
    assert card.data.model_name == "shapes-detr"
    assert {r.dataset_type for r in card.data.eval_results} == {"org/shapes"}
    assert "map_large" not in {r.metric_type for r in card.data.eval_results}
    assert len(card.data.eval_results) == len(SUMMARY_METRICS) - 1
    assert 'model_id = "someone/shapes-detr"' in card.text


def test_sample_predictions_and_dataset_report_are_shown_when_present(tmp_path) -> None:
    write_model_card(tmp_path, _context())
    text = (tmp_path / "README.md").read_text()
    assert "sample_predictions.png" not in text and "dataset_report.json" not in text
    assert "Not evaluated yet." in text and "model-index" not in text

    Image.new("RGB", (8, 8)).save(tmp_path / "sample_predictions.png")
    (tmp_path / "dataset_report.json").write_text("{}")
    write_model_card(tmp_path, _context())
    text = (tmp_path / "README.md").read_text()
    assert re.search(r"!\[[^\]]+\]\(sample_predictions\.png\)", text)
    assert "[`dataset_report.json`](dataset_report.json)" in text


def test_the_card_follows_each_evaluation_during_training(tmp_path) -> None:
    args = DetrTrainingArguments(output_dir=str(tmp_path), report_to="none")
    callback = ModelCardCallback(_context())
    state = TrainerState()
    for epoch, value in ((1, 0.125), (2, 0.375)):
        state.log_history.append(
            {"eval_map": value, "eval_map_50": 0.5, "epoch": epoch, "step": 2 * epoch}
        )
        callback.on_save(args, state, None)
        card = ModelCard.load(tmp_path / "README.md")
        results = {(r.metric_type, r.metric_value, r.dataset_split) for r in card.data.eval_results}
        assert results == {("map", value, "validation"), ("map_50", 0.5, "validation")}
        assert f"latest evaluation during training (epoch {epoch})" in card.text
