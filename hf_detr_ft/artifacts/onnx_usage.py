"""The README of an ONNX export and its usage code: numpy, Pillow and onnxruntime only.

:func:`snippet_code` writes, for one exported model, the functions that reproduce what
``pipeline("object-detection")`` does around the model: ``preprocess`` (EXIF orientation,
RGB, the processor's resize rule, rescale, normalize, the pixel mask) and ``detect`` (the
session call and the family's post-processing: softmax with a no-object class, or sigmoid
scores of the best (query, class) pairs, boxes scaled to pixels). :class:`SnippetSpec` reads
what they need from the image processor and the model's family; where the processor's resize
is not Pillow's antialiased one (RF-DETR's processor rescales first and resizes without
antialiasing: the family table's ``resize_antialias``), the snippet carries a numpy resize of
that kind. :func:`check_snippet` runs the code as written on
the export's check images against the PyTorch model, and :func:`write_usage` writes the
README: files, inputs and outputs with their shapes and meanings, the code.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import PretrainedConfig, PreTrainedModel
from transformers.image_processing_utils import BaseImageProcessor

from ..inference.detect import prepare_batch
from ..inference.onnx_runtime import OnnxOutput
from ..models.families import Family, family_of, resizes_with_antialias
from ..models.input_sizes import detr_longest_edge

ONNX_FILE = "model.onnx"
USAGE_FILE = "README.md"
CHECK_FILE = "export_check.json"
#: Detections compared per image (the best by score).
TOP_DETECTIONS = 5


def model_input_names(model: PreTrainedModel, inputs: Any) -> list[str]:
    """``pixel_values``, and ``pixel_mask`` where the processor makes one and the model takes
    it (the families that pad a batch)."""
    takes_mask = "pixel_mask" in inspect.signature(model.forward).parameters
    return ["pixel_values"] + (["pixel_mask"] if takes_mask and "pixel_mask" in inputs else [])


@dataclass
class SnippetSpec:
    """What the README's numpy pre- and post-processing needs to reproduce the processor."""

    inputs: list[str]
    fixed_size: tuple[int, int] | None  # (height, width), or the shortest/longest edge rule
    shortest_edge: int | None
    longest_edge: int | None
    multiple: int
    rescale: float | None
    mean: list[float] | None
    std: list[float] | None
    sigmoid: bool
    top_k: int | None
    antialias: bool = True

    @classmethod
    def for_model(
        cls,
        processor: BaseImageProcessor,
        family: Family,
        config: PretrainedConfig,
        model: PreTrainedModel,
    ) -> SnippetSpec:
        size = dict(processor.size)
        fixed = (size["height"], size["width"]) if size.get("height") else None
        sample = prepare_batch(processor, [Image.new("RGB", (64, 48))]).inputs
        return cls(
            inputs=model_input_names(model, sample),
            fixed_size=fixed,
            shortest_edge=None if fixed else size.get("shortest_edge"),
            longest_edge=None if fixed else size.get("longest_edge"),
            multiple=1 if fixed else family.size_multiple(config),
            rescale=processor.rescale_factor if processor.do_rescale else None,
            mean=list(processor.image_mean) if processor.do_normalize else None,
            std=list(processor.image_std) if processor.do_normalize else None,
            sigmoid=family.sigmoid_classes,
            top_k=_top_k(processor, config) if family.sigmoid_classes else None,
            antialias=resizes_with_antialias(processor),
        )


def _top_k(processor: BaseImageProcessor, config: PretrainedConfig) -> int:
    """How many (query, class) pairs the processor's post-processing keeps at most."""
    queries, classes = family_of(config).num_queries(config), len(config.id2label)
    probe = OnnxOutput(torch.zeros(1, queries, classes), torch.full((1, queries, 4), 0.5))
    kept = processor.post_process_object_detection(probe, threshold=0.0, target_sizes=[(8, 8)])
    return int(len(kept[0]["scores"]))


def _snippet_namespace(spec: SnippetSpec, model_dir: str | None = None) -> dict[str, Any]:
    """The snippet's functions, run as written (``model_dir=None``: without a session)."""
    code = snippet_code(spec, model_dir or ".", with_session=model_dir is not None)
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md snippet", "exec"), namespace)  # noqa: S102 (our own code)
    return namespace


