"""ONNX export: checked against PyTorch, run by predict/evaluate, quantized, usable alone."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image
from tiny_families import save_tiny_model
from transformers import AutoModelForObjectDetection, pipeline

from hf_detr_ft.artifacts.hub import ALLOW_PATTERNS, IGNORE_PATTERNS
from hf_detr_ft.artifacts.model_card import refresh_onnx_section
from hf_detr_ft.artifacts.onnx_export import (
    CHECK_FILE,
    EXPORT_DIR,
    ONNX_FILE,
    QUANTIZED_FILES,
    USAGE_FILE,
    _compare,
    _recording_topk_ties,
    check_export,
    class_scores,
    export,
    resolve_check_images,
)
from hf_detr_ft.cli import main
from hf_detr_ft.data.dataset import load_detection_dataset
from hf_detr_ft.demo import DEMO_CHECKPOINT
from hf_detr_ft.errors import (
    ArgumentError,
    ExportCheckError,
    ExportError,
    HfDetrFtError,
    ModelLoadError,
)
from hf_detr_ft.evaluation.evaluate import evaluate
from hf_detr_ft.inference.detect import prepare_batch
from hf_detr_ft.inference.onnx_runtime import OnnxDetector, load_onnx_detector
from hf_detr_ft.inference.predict import predict
from hf_detr_ft.models.families import family_of
from hf_detr_ft.models.loading import load_detector


def _perturbed(model_type: str, path: Path, class_names: list[str], scale: float) -> Path:
    """A tiny model whose zero-initialised heads are made random: RT-DETR's untrained encoder
    scores every position alike, and the top-k of a tie is not the same in ONNX Runtime and
    torch (a trained model has no ties)."""
    save_tiny_model(model_type, path, class_names)
    model = AutoModelForObjectDetection.from_pretrained(path)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shapes_classes(shapes_dir: Path) -> list[str]:
    return load_detection_dataset(shapes_dir).class_names


@pytest.fixture(scope="module")
def detr_dir(tmp_path_factory: pytest.TempPathFactory, shapes_classes: list[str]) -> Path:
    """A tiny DETR for the shapes classes (64 px inputs)."""
    return save_tiny_model("detr", tmp_path_factory.mktemp("detr"), shapes_classes)


@pytest.fixture(scope="module")
def detr_export(detr_dir: Path, shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny DETR exported with a dynamic batch and its dynamic-int8 variant, checked on
    the shapes dataset's test images."""
    out = tmp_path_factory.mktemp("detr-onnx")
    return export(
        detr_dir,
        out,
        dynamic_batch=True,
        quantize="dynamic-int8",
        dataset_dir=shapes_dir,
        num_check_images=3,
    )


