"""The end of a run under FSDP or ZeRO-3: no forward of the training model on one process alone.

FSDP and ZeRO-3 gather each layer's weights from every process inside the forward pass, so a
forward that only the main process runs (the training report's sample predictions) waits
forever for the others. Here every forward of the trained model joins a collective the same
way, in a real two-process CPU run through ``run_training``'s final-save path: the run ends
and saves only if the final steps never run that model on one process alone.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import two_process_launch
from transformers import AutoModelForObjectDetection

SCRIPT = """
import sys

import torch.distributed as dist
import torch
from transformers import TrainerCallback

from hf_detr_ft import finetune


def join_the_others(module, inputs):
    dist.all_reduce(torch.zeros(1))  # what a sharded forward does: every process takes part


class ShardedForward(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.register_forward_pre_hook(join_the_others)


dataset, model, output_dir = sys.argv[1:4]
finetune(
    dataset, 3, model=model, output_dir=output_dir, callbacks=[ShardedForward()],
    use_cpu=True, num_train_epochs=1, per_device_train_batch_size=4,
    per_device_eval_batch_size=2, image_size=64, max_image_size=64, disable_tqdm=True,
    report_to="none",
)
"""


def test_two_processes_with_sharded_forwards_finish_and_save(
    tiny_model_dir: Path, shapes_dir: Path, tmp_path: Path
) -> None:
    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    command = two_process_launch(
        29533,
        str(script),
        str(shapes_dir),
        str(tiny_model_dir),
        str(out),
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    # The final model is saved, and the report's pictures were drawn from it.
    assert (out / "model.safetensors").is_file() and (out / "metrics.json").is_file()
    assert (out / "sample_predictions.png").is_file()
    saved = AutoModelForObjectDetection.from_pretrained(out)
    assert saved.config.id2label == {0: "circle", 1: "square", 2: "triangle"}
