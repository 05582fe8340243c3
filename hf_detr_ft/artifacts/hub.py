"""Publish a fine-tuned model to the Hugging Face Hub with ``huggingface_hub.HfApi``.

What goes up (:data:`ALLOW_PATTERNS`, top level of the output directory): the safetensors
weights, ``config.json`` (with ``id2label``), ``preprocessor_config.json``, the model card
``README.md``, the metrics and reports (``*.json``), plots (``*.png``), the card's
``example.jpg`` and the ONNX export in ``onnx/`` when there is one. Never the optimizer
states, ``training_args.bin`` or ``checkpoint-*/``, unless ``include_checkpoint`` asks for the
newest checkpoint too (uploaded as ``last-checkpoint/``, the Trainer's
``hub_strategy="checkpoint"`` layout, so training can resume from a download).

The token comes from ``huggingface_hub`` (``HF_TOKEN``, ``hf auth login``) or an explicit
argument; it is only passed to ``HfApi`` and never written anywhere. Failures become a
:class:`HubError` that says what is wrong and that the local output directory is intact.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..errors import HubError
from ..training.checkpoints import last_complete_checkpoint
from ..training.run_guard import RUN_RECORD
from .model_card import CARD_FILE
from .onnx_export import EXPORT_DIR

logger = logging.getLogger(__name__)

#: The last pattern: the ONNX export (``--export onnx``, ``hf-detr-ft export``), its folder whole.
ALLOW_PATTERNS = ["*.safetensors", "*.json", CARD_FILE, "*.png", "*.jpg", f"{EXPORT_DIR}/*"]
#: Never uploaded: checkpoints, logs, hidden files, the run record (it names local paths).
IGNORE_PATTERNS = ["checkpoint-*", "last-checkpoint*", "runs/*", "_*", ".*", "*/.*", RUN_RECORD]
CHECKPOINT_PATH_IN_REPO = "last-checkpoint"
DEFAULT_COMMIT_MESSAGE = "Upload fine-tuned DETR (hf-detr-ft)"


def push_output_dir(
    output_dir: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    include_checkpoint: bool = False,
) -> str:
    """Upload a finished output directory to ``repo_id`` (created if needed); returns its URL.

    ``private`` applies when the repo is created (an existing repo keeps its visibility);
    ``revision`` is a branch, created from main if it does not exist.
    """
    output_dir = Path(output_dir)
    if not (output_dir / "config.json").is_file():
        raise HubError(
            f"{output_dir} is not a saved model (no config.json); pass the output_dir of a "
            "finished run (the folder with model.safetensors and config.json)."
        )
    if not (output_dir / CARD_FILE).is_file():
        logger.warning("%s has no %s: the repo will have no model card.", output_dir, CARD_FILE)
    checkpoint = last_complete_checkpoint(output_dir) if include_checkpoint else None
    if include_checkpoint and checkpoint is None:
        raise HubError(f"include_checkpoint was asked, but {output_dir} has no checkpoint-*/.")

    check_repo_id(repo_id, _push_later_hint(output_dir, "user/name"))
    later = _push_later_hint(output_dir, repo_id)
    repo_id = create_hub_repo(repo_id, private=private, token=token, later=later)
    api = HfApi()
    with _hub_errors(repo_id, later):
        if revision:
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            commit_message=commit_message,
            revision=revision,
            token=token,
            allow_patterns=ALLOW_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
        )
        if checkpoint:
            api.upload_folder(
                repo_id=repo_id,
                folder_path=checkpoint,
                path_in_repo=CHECKPOINT_PATH_IN_REPO,
                commit_message=f"{commit_message}: {Path(checkpoint).name} for resuming",
                revision=revision,
                token=token,
            )
    logger.info("Pushed %s to %s", output_dir, commit.repo_url)
    return str(commit.repo_url)


def create_hub_repo(
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    later: str | None = None,
) -> str:
    """Create ``repo_id`` if needed (``exist_ok``); returns the full id (``user/name``).

    ``later`` is the advice appended to a failure (what happens to the local files, how to
    retry); the default suits a run that has not trained yet.
    """
    later = later or (
        "Nothing has been trained or written yet. Fix this and run again, or train without "
        f"push_to_hub and publish the output later with `hf-detr-ft push OUTPUT_DIR "
        f"--repo_id {repo_id}`."
    )
    check_repo_id(repo_id, later)
    if (token or get_token()) is None:
        raise HubError(
            f"No Hugging Face token found, so {repo_id} cannot be created or written: set the "
            "HF_TOKEN environment variable or run `hf auth login` (a token with write access). "
            + later
        )
    with _hub_errors(repo_id, later):
        return HfApi().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id


def check_repo_id(repo_id: str, later: str = "") -> None:
    """Raise a :class:`HubError` unless ``repo_id`` is a valid Hub model id."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise HubError(
            f"Invalid Hub repo id {repo_id!r}: {err} Use 'name', 'user/name' or 'org/name'. "
            + later
        ) from err


def _push_later_hint(output_dir: Path, repo_id: str) -> str:
    return (
        f"The local output directory {output_dir} is intact; push it later with "
        f"`hf-detr-ft push {output_dir} --repo_id {repo_id}`."
    )


@contextmanager
def _hub_errors(repo_id: str, later: str) -> Iterator[None]:
    """Turn the Hub client's failures into one :class:`HubError` line with ``later`` advice."""
    try:
        yield
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            reason = "the Hub rejected the token (it needs write access to this namespace)"
        else:
            reason = f"the Hub answered: {str(err).splitlines()[0]}"
        raise HubError(f"Cannot push to {repo_id}: {reason}. {later}") from err
    except (ConnectionError, TimeoutError, httpx2.HTTPError) as err:
        raise HubError(
            f"Cannot reach the Hugging Face Hub to push to {repo_id} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no details'}). "
            + later
        ) from err
