"""The package as users import it: a light import, the public API, no global side effects."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import hf_detr_ft

HEAVY = ("torch", "transformers", "matplotlib", "datasets", "albumentations", "pycocotools")


def _modules_after(code: str) -> set[str]:
    """The top-level modules loaded by ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    return {name.split(".")[0] for name in json.loads(done.stdout.splitlines()[-1])}


def test_import_loads_no_heavy_library() -> None:
    loaded = _modules_after("import hf_detr_ft")
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_help_loads_no_heavy_library() -> None:
    code = (
        "from hf_detr_ft.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as stop:\n    assert stop.code == 0"
    )
    loaded = _modules_after(code)
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_every_public_name_resolves_and_is_listed() -> None:
    for name in hf_detr_ft.__all__:
        assert getattr(hf_detr_ft, name) is not None, name
    assert set(hf_detr_ft.__all__) <= set(dir(hf_detr_ft))
    with pytest.raises(AttributeError, match="no_such_name"):
        hf_detr_ft.no_such_name  # noqa: B018


def test_submodules_never_shadow_public_functions() -> None:
    """Importing a submodule sets an attribute of the package: none may hide a function."""
    import hf_detr_ft.evaluation.evaluate
    import hf_detr_ft.inference.explain
    import hf_detr_ft.inference.predict
    import hf_detr_ft.run  # noqa: F401

    for name in ("finetune", "evaluate", "predict", "explain", "run_training"):
        assert callable(getattr(hf_detr_ft, name)) and not isinstance(
            getattr(hf_detr_ft, name), type(sys)
        ), name


def test_pictures_leave_the_matplotlib_backend_alone(tmp_path) -> None:
    """Saving figures must not switch the user's backend (inline plots in notebooks)."""
    code = (
        "import matplotlib\n"
        "matplotlib.use('svg')\n"
        "from hf_detr_ft.artifacts.pictures import save_figure, subplots\n"
        "fig, ax = subplots(figsize=(2, 2))\n"
        "ax.plot([0, 1], [0, 1])\n"
        f"save_figure(fig, {str(tmp_path / 'plot.png')!r})\n"
        "import matplotlib.pyplot as plt\n"
        "print(matplotlib.get_backend(), len(plt.get_fignums()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split() == ["svg", "0"]
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
