"""Publishing to the Hub: what is uploaded where, tokens, and errors, against a recorded fake.

The Hub cannot be reached from the tests. ``FakeHub`` replaces the three ``HfApi`` methods that
hf_detr_ft and the Trainer call (``create_repo``, ``create_branch``, ``upload_folder``) and
records each call; an upload is recorded with the exact files it would send, selected with
``huggingface_hub``'s own pattern filter and read from disk at call time. Everything else, the
real Trainer included, runs for real; the "unreachable" tests use the real client offline.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS
from transformers import pipeline

from hf_detr_ft.artifacts.hub import push_output_dir
from hf_detr_ft.cli import main as cli_main
from hf_detr_ft.errors import HubError
from hf_detr_ft.run import METRICS_FILE, finetune
from hf_detr_ft.training.run_guard import RUN_RECORD

TOKEN = "hf_FakeTokenForTests0123456789abcdef"
QUICK = {
    "image_size": 64,
    "max_image_size": 64,
    "report_to": "none",
    "disable_tqdm": True,
    "num_train_epochs": 2,
    "per_device_train_batch_size": 8,
}
# Always uploaded; other engineers' reports (*.json, *.png) at the top level go up too.
FINAL_FILES = {
    "README.md",
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "metrics.json",
    "train_results.json",
    "all_results.json",
    "trainer_state.json",
    "example.jpg",
}


@dataclass
class Upload:
    repo_id: str
    path_in_repo: str
    revision: str | None
    commit_message: str | None
    token: str | None
    files: dict[str, bytes]


@dataclass
class FakeHub:
    """Records what would be sent to the Hub; behaves like a Hub where the token may write."""

    user: str = "fake-user"
    repos: list[dict] = field(default_factory=list)
    branches: list[tuple[str, str]] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)

    def full_id(self, repo_id: str) -> str:
        return repo_id if "/" in repo_id else f"{self.user}/{repo_id}"

    def create_repo(self, api, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
        self.repos.append({"repo_id": repo_id, "private": private, "token": token})
        return RepoUrl(f"https://huggingface.co/{self.full_id(repo_id)}")

    def create_branch(self, api, repo_id, *, branch, token=None, exist_ok=False, **kwargs):
        self.branches.append((repo_id, branch))

    def upload_folder(
        self,
        api,
        *,
        repo_id,
        folder_path,
        path_in_repo=None,
        commit_message=None,
        token=None,
        revision=None,
        allow_patterns=None,
        ignore_patterns=None,
        run_as_future=False,
        **kwargs,
    ):
        folder = Path(folder_path)
        relative = sorted(
            p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file()
        )
        if isinstance(ignore_patterns, str):
            ignore_patterns = [ignore_patterns]
        ignore = [*(ignore_patterns or []), *DEFAULT_IGNORE_PATTERNS]  # as upload_folder does
        selected = filter_repo_objects(
            relative, allow_patterns=allow_patterns, ignore_patterns=ignore
        )
        prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
        files = {prefix + name: (folder / name).read_bytes() for name in selected}
        self.uploads.append(
            Upload(repo_id, path_in_repo or "", revision, commit_message, token, files)
        )
        info = CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{len(self.uploads):040x}",
            commit_message=commit_message or "",
            commit_description="",
            oid=f"{len(self.uploads):040x}",
        )
        if not run_as_future:
            return info
        future: Future = Future()
        future.set_result(info)
        return future

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
        for name in ("create_repo", "create_branch", "upload_folder"):
            method = getattr(self, name)
            monkeypatch.setattr(HfApi, name, lambda api, *a, _m=method, **k: _m(api, *a, **k))
        return self


@pytest.fixture
def hub_token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return TOKEN


@pytest.fixture
def no_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No token in the environment and no stored `hf auth login` token either."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    return FakeHub().install(monkeypatch)


@pytest.fixture(scope="module")
def pushed_run(tiny_model_dir, shapes_dir, tmp_path_factory) -> tuple[Path, FakeHub]:
    """A real finetune() with push_to_hub=True (checkpoints pushed too) against the fake."""
    out = tmp_path_factory.mktemp("pushed") / "out"
    hub = FakeHub()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_TOKEN", TOKEN)
        hub.install(patch)
        finetune(
            shapes_dir,
            3,
            model=tiny_model_dir,
            output_dir=out,
            push_to_hub=True,
            hub_model_id="someone/shapes-detr",
            hub_private_repo=True,
            hub_strategy="checkpoint",
            hub_token=TOKEN,
            **QUICK,
        )
    return out, hub


def _expected_upload(out: Path) -> set[str]:
    """The top-level model files, JSON reports and pictures; never training_args.bin, text
    reports (their JSON twin goes up), or anything under checkpoint-*/."""
    hidden = {p.name for p in out.iterdir() if p.name.startswith(".")}  # never uploaded
    names = {p.name for p in out.iterdir() if p.is_file()} - {RUN_RECORD} - hidden
    model_files = {n for n in names if n.endswith((".json", ".png", ".jpg", ".safetensors"))}
    expected = model_files | {"README.md"}
    assert FINAL_FILES <= expected and "training_args.bin" in names - expected
    return expected


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.glob("**/*"))
        if p.is_file()
    }


def test_finetune_pushes_the_model_card_and_metrics_at_the_end(pushed_run) -> None:
    out, hub = pushed_run
    # Created when the Trainer starts (errors before training), ensured again by the final push.
    assert hub.repos == 2 * [{"repo_id": "someone/shapes-detr", "private": True, "token": TOKEN}]
    final = hub.uploads[-1]
    assert final.repo_id == "someone/shapes-detr" and final.commit_message == "End of training"
    assert set(final.files) == _expected_upload(out)
    assert (out / RUN_RECORD).is_file() and RUN_RECORD not in final.files  # local paths stay
    for name, content in final.files.items():
        assert content == (out / name).read_bytes(), name
    card = ModelCard.load(out / "README.md")
    assert card.data.model_name == "shapes-detr"
    assert 'model_id = "someone/shapes-detr"' in card.text
    saved = json.loads((out / METRICS_FILE).read_text())
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
        key.removeprefix("eval_"): value
        for key, value in saved.items()
        if key.removeprefix("eval_") in {r.metric_type for r in card.data.eval_results}
    }
    assert json.loads(final.files["config.json"])["id2label"] == {
        "0": "circle",
        "1": "square",
        "2": "triangle",
    }


def test_checkpoints_are_pushed_during_training_with_a_card(pushed_run) -> None:
    """hub_strategy="checkpoint": each save pushes the model and last-checkpoint/ (resumable)."""
    _, hub = pushed_run
    during = [u for u in hub.uploads if u.commit_message.startswith("Training in progress")]
    model_pushes = [u for u in during if not u.path_in_repo]
    checkpoint_pushes = [u for u in during if u.path_in_repo == "last-checkpoint"]
    assert len(model_pushes) == len(checkpoint_pushes) == 2  # one save per epoch
    for upload in model_pushes:
        assert {"README.md", "model.safetensors", "config.json"} <= upload.files.keys()
        assert not any(name.startswith("checkpoint-") for name in upload.files)
        assert "Evaluation during training" in upload.files["README.md"].decode()
    for upload in checkpoint_pushes:
        assert {"last-checkpoint/optimizer.pt", "last-checkpoint/model.safetensors"} <= set(
            upload.files
        )
    assert all(u.repo_id == "someone/shapes-detr" for u in hub.uploads)
    # Only checkpoint pushes (asked for, to resume) carry optimizer states.
    final = hub.uploads[-1]
    assert not any(name.endswith(("optimizer.pt", "training_args.bin")) for name in final.files)


def test_the_token_is_in_no_file_of_the_output_directory(pushed_run) -> None:
    out, hub = pushed_run
    files = [p for p in out.glob("**/*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in files)
    for path in files:
        assert TOKEN.encode() not in path.read_bytes(), path
    for upload in hub.uploads:
        assert all(TOKEN.encode() not in content for content in upload.files.values())
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.hub_token is None and args.hub_model_id == "someone/shapes-detr"


def test_push_command_uploads_exactly_the_model_files(
    pushed_run, fake_hub, hub_token, capsys
) -> None:
    out, _ = pushed_run
    before = _digest(out)
    code = cli_main(
        ["push", str(out), "--repo_id", "org/blood-cells", "--private", "--revision", "v1"]
    )
    assert code == 0, capsys.readouterr().err
    assert fake_hub.repos == [{"repo_id": "org/blood-cells", "private": True, "token": None}]
    assert fake_hub.branches == [("org/blood-cells", "v1")]
    [upload] = fake_hub.uploads
    assert (upload.repo_id, upload.revision, upload.path_in_repo) == ("org/blood-cells", "v1", "")
    assert upload.files == {name: (out / name).read_bytes() for name in _expected_upload(out)}
    assert "https://huggingface.co/org/blood-cells" in capsys.readouterr().out
    assert _digest(out) == before


def test_push_with_checkpoint_adds_the_newest_checkpoint_for_resuming(
    pushed_run, fake_hub, hub_token
) -> None:
    out, _ = pushed_run
    push_output_dir(out, "someone/resumable", include_checkpoint=True)
    model, checkpoint = fake_hub.uploads
    assert set(model.files) == _expected_upload(out)
    newest = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoint.path_in_repo == "last-checkpoint"
    assert checkpoint.files == {
        f"last-checkpoint/{p.relative_to(newest).as_posix()}": p.read_bytes()
        for p in newest.glob("**/*")
        if p.is_file()
    }
    assert "last-checkpoint/optimizer.pt" in checkpoint.files


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--repo_id", "bad name!"], ["Invalid Hub repo id 'bad name!'"]),
        (["--repo_id", "a/b/c"], ["Invalid Hub repo id 'a/b/c'"]),
    ],
)
def test_push_rejects_an_invalid_repo_id(pushed_run, fake_hub, hub_token, capsys, argv, expected):
    out, _ = pushed_run
    assert cli_main(["push", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert all(text in err for text in expected) and "Traceback" not in err
    assert "is intact" in err and f"hf-detr-ft push {out} --repo_id" in err
    assert fake_hub.uploads == [] and fake_hub.repos == []


def test_push_without_a_token_says_how_to_log_in(pushed_run, fake_hub, no_token, capsys) -> None:
    out, _ = pushed_run
    assert cli_main(["push", str(out), "--repo_id", "someone/x"]) == 2
    err = capsys.readouterr().err
    assert "No Hugging Face token" in err and "HF_TOKEN" in err and "hf auth login" in err
    assert f"{out} is intact" in err and "Traceback" not in err
    assert fake_hub.uploads == [] and fake_hub.repos == []


def test_push_to_an_unreachable_hub_leaves_the_output_directory_intact(
    pushed_run, hub_token, capsys
) -> None:
    """The real client (HF_HUB_OFFLINE=1 in conftest) cannot reach the Hub."""
    out, _ = pushed_run
    before = _digest(out)
    assert cli_main(["push", str(out), "--repo_id", "someone/offline"]) == 2
    err = capsys.readouterr().err
    assert "Cannot reach the Hugging Face Hub" in err and "Traceback" not in err
    assert f"{out} is intact; push it later with `hf-detr-ft push {out} --repo_id " in err
    assert _digest(out) == before


def test_training_with_an_unreachable_hub_fails_before_training(
    tiny_model_dir, shapes_dir, tmp_path, hub_token
) -> None:
    out = tmp_path / "out"
    with pytest.raises(HubError, match="Cannot reach the Hugging Face Hub") as raised:
        finetune(
            shapes_dir,
            3,
            model=tiny_model_dir,
            output_dir=out,
            push_to_hub=True,
            hub_model_id="someone/x",
            **QUICK,
        )
    assert "Nothing has been trained" in str(raised.value)
    assert "hf-detr-ft push OUTPUT_DIR --repo_id someone/x" in str(raised.value)
    assert not (out / "model.safetensors").exists()


def test_upload_failure_at_the_end_leaves_a_complete_usable_output_dir(
    tiny_model_dir, shapes_dir, tmp_path, hub_token, monkeypatch
) -> None:
    """The repo exists (create_repo faked) but every upload fails: the real client, offline."""
    hub = FakeHub()
    monkeypatch.setattr(HfApi, "create_repo", lambda api, *a, **k: hub.create_repo(api, *a, **k))
    out = tmp_path / "out"
    with pytest.raises(HubError) as raised:
        finetune(
            shapes_dir,
            3,
            model=tiny_model_dir,
            output_dir=out,
            push_to_hub=True,
            hub_model_id="someone/x",
            **QUICK,
        )
    message = str(raised.value)
    assert message.startswith("Cannot reach the Hugging Face Hub to push to someone/x")
    assert f"{out} is intact; push it later with `hf-detr-ft push {out} --repo_id someone/x`" in (
        message
    )
    assert FINAL_FILES <= {p.name for p in out.iterdir()}
    assert json.loads((out / METRICS_FILE).read_text())["eval_split"] == "test"
    detector = pipeline("object-detection", model=str(out), threshold=0.0)
    assert detector(str(out / "example.jpg"))
