"""The dataset cache: a COCO folder's checked splits built once, memory-mapped afterwards."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ONE_STEP

from hf_detr_ft.data.cache import CACHE_ENV, META_FILE, cache_root
from hf_detr_ft.data.dataset import load_detection_dataset
from hf_detr_ft.data.dataset_report import build_report
from hf_detr_ft.data.synthetic import make_shapes_dataset
from hf_detr_ft.errors import DatasetError

BUILD_MESSAGE = "Building the dataset cache"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A small COCO folder with one box overhanging its image (a problem the cache keeps)."""
    root = make_shapes_dataset(tmp_path / "shapes", splits={"train": 12, "valid": 4})
    path = root / "train" / "_annotations.coco.json"
    coco = json.loads(path.read_text())
    coco["annotations"][0]["bbox"] = [100.0, 100.0, 60.0, 60.0]  # 128x128 images: clipped
    path.write_text(json.dumps(coco))
    return root


def _load(folder: Path, cache_dir: Path, **kwargs):
    return load_detection_dataset(folder, cache_dir=cache_dir, **kwargs)


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if p.is_dir())


def _builds(caplog: pytest.LogCaptureFixture) -> int:
    return sum(BUILD_MESSAGE in r.getMessage() for r in caplog.records)


def test_second_load_maps_the_cache_with_identical_records_and_problems(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache_dir = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="hf_detr_ft")
    fresh = load_detection_dataset(folder, cache=False)
    first = _load(folder, cache_dir)
    second = _load(folder, cache_dir)
    assert _builds(caplog) == 1
    (entry,) = _entries(cache_dir)
    assert (entry / META_FILE).is_file()
    # the hit maps the Arrow files of the entry, it does not copy them into memory
    train = second.splits["train"]
    assert {Path(f["filename"]).parent for f in train.cache_files} == {entry}
    for data in (first, second):
        assert data.class_names == fresh.class_names
        assert data.label_map.source_ids == fresh.label_map.source_ids
        assert data.layout == fresh.layout == "roboflow"
        for split in fresh.splits:
            assert data.splits[split].to_list() == fresh.splits[split].to_list()
            assert data.splits[split].features == fresh.splits[split].features
        assert build_report(data).to_dict() == build_report(fresh).to_dict()
    assert second.skipped["train"].counts["boxes clipped to their image"] == 1
    # the hit logs the problems as reading the folder does
    assert any("boxes clipped" in r.getMessage() for r in caplog.records[-10:])


def test_an_edited_annotation_file_is_read_again(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache_dir = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="hf_detr_ft")
    before = _load(folder, cache_dir)
    path = folder / "train" / "_annotations.coco.json"
    coco = json.loads(path.read_text())
    coco["annotations"] = coco["annotations"][1:]  # one box fewer
    stat = path.stat()
    path.write_text(json.dumps(coco))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: content decides
    after = _load(folder, cache_dir)
    assert _builds(caplog) == 2
    count = lambda data: sum(len(o["bbox"]) for o in data.splits["train"]["objects"])  # noqa: E731
    assert count(after) == count(before) - 1
    assert not after.skipped["train"].counts  # the clipped box was the one removed
    assert len(_entries(cache_dir)) == 2


