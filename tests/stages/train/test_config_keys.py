"""verl keys the trainer does not honour are refused by name; keys that change nothing in this mode warn at load."""

from __future__ import annotations

import json
import logging

import pytest

from config import load_config
from ground.errors import ConfigError


@pytest.mark.parametrize("override, names", [
    ("actor_rollout_ref.hybrid_engine=false", "True"),
    ("actor_rollout_ref.rollout.mode=async", "'sync'"),
    ("reward_model.reward_manager=prime", "'naive' or 'dapo'"),
    ("actor_rollout_ref.actor.checkpoint.save_contents=[model]", "[model,optimizer,extra]"),
    ("actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]", "hf_model"),
])
def test_values_we_do_not_run_are_refused_naming_the_key_and_what_runs(override, names):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    key = override.split("=")[0]
    assert f"`{key}`" in str(err.value) and names in str(err.value)


def test_the_values_we_run_load():
    cfg = load_config(None, ["actor_rollout_ref.hybrid_engine=true", "actor_rollout_ref.rollout.mode=sync",
                             "reward_model.reward_manager=dapo",
                             "actor_rollout_ref.actor.checkpoint.save_contents=[extra,optimizer,model]"])
    assert cfg.reward_model.reward_manager == "dapo"


def _inert(caplog, overrides):
    with caplog.at_level(logging.WARNING, logger="config.inert"):
        caplog.clear()
        load_config(None, overrides)
    return [r.getMessage() for r in caplog.records if r.name == "config.inert"]


def test_lora_keys_that_differ_from_the_starting_adapter_warn(caplog, tmp_path):
    adapter = tmp_path / "start"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"r": 8, "lora_alpha": 16, "target_modules": ["v_proj", "q_proj"], "exclude_modules": None}))
    start = f"actor_rollout_ref.model.lora_adapter_path={adapter}"
    same = ["actor_rollout_ref.model.lora_rank=8", "actor_rollout_ref.model.lora_alpha=16",
            "actor_rollout_ref.model.target_modules=[q_proj,v_proj]"]
    assert _inert(caplog, [start, *same]) == []
    messages = _inert(caplog, [start, "actor_rollout_ref.model.lora_rank=32",
                               "actor_rollout_ref.model.lora_alpha=16",
                               "actor_rollout_ref.model.target_modules=[q_proj,k_proj]",
                               "actor_rollout_ref.model.exclude_modules=[lm_head]"])
    joined = "\n".join(messages)
    assert len(messages) == 3, joined
    for key in ("lora_rank=32", "target_modules=['q_proj', 'k_proj']", "exclude_modules=['lm_head']"):
        assert f"actor_rollout_ref.model.{key}" in joined
    assert "lora_adapter_path" in joined and "the command line" in joined
    # without a starting adapter the same keys are the policy's layout: no warning
    assert _inert(caplog, ["actor_rollout_ref.model.lora_rank=32"]) == []


def test_layered_summon_in_merged_sync_warns(caplog):
    merged = _inert(caplog, ["actor_rollout_ref.rollout.layered_summon=true",
                             "actor_rollout_ref.rollout.lora_sync=merged"])
    assert len(merged) == 1 and "layered_summon=True has no effect with merged sync" in merged[0]
    assert _inert(caplog, ["actor_rollout_ref.rollout.layered_summon=true", "trainer.device=cpu"])
    assert _inert(caplog, ["actor_rollout_ref.rollout.layered_summon=true",
                           "actor_rollout_ref.rollout.lora_sync=adapter"]) == []


def test_a_replaced_checkpoint_folder_warns_only_when_the_user_set_it(caplog):
    from config.inert import warn_replaced_local_dir

    for overrides, expected in (([], 0), (["trainer.default_local_dir=/tmp/mine"], 1)):
        cfg = load_config(None, overrides)
        with caplog.at_level(logging.WARNING, logger="config.inert"):
            caplog.clear()
            warn_replaced_local_dir(cfg, "/runs/r1/train/checkpoints")
        found = [r.getMessage() for r in caplog.records if r.name == "config.inert"]
        assert len(found) == expected
        if expected:
            assert "trainer.default_local_dir=/tmp/mine (the command line)" in found[0]


def test_overlong_log_without_shaping_warns(caplog):
    found = _inert(caplog, ["reward_model.overlong_buffer.log=true"])
    assert len(found) == 1 and "overlong_buffer.log=True has no effect" in found[0]
    assert _inert(caplog, ["reward_model.overlong_buffer.log=true", "reward_model.overlong_buffer.enable=true"]) == []
