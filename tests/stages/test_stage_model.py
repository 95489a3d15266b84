import os
import shutil

import pytest

from config import load_config
from ground.errors import StageError
from stages import stage_model as sm
from ground.model_files import fingerprint


def _cfg(path, **model):
    overrides = [f"actor_rollout_ref.model.path={path}"] + [f"actor_rollout_ref.model.{k}={v}" for k, v in model.items()]
    return load_config(None, overrides)


def test_local_dir(tiny_model_dir):
    out = sm.stage_model(_cfg(tiny_model_dir))
    assert out["model_dir"] == str(tiny_model_dir) and out["shm_copy"] is None
    assert out["fingerprint"] == fingerprint(tiny_model_dir)


def test_fingerprint_stable_across_copies_and_changes_with_weights(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text() + "\n")
    assert fingerprint(copy) == fingerprint(tiny_model_dir)  # tokenizer bytes do not change the model
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    assert fingerprint(copy) != fingerprint(tiny_model_dir)


def test_shm_copy_reuse_and_cleanup(tiny_model_dir, tmp_path):
    shm = tmp_path / "shm"
    cfg = _cfg(tiny_model_dir, use_shm=True, shm_root=shm)
    first = sm.stage_model(cfg)
    copy = first["shm_copy"]
    assert copy.startswith(str(shm)) and first["model_dir"] == copy
    assert fingerprint(copy) == first["fingerprint"]
    mtime = os.stat(os.path.join(copy, "model.safetensors")).st_mtime_ns
    second = sm.stage_model(cfg)
    assert second["shm_copy"] == copy
    assert os.stat(os.path.join(copy, "model.safetensors")).st_mtime_ns == mtime  # reused, not re-copied

    # a damaged copy is not reused
    with open(os.path.join(copy, "config.json"), "a") as f:
        f.write(" ")
    third = sm.stage_model(cfg)
    assert fingerprint(third["shm_copy"]) == first["fingerprint"]
    sm.cleanup(third)
    assert not os.path.exists(copy)
    assert not any(p.name.startswith(".staging-") for p in shm.iterdir())


def test_shm_target_not_made_by_us_is_never_replaced_or_removed(tiny_model_dir, tmp_path):
    shm = tmp_path / "shm"
    cfg = _cfg(tiny_model_dir, use_shm=True, shm_root=shm)
    ours = sm.stage_model(cfg)
    target = ours["shm_copy"]
    sm.cleanup(ours)
    os.makedirs(target)  # someone else's folder under the very name the stage would use
    with open(os.path.join(target, "theirs.bin"), "wb") as f:
        f.write(b"not ours")
    with pytest.raises(StageError, match="was not staged by lora-pipeline"):
        sm.stage_model(cfg)
    assert os.listdir(target) == ["theirs.bin"]
    assert open(os.path.join(target, "theirs.bin"), "rb").read() == b"not ours"
    assert not any(p.name.startswith(".staging-") for p in shm.iterdir())


def test_keep_shm_copy(tiny_model_dir, tmp_path):
    out = sm.stage_model(_cfg(tiny_model_dir, use_shm=True, shm_root=tmp_path / "shm", keep_shm_copy=True))
    sm.cleanup(out)
    assert os.path.isdir(out["shm_copy"])


def test_shm_space_short(tiny_model_dir, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(sm.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(StageError, match=r"Not enough space.*use_shm=False"):
        sm.stage_model(_cfg(tiny_model_dir, use_shm=True, shm_root=tmp_path / "shm"))
    assert list((tmp_path / "shm").iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "garble_header"])
def test_corrupted_weights_clear_error_nothing_left(tiny_model_copy, tmp_path, damage):
    weights = tiny_model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + data[17:])
    shm = tmp_path / "shm"
    with pytest.raises(StageError, match=r"model\.safetensors.*corrupted or truncated"):
        sm.stage_model(_cfg(tiny_model_copy, use_shm=True, shm_root=shm))
    assert not shm.exists() or list(shm.iterdir()) == []


def test_missing_path_and_not_a_model(tmp_path):
    with pytest.raises(StageError, match="neither an existing folder nor a Hugging Face repo id"):
        sm.stage_model(_cfg(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="no config.json"):
        sm.stage_model(_cfg(tmp_path / "empty"))


def test_hub_repo_offline_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(StageError, match=r"someone/some-model.*cannot be reached.*--local-dir"):
        sm.resolve_model_path("someone/some-model")


def test_cache_folder_not_converted_by_us_is_never_replaced(tmp_path, monkeypatch):
    from ground import default_model

    monkeypatch.setenv("LORA_PIPELINE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "models" / default_model.DEFAULT_MODEL_NAME
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("the user's own")
    with pytest.raises(StageError, match="not a conversion made by lora-pipeline"):
        default_model.default_model_dir()
    assert [p.name for p in folder.iterdir()] == ["config.json"] and (folder / "config.json").read_text() == "the user's own"


@pytest.mark.slow
def test_packaged_default_converted_once_verified_and_reused(tmp_path, monkeypatch):
    from ground import default_model

    monkeypatch.setenv("LORA_PIPELINE_CACHE", str(tmp_path / "cache"))
    out = sm.stage_model(load_config(None, ["actor_rollout_ref.model.path=smollm2-135m-instruct"]))
    folder = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    assert out["model_dir"] == str(folder)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", default_model.STAMP} <= names
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                             add_generation_prompt=True, tokenize=False)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert sm.stage_model(load_config())["fingerprint"] == out["fingerprint"]
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime  # reused

    # damage the cache: it is detected by hash and rebuilt, giving the same fingerprint
    with open(folder / "config.json", "a") as f:
        f.write(" ")
    assert sm.stage_model(load_config())["fingerprint"] == out["fingerprint"]
