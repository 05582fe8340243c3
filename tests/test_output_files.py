"""No command overwrites a file hf-detr-ft did not write (hf_detr_ft.artifacts.output_files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import ONE_STEP

from hf_detr_ft import finetune, predict
from hf_detr_ft.artifacts.output_files import MANIFEST, claim_files
from hf_detr_ft.cli import main as cli_main
from hf_detr_ft.data.dataset import load_detection_dataset
from hf_detr_ft.errors import DatasetError, OutputDirError


def test_new_files_and_our_own_files_may_be_written_others_never(tmp_path: Path) -> None:
    (tmp_path / "mine.json").write_text("{}")
    first = claim_files(tmp_path, ["report.json"])
    first[0].write_text("1")
    assert claim_files(tmp_path, ["report.json"]) == first  # ours: may be replaced
    with pytest.raises(OutputDirError, match=r"mine\.json already exists and was not written"):
        claim_files(tmp_path, ["report.json", "mine.json"])
    assert (tmp_path / "mine.json").read_text() == "{}" and (tmp_path / MANIFEST).is_file()


def test_a_run_folder_of_an_earlier_version_counts_as_ours(tmp_path: Path) -> None:
    (tmp_path / "trainer_state.json").write_text("{}")
    (tmp_path / "training_map.png").write_bytes(b"old")
    with pytest.raises(OutputDirError):
        claim_files(tmp_path, ["training_map.png"])  # only for the files a run writes
    assert claim_files(tmp_path, ["training_map.png"], run_outputs=["training_map.png"])


def test_predict_never_draws_over_its_inputs(tiny_model_dir, shapes_dir, tmp_path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for image in sorted((shapes_dir / "test").glob("*.png"))[:2]:
        (photos / image.name).write_bytes(image.read_bytes())
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    with pytest.raises(OutputDirError, match="not written by hf-detr-ft"):
        predict(tiny_model_dir, photos, output_dir=photos, device="cpu")
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before
    out = tmp_path / "drawn"
    predict(tiny_model_dir, photos, output_dir=out, device="cpu")
    predict(tiny_model_dir, photos, output_dir=out, device="cpu")  # a rerun replaces its own


def test_training_keeps_the_users_files(tiny_model_dir, shapes_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    argv = ["train", "--dataset_dir", str(shapes_dir), "--model_name_or_path", str(tiny_model_dir)]
    assert cli_main([*argv, "--output_dir", str(out), "--max_steps", "1"]) == 2
    assert "README.md already exists and was not written" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]  # nothing written, no lock
    finetune(
        shapes_dir,
        3,
        model=tiny_model_dir,
        output_dir=tmp_path / "fresh",
        **ONE_STEP,
    )
    report = ["report", str(tmp_path / "fresh")]
    assert cli_main(report) == 0 and cli_main(report) == 0  # its own plots, replaced


def test_explain_and_inspect_refuse_to_overwrite(tiny_model_dir, shapes_dir, tmp_path, capsys):
    image = next((shapes_dir / "test").glob("*.png"))
    figure = tmp_path / "figure.png"
    figure.write_bytes(b"a picture of mine")
    argv = ["explain", str(image), "--model", str(tiny_model_dir), "--output", str(figure)]
    assert cli_main(argv) == 2 and figure.read_bytes() == b"a picture of mine"
    (tmp_path / "dataset_report.json").write_text("{}")
    assert cli_main(["inspect", str(shapes_dir), "--output_dir", str(tmp_path)]) == 2
    assert (tmp_path / "dataset_report.json").read_text() == "{}"
    assert capsys.readouterr().err.count("not written by hf-detr-ft") == 2


def test_inputs_that_cannot_work_are_one_line(tiny_model_dir, shapes_dir, tmp_path, capsys):
    """A missing or non-image file to explain; a report drawn with another dataset's classes."""
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a picture")
    for image in (tmp_path / "missing.jpg", not_an_image, tmp_path):
        assert cli_main(["explain", str(image), "--model", str(tiny_model_dir)]) == 2
        assert f"Cannot read the image {image}" in capsys.readouterr().err
    run = tmp_path / "run"
    finetune(
        shapes_dir,
        3,
        model=tiny_model_dir,
        output_dir=run,
        **ONE_STEP,
    )
    other = Path(shutil.copytree(shapes_dir, tmp_path / "other"))
    for path in other.glob("*/_annotations.coco.json"):  # the same data, one class renamed
        coco = json.loads(path.read_text())
        for category in coco["categories"]:
            category["name"] = {"circle": "disc"}.get(category["name"], category["name"])
        path.write_text(json.dumps(coco))
    assert cli_main(["report", str(run), "--dataset_dir", str(other)]) == 2
    assert "predicts the classes ['circle', 'square', 'triangle']" in capsys.readouterr().err


def test_duplicate_class_names_are_refused(shapes_dir, tmp_path) -> None:
    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    coco = json.loads((shapes_dir / "train" / "_annotations.coco.json").read_text())
    for category in coco["categories"]:
        category["name"] = {"square": "circle"}.get(category["name"], category["name"])
    (data / "_annotations.coco.json").write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match=r"'circle' \(category ids \[\d, \d\]\)"):
        load_detection_dataset(tmp_path / "data")
