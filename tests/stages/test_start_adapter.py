"""Training from a registry reference: `lora_adapter_path: NAME@prod` resolves (local store and a real MLflow
server) to a verified local folder and a pinned version; a value that is neither a folder nor a reference is one
clear error, from the resolver and from `pipeline train` / `pipeline run` before anything starts."""

from __future__ import annotations

import re

import pytest

from config import load_config
from ground.errors import ConfigError, PipelineError
from pipeline.cli import cli_entry
from tests.synthetic_lora import write_lora
from stages.start_adapter import PIN_FILE, resolve_start_adapter, with_start_folder
from tests.registry.conftest import mlflow_reg, reg  # noqa: F401 (fixtures: the registry over both stores)


def _config(reg, value):
    return load_config(None, [f"registry.uri={reg.uri}", f"actor_rollout_ref.model.lora_adapter_path={value}"])


@pytest.fixture
def published(reg, tmp_path, tiny_model_dir):
    """`arith@1` and `arith@2` (alias prod -> 1) in the registry under test."""
    for seed in (1, 2):
        reg.publish(write_lora(tmp_path / f"lora{seed}", seed=seed), "arith", base_dir=tiny_model_dir,
                    alias="prod" if seed == 1 else None)
    return reg


def test_reference_resolves_to_a_verified_folder_and_pins_its_version(published, tmp_path):
    reg = published
    pin_dir = tmp_path / "run" / "train"
    start = resolve_start_adapter(_config(reg, "arith@prod"), pin_dir=pin_dir)
    assert (start["reference"], start["ref"], start["name"], start["version"]) == ("arith@prod", "arith@1", "arith", 1)
    assert start["registry"] == reg.uri
    expected = reg.resolve("arith@1")
    assert (tmp_path / "lora1" / "adapter_model.safetensors").read_bytes() == \
        (expected.path / "adapter_model.safetensors").read_bytes()
    assert start["path"] == str(expected.path)
    assert (pin_dir / PIN_FILE).is_file()

    # the alias moves: a resumed run (same pin folder) keeps version 1, a new run takes version 2
    reg.set_alias("arith", "prod", 2)
    assert resolve_start_adapter(_config(reg, "arith@prod"), pin_dir=pin_dir)["ref"] == "arith@1"
    assert resolve_start_adapter(_config(reg, "arith@prod"))["ref"] == "arith@2"
    assert resolve_start_adapter(_config(reg, "arith"))["ref"] == "arith@2"
    assert resolve_start_adapter(_config(reg, "arith@1"))["ref"] == "arith@1"

    cfg = _config(reg, "arith@prod")
    resolved = with_start_folder(cfg, start)
    assert resolved.actor_rollout_ref.model.lora_adapter_path == start["path"]
    assert cfg.actor_rollout_ref.model.lora_adapter_path == "arith@prod"  # the run's saved config keeps the reference


def test_a_local_folder_is_used_as_it_is(reg, tmp_path):
    folder = write_lora(tmp_path / "adapter")
    start = resolve_start_adapter(_config(reg, str(folder)))
    assert start == {"path": str(folder), "reference": str(folder)}
    assert resolve_start_adapter(load_config(None, [])) == {"path": None, "reference": None}


def test_a_damaged_copy_is_never_trained_from(published):
    reg = published
    folder = reg.resolve("arith@1").path  # the local store's own folder, or this machine's cached download
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size: the start adapter re-hashes
    weights.write_bytes(bytes(data))
    if getattr(reg, "test_server", None) is not None:
        # a server's cache also re-hashes a copy on its first hand-out in a process, and downloads it again
        try:
            start = resolve_start_adapter(_config(reg, "arith@prod"))
        except PipelineError as exc:
            assert re.search(r"arith@1.*do not match its manifest.*corrupted", str(exc)), exc
        else:
            assert open(f"{start['path']}/adapter_model.safetensors", "rb").read() != bytes(data)
        return
    with pytest.raises(PipelineError, match=r"arith@1.*do not match its manifest.*corrupted"):
        resolve_start_adapter(_config(reg, "arith@prod"))


@pytest.mark.parametrize("value, says", [
    ("no/such/folder", r"neither an existing folder nor a registry reference.*which holds the adapters arith"),
    ("missing@prod", r"has no such version: Adapter `missing` does not exist.*it holds: arith"),
    ("arith@nosuch", r"Alias `nosuch` of adapter `arith` does not exist \(aliases: prod -> 1; versions: 1-2\)"),
    ("arith@9", r"`arith@9` does not exist; versions of `arith`: 1-2"),
])
def test_neither_folder_nor_reference_is_one_clear_error(published, value, says):
    with pytest.raises(ConfigError) as info:
        resolve_start_adapter(_config(published, value))
    message = str(info.value)
    assert f"lora_adapter_path=`{value}`" in message and published.uri in message
    assert re.search(says, message), message


@pytest.mark.parametrize("command", [["train"], ["run", "train-and-publish"]])
def test_the_cli_refuses_an_unknown_reference_before_anything_starts(published, command, capsys, tmp_path):
    code = cli_entry([*command, f"registry.uri={published.uri}", "actor_rollout_ref.model.lora_adapter_path=arith@nope",
                      "trainer.default_local_dir=" + str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "Alias `nope` of adapter `arith` does not exist" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()  # no run folder, no log file