def test_export_writes_a_checked_folder_a_consumer_needs(detr_export, shapes_classes) -> None:
    out = detr_export.output_dir
    for name in (ONNX_FILE, QUANTIZED_FILES["dynamic-int8"], "config.json", USAGE_FILE):
        assert (out / name).is_file(), name
    assert (out / "preprocessor_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(3)] == shapes_classes

    model = onnx.load(str(out / ONNX_FILE))
    assert [i.name for i in model.graph.input] == ["pixel_values", "pixel_mask"]
    assert [o.name for o in model.graph.output] == ["logits", "pred_boxes"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]  # DETR takes any image shape

    check = json.loads((out / CHECK_FILE).read_text())
    fp32 = check["variants"]["fp32"]
    assert check["passed"] and fp32["passed"] and fp32["top_detections_agree"]
    assert fp32["max_score_diff"] < 1e-5 and fp32["max_box_diff"] < 1e-5
    assert len(check["images"]) == 4  # 3 test images and the first turned by 90 degrees
    assert check["variants"]["dynamic-int8"]["passed"] is None  # lossy: reported, not failed
    assert check["snippet"]["images_agreeing"] >= 3

    readme = (out / USAGE_FILE).read_text()
    assert "| `pixel_mask` | int64 (batch, height, width)" in readme
    assert "| `logits` | float32 (batch, 12, 3 + 1)" in readme
    assert "onnxruntime" in readme and "session.run" in readme
    assert "--maxShapes=pixel_values:8x3x64x64,pixel_mask:8x64x64" in readme  # TensorRT


def test_quantized_model_loads_and_runs(detr_export, shapes_dir) -> None:
    path = detr_export.files["dynamic-int8"]
    assert path.stat().st_size < detr_export.files["fp32"].stat().st_size
    detector, processor = load_onnx_detector(path)
    found = predict(path, shapes_dir / "test", threshold=0.0, batch_size=2)
    assert len(found) == 5 and all(len(p.boxes.labels) > 0 for p in found)
    assert isinstance(detector, OnnxDetector) and detector.fixed_batch is None


def test_predict_on_the_onnx_file_equals_pytorch(detr_export, detr_dir, shapes_dir) -> None:
    onnx_found = predict(detr_export.files["fp32"], shapes_dir / "test", threshold=0.2)
    torch_found = predict(detr_dir, shapes_dir / "test", threshold=0.2, device="cpu")
    assert [p.path for p in onnx_found] == [p.path for p in torch_found]
    for ours, theirs in zip(onnx_found, torch_found):
        assert ours.boxes.labels == theirs.boxes.labels
        np.testing.assert_allclose(ours.boxes.scores, theirs.boxes.scores, atol=1e-5)
        np.testing.assert_allclose(ours.boxes.xyxy, theirs.boxes.xyxy, atol=1e-3)


def test_evaluate_on_the_onnx_file_equals_pytorch(detr_export, detr_dir, shapes_dir) -> None:
    kwargs = dict(batch_size=2, save_predictions=True)
    ours = evaluate(detr_export.files["fp32"], shapes_dir, "test", **kwargs)
    theirs = evaluate(detr_dir, shapes_dir, "test", device="cpu", **kwargs)
    for name, value in theirs.metrics.items():
        assert ours.metrics[name] == pytest.approx(value, abs=1e-3), name
    assert ours.losses == {}  # DETR's loss terms need the PyTorch model
    assert len(ours.predictions) == len(theirs.predictions)
    for a, b in zip(ours.predictions, theirs.predictions):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=1e-3)


def test_a_corrupted_model_file_fails_the_check(detr_export, detr_dir, tmp_path) -> None:
    model = onnx.load(str(detr_export.files["fp32"]))
    largest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(largest)
    largest.CopyFrom(numpy_helper.from_array(values * -3.0, largest.name))
    corrupted = tmp_path / ONNX_FILE
    onnx.save(model, str(corrupted))
    detector, processor = load_detector(detr_dir, device="cpu")
    images = resolve_check_images(detr_dir, None, None, 2)  # no images: synthetic ones

    with pytest.raises(ExportCheckError) as caught:
        check_export({"fp32": corrupted}, detector, processor, images, output_dir=tmp_path)

    message = str(caught.value)
    assert "\n" not in message and "does not reproduce the PyTorch model" in message
    assert json.loads((tmp_path / CHECK_FILE).read_text())["passed"] is False


def test_rt_detr_exports_at_its_fixed_square(tmp_path, shapes_dir, shapes_classes) -> None:
    model_dir = _perturbed("rt_detr", tmp_path / "rt_detr", shapes_classes, scale=0.3)
    result = export(model_dir, dataset_dir=shapes_dir, num_check_images=1)

    assert result.output_dir == model_dir / EXPORT_DIR
    assert result.check.passed and result.check.opset == 17
    model = onnx.load(str(result.files["fp32"]))
    assert [i.name for i in model.graph.input] == ["pixel_values"]  # RT-DETR pads nothing
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 64, 64]
    assert result.check.variants["fp32"].max_box_diff < 1e-4
    assert result.check.variants["fp32"].images_with_tied_queries == 0  # compared by query
    # a fixed batch of 1 runs a batch one image at a time
    found = predict(result.files["fp32"], shapes_dir / "test", threshold=0.0, batch_size=3)
    assert len(found) == 5


