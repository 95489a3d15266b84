"""trainer.logger takes verl's console, mlflow, wandb, tensorboard and file: verl's GSM8K LoRA command line resolves
as it is, a missing optional package is refused when the config loads (naming the extra), and W&B that cannot
start is an error while the run starts, not a traceback at its first step. The trackers on a real training run:
tests/pipeline/test_loggers_training.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from config import load_config
from ground.errors import ConfigError, StageError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "qwen2_5_3b_gsm8k_grpo_lora.yaml"

# verl's examples/grpo_trainer/run_qwen2_5-3b_gsm8k_grpo_lora.sh, its overrides as the shell passes them (the
# shell drops the quotes of `trainer.logger=['console','wandb']`), minus the data paths and model (a GPU run).
VERL_GSM8K_LORA = [
    "algorithm.adv_estimator=grpo", "data.train_batch_size=1024", "data.max_prompt_length=512",
    "data.max_response_length=1024", "data.filter_overlong_prompts=True", "data.truncation=error",
    "data.shuffle=False", "actor_rollout_ref.model.use_shm=True", "actor_rollout_ref.actor.optim.lr=3e-6",
    "actor_rollout_ref.model.use_remove_padding=True", "actor_rollout_ref.actor.ppo_mini_batch_size=256",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=40", "actor_rollout_ref.actor.use_kl_loss=True",
    "actor_rollout_ref.actor.kl_loss_coef=0.001", "actor_rollout_ref.actor.kl_loss_type=low_var_kl",
    "actor_rollout_ref.actor.entropy_coeff=0", "actor_rollout_ref.model.enable_gradient_checkpointing=True",
    "actor_rollout_ref.actor.fsdp_config.param_offload=False",
    "actor_rollout_ref.actor.fsdp_config.optimizer_offload=False",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=40",
    "actor_rollout_ref.rollout.tensor_model_parallel_size=2", "actor_rollout_ref.rollout.name=vllm",
    "actor_rollout_ref.rollout.gpu_memory_utilization=0.6", "actor_rollout_ref.rollout.n=5",
    "actor_rollout_ref.rollout.load_format=safetensors", "actor_rollout_ref.rollout.layered_summon=True",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=40", "actor_rollout_ref.ref.fsdp_config.param_offload=True",
    "algorithm.use_kl_in_reward=False", "trainer.critic_warmup=0", "trainer.logger=[console,wandb]",
    "trainer.project_name=verl_grpo_example_gsm8k", "trainer.experiment_name=qwen2_7b_function_rm",
    "trainer.n_gpus_per_node=8", "trainer.nnodes=1", "trainer.save_freq=20", "trainer.test_freq=5",
    "trainer.total_epochs=15",
]


@pytest.mark.parametrize("logger", ["trainer.logger=[console,wandb]", "trainer.logger=['console','wandb']"])
def test_verls_gsm8k_lora_command_line_resolves_with_its_loggers(logger):
    cfg = load_config(EXAMPLE, [o for o in VERL_GSM8K_LORA if not o.startswith("trainer.logger=")] + [logger])
    assert cfg.trainer.logger == ["console", "wandb"]
    assert (cfg.trainer.project_name, cfg.trainer.experiment_name) == ("verl_grpo_example_gsm8k", "qwen2_7b_function_rm")
    # the example itself keeps verl's loggers
    assert load_config(EXAMPLE).trainer.logger == ["console", "wandb"]


@pytest.mark.parametrize("loggers", ["console", "[console,mlflow,wandb,tensorboard,file]", "[file]",
                                     "[tensorboard,mlflow]"])
def test_every_combination_of_the_five_loads(loggers):
    load_config(None, [f"trainer.logger={loggers}"])


def test_a_verl_tracker_we_do_not_have_is_refused_by_name():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["trainer.logger=[console,swanlab]"])
    msg = str(err.value)
    assert "swanlab" in msg and "verl tracker" in msg and "the command line" in msg
    assert "console, mlflow, wandb, tensorboard, file" in msg


@pytest.mark.parametrize("logger, module", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_a_logger_whose_package_is_missing_is_refused_at_load_naming_the_extra(monkeypatch, logger, module):
    # sys.modules[name] = None is Python's own "this module cannot be imported" (import raises ImportError)
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError):
        __import__(module)
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"trainer.logger=[console,{logger}]"])
    msg = str(err.value)
    assert f"pip install 'lora-pipeline[{logger}]'" in msg and f"`{module}` package" in msg
    assert "trainer.logger=['console', " in msg and "the command line" in msg
    load_config(None, ["trainer.logger=[console,mlflow,file]"])  # the others still load


def test_the_cli_refuses_a_missing_logger_package_with_exit_2(monkeypatch, capsys):
    from pipeline.cli import cli_entry

    monkeypatch.setitem(sys.modules, "wandb", None)
    assert cli_entry(["config", "show", "trainer.logger=[console,wandb]"]) == 2
    err = capsys.readouterr().err
    assert "lora-pipeline[wandb]" in err and "Traceback" not in err


def _no_wandb_login(monkeypatch, tmp_path):
    import wandb

    # wandb reads its WANDB_* settings once per process (its setup singleton); drop it so this test's count
    wandb.teardown()
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # no netrc / settings from the machine
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


@pytest.fixture(autouse=True)
def _fresh_wandb_settings():
    yield
    if "wandb" in sys.modules and sys.modules["wandb"] is not None:
        sys.modules["wandb"].teardown()  # the next test's environment is read afresh


def test_wandb_online_without_a_login_fails_while_the_run_starts(monkeypatch, tmp_path):
    from stages.train.tracking import TrainTracking

    _no_wandb_login(monkeypatch, tmp_path)
    cfg = load_config(None, ["trainer.logger=[console,file,wandb]"])
    with pytest.raises(StageError) as err:
        TrainTracking(cfg, out_dir=str(tmp_path / "out"))
    msg = str(err.value)
    assert "W&B could not start" in msg and "WANDB_MODE=offline" in msg and "wandb login" in msg


@pytest.mark.timeout(180)
def test_wandb_online_without_network_fails_while_the_run_starts(monkeypatch, tmp_path):
    from ground.ports import free_port
    from stages.train.tracking import TrainTracking

    _no_wandb_login(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # a key of the right shape: the failure is the network's
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "10")
    cfg = load_config(None, ["trainer.logger=[console,wandb]"])
    with pytest.raises(StageError) as err:
        TrainTracking(cfg, out_dir=str(tmp_path / "out"))
    assert "W&B could not start" in str(err.value) and "WANDB_MODE=offline" in str(err.value)


def test_the_file_logger_appends_verls_lines_and_never_truncates(monkeypatch, tmp_path):
    import json

    from stages.train.tracking import TrainTracking

    for var in ("VERL_FILE_LOGGER_PATH", "VERL_FILE_LOGGER_ROOT"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(None, ["trainer.logger=[file]", "trainer.project_name=p", "trainer.experiment_name=e"])
    for first in (1, 3):  # two runs into the same folder
        tracking = TrainTracking(cfg, out_dir=str(tmp_path))
        tracking.log_metrics({"reward/mean": 0.5, "val/reward": float("nan")}, step=first)
        tracking.log_metrics({"reward/mean": 0.75}, step=first + 1)
        tracking.end("FINISHED")
    path = tmp_path / "file_log" / "p" / "e.jsonl"
    assert tracking.destinations == {"file": str(path)}
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert lines[0]["data"] == {"reward/mean": 0.5, "val/reward": None} and lines[1]["data"] == {"reward/mean": 0.75}
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(tmp_path / "elsewhere.jsonl"))  # verl's variable wins
    assert TrainTracking(cfg, out_dir=str(tmp_path)).destinations == {"file": str(tmp_path / "elsewhere.jsonl")}
