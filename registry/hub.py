"""Hugging Face Hub: push a version to a repo, import an adapter from a repo (or a local folder).

Only the PEFT files travel (plus the registry's metadata on push); pickle weights are never downloaded, so
a repo that ships only `adapter_model.bin` is refused by validation with the reason.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ground.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PICKLED_WEIGHTS
from ground.errors import NotFoundError, RegistryError
from registry.integrity import METADATA, PAYLOAD

if TYPE_CHECKING:  # annotations only: registry.core imports this module when it exports/imports
    from registry.core import AdapterVersion

log = logging.getLogger(__name__)

REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _check_repo_id(repo_id: str) -> str:
    if not REPO_ID.fullmatch(repo_id or "") or ".." in repo_id:
        raise RegistryError(f"Invalid Hugging Face repo id {repo_id!r}: write OWNER/NAME, e.g. `my-org/arith-lora`.")
    return repo_id


def push_version(av: AdapterVersion, repo_id: str, private: bool | None = None, revision: str | None = None) -> str:
    """Upload `av`'s PEFT files + metadata.json to model repo `repo_id` (created if needed); returns the commit URL."""
    _check_repo_id(repo_id)
    if _offline():
        raise RegistryError(f"Cannot push {av.ref} to the Hub repo `{repo_id}`: HF_HUB_OFFLINE=1 is set, so "
                            "huggingface_hub will not use the network. Unset HF_HUB_OFFLINE on a machine that reaches "
                            "huggingface.co (and log in with `hf auth login` or set HF_TOKEN), then run the push again; "
                            "or `pipeline registry export REF --out DIR` and upload DIR yourself.")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=av.path, repo_type="model", revision=revision,
                                 allow_patterns=[*PAYLOAD, METADATA],
                                 commit_message=f"{av.ref} from the lora-pipeline registry")
    except Exception as exc:  # noqa: BLE001 - network/auth errors of every kind become one clear message
        raise RegistryError(f"Pushing {av.ref} to the Hub repo `{repo_id}` failed: {exc.__class__.__name__}: {str(exc).rstrip('.')}. "
                            "Check the network, your token (HF_TOKEN or `hf auth login`) and write access to the "
                            "repo.") from None
    url = getattr(info, "commit_url", None) or str(info)
    log.info("pushed %s to %s (%s)", av.ref, repo_id, url)
    return url


def download(repo_id: str, revision: str | None, into: Path) -> Path:
    """The PEFT files of a Hub repo (from the local HF cache when offline and cached)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_dir=into,
                                      allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS, PICKLED_WEIGHTS]))
    except Exception as exc:  # noqa: BLE001
        hint = ("HF_HUB_OFFLINE=1 is set and the repo is not in the local Hugging Face cache; unset HF_HUB_OFFLINE "
                "on a machine that reaches huggingface.co, or download the adapter folder elsewhere and run "
                "`pipeline registry import LOCAL_DIR --name NAME`." if _offline() else
                "Check the repo id, the network and your token (HF_TOKEN) for private repos.")
        raise RegistryError(f"Could not download Hub repo `{repo_id}`: {exc.__class__.__name__}: {str(exc).rstrip('.')}. {hint}") from None


def import_source(registry, src: str, name: str, revision: str | None = None, **publish_kwargs) -> AdapterVersion:
    """Publish an existing PEFT adapter from a local folder, or from Hub repo `OWNER/NAME` (`@revision` allowed)."""
    lineage = dict(publish_kwargs.pop("lineage", None) or {})
    local = Path(src).expanduser()
    if local.is_dir():
        lineage.setdefault("imported_from", str(local.absolute()))
        return registry.publish(local, name, lineage=lineage, **publish_kwargs)
    repo_id, _, rev = src.partition("@")
    if not REPO_ID.fullmatch(repo_id):
        raise NotFoundError(f"Import source `{src}` is neither a local folder nor a Hub repo id (OWNER/NAME[@REVISION]).")
    _check_repo_id(repo_id)
    revision = revision or rev or None
    with tempfile.TemporaryDirectory(prefix="hub-import-") as tmp:
        folder = download(repo_id, revision, Path(tmp))
        lineage.setdefault("imported_from", f"hf://{repo_id}" + (f"@{revision}" if revision else ""))
        return registry.publish(folder, name, lineage=lineage, **publish_kwargs)
