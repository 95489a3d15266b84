"""No output folder is a registry: `pipeline train --out-dir`, trainer.default_local_dir and `pipeline run`'s run
directory are refused (exit 2, naming the folder) when they are a local registry's root or lie inside one,
before anything (data, pipeline.log, checkpoints, config.yaml) is written."""

from __future__ import annotations

import pytest

from ground.new_files import REGISTRY_MARKER, registry_root_of
from pipeline.cli import cli_entry
from registry import open_registry
from tests.synthetic_lora import write_lora


@pytest.fixture
def store(tmp_path, tiny_model_dir):
    """A real local registry holding one version."""
    root = tmp_path / "store"
    open_registry(str(root), mirror_mlflow=False).publish(write_lora(tmp_path / "lora", seed=1), "arith",
                                                          base_dir=tiny_model_dir)
    assert (root / REGISTRY_MARKER).is_file()  # the marker ground/ names is the one the local store writes
    return root


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _run(args, capsys):
    code = cli_entry(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# A model path that does not exist: before the check, `pipeline train` wrote pipeline.log into the folder and
# only then failed on the model, so the test needs no training to see the old behaviour.
NO_MODEL = "actor_rollout_ref.model.path=/nonexistent/model"


@pytest.mark.parametrize("where", [".", "adapters/arith", "adapters/arith/new-out"])
def test_train_refuses_an_out_dir_in_a_registry(store, capsys, where):
    folder = store / where
    before = _listing(store)
    code, shown = _run(["train", "--out-dir", str(folder), NO_MODEL], capsys)
    assert code == 2, shown
    assert str(folder) in shown and str(store.resolve()) in shown and "--out-dir" in shown
    assert _listing(store) == before  # no pipeline.log, no checkpoints


def test_train_refuses_default_local_dir_in_a_registry(store, capsys):
    before = _listing(store)
    code, shown = _run(["train", f"trainer.default_local_dir={store}", NO_MODEL], capsys)
    assert code == 2 and "trainer.default_local_dir" in shown and str(store) in shown, shown
    assert _listing(store) == before


def test_train_refuses_a_symlink_to_a_registry(store, tmp_path, capsys):
    link = tmp_path / "looks-harmless"
    link.symlink_to(store)
    code, shown = _run(["train", "--out-dir", str(link), NO_MODEL], capsys)
    assert code == 2 and str(link) in shown, shown
    assert not (store / "pipeline.log").exists()


@pytest.mark.parametrize("where", ["runs/r1", "."])
def test_run_refuses_a_run_dir_in_a_registry(store, tiny_model_dir, capsys, where):
    before = _listing(store)
    code, shown = _run(["run", "stage-model", f"actor_rollout_ref.model.path={tiny_model_dir}",
                        "--run-dir", str(store / where)], capsys)
    assert code == 2 and "registry" in shown and str(store.resolve()) in shown, shown
    assert _listing(store) == before


def test_ordinary_folders_are_not_registries(tmp_path, store):
    assert registry_root_of(tmp_path / "out") is None
    assert registry_root_of(store / "adapters" / "arith" / "x") == store.resolve()
