"""The fleet config (stages/train/fleet/config.py): members parse into whole configs of their own; keys that
cannot differ per member are refused by name."""

from __future__ import annotations

import pytest
import yaml

from ground.errors import ConfigError
from stages.train.fleet.config import parse_fleet


def _write(tmp_path, members, shared=None):
    doc = {"actor_rollout_ref": {"model": {"lora_rank": 4, "lora_alpha": 8}, "actor": {"optim": {"lr": 1e-4}}},
           **(shared or {}), "fleet": {"members": members}}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _member(name, **extra):
    return {"name": name, "data": {"train_files": f"{name}/train.parquet", "val_files": f"{name}/test.parquet"},
            **extra}


def test_members_get_their_own_keys_over_the_shared_ones(tmp_path):
    path = _write(tmp_path, [
        _member("add", custom_reward_function={"path": "r.py", "name": "add_score"}),
        _member("sub", lora_rank=8, lora_alpha=32, optim={"lr": 3e-4}, rollout={"n": 2},
                reward_model={"scorer": "arithmetic"}, start_adapter="sub@prod"),
    ])
    fleet = parse_fleet(path)
    add, sub = fleet.members
    assert [m.name for m in fleet.members] == ["add", "sub"]
    assert add.cfg.data.train_files == "add/train.parquet" and sub.cfg.data.val_files == "sub/test.parquet"
    assert add.cfg.custom_reward_function.name == "add_score" and sub.cfg.reward_model.scorer == "arithmetic"
    assert (add.member.lora_rank, add.member.lora_alpha, add.member.lr) == (4, 8.0, 1e-4)  # the shared values
    assert (sub.member.lora_rank, sub.member.lora_alpha, sub.member.lr) == (8, 32.0, 3e-4)
    assert sub.cfg.actor_rollout_ref.rollout.n == 2 and add.cfg.actor_rollout_ref.rollout.n == fleet.shared.actor_rollout_ref.rollout.n
    assert sub.start_adapter == "sub@prod" and add.start_adapter is None
    assert fleet.shared.data.train_files != "add/train.parquet"  # the shared part does not see members' keys


def test_overrides_apply_to_every_member(tmp_path):
    fleet = parse_fleet(_write(tmp_path, [_member("a"), _member("b")]), ["trainer.total_training_steps=3"])
    assert {m.cfg.trainer.total_training_steps for m in fleet.members} == {3}


@pytest.mark.parametrize("extra, key", [
    ({"actor_rollout_ref": {"model": {"path": "other/model"}}}, "actor_rollout_ref.model.path"),
    ({"algorithm": {"adv_estimator": "rloo"}}, "algorithm.adv_estimator"),
    ({"actor_rollout_ref": {"actor": {"ppo_micro_batch_size_per_gpu": 2}}},
     "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu"),
    ({"actor_rollout_ref": {"actor": {"strategy": "fsdp"}}}, "actor_rollout_ref.actor.strategy"),
])
def test_keys_that_cannot_differ_are_refused_by_name(tmp_path, extra, key):
    path = _write(tmp_path, [_member("add"), _member("sub", **extra)])
    with pytest.raises(ConfigError) as err:
        parse_fleet(path)
    msg = str(err.value)
    assert f"fleet.members[1] (sub): key {key} cannot differ per member" in msg
    assert "Set it at the top level" in msg


@pytest.mark.parametrize("members, words", [
    ([{"data": {"train_files": "a", "val_files": "b"}}], "fleet.members[0] has no name"),
    ([_member("a"), _member("a")], "used twice"),
    ([{"name": "a", "data": {"train_files": "x"}}], "fleet.members[0] (a) has no data.val_files"),
    ([_member("a", colour="red")], "fleet.members[0] (a): unknown key colour"),
    ([_member("a", lora_rank=0)], "lora_rank"),
    ([_member("a", target_modules=["q_proj"])], "every member adapts the same layers"),
    ([], "is empty"),
])
def test_bad_members_are_refused(tmp_path, members, words):
    with pytest.raises(ConfigError) as err:
        parse_fleet(_write(tmp_path, members))
    assert words in str(err.value)