def snippet_code(spec: SnippetSpec, model_dir: str = ".", *, with_session: bool = True) -> str:
    """The README's usage code for this model: numpy, Pillow and onnxruntime only."""
    lines = [
        "import json",
        "",
        "import numpy as np",
        "import onnxruntime as ort",
        "from PIL import Image, ImageOps",
        "",
        f'model_dir = "{model_dir}"  # the export folder',
    ]
    if with_session:
        lines += [
            f'session = ort.InferenceSession(f"{{model_dir}}/{ONNX_FILE}")',
            'labels = json.load(open(f"{model_dir}/config.json"))["id2label"]',
        ]
    lines += ["", ""]
    if not spec.antialias:
        lines += _PLAIN_RESIZE
    lines += [
        "def preprocess(image):",
        '    """The model inputs of an RGB PIL image, as preprocessor_config.json makes them."""',
        "    w, h = image.size",
        *_size_lines(spec),
    ]
    scale = repr(spec.rescale) if spec.rescale is not None else None
    if spec.antialias:
        resized = "np.asarray(image.resize((nw, nh), Image.BILINEAR), np.float32)"
        lines.append(f"    x = {resized}" + (f" * {scale}" if scale else ""))
    else:
        lines.append("    x = np.asarray(image, np.float32)" + (f" * {scale}" if scale else ""))
        lines.append("    x = resize(x, nh, nw)")
    if spec.mean is not None:
        lines.append(f"    x = (x - {_floats(spec.mean)}) / {_floats(spec.std)}")
    lines.append("    x = x.transpose(2, 0, 1)[None].astype(np.float32)")
    if "pixel_mask" in spec.inputs:
        lines.append('    return {"pixel_values": x, "pixel_mask": np.ones((1, nh, nw), np.int64)}')
    else:
        lines.append('    return {"pixel_values": x}')
    lines += [
        "",
        "",
        "def detect(image, threshold=0.5):",
        '    """Detections in a PIL image: label, score, box (xmin, ymin, xmax, ymax), pixels."""',
        '    image = ImageOps.exif_transpose(image).convert("RGB")',
        "    logits, boxes = session.run(None, preprocess(image))",
    ]
    if spec.sigmoid:
        lines += [
            "    p = 1 / (1 + np.exp(-logits[0]))  # sigmoid: (queries, classes)",
            f'    top = np.argsort(-p, axis=None, kind="stable")[:{spec.top_k}]  # best pairs',
            "    top = top[p.flat[top] > threshold]",
            "    queries, classes = np.divmod(top, p.shape[1])",
            "    scores = p.flat[top]",
        ]
    else:
        lines += [
            "    p = np.exp(logits[0] - logits[0].max(-1, keepdims=True))",
            "    p = (p / p.sum(-1, keepdims=True))[:, :-1]  # softmax; the last is no-object",
            "    queries = np.flatnonzero(p.max(-1) > threshold)",
            "    classes = p[queries].argmax(-1)",
            "    scores = p[queries, classes]",
        ]
    lines += [
        "    w, h = image.size",
        "    cx, cy, bw, bh = boxes[0, queries].T * [[w], [h], [w], [h]]",
        "    corners = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)",
        "    return [",
        '        {"label": labels[str(c)], "score": float(s), "box": [float(v) for v in b]}',
        "        for c, s, b in zip(classes, scores, corners)",
        "    ]",
    ]
    return "\n".join(lines) + "\n"


_PLAIN_RESIZE = [
    "def resize(x, nh, nw):",
    '    """Bilinear resize without antialiasing, as torch\'s interpolate does it."""',
    "    for axis, n in ((0, nh), (1, nw)):",
    "        src = np.maximum((np.arange(n) + 0.5) * x.shape[axis] / n - 0.5, 0)",
    "        i0 = np.minimum(src.astype(int), x.shape[axis] - 1)",
    "        t = (src - i0).reshape((-1, 1, 1)[: 3 - axis])",
    "        i1 = np.minimum(i0 + 1, x.shape[axis] - 1)",
    "        x = np.take(x, i0, axis) * (1 - t) + np.take(x, i1, axis) * t",
    "    return x",
    "",
    "",
]


def _size_lines(spec: SnippetSpec) -> list[str]:
    if spec.fixed_size is not None:
        height, width = spec.fixed_size
        return [f"    nh, nw = {height}, {width}"]
    short_edge, long_edge = spec.shortest_edge, spec.longest_edge
    rule = f"shortest edge {short_edge}" + (f", longest at most {long_edge}" if long_edge else "")
    lines = [f"    short, long = min(w, h), max(w, h)  # {rule}"]
    if long_edge:
        lines.append(
            f"    raw = {long_edge} * short / long if long / short * {short_edge} > {long_edge} "
            "else None"
        )
    else:
        lines.append("    raw = None")
    lines += [
        f"    size = round(raw) if raw else {short_edge}",
        "    other = int((raw or size) * long / short)",
        "    nh, nw = (h, w) if short == size else (other, size) if w < h else (size, other)",
    ]
    if spec.multiple > 1:
        lines.append(f"    nh, nw = nh - nh % {spec.multiple}, nw - nw % {spec.multiple}")
    return lines


