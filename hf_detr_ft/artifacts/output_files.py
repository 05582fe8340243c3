"""Output folders that protect the user's files: never overwrite a file hf-detr-ft did not write.

Every command writes into a folder the user names (``--output_dir``, ``--output``), which may
be an existing folder of their own: the current directory, the folder of the photos being
predicted on, a dataset. The rule, the same for every command:

* a command may always create a *new* file;
* it may overwrite a file only if hf-detr-ft wrote it: the file is listed in the folder's
  manifest (:data:`MANIFEST`, a hidden JSON list that :func:`claim_files` keeps), or the folder
  is a training run's output folder (it holds ``trainer_state.json`` or the run record) and the
  file is one a run writes;
* anything else stops the command before it writes anything, with an
  :class:`~hf_detr_ft.errors.OutputDirError` naming the file.

So ``predict --output_dir photos`` on ``photos/`` refuses instead of drawing over the photos,
and a ``README.md`` of the user's own in a training ``output_dir`` is never replaced.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ..errors import OutputDirError

MANIFEST = ".hf-detr-ft-files.json"

#: What a run records about itself in its output folder (see :mod:`.training.run_guard`).
RUN_RECORD = "hf_detr_ft_run.json"

#: Files whose presence marks a training run's output folder: the run record, and the Trainer's
#: state (transformers' ``TRAINER_STATE_NAME``, named here: importing ``transformers.trainer``
#: would load torch for ``inspect``, which writes through this module too).
RUN_FOLDER_MARKERS = (RUN_RECORD, "trainer_state.json")


def claim_files(
    folder: str | Path, names: Iterable[str], *, run_outputs: Iterable[str] = ()
) -> list[Path]:
    """Paths to write ``names`` (relative to ``folder``, created if needed) at, after checking
    the rule of the module docstring for all of them; records them in the manifest.

    ``run_outputs`` are the names a training run writes, which may be replaced in a run's
    output folder even when the manifest does not list them (runs of earlier versions)."""
    root = Path(folder).expanduser()
    names = list(dict.fromkeys(names))
    ours = _manifest(root)
    if any((root / marker).is_file() for marker in RUN_FOLDER_MARKERS):
        ours |= set(run_outputs)
    foreign = [name for name in names if (root / name).exists() and name not in ours]
    if foreign:
        shown = ", ".join(str(root / name) for name in foreign[:3])
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise OutputDirError(
            f"{shown}{more} already exist{'s' if len(foreign) == 1 else ''} and "
            f"{'was' if len(foreign) == 1 else 'were'} not written by hf-detr-ft; it never "
            f"overwrites files it did not write. Choose another output folder (or move "
            f"{'it' if len(foreign) == 1 else 'them'} away)."
        )
    root.mkdir(parents=True, exist_ok=True)
    _write_manifest(root, ours | set(names))
    return [root / name for name in names]


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all (a hidden temporary file, renamed), so
    that a kill or a full disk never leaves a half-written file that looks complete."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(text)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _manifest(root: Path) -> set[str]:
    try:
        listed = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return set()
    return {name for name in listed if isinstance(name, str)} if isinstance(listed, list) else set()


def _write_manifest(root: Path, names: set[str]) -> None:
    write_text_atomic(root / MANIFEST, json.dumps(sorted(names), indent=0) + "\n")
