"""Where a base model comes from: a local folder, a Hugging Face repo id, or the packaged default."""

from __future__ import annotations

import re
from pathlib import Path

from ground.default_model import DEFAULT_MODEL_NAME, default_model_dir
from ground.errors import StageError

HF_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_model_path(path: str) -> Path:
    """Turn the config's model path into a local folder."""
    if path in (DEFAULT_MODEL_NAME, "default"):
        return default_model_dir()
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise StageError(f"actor_rollout_ref.model.path=`{path}` is a file; point it at the model folder.")
        return local.resolve()
    if HF_REPO_ID.match(path) and not path.startswith((".", "/")):
        return _download(path)
    raise StageError(
        f"actor_rollout_ref.model.path=`{path}` is neither an existing folder nor a Hugging Face repo id "
        f"(owner/name). Pass a local model folder, a repo id, or `{DEFAULT_MODEL_NAME}` for the packaged default."
    )


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise StageError(
            f"actor_rollout_ref.model.path=`{repo_id}` is a Hugging Face repo id, but the Hub cannot be reached and "
            "the model is not in the local Hugging Face cache. Download it where there is network "
            f"(`huggingface-cli download {repo_id} --local-dir DIR`), copy DIR here and set "
            "actor_rollout_ref.model.path=DIR."
        ) from None
    except Exception as exc:  # repo not found, gated, HTTP errors: all fixable by the user
        raise StageError(f"Could not download `{repo_id}` from the Hugging Face Hub: {exc}") from None
