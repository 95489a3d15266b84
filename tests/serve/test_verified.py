"""serve.verified on real registry folders (no vLLM): verified read-only copies, and per-request refusals of
versions deleted, truncated or swapped in the registry after they were loaded."""

from __future__ import annotations

import os
import stat

import pytest

from ground.errors import NotFoundError
from registry import open_registry
from tests.synthetic_lora import write_lora
from serve.verified import AdapterMismatchError, CorruptVersionError, VerifiedCache

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def setup(tmp_path):
    reg = open_registry(str(tmp_path / "store"), mirror_mlflow=False)
    lora = write_lora(tmp_path / "lora", rank=4, alpha=8)
    versions = [reg.publish(lora, "a") for _ in range(3)]
    return reg, versions, VerifiedCache(tmp_path / "run" / "verified")


def _flip(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))


def test_engine_gets_a_verified_read_only_copy_that_outlives_the_registry_folder(setup):
    reg, (v1, _, _), cache = setup
    path = cache.path_for(v1.ref, v1.path)
    assert os.path.dirname(path) == str(cache.root) and path != str(v1.path)
    copied = os.path.join(path, WEIGHTS)
    assert open(copied, "rb").read() == (v1.path / WEIGHTS).read_bytes()
    assert stat.S_IMODE(os.stat(copied).st_mode) == 0o444
    assert cache.path_for(v1.ref, v1.path) == path  # verified once
    reg.delete_version("a", 1)
    assert os.path.isfile(copied)  # the engine's copy survives a deletion in the registry
    with pytest.raises(NotFoundError, match="a@1.*deleted"):
        cache.check_current(v1.ref, reg.store.version_dir("a", 1))
    cache.clear()
    assert not cache.root.exists()


def test_flipped_byte_is_refused_before_the_engine_sees_it(setup):
    reg, (v1, v2, _), cache = setup
    _flip(v1.path / WEIGHTS)
    with pytest.raises(CorruptVersionError, match=r"a@1 .*does not match its manifest.*pipeline registry verify a@1"):
        cache.path_for(v1.ref, v1.path)
    assert not any(p.name.startswith(".staging") for p in cache.root.iterdir())
    assert cache.path_for(v2.ref, v2.path)  # others are unaffected


def test_changes_after_load_are_refused_per_request(setup):
    reg, (v1, v2, v3), cache = setup
    for v in (v1, v2, v3):
        cache.path_for(v.ref, v.path)
        cache.check_current(v.ref, v.path)  # unchanged: passes
    os.truncate(v1.path / WEIGHTS, 100)
    with pytest.raises(CorruptVersionError, match="a@1"):
        cache.check_current(v1.ref, v1.path)
    _flip(v2.path / WEIGHTS)
    with pytest.raises(CorruptVersionError, match="a@2"):
        cache.check_current(v2.ref, v2.path)
    os.utime(v3.path / WEIGHTS)  # touched, same bytes: still served
    cache.check_current(v3.ref, v3.path)


def test_adapter_that_does_not_fit_the_base_is_refused(tmp_path, tiny_model_dir):
    reg = open_registry(str(tmp_path / "store"), mirror_mlflow=False)
    wide = {"self_attn.q_proj": (96, 64), "self_attn.v_proj": (64, 32)}  # q_proj's input is 64 in the tiny model
    v = reg.publish(write_lora(tmp_path / "wide", shapes=wide), "wide")  # no base given: publish cannot tell
    cache = VerifiedCache(tmp_path / "verified", base_dir=tiny_model_dir)
    with pytest.raises(AdapterMismatchError, match=r"wide@1 does not fit.*96 -> 64") as info:
        cache.path_for(v.ref, v.path)
    assert str(cache.root) not in str(info.value)  # the server's folders are nobody's business