def _floats(values: Sequence[float]) -> str:
    return "[" + ", ".join(repr(float(v)) for v in values) + "]"


def check_snippet(
    spec: SnippetSpec,
    output_dir: Path,
    model: PreTrainedModel,
    processor: BaseImageProcessor,
    images: Sequence[tuple[str, Image.Image]],
    computed: Sequence[tuple[Any, Any]] = (),
) -> dict[str, Any]:
    """The README's code, run on the check images, against the PyTorch model as
    ``pipeline("object-detection")`` runs it (the processor's own pre-processing, its
    post-processing at threshold 0: every detection it keeps). ``computed``: (inputs, outputs)
    of the model per image already, reused where the processor makes the same inputs."""
    namespace = _snippet_namespace(spec, str(output_dir))
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    pixel_diff, score_diff, box_px, agreeing = 0.0, 0.0, 0.0, 0
    for i, (_, image) in enumerate(images):
        x = namespace["preprocess"](image)["pixel_values"]
        inputs = processor(images=[image], return_tensors="pt")
        expected = inputs["pixel_values"].numpy()
        same_shape = x.shape == expected.shape
        pixel_diff = max(pixel_diff, float(np.abs(x - expected).max()) if same_shape else np.inf)
        if i < len(computed) and _same_inputs(inputs, computed[i][0]):
            outputs = computed[i][1]
        else:
            with torch.inference_mode():
                outputs = model(**inputs)
        theirs = processor.post_process_object_detection(
            outputs, threshold=0.0, target_sizes=[image.size[::-1]]
        )[0]
        ours = namespace["detect"](image, threshold=0.0)
        agree, scores, boxes = _same_detections(ours, theirs, id2label)
        agreeing += agree
        score_diff, box_px = max(score_diff, scores), max(box_px, boxes)
    return {
        "max_pixel_diff": pixel_diff,
        "max_score_diff": score_diff,
        "max_box_diff_px": box_px,
        "images_agreeing": agreeing,
        "images": len(images),
    }


def _same_inputs(ours: Any, theirs: Any) -> bool:
    return set(ours.keys()) == set(theirs.keys()) and all(
        ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k].to(ours[k].dtype))
        for k in ours.keys()
    )


def _same_detections(
    ours: list[dict[str, Any]], theirs: dict[str, torch.Tensor], id2label: dict[int, str]
) -> tuple[bool, float, float]:
    """Whether the processor's top detections are among the snippet's best (same class,
    IoU >= 0.5), and the largest score and box (pixel) differences of those matched."""
    order = torch.argsort(theirs["scores"], descending=True)[:TOP_DETECTIONS].tolist()
    mine = sorted(ours, key=lambda d: -d["score"])[: 2 * TOP_DETECTIONS]
    score_diff = box_diff = 0.0
    for i in order:
        box, label = theirs["boxes"][i].tolist(), id2label[int(theirs["labels"][i])]
        matches = [d for d in mine if d["label"] == label and _iou_xyxy(box, d["box"]) >= 0.5]
        if not matches:
            return False, score_diff, box_diff
        best = max(matches, key=lambda d: _iou_xyxy(box, d["box"]))
        score_diff = max(score_diff, abs(best["score"] - float(theirs["scores"][i])))
        box_diff = max(box_diff, max(abs(a - b) for a, b in zip(box, best["box"])))
    return True, score_diff, box_diff