def test_queries_are_paired_and_tied_choices_held_to_top_detections(
    tmp_path, shapes_dir, shapes_classes
) -> None:
    # Two-stage models pick their queries with torch.topk: scores within the tolerance of the
    # last one chosen may be chosen otherwise by ONNX Runtime (its rounding, its tie rule).
    scores = torch.tensor([[3.0, 1.0, 1.0005, 0.0]])
    ties: list[int] = []
    with _recording_topk_ties(ties, 1e-3):
        torch.topk(scores, 2)  # 1.0005 chosen, 1.0 left out
        torch.topk(scores, 3)
        torch.topk(scores, 1, sorted=False)
    assert ties == [1, 0, 0]

    model_dir = _perturbed("rt_detr", tmp_path / "rt_detr", shapes_classes, scale=0.3)
    result = export(model_dir, dataset_dir=shapes_dir, num_check_images=1)
    model, processor = load_detector(model_dir, device="cpu")
    onnx_model = OnnxDetector(result.files["fp32"], model.config)
    image = Image.open(next((shapes_dir / "test").glob("*.png"))).convert("RGB")
    batch = prepare_batch(processor, [image])
    with torch.inference_mode():
        reference = model(**batch.inputs)
        original = reference.pred_boxes.clone(), reference.logits.clone()
    family = family_of(model.config)
    settings = (family, 1e-3, 1e-3)
    path = result.files["fp32"]

    # Queries in another order (as scores closer than rounding swap them) still match.
    order = torch.randperm(original[0].shape[1])
    reference.pred_boxes, reference.logits = original[0][:, order], original[1][:, order]
    shuffled = _compare("fp32", path, onnx_model, [batch], [reference], [0], *settings)
    assert shuffled.passed and shuffled.max_box_diff < 1e-4 and shuffled.max_score_diff < 1e-4

    # One query moved: a real difference, unless PyTorch's choice of queries was a tie.
    lowest = class_scores(original[1], family)[0].amax(-1).argmin()
    boxes = original[0].clone()
    boxes[0, lowest, :2] = 1.0 - boxes[0, lowest, :2]
    reference.pred_boxes, reference.logits = boxes, original[1]
    moved = float((boxes - original[0]).abs().max())
    assert moved > 0.1
    strict = _compare("fp32", path, onnx_model, [batch], [reference], [0], *settings)
    tied = _compare("fp32", path, onnx_model, [batch], [reference], [1], *settings)
    assert not strict.passed and strict.max_box_diff >= moved - 1e-3
    assert tied.passed and tied.images_with_tied_queries == 1 and tied.top_detections_agree
    assert "held to their top detections only" in tied.line()


