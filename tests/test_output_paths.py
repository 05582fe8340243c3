"""Every command that writes, with an output path that cannot work: one line, never a traceback.

Cases: a missing parent that is a file (so the folder cannot be made), an existing *file* where
a folder is expected, and a full disk. The full disk is simulated for real in a subprocess with
a file-size limit (``RLIMIT_FSIZE``, with ``SIGXFSZ`` ignored so that writes past the limit fail
with ``EFBIG`` as they would with ``ENOSPC``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hf_detr_ft.cli import main


def _commands(model: Path, data: Path, image: Path, run: Path) -> dict[str, list[str]]:
    """Each writing command, with ``{out}`` where its output path goes."""
    return {
        "train": ["train", "--dataset_dir", str(data), "--model_name_or_path", str(model),
                  "--max_steps", "1", "--image_size", "64", "--max_image_size", "64",
                  "--output_dir", "{out}"],
        "predict": ["predict", str(image), "--model", str(model), "--output_dir", "{out}"],
        "evaluate": ["evaluate", "--model", str(model), "--dataset_dir", str(data),
                     "--output_dir", "{out}"],
        "explain": ["explain", str(image), "--model", str(model), "--output", "{out}/a.png"],
        "inspect": ["inspect", str(data), "--output_dir", "{out}"],
        "convert": ["convert", str(data), "{out}/converted"],
        "demo": ["demo", "--output_dir", "{out}"],
        "export": ["export", str(model), "--output_dir", "{out}"],
    }  # fmt: skip


@pytest.fixture(scope="module")
def commands(tiny_model_dir, shapes_dir) -> dict[str, list[str]]:
    image = next((shapes_dir / "test").glob("*.png"))
    return _commands(tiny_model_dir, shapes_dir, image, tiny_model_dir)


@pytest.mark.parametrize(
    "name", ["train", "predict", "evaluate", "explain", "inspect", "convert", "demo", "export"]
)
@pytest.mark.parametrize("case", ["parent is a file", "a file, not a folder"])
def test_an_output_path_that_cannot_be_a_folder(commands, name, case, tmp_path, capsys) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file of mine\n")
    out = blocker / "out" if case == "parent is a file" else blocker
    if name in {"explain", "convert"} and case == "a file, not a folder":
        out = blocker  # their paths go below it: {out}/a.png, {out}/converted
    argv = [part.replace("{out}", str(out)) for part in commands[name]]
    status = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert status in (1, 2) and err, (status, err)
    assert "Traceback" not in "\n".join(err) and err[-1].startswith(f"hf-detr-ft {name}: error:")
    assert blocker.read_text() == "a file of mine\n"  # never replaced


FULL_DISK = """
import resource, signal, sys
from hf_detr_ft.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))  # every file at most 2 kB
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("name", ["inspect", "predict", "convert", "export"])
def test_a_full_disk_is_one_line(commands, name, tmp_path) -> None:
    argv = [part.replace("{out}", str(tmp_path / "out")) for part in commands[name]]
    if name == "inspect":
        argv += ["--preview", "2"]  # pictures larger than the limit
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, *argv], capture_output=True, text=True, timeout=300
    )
    err = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "File too large" in err[-1], err[-3:]
