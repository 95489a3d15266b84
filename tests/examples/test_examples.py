"""Every example config loads and validates, and starts with the command that runs it."""

from pathlib import Path

import pytest

from config import DEFAULT_CONFIG, load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))


def test_the_required_examples_exist():
    names = {p.name for p in CONFIGS}
    assert {"cpu_quickstart.yaml", "qwen2_5_3b_gsm8k_grpo_lora.yaml", "qwen2_5_72b_lora_layered_summon.yaml",
            "ppo_lora.yaml", "dapo_lora.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_loads_validates_and_names_its_command(path):
    cfg = load_config(path)
    assert cfg.actor_rollout_ref.rollout.name == "vllm"
    head = [line for line in path.read_text().splitlines()[:8] if line.startswith("#")]
    assert any(f"-c examples/{path.name}" in line or "pipeline run" in line for line in head), head


def test_quickstart_is_the_embedded_default():
    assert (EXAMPLES / "cpu_quickstart.yaml").resolve() == DEFAULT_CONFIG.resolve()
    assert load_config().digest() == load_config(EXAMPLES / "cpu_quickstart.yaml").digest()


def test_gsm8k_example_is_the_verl_seed_setting():
    cfg = load_config(EXAMPLES / "qwen2_5_3b_gsm8k_grpo_lora.yaml")
    m, r = cfg.actor_rollout_ref.model, cfg.actor_rollout_ref.rollout
    assert (m.lora_rank, m.lora_alpha, m.use_shm, r.layered_summon, r.load_format) == (64, 32, True, True, "safetensors")
    assert cfg.trainer.n_gpus_per_node == 2 and cfg.algorithm.adv_estimator == "grpo"
