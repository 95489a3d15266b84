"""File names that come from a manifest are never used as paths unless they are a version's own files.

Against a real `mlflow server`: the version's `pipeline.manifest` tag rewritten with one `set-tag` call (plain
MLflow REST, what anyone with write access can do) to list an absolute path and `../` names, each uploaded as
an artifact so that its download would succeed; `registry export` and `registry verify` (the real CLI) must
refuse with exit 2 and write nothing outside the cache. The local store with a hostile `manifest.json`: `verify`,
`export`, `copy` and the server's verification refuse it. Also the MLflow cache's hand-out check (a byte flipped
in a cached file, size kept) and `export --out LINK`.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath

import pytest

from ground.errors import RegistryError
from pipeline.cli import cli_entry
from registry import open_registry
from registry.mlflow_layout import MANIFEST_TAG, PATH_TAG, tags_of
from tests.synthetic_lora import write_lora

WEIGHTS = "adapter_model.safetensors"


def run(capsys, *args) -> tuple[int, str, str]:
    code = cli_entry(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _files_under(root) -> set[str]:
    return {os.path.join(d, f) for d, _, files in os.walk(root) for f in files}


def test_rewritten_manifest_tag_cannot_write_outside_the_cache(mlflow_reg, capsys, tmp_path):
    payload = b"written by a manifest\n"
    entry = {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    outside = tmp_path / "outside" / "real.txt"
    outside.parent.mkdir()  # an existing folder, so that only the name check stands between it and a write
    hostile = [str(outside), "../../x", "../../../../x"]
    av = mlflow_reg.publish(write_lora(tmp_path / "lora", rank=4), "evil")
    server = mlflow_reg.store.server
    mv = mlflow_reg.store._model_version("evil", av.version)
    tags = tags_of(mv)
    manifest = json.loads(tags[MANIFEST_TAG])
    (tmp_path / "payload.txt").write_bytes(payload)
    for name in hostile:  # each name downloadable, so only a name check stops the write
        manifest["files"][name] = entry
        # the server stores each at its normalized path; the download URL `ART/NAME` reaches it there
        server.upload(tmp_path / "payload.txt", posixpath.normpath(f"{tags[PATH_TAG]}/{name.lstrip('/')}"))
    server.post("model-versions/set-tag", "rewriting the manifest",
                {"name": "evil", "version": str(av.version), "key": MANIFEST_TAG, "value": json.dumps(manifest)})
    cache_root = tmp_path / "registry-cache"
    before = _files_under(tmp_path) - _files_under(cache_root)

    for args in (["export", "evil@1", "--out", str(tmp_path / "exported")], ["verify", "evil@1"]):
        code, out, err = run(capsys, "registry", "--registry", mlflow_reg.uri, *args)
        assert code == 2, (args, out, err)
        assert "evil@1 is refused" in out + err and "Traceback" not in out + err, (out, err)
    assert not outside.exists()
    assert not (tmp_path / "x").exists()
    assert not any(p.name == "x" for p in cache_root.rglob("x"))
    assert _files_under(tmp_path) - _files_under(cache_root) == before  # nothing new outside the cache
    assert not (tmp_path / "exported").exists()


def _local_with_hostile_manifest(tmp_path):
    reg = open_registry(str(tmp_path / "store"), mirror_mlflow=False)
    av = reg.publish(write_lora(tmp_path / "lora", rank=4), "evil")
    secret = tmp_path / "secret.txt"
    secret.write_text("not a registry file\n")
    manifest_path = av.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][str(secret)] = {"sha256": hashlib.sha256(secret.read_bytes()).hexdigest(),
                                      "size": secret.stat().st_size}
    manifest["files"]["../../../../secret.txt"] = manifest["files"][str(secret)]
    manifest_path.write_text(json.dumps(manifest))
    return reg, av


def test_local_store_refuses_a_manifest_naming_other_files(tmp_path, capsys):
    reg, av = _local_with_hostile_manifest(tmp_path)
    code, out, err = run(capsys, "registry", "--registry", reg.uri, "verify", "evil@1")
    assert code == 2 and "evil@1 is refused" in out + err and "secret.txt" in out + err, (out, err)
    code, out, err = run(capsys, "registry", "--registry", reg.uri, "export", "evil@1", "--out", str(tmp_path / "o"))
    assert code == 2 and "is refused" in err, (out, err)
    assert not (tmp_path / "o").exists()
    dst = open_registry(str(tmp_path / "dst"), mirror_mlflow=False)
    with pytest.raises(RegistryError, match="is refused"):
        from registry.copy import copy_registry

        copy_registry(reg, dst)


def test_server_verification_refuses_a_manifest_naming_other_files(tmp_path):
    from serve.verified import CorruptVersionError, VerifiedCache

    reg, av = _local_with_hostile_manifest(tmp_path)
    cache = VerifiedCache(tmp_path / "run" / "verified")
    with pytest.raises(CorruptVersionError, match=r"evil@1 is refused.*secret\.txt"):
        cache.path_for(av.ref, av.path)
    assert not any((tmp_path / "run" / "verified").glob("*/*secret*"))


def test_cache_never_hands_out_bytes_changed_in_place(mlflow_reg, capsys, tmp_path):
    lora = write_lora(tmp_path / "lora", rank=4)
    mlflow_reg.publish(lora, "flip")
    uri = mlflow_reg.uri
    assert run(capsys, "registry", "--registry", uri, "export", "flip@1", "--out", str(tmp_path / "a"))[0] == 0
    cached = next((tmp_path / "registry-cache").rglob(WEIGHTS))
    data = bytearray(cached.read_bytes())
    data[-3] ^= 0x01  # same size, other bytes
    os.chmod(cached, 0o644)
    cached.write_bytes(bytes(data))
    code, out, err = run(capsys, "registry", "--registry", uri, "export", "flip@1", "--out", str(tmp_path / "b"))
    if code == 0:  # downloaded the good bytes again
        assert (tmp_path / "b" / WEIGHTS).read_bytes() == (lora / WEIGHTS).read_bytes()
    else:
        assert code == 2 and "flip@1" in err and not (tmp_path / "b").exists()


def test_export_into_a_symlink_to_an_empty_folder(tmp_path, capsys):
    reg = open_registry(str(tmp_path / "store"), mirror_mlflow=False)
    lora = write_lora(tmp_path / "lora", rank=4)
    reg.publish(lora, "a")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    code, out, err = run(capsys, "registry", "--registry", reg.uri, "export", "a@1", "--out", str(tmp_path / "link"))
    assert code == 0, err
    assert (tmp_path / "link").is_symlink()
    assert (tmp_path / "real" / WEIGHTS).read_bytes() == (lora / WEIGHTS).read_bytes()
    code, out, err = run(capsys, "registry", "--registry", reg.uri, "export", "a@1", "--out", str(tmp_path / "link"))
    assert code == 2 and "not empty" in err and "Traceback" not in err