def _iou_xyxy(a: Sequence[float], b: Sequence[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def write_usage(
    output_dir: Path,
    spec: SnippetSpec,
    model: PreTrainedModel,
    files: dict[str, Path],
    opset: int,
    dynamic_batch: bool,
) -> Path:
    """The export folder's README.md: files, inputs and outputs, usage without this package."""
    config = model.config
    family = family_of(config)
    classes = len(config.id2label)
    batch = "batch" if dynamic_batch else "1"
    if spec.fixed_size:
        height, width = spec.fixed_size
        size_text = f"{height} x {width} (every image resized to it)"
    else:
        height, width = "height", "width"
        size_text = (
            f"any: each image resized to shortest edge {spec.shortest_edge}"
            + (f", longest at most {spec.longest_edge}" if spec.longest_edge else "")
            + (f", sides floored to multiples of {spec.multiple}" if spec.multiple > 1 else "")
        )
    logits_classes = f"{classes}" if spec.sigmoid else f"{classes} + 1"
    score_rule = (
        "sigmoid of each logit; the best (query, class) pairs are the detections"
        if spec.sigmoid
        else "softmax over the classes; the last class is 'no object'"
    )
    rows = [
        f"| `pixel_values` | float32 ({batch}, 3, {height}, {width}) | the image: resized "
        f"({size_text}), scaled to [0, 1]"
        + (", normalised by the mean and std of preprocessor_config.json" if spec.mean else "")
        + " |",
    ]
    if "pixel_mask" in spec.inputs:
        rows.append(
            f"| `pixel_mask` | int64 ({batch}, {height}, {width}) | 1 on image pixels, 0 on "
            "padding (all ones for one image) |"
        )
    outputs = [
        f"| `logits` | float32 ({batch}, {family.num_queries(config) or 'queries'}, "
        f"{logits_classes}) | class logits per query: {score_rule} |",
        f"| `pred_boxes` | float32 ({batch}, {family.num_queries(config) or 'queries'}, 4) | "
        "boxes per query as (center x, center y, width, height), fractions of the image's "
        "width and height |",
    ]
    file_rows = [
        f"| `{path.name}` | {variant} | {path.stat().st_size / 1e6:.1f} MB |"
        for variant, path in files.items()
    ]
    snippet = snippet_code(spec)
    text = f"""# {config.model_type} detector, exported to ONNX by hf-detr-ft

Classes: {", ".join(config.id2label[i] for i in range(classes))}. Exported at ONNX opset {opset}
and checked against the PyTorch model on real images (`{CHECK_FILE}`: the largest score and
box differences, whether the top detections agree).

| file | variant | size |
|---|---|---|
{chr(10).join(file_rows)}
| `config.json` | the model's config: `id2label` (class index -> name), the model type | |
| `preprocessor_config.json` | the image processor: resize, rescale, normalize | |

## Inputs and outputs

| input | type and shape | meaning |
|---|---|---|
{chr(10).join(rows)}

| output | type and shape | meaning |
|---|---|---|
{chr(10).join(outputs)}

## Use it with onnxruntime only

`pip install onnxruntime numpy pillow`; run in this folder. The pre- and post-processing are
those of `preprocessor_config.json` and of the model's `post_process_object_detection` (what
`pipeline("object-detection")` runs), in numpy:

```python
{snippet}

print(detect(Image.open("photo.jpg")))
```

With hf-detr-ft: `hf-detr-ft predict --model {ONNX_FILE} photos/` and
`hf-detr-ft evaluate --model {ONNX_FILE} --dataset_dir DATA` run this file with ONNX Runtime.

TensorRT (GPU; not run where this was exported, see hf-detr-ft's docs/export.md):

```bash
{trtexec_command(spec, dynamic_batch)}
```
"""
    path = output_dir / USAGE_FILE
    path.write_text(text)
    return path


def trtexec_command(spec: SnippetSpec, dynamic_batch: bool) -> str:
    """The ``trtexec`` line that builds an fp16 TensorRT engine of ``model.onnx``: shape
    ranges for the free dimensions (a batch of 1 to 8 with ``dynamic_batch``; sides from a
    quarter of the shortest edge to the longest, DETR's images at the shortest edge)."""
    command = f"trtexec --onnx={ONNX_FILE} --saveEngine=model_fp16.plan --fp16"
    if spec.fixed_size is not None and not dynamic_batch:
        return command
    if spec.fixed_size is not None:
        low = opt = high = spec.fixed_size
    else:
        short = spec.shortest_edge or 800
        long = spec.longest_edge or detr_longest_edge(short)
        low, opt, high = (
            (short // 4, short // 4),
            (short, min(long, round(short * 4 / 3))),
            (long, long),
        )
    batches = (1, 1, 8) if dynamic_batch else (1, 1, 1)
    ranges = []
    for flag, batch, (h, w) in zip(("min", "opt", "max"), batches, (low, opt, high)):
        shapes = [f"pixel_values:{batch}x3x{h}x{w}"]
        if "pixel_mask" in spec.inputs:
            shapes.append(f"pixel_mask:{batch}x{h}x{w}")
        ranges.append(f"--{flag}Shapes={','.join(shapes)}")
    return " \\\n    ".join([command, *ranges])