def test_other_options_are_other_entries(folder: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    _load(folder, cache_dir)
    _load(folder, cache_dir, validation_fraction=0.5, seed=3)  # applied after: same entry
    assert len(_entries(cache_dir)) == 1
    _load(folder, cache_dir, strict=True)  # clipping is no drop: it loads, under its own key
    assert len(_entries(cache_dir)) == 2
    path = folder / "train" / "_annotations.coco.json"
    coco = json.loads(path.read_text())
    coco["annotations"][1]["bbox"] = [1.0, 1.0, 0.0, 5.0]  # dropped: strict makes it an error
    path.write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match="strict=True"):
        _load(folder, cache_dir, strict=True)
    assert len(_entries(cache_dir)) == 2  # a failed build leaves nothing behind
    assert not [p for p in cache_dir.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize("damage", ["truncate arrow", "remove meta", "corrupt meta"])
def test_a_partial_or_corrupt_entry_is_rebuilt_never_used(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    cache_dir = tmp_path / "cache"
    expected = _load(folder, cache_dir).splits["train"].to_list()
    (entry,) = _entries(cache_dir)
    if damage == "truncate arrow":
        arrow = entry / "train.arrow"
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    elif damage == "remove meta":
        (entry / META_FILE).unlink()
    else:
        (entry / META_FILE).write_text('{"version": 1, "splits": ')
    caplog.set_level(logging.INFO, logger="hf_detr_ft")
    again = _load(folder, cache_dir)
    assert "incomplete or corrupt" in caplog.text
    assert _builds(caplog) == 1
    assert again.splits["train"].to_list() == expected
    assert (entry / META_FILE).is_file()


def test_a_killed_build_leaves_nothing_behind_after_the_next_one(
    folder: Path, tmp_path: Path
) -> None:
    """SIGTERM skips a build's clean-up; the next build (under the lock) removes its folder."""
    cache_dir = tmp_path / "cache"
    _load(folder, cache_dir)
    (entry,) = _entries(cache_dir)
    shutil.rmtree(entry)
    left = entry.with_name(f"{entry.name}.partial-424242")  # as a killed build leaves it
    left.mkdir()
    (left / "train.arrow").write_bytes(b"half written")
    _load(folder, cache_dir)
    assert (entry / META_FILE).is_file() and not left.exists()
    assert not [p for p in cache_dir.iterdir() if ".partial-" in p.name]


def test_num_classes_is_checked_on_a_hit(folder: Path, tmp_path: Path) -> None:
    _load(folder, tmp_path / "cache")
    with pytest.raises(DatasetError, match="num_classes=7"):
        _load(folder, tmp_path / "cache", num_classes=7)


def test_cache_directory_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env-cache"))
    assert cache_root() == tmp_path / "env-cache"
    assert cache_root(tmp_path / "given") == tmp_path / "given"
    monkeypatch.setenv(CACHE_ENV, "off")
    assert cache_root() is None
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "hf_detr_ft" / "datasets"


def test_an_unusable_cache_folder_reads_without_the_cache(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A cache folder under a file (or a read-only home) is no reason to stop a run: it reads
    # the folder as without a cache and says why, once.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        data = _load(folder, blocker / "cache")
    assert len(data.splits["train"]) > 0
    assert "cannot be used" in caplog.text and str(blocker / "cache") in caplog.text
    assert blocker.read_text() == "not a folder"


_LOAD_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from hf_detr_ft.data.dataset import load_detection_dataset
data = load_detection_dataset(sys.argv[1], cache_dir=sys.argv[2])
print("ROWS", len(data.splits["train"]) + len(data.splits["validation"]))
"""


def test_two_processes_share_one_build(folder: Path, tmp_path: Path) -> None:
    """Two processes started together: one builds, the other waits on the lock and maps."""
    cache_dir = tmp_path / "cache"
    command = [sys.executable, "-c", _LOAD_SCRIPT, str(folder), str(cache_dir)]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    assert sum(out.count(BUILD_MESSAGE) for out in outputs) == 1, outputs
    assert sum("Dataset cache hit" in out for out in outputs) == 1, outputs
    assert all("ROWS 16" in out for out in outputs), outputs
    assert len(_entries(cache_dir)) == 1


def test_inspect_takes_the_cache_flags(folder: Path, tmp_path: Path) -> None:
    from hf_detr_ft.cli import main

    cache_dir = tmp_path / "cache"
    out = tmp_path / "report"
    assert main(["inspect", str(folder), "--output_dir", str(out), "--no_dataset_cache"]) == 0
    argv = ["inspect", str(folder), "--output_dir", str(tmp_path / "again")]
    assert main([*argv, "--dataset_cache_dir", str(cache_dir)]) == 0
    assert len(_entries(cache_dir)) == 1
    assert (out / "dataset_report.json").read_text() == (
        tmp_path / "again" / "dataset_report.json"
    ).read_text()


def test_training_arguments_carry_the_cache_options() -> None:
    from hf_detr_ft.arguments import DataArguments, parse_train_args

    assert DataArguments(dataset_dir="d").dataset_cache is True
    model_args, data_args, _ = parse_train_args(
        ["--dataset_dir", "d", "--dataset_cache_dir", "/c", "--no_dataset_cache"]
    )
    assert data_args.dataset_cache_dir == "/c" and data_args.dataset_cache is False


def test_split_counts_from_arrow_columns_match_counting_each_box() -> None:
    """The report's and pre-flight's vectorised counts, on a split with crowd boxes, images
    without boxes and an index mapping (a ``select``, as a split-off validation set has)."""
    from datasets import Dataset

    from hf_detr_ft.data.dataset import detection_features
    from hf_detr_ft.data.dataset_report import split_stats

    names = ["a", "b", "c"]
    rows = []
    for i, (categories, crowd) in enumerate(
        [([0, 0, 1], [0, 1, 0]), ([], []), ([1], [1]), ([2, 0], [0, 0]), ([0], [0])]
    ):
        rows.append(
            {
                "image": {"bytes": b"", "path": f"/x/{i}.jpg"},
                "image_id": i,
                "width": 10,
                "height": 10,
                "objects": {
                    "id": list(range(len(categories))),
                    "bbox": [[0.0, 0.0, 1.0, 1.0]] * len(categories),
                    "category": categories,
                    "area": [1.0] * len(categories),
                    "iscrowd": [bool(c) for c in crowd],
                },
            }
        )
    split = Dataset.from_list(rows, features=detection_features(names)).select([4, 0, 1, 2])
    every = split_stats(split, names)
    assert (every.images, every.boxes, every.images_without_boxes) == (4, 5, 1)
    assert every.boxes_per_class == {"a": 3, "b": 2, "c": 0}
    assert every.images_per_class == {"a": 2, "b": 2, "c": 0}
    learned = split_stats(split, names, count_crowd=False)
    assert (learned.boxes, learned.images_without_boxes) == (3, 2)
    assert learned.boxes_per_class == {"a": 2, "b": 1, "c": 0}
    assert learned.images_per_class == {"a": 2, "b": 1, "c": 0}


def test_finetune_builds_the_cache_and_writes_the_same_report_from_it(
    folder: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    from hf_detr_ft import finetune

    cache_dir = tmp_path / "cache"
    one_step = dict(ONE_STEP, model=tiny_model_dir, dataset_cache_dir=str(cache_dir))
    finetune(folder, output_dir=tmp_path / "first", **one_step)
    finetune(folder, output_dir=tmp_path / "second", **one_step)
    (entry,) = _entries(cache_dir)
    assert (entry / META_FILE).is_file()
    report = "dataset_report.json"
    assert (tmp_path / "first" / report).read_text() == (tmp_path / "second" / report).read_text()
