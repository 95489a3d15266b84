"""Tamper evidence beyond a version's own manifest (local store): each version's manifest digest is appended to
ROOT/adapters/NAME/manifests.log when it is published. Weights and manifest.json rewritten together pass the
folder's own check, but not `registry verify` nor the server's verification before a first load."""

from __future__ import annotations

import hashlib
import json

import pytest

from pipeline.cli import cli_entry
from registry import open_registry
from registry.integrity import verify_folder
from tests.synthetic_lora import write_lora

WEIGHTS = "adapter_model.safetensors"


def _rewrite_consistently(folder):
    """Flip a weight byte and rewrite manifest.json to match: the folder agrees with itself afterwards."""
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[-5] ^= 0x01
    (folder / WEIGHTS).write_bytes(bytes(data))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][WEIGHTS] = {"sha256": hashlib.sha256(bytes(data)).hexdigest(), "size": len(data)}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


@pytest.fixture
def reg(tmp_path):
    reg = open_registry(str(tmp_path / "store"), mirror_mlflow=False)
    lora = write_lora(tmp_path / "lora", rank=4)
    for _ in range(2):
        reg.publish(lora, "a")
    return reg


def test_verify_reports_weights_and_manifest_rewritten_together(reg, capsys):
    v1 = reg.resolve("a@1")
    _rewrite_consistently(v1.path)
    assert verify_folder(v1.ref, v1.path) == []  # its own manifest cannot tell
    code = cli_entry(["registry", "--registry", reg.uri, "verify"])
    out, err = capsys.readouterr()
    assert code == 2 and "a@1" in out and "manifests.log" in out and "rewritten after publishing" in out, (out, err)
    assert "a@2" not in out.replace("checked", "")  # the untouched version has no problem
    assert cli_entry(["registry", "--registry", reg.uri, "verify", "a@2"]) == 0


def test_server_refuses_it_before_the_first_load(reg, tmp_path):
    from serve.verified import CorruptVersionError, VerifiedCache

    v1, v2 = reg.resolve("a@1"), reg.resolve("a@2")
    _rewrite_consistently(v1.path)
    cache = VerifiedCache(tmp_path / "run" / "verified")
    with pytest.raises(CorruptVersionError, match=r"a@1 is refused.*not the one recorded when it was published"):
        cache.path_for(v1.ref, v1.path)
    assert cache.path_for(v2.ref, v2.path)


def test_record_is_append_only_and_survives_deletes(reg, tmp_path):
    log = reg.store.root / "adapters" / "a" / "manifests.log"
    before = log.read_text()
    assert [line.split()[0] for line in before.splitlines()] == ["1", "2"]
    for v in (1, 2):
        digest = hashlib.sha256((reg.resolve(f"a@{v}").path / "manifest.json").read_bytes()).hexdigest()
        assert f"{v} {digest}\n" in before
    reg.delete_version("a", 2)
    reg.publish(write_lora(tmp_path / "other", rank=8, seed=3), "a")
    after = log.read_text()
    assert after.startswith(before) and after.splitlines()[-1].startswith("3 ")
    assert reg.verify().ok


def test_copy_into_a_local_store_records_too(reg, tmp_path):
    from registry.copy import copy_registry

    dst = open_registry(str(tmp_path / "copy"), mirror_mlflow=False)
    copy_registry(reg, dst)
    assert len((dst.store.root / "adapters" / "a" / "manifests.log").read_text().splitlines()) == 2
    _rewrite_consistently(dst.resolve("a@2").path)
    assert [p for p in dst.verify().problems if "manifests.log" in p]


def test_missing_record_after_the_first_is_reported(reg):
    log = reg.store.root / "adapters" / "a" / "manifests.log"
    log.write_text(log.read_text().splitlines()[0] + "\n")  # a@2's record removed
    problems = reg.verify().problems
    assert len(problems) == 1 and "a@2" in problems[0] and "no record" in problems[0]


def test_registry_without_a_record_still_verifies(reg):
    (reg.store.root / "adapters" / "a" / "manifests.log").unlink()  # a registry from before the record
    assert reg.verify().ok


def test_mlflow_tag_rewritten_with_the_files_is_refused(mlflow_reg, capsys, tmp_path):
    """On MLflow the manifest is a model-version tag anyone with write access can rewrite; its digest is also an
    immutable parameter of the upload run (MLflow refuses to change a logged parameter)."""
    from registry.mlflow_layout import MANIFEST_TAG, PATH_TAG, tags_of

    lora = write_lora(tmp_path / "lora", rank=4)
    mlflow_reg.publish(lora, "m")
    server = mlflow_reg.store.server
    tags = tags_of(mlflow_reg.store._model_version("m", 1))
    data = bytearray((lora / WEIGHTS).read_bytes())
    data[-5] ^= 0x01
    (tmp_path / "evil.safetensors").write_bytes(bytes(data))
    server.upload(tmp_path / "evil.safetensors", f"{tags[PATH_TAG]}/{WEIGHTS}")
    manifest = json.loads(tags[MANIFEST_TAG])
    manifest["files"][WEIGHTS] = {"sha256": hashlib.sha256(bytes(data)).hexdigest(), "size": len(data)}
    server.post("model-versions/set-tag", "rewriting the manifest",
                {"name": "m", "version": "1", "key": MANIFEST_TAG, "value": json.dumps(manifest)})
    code = cli_entry(["registry", "--registry", mlflow_reg.uri, "verify", "m@1"])
    out, err = capsys.readouterr()
    assert code == 2 and "not the manifest recorded when it was published" in out, (out, err)
    code = cli_entry(["registry", "--registry", mlflow_reg.uri, "export", "m@1", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 2 and "m@1" in err and "rewritten after publishing" in err, (out, err)
    assert not (tmp_path / "out").exists()