@pytest.mark.parametrize("shared, key, why", [
    ({"algorithm": {"use_kl_in_reward": True}}, "algorithm.use_kl_in_reward", "use_kl_loss=true"),
    ({"algorithm": {"adv_estimator": "gae"}}, "algorithm.adv_estimator", "no critic"),
    ({"algorithm": {"adv_estimator": "remax"}}, "algorithm.adv_estimator", "greedy baseline"),
    ({"algorithm": {"filter_groups": {"enable": True}}}, "algorithm.filter_groups.enable", "dynamic sampling"),
    ({"algorithm": {"rollout_correction": {"rollout_is": "token"}}}, "algorithm.rollout_correction.rollout_is",
     "engine's log-probs"),
    ({"algorithm": {"rollout_correction": {"bypass_mode": True}}}, "algorithm.rollout_correction.bypass_mode",
     "engine's log-probs"),
    ({"actor_rollout_ref": {"rollout": {"calculate_log_probs": True}}},
     "actor_rollout_ref.rollout.calculate_log_probs", "engine's log-probs"),
    ({"actor_rollout_ref": {"actor": {"optim": {"lr_warmup_steps_ratio": 0.1}}}},
     "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio", "set actor_rollout_ref.actor.optim.lr_warmup_steps"),
    ({"trainer": {"critic_warmup": 2}}, "trainer.critic_warmup", "set it to 0"),
    ({"actor_rollout_ref": {"rollout": {"multi_turn": {"enable": True}}}},
     "actor_rollout_ref.rollout.multi_turn.enable", "agent loops"),
    ({"actor_rollout_ref": {"rollout": {"agent": {"default_agent_loop": "tool_agent"}}}},
     "actor_rollout_ref.rollout.agent.default_agent_loop", "no agent loop"),
    ({"actor_rollout_ref": {"model": {"share_prompt_forward": True}}},
     "actor_rollout_ref.model.share_prompt_forward", "leave it off"),
])
def test_settings_a_fleet_would_ignore_are_refused_by_name(tmp_path, shared, key, why):
    with pytest.raises(ConfigError) as err:
        parse_fleet(_write(tmp_path, [_member("add")], shared))
    msg = str(err.value)
    assert f"{key}=" in msg and "is not supported in fleet training" in msg and why in msg


def test_the_single_update_keys_a_fleet_honours_parse(tmp_path):
    """KL loss, entropy bonus, any loss_agg_mode, mini-batches, epochs, shuffle and a warmup in steps: the fleet
    update does them per member (fleet/update_loop.py), so they are accepted; so is a ratio-free warmup of 0."""
    actor = {"use_kl_loss": True, "kl_loss_coef": 0.1, "entropy_coeff": 0.01, "loss_agg_mode": "seq-mean-token-mean",
             "ppo_mini_batch_size": 2, "ppo_epochs": 2, "shuffle": True,
             "optim": {"lr": 1e-4, "lr_warmup_steps": 3, "lr_warmup_steps_ratio": 0.5}}
    fleet = parse_fleet(_write(tmp_path, [_member("add")], {"actor_rollout_ref": {
        "model": {"lora_rank": 4, "lora_alpha": 8}, "actor": actor}}))
    assert fleet.shared.actor_rollout_ref.actor.use_kl_loss and fleet.members[0].cfg.actor_rollout_ref.actor.ppo_epochs == 2


def test_a_config_without_members_is_refused(tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text("trainer: {total_training_steps: 1}\n")
    with pytest.raises(ConfigError, match="no `fleet.members:` list"):
        parse_fleet(path)


def test_the_example_fleet_parses_and_its_data_and_reward_work(tmp_path):
    """examples/fleet: three members, names the registry takes, data the generator writes, the spelled reward."""
    import importlib.util
    from pathlib import Path

    from registry.refs import check_name
    from stages.train.data import load_rows

    root = Path(__file__).resolve().parents[3]
    fleet = parse_fleet(root / "examples" / "fleet" / "fleet.yaml")
    assert [m.name for m in fleet.members] == ["smollm2-add", "smollm2-sub", "smollm2-spell"]
    assert all(check_name(m.name) for m in fleet.members)
    spec = importlib.util.spec_from_file_location("fleet_make_data", root / "examples" / "fleet" / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    make_data.main(["--out", str(tmp_path), "--train-size", "16", "--test-size", "4"])
    spell = load_rows(tmp_path / "spell" / "train.parquet")
    assert len(spell) == 16 and spell[0]["reward_model"]["ground_truth"] in make_data.WORDS
    assert {r["extra_info"]["op"] for r in load_rows(tmp_path / "sub" / "train.parquet")} == {"-"}
    from stages.train.rewards import load_custom_scorer

    score = load_custom_scorer(str(root / "examples" / "fleet" / "rewards.py"), "spelled_score")
    assert score("fleet_spell", " Seven.", "seven", {})["score"] == 1.0
    assert score("fleet_spell", "7", "seven", {})["score"] == 0.0
