"""The offline demo, run whole: it must show learning a person can see."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from hf_detr_ft.artifacts.training_report import SAMPLES_JSON
from hf_detr_ft.data.synthetic import DEMO_CLASSES
from hf_detr_ft.demo import DEMO_CHECKPOINT, _prepare, run_demo


def test_demo_checkpoint_is_shipped_small_and_complete() -> None:
    files = {p.name: p.stat().st_size for p in DEMO_CHECKPOINT.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= files.keys()
    assert files["model.safetensors"] < 10 * 2**20
    config = json.loads((DEMO_CHECKPOINT / "config.json").read_text())
    assert not set(config["id2label"].values()) & set(DEMO_CLASSES)  # pretrained on other shapes


def test_demo_fine_tunes_and_shows_learning(tmp_path) -> None:
    result = run_demo(tmp_path / "demo")
    # Measured (docs/demo.md): mAP@.5 0.43 before -> 0.96 after; of 127 validation objects
    # 103-109 with one box at score > 0.5, 6-10 with more, the rest missed.
    assert result.map50_before < 0.6
    assert result.map50_after >= 0.8 and result.map_after > result.map_before + 0.2
    boxes = result.boxes
    assert len(boxes.counts) > 100  # every validation object counted
    assert boxes.at_most_one_share >= 0.9  # the bound: no stacks of near-duplicates
    assert boxes.single >= 0.75 * len(boxes.counts)  # and most objects found
    with Image.open(result.picture) as picture:
        assert picture.format == "PNG" and picture.width > 400
    drawn = json.loads(result.picture.with_name(SAMPLES_JSON).read_text())
    per_object = drawn["boxes_per_object"]
    assert drawn["score_threshold"] == 0.5 and per_object["objects"] >= 4
    assert per_object["several_boxes"] <= 1  # the picture shows one box per object
    assert (tmp_path / "demo" / "model" / "model.safetensors").is_file()
    summary = result.summary()  # what `hf-detr-ft demo` prints last
    assert f"{result.map50_before:.3f} before -> {result.map50_after:.3f} after" in summary
    assert f"one box on {boxes.single} of {len(boxes.counts)} validation objects" in summary
    assert str(result.picture) in summary and "hf-detr-ft predict" in summary


def test_demo_replaces_only_its_own_output(tmp_path) -> None:
    foreign = tmp_path / "mine"
    (foreign / "keep.txt").parent.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not made by the demo"):
        _prepare(foreign, seed=0)
    assert (foreign / "keep.txt").exists()
    ours = tmp_path / "demo"
    _prepare(ours, seed=0)
    (ours / "model").mkdir()
    _prepare(ours, seed=0)  # a second demo run starts afresh instead of resuming the finished one
    assert not (ours / "model").exists()


def test_a_demo_stopped_with_ctrl_c_continues_when_run_again(tmp_path) -> None:
    """What the interrupt message advises (the same command again) resumes, not restarts."""
    ours = tmp_path / "demo"
    _prepare(ours, seed=3)
    checkpoint = ours / "model" / "checkpoint-20"
    checkpoint.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "optimizer.pt", "rng_state.pth"):
        (checkpoint / name).write_text("{}")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 20}))
    _prepare(ours, seed=3)
    assert checkpoint.is_dir()  # kept: the demo resumes from it
    _prepare(ours, seed=4)  # another seed is another demo: it starts afresh
    assert not (ours / "model").exists()
