import pytest

from config import all_keys, load_config
from ground.errors import ConfigError

SEED_COMMAND_LINE = [
    "algorithm.adv_estimator=grpo",
    "actor_rollout_ref.model.use_shm=True",
    "actor_rollout_ref.model.lora_rank=64",
    "actor_rollout_ref.model.lora_alpha=32",
    "actor_rollout_ref.rollout.name=vllm",
    "actor_rollout_ref.rollout.load_format=safetensors",
    "actor_rollout_ref.rollout.layered_summon=True",
    "actor_rollout_ref.actor.strategy=fsdp",
]


def test_seed_command_line_parses():
    cfg = load_config(None, SEED_COMMAND_LINE)
    m = cfg.actor_rollout_ref.model
    assert (m.use_shm, m.lora_rank, m.lora_alpha) == (True, 64, 32)
    assert cfg.actor_rollout_ref.rollout.layered_summon is True
    assert cfg.actor_rollout_ref.rollout.load_format == "safetensors"
    assert cfg.algorithm.adv_estimator == "grpo"


def test_hydra_plus_prefix_and_list_values():
    cfg = load_config(None, ["+actor_rollout_ref.model.target_modules=[q_proj,v_proj]", "data.train_batch_size=4"])
    assert cfg.actor_rollout_ref.model.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.train_batch_size == 4


def test_yaml_then_overrides_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("actor_rollout_ref:\n  model:\n    lora_rank: 8\n    lora_alpha: 8\ndata:\n  train_batch_size: 3\n")
    cfg = load_config(f, ["actor_rollout_ref.model.lora_rank=32"])
    assert cfg.actor_rollout_ref.model.lora_rank == 32  # command line beats file
    assert cfg.actor_rollout_ref.model.lora_alpha == 8  # file beats default
    assert cfg.data.max_prompt_length == 256  # default where neither says


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"actor_rollout_ref\.model\.lora_rnak.*Did you mean `actor_rollout_ref\.model\.lora_rank`"):
        load_config(None, ["actor_rollout_ref.model.lora_rnak=3"])


def test_unknown_key_in_yaml_names_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("trainer:\n  total_epoch: 3\n")
    with pytest.raises(ConfigError, match=r"trainer\.total_epoch.*c\.yaml.*trainer\.total_epochs"):
        load_config(f)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("actor_rollout_ref.model.lora_rank=0", r"lora_rank=0.*> 0"),
        ("actor_rollout_ref.model.lora_alpha=-1", r"lora_alpha=-1.*> 0"),
        ("actor_rollout_ref.rollout.load_format=dummy", r"load_format='dummy'.*only the LoRA tensors.*load_format=safetensors"),
        ("actor_rollout_ref.actor.strategy=megatron", r"strategy='megatron'.*supported: fsdp"),
        ("actor_rollout_ref.rollout.name=sglang", r"rollout.name='sglang'.*supported: vllm"),
        ("data.train_batch_size=many", r"data\.train_batch_size.*'many'"),
    ],
)
def test_validation_errors_name_key_value_and_fix(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["actor_rollout_ref.model.lora_rank"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_interpolation_and_digest_stable():
    a = load_config(None, ["trainer.experiment_name=x"])
    assert a.trainer.default_local_dir.endswith("/x")
    assert a.digest() == load_config(None, ["trainer.experiment_name=x"]).digest()
    assert a.digest() != load_config(None, ["trainer.experiment_name=y"]).digest()
    assert "actor_rollout_ref.model.lora_rank" in all_keys()


def test_dapo_preset_sets_defaults_that_stay_overridable():
    cfg = load_config(None, ["algorithm.adv_estimator=dapo"])
    a = cfg.actor_rollout_ref.actor
    assert (a.clip_ratio_low, a.clip_ratio_high, a.loss_agg_mode) == (0.2, 0.28, "token-mean")
    assert cfg.algorithm.filter_groups.enable and cfg.reward_model.overlong_buffer.enable
    cfg = load_config(None, ["algorithm.adv_estimator=dapo", "actor_rollout_ref.actor.clip_ratio_high=0.3",
                             "algorithm.filter_groups.enable=False"])
    assert cfg.actor_rollout_ref.actor.clip_ratio_high == 0.3 and not cfg.algorithm.filter_groups.enable


def test_fsdp_config_is_typed_and_refuses_unknown_keys_with_the_supported_list(tmp_path):
    cfg = load_config(None, ["actor_rollout_ref.actor.fsdp_config.param_offload=true",
                             "actor_rollout_ref.ref.fsdp_config.param_offload=true"])
    assert cfg.actor_rollout_ref.actor.fsdp_config.param_offload is True
    assert cfg.actor_rollout_ref.actor.fsdp_config.optimizer_offload is False
    with pytest.raises(ConfigError) as err:
        load_config(None, ["actor_rollout_ref.actor.fsdp_config.wrap_polcy=x"])
    msg = str(err.value)
    assert "actor_rollout_ref.actor.fsdp_config.wrap_polcy" in msg and "the command line" in msg
    assert "param_offload, optimizer_offload, reshard_after_forward, load_weights" in msg
    # a verl key that is not honoured here says what to do instead, also from a YAML file
    f = tmp_path / "c.yaml"
    f.write_text("actor_rollout_ref:\n  ref:\n    fsdp_config:\n      optimizer_offload: true\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    msg = str(err.value)
    assert "actor_rollout_ref.ref.fsdp_config.optimizer_offload" in msg and str(f) in msg
    assert "no optimizer" in msg and "supports: param_offload." in msg
    with pytest.raises(ConfigError, match="load_weights"):
        load_config(None, ["actor_rollout_ref.actor.fsdp_config.load_weights=rank_0"])


def test_serve_gpu_memory_utilization_is_refused_for_the_key_that_sizes_the_kv_cache():
    # vLLM's --kv-cache-memory-bytes, which the server always passes, overrides a memory fraction: the old key did
    # nothing. Its replacement reaches the server in both modes (stages/serve_stage.py).
    with pytest.raises(ConfigError, match=r"serve.gpu_memory_utilization` .*set serve.kv_cache_gib"):
        load_config(None, ["serve.gpu_memory_utilization=0.3"])
    assert load_config(None, ["serve.kv_cache_gib=0.5"]).serve.kv_cache_gib == 0.5
    with pytest.raises(ConfigError, match="kv_cache_gib"):
        load_config(None, ["serve.kv_cache_gib=0"])