def test_readme_snippet_alone_gives_the_pipelines_detections(tmp_path, shapes_dir) -> None:
    """The README's code, as written into the export folder, run in a fresh interpreter that
    never imports hf_detr_ft (nor torch), against pipeline("object-detection")."""
    out = tmp_path / "onnx"
    export(DEMO_CHECKPOINT, out, images=shapes_dir / "valid", num_check_images=2)
    readme = (out / USAGE_FILE).read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    images = sorted((shapes_dir / "test").glob("*.png"))[:3]
    program = code.replace(
        'print(detect(Image.open("photo.jpg")))',
        "import sys\n"
        "found = [detect(Image.open(p), threshold=0.3) for p in sys.argv[1:]]\n"
        "assert not {'hf_detr_ft', 'torch', 'transformers'} & set(sys.modules), sys.modules\n"
        "print(json.dumps(found))",
    )
    assert program != code
    ran = subprocess.run(
        [sys.executable, "-c", program, *map(str, images)],
        cwd=out,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    snippet = json.loads(ran.stdout)

    detector = pipeline("object-detection", model=str(DEMO_CHECKPOINT), device="cpu")
    expected = [detector(str(p), threshold=0.3) for p in images]
    assert sum(map(len, expected)) > 0
    for ours, theirs in zip(snippet, expected):
        # The pipeline's boxes are truncated to whole pixels; Pillow's resize and torchvision's
        # differ by one grey level here and there, so a score exactly at the threshold may
        # fall on either side of it.
        clear = [d for d in theirs if d["score"] > 0.31]
        assert len(ours) >= len(clear)
        for d in clear:
            box = [d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")]
            assert any(
                o["label"] == d["label"]
                and abs(o["score"] - d["score"]) < 0.01
                and np.allclose(o["box"], box, atol=1.5)
                for o in ours
            ), (d, ours)


def test_errors_are_one_line(tmp_path, detr_dir, shapes_dir, capsys) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        predict(tmp_path / "missing.onnx", shapes_dir / "test")
    with pytest.raises(ModelLoadError) as missing:
        load_onnx_detector(tmp_path / "missing.onnx")
    assert "\n" not in str(missing.value)

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (broken / name).write_text((detr_dir / name).read_text())
    (broken / ONNX_FILE).write_bytes(b"not an onnx model")
    with pytest.raises(ModelLoadError, match="is not an ONNX model") as invalid:
        load_onnx_detector(broken / ONNX_FILE)
    assert "\n" not in str(invalid.value)

    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="'bert' is not a DETR-family detector"):
        export(other)

    assert main(["export", str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-detr-ft export: error:") and "\n" not in err
    with pytest.raises(ArgumentError, match="output_dir is the model folder"):
        export(detr_dir, detr_dir)


def test_an_operator_without_onnx_form_names_itself_and_the_type(tmp_path) -> None:
    model_dir = save_tiny_model("rf_detr", tmp_path / "rf_detr", ["a", "b"])
    with pytest.raises(ExportError) as caught:
        export(model_dir, tmp_path / "out", opset=17, num_check_images=1)
    message = str(caught.value)
    assert "\n" not in message and isinstance(caught.value, HfDetrFtError)
    assert "rf_detr" in message and "aten::_upsample_bicubic2d_aa" in message
    assert "opset 18" in message
    # without --opset the export takes the opset the operator needs
    result = export(model_dir, tmp_path / "out", num_check_images=1)
    assert result.check.opset == 18 and result.check.passed


def test_the_card_lists_the_export_and_push_uploads_it(detr_export, tmp_path) -> None:
    out = tmp_path / "run"
    (out / EXPORT_DIR).mkdir(parents=True)
    for path in detr_export.output_dir.iterdir():
        (out / EXPORT_DIR / path.name).write_bytes(path.read_bytes())
    card = "---\ntags:\n- hf-detr-ft\n---\n# m\n\n## Usage\n\ntext\n\n## Evaluation\n\nrest\n"
    (out / "README.md").write_text(card)
    assert refresh_onnx_section(out)
    assert refresh_onnx_section(out)  # replaces its own section, does not add another
    text = (out / "README.md").read_text()
    assert text.count("### ONNX") == 1 and "`onnx/model.onnx`" in text
    assert "checked against this PyTorch model on 4 images" in text
    assert text.index("### ONNX") < text.index("## Evaluation") and text.endswith("rest\n")

    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    uploaded = [
        f
        for f in files
        if any(fnmatch.fnmatch(f, p) for p in ALLOW_PATTERNS)
        and not any(fnmatch.fnmatch(f, p) for p in IGNORE_PATTERNS)
    ]
    for name in (ONNX_FILE, QUANTIZED_FILES["dynamic-int8"], USAGE_FILE, CHECK_FILE):
        assert f"{EXPORT_DIR}/{name}" in uploaded
    assert not [f for f in uploaded if Path(f).name.startswith(".")]  # the manifest stays


def test_training_exports_at_the_end_and_the_card_says_so(tiny_model_dir, shapes_dir, tmp_path):
    from hf_detr_ft.run import finetune

    out = tmp_path / "run"
    finetune(
        shapes_dir,
        3,
        model=tiny_model_dir,
        output_dir=out,
        max_steps=1,
        per_device_train_batch_size=4,
        image_size=64,
        max_image_size=64,
        report_to="none",
        disable_tqdm=True,
        export="onnx",
    )
    check = json.loads((out / EXPORT_DIR / CHECK_FILE).read_text())
    assert check["passed"] and check["images"][0] == "image 0"  # the test split's images
    assert len(check["images"]) == 6  # 5 test images and the first turned
    card = (out / "README.md").read_text()
    assert "### ONNX" in card and f"`{EXPORT_DIR}/{ONNX_FILE}`" in card
    found = predict(out / EXPORT_DIR / ONNX_FILE, shapes_dir / "test", threshold=0.0)
    assert len(found) == 5
