"""Config mistakes stop `train` with a clear error before Ray, any worker or the engine starts."""

from __future__ import annotations

import time

import pytest

from config import load_config
from ground.errors import ConfigError
from tests.stages.train.toy_task import toy_overrides


def _cfg(tiny_model_dir, tmp_path, extra):
    return load_config(None, toy_overrides(tiny_model_dir, tmp_path, steps=1, extra=extra))


def _train_fails_fast(cfg, model_dir) -> ConfigError:
    import ray

    from stages.train import train

    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        train(cfg, str(model_dir), "fp")
    assert not ray.is_initialized(), "a worker or Ray was started before the config was checked"
    assert time.perf_counter() - t0 < 10
    return info.value


def test_dummy_load_format_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="load_format='dummy'.*LoRA"):
        _cfg(tiny_model_dir, tmp_path, {"actor_rollout_ref.rollout.load_format": "dummy"})
    # A config built another way (not through load_config) is caught by train's own check.
    cfg = _cfg(tiny_model_dir, tmp_path, {})
    cfg.actor_rollout_ref.rollout.load_format = "dummy"
    err = _train_fails_fast(cfg, tiny_model_dir)
    assert "load_format" in str(err) and "safetensors" in str(err)


def test_rank_above_vllm_max_is_refused(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, {"actor_rollout_ref.model.lora_rank": 1024})
    err = _train_fails_fast(cfg, tiny_model_dir)
    assert "lora_rank=1024" in str(err) and "512" in str(err)


def test_missing_target_module_is_refused(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, {"actor_rollout_ref.model.target_modules": "[q_proj,qkv_fused]"})
    err = _train_fails_fast(cfg, tiny_model_dir)
    text = str(err)
    assert "qkv_fused" in text and "q_proj" not in text.split("names")[1].split("but")[0]
    assert "v_proj" in text  # the message lists the module names the model does have


def test_regex_target_matching_nothing_is_refused(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, {"actor_rollout_ref.model.target_modules": ".*attn_fused"})
    err = _train_fails_fast(cfg, tiny_model_dir)
    assert "matches no module" in str(err)


def test_cli_prints_the_error_without_traceback(tiny_model_dir, tmp_path, capsys):
    from pipeline.cli import cli_entry

    args = ["train", *toy_overrides(tiny_model_dir, tmp_path, 1, {"actor_rollout_ref.model.lora_rank": 600})]
    assert cli_entry(args) == 2
    err = capsys.readouterr().err
    assert "lora_rank=600" in err and "Traceback" not in err


def test_fresh_run_never_writes_over_an_earlier_runs_checkpoints_or_outputs(tiny_model_dir, tmp_path):
    """Without resuming, a checkpoint folder or out folder holding another run's files is refused, untouched."""
    import ray

    from ground.errors import StageError
    from stages.train import train

    ckpt = tmp_path / "ckpt"
    (ckpt / "global_step_5").mkdir(parents=True)
    (ckpt / "global_step_5" / "trainer_state.json").write_text('{"global_step": 5}')
    (ckpt / "latest_checkpointed_iteration.txt").write_text("5")
    cfg = _cfg(tiny_model_dir, tmp_path, {"trainer.default_local_dir": str(ckpt), "trainer.resume_mode": "disable"})
    with pytest.raises(StageError, match="already holds checkpoints of an earlier run.*--force"):
        train(cfg, str(tiny_model_dir), "fp", out_dir=str(tmp_path / "out"))
    assert (ckpt / "global_step_5" / "trainer_state.json").read_text() == '{"global_step": 5}'
    assert sorted(p.name for p in ckpt.iterdir()) == ["global_step_5", "latest_checkpointed_iteration.txt"]

    out = tmp_path / "out2"
    out.mkdir()
    (out / "history.jsonl").write_text('{"step": 1}\n')
    cfg = _cfg(tiny_model_dir, tmp_path, {"trainer.default_local_dir": str(tmp_path / "new-ckpt")})
    with pytest.raises(StageError, match="already holds history.jsonl.*--force"):
        train(cfg, str(tiny_model_dir), "fp", out_dir=str(out))
    assert (out / "history.jsonl").read_text() == '{"step": 1}\n'
    assert not ray.is_initialized()
