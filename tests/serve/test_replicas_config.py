"""The replicated mode's settings, checked where they are loaded (no Ray, no engine)."""

import pytest

from config import load_config
from ground.errors import ConfigError
from serve.replicas.app import check_autoscaling


def test_serve_replica_keys_load_and_validate():
    cfg = load_config(None, ["serve.replicas=3", "serve.routing=round_robin", "serve.autoscaling.min_replicas=1",
                             "serve.autoscaling.max_replicas=4", "serve.autoscaling.target_ongoing_requests=2.5"])
    assert cfg.serve.replicas == 3 and cfg.serve.routing == "round_robin"
    assert cfg.serve.autoscaling.as_dict() == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2.5}
    assert load_config(None, []).serve.autoscaling.as_dict() == {}  # default: a fixed replica count
    for bad in (["serve.replicas=0"], ["serve.routing=random"], ["serve.autoscaling.max_replicas=0"],
                ["serve.autoscaling.min_replicas=3", "serve.autoscaling.max_replicas=2"],
                ["serve.autoscaling.target_ongoing_request=2"]):
        with pytest.raises(ConfigError):
            load_config(None, bad)


def test_autoscaling_dict_is_checked_before_ray_starts():
    assert check_autoscaling(None) is None and check_autoscaling({}) is None
    assert check_autoscaling({"max_replicas": 3}) == {"min_replicas": 1, "max_replicas": 3,
                                                      "target_ongoing_requests": 2.0}
    with pytest.raises(ConfigError, match="min_replicas <= max_replicas"):
        check_autoscaling({"min_replicas": 4, "max_replicas": 2})
    with pytest.raises(ConfigError, match="valid keys"):
        check_autoscaling({"max_replica": 2})


def test_replicas_size_the_host_memory_tier_like_the_single_server(tmp_path, tiny_model_dir):
    """Each replica's vLLM `max_cpu_loras` (and Serve's per-replica model cache, which is the same setting) comes
    from the budget and the registry's largest adapter on the base, unless given; checked before Ray starts."""
    from ground.errors import StageError
    from registry import open_registry
    from serve.lora_tier import MAX_CPU_LORAS_CAP
    from serve.replicas.app import plan_replicas
    from tests.synthetic_lora import write_lora

    reg = open_registry(str(tmp_path / "registry"))
    big = write_lora(tmp_path / "big", rank=8, seed=2, targets=("q_proj", "v_proj", "o_proj"))
    reg.publish(write_lora(tmp_path / "small", rank=4, seed=1), "small", base_dir=tiny_model_dir)
    reg.publish(big, "big", base_dir=tiny_model_dir)
    per_adapter = 2 * 8 * ((64 + 64) + (64 + 32) + (64 + 64)) * 4  # 2 layers x rank 8 x (in + out), float32

    def plan(**kw):
        return plan_replicas(tiny_model_dir, reg.uri, max_loras=2, dtype="auto", **kw)

    default = plan()  # 1 GiB holds far more than the cap of these few-KiB adapters
    assert default.settings["max_cpu_loras"] == MAX_CPU_LORAS_CAP
    assert f"max_cpu_loras={MAX_CPU_LORAS_CAP}" in default.lora_tier and "largest of 2" in default.lora_tier
    sized = plan(lora_cache_gib=10.5 * per_adapter / (1 << 30))
    assert sized.settings["max_cpu_loras"] == 10, sized.lora_tier
    assert "= 10 adapter(s); the budget" in sized.lora_tier
    assert plan(lora_cache_gib=0).settings["max_cpu_loras"] == 2  # never below the slots
    explicit = plan(max_cpu_loras=1)
    assert explicit.settings["max_cpu_loras"] == 2 and "set explicitly" in explicit.lora_tier
    with pytest.raises(StageError, match="--lora-cache-gib"):
        plan(lora_cache_gib=-1)
    with pytest.raises(ConfigError, match="random"):
        plan(routing="random")
