"""The typed config schema, with verl's key names: one pydantic section per verl config group.

Loading (YAML + `a.b.c=value` overrides) and the cross-field rules live in `config.loader`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Literal, Optional, Union

import yaml
from pydantic import Field, PrivateAttr, field_validator

from config.multi_turn_schema import AgentConfig, MultiTurnConfig
from config.section import Section
from config.serve_schema import AutoscalingConfig, PublishConfig, RegistryConfig, ServeConfig  # noqa: F401


def _flatten(d: dict[str, Any], prefix: str = ""):
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _flatten(value, path + ".")
        else:
            yield path, value


# ----------------------------------------------------------------------------------------------- model / actor
class ModelConfig(Section):
    path: str = "smollm2-135m-instruct"
    lora_rank: int = 16
    lora_alpha: float = 32
    target_modules: Union[str, list[str]] = "all-linear"
    exclude_modules: Optional[Union[str, list[str]]] = None
    use_shm: bool = False
    shm_root: str = "/dev/shm"  # where use_shm copies the base; tests point it at a temp dir
    keep_shm_copy: bool = False  # keep the /dev/shm copy after the pipeline ends
    lora_adapter_path: Optional[str] = None  # continue training from this PEFT adapter
    enable_gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    # Sort rows by length, bucket them into micro-batches and trim each to its longest row, so the actor's
    # forward and backward skip pad columns (stages/train/micro_batching.py).
    use_remove_padding: bool = True
    # Compute each prompt once for all of its sampled responses (one packed row per prompt with a 4D attention
    # mask; stages/train/shared_prompt.py). Same log-probs; fewer tokens with short sequences and many samples.
    share_prompt_forward: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class OptimConfig(Section):
    lr: float = 1e-5
    lr_warmup_steps: int = -1  # <0: use lr_warmup_steps_ratio
    lr_warmup_steps_ratio: float = 0.0
    weight_decay: float = 0.01
    betas: list[float] = [0.9, 0.999]


class PolicyLossConfig(Section):
    loss_mode: str = "vanilla"  # a registered policy loss: vanilla (clipped PPO), gspo, ...


class CheckpointConfig(Section):
    # Every checkpoint holds all three (verl's names): `model` the policy adapter (and the PPO critic), `optimizer`
    # the AdamW state, `extra` the LR schedulers and RNG states; a resume needs each of them. verl's `hf_model`
    # (a full Hugging Face model) is never written: the final adapter is already in PEFT format.
    save_contents: list[str] = ["model", "optimizer", "extra"]

    @field_validator("save_contents")
    @classmethod
    def _everything_is_saved(cls, value: list[str]) -> list[str]:
        if sorted(set(value)) != ["extra", "model", "optimizer"]:
            raise ValueError(
                "every checkpoint saves model (the adapter), optimizer (AdamW state) and extra (schedulers, RNG), "
                "because a resume needs all three; other contents (e.g. hf_model) are not written. Set "
                "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra] or leave it out")
        return value


class FSDPConfig(Section):
    """`actor_rollout_ref.actor.fsdp_config`: verl's FSDP keys that this trainer honours (anything else is refused).

    On GPUs `param_offload` keeps the parameter shards, their gradients and the optimizer step in host memory
    (FSDP2's CPUOffloadPolicy); `optimizer_offload` alone moves the optimizer state to host memory between steps.
    On CPU workers both are no-ops: everything already lives in host memory.
    """

    param_offload: bool = False
    optimizer_offload: bool = False
    reshard_after_forward: bool = True  # free each layer's gathered weights after its forward (FSDP2's default)
    # Ours, not verl's: `sharded` builds the model on the meta device and each rank reads its shard from the
    # safetensors files; `rank0` builds it the same way but rank 0 reads every tensor and scatters the rows (verl's
    # way); `whole` loads the whole base on every rank first (peak host memory: one base per rank).
    load_weights: Literal["sharded", "rank0", "whole"] = "sharded"

    # verl keys refused here, with what to do instead (the unknown-key error prints these).
    REFUSED_VERL_KEYS: ClassVar[dict[str, str]] = {
        "offload_policy": "`param_offload=True` already maps to FSDP2's CPUOffloadPolicy (parameters, gradients "
                          "and optimizer state)",
        "model_dtype": "set actor_rollout_ref.model.dtype",
        "mixed_precision": "the base computes in actor_rollout_ref.model.dtype, LoRA weights and gradient "
                           "reduction in float32",
        "wrap_policy": "every decoder layer is its own FSDP unit, the rest is the root unit",
        "fsdp_size": "the workers form one FSDP group (trainer.n_gpus_per_node x trainer.nnodes GPUs, "
                     "or trainer.cpu_workers)",
        "forward_prefetch": "FSDP2 prefetches the next layer's all-gather by itself",
        "use_orig_params": "an FSDP1 setting; FSDP2 always keeps the original parameters",
    }


class RefFSDPConfig(Section):
    """`actor_rollout_ref.ref.fsdp_config`. The reference policy is the actor's base with the adapter switched
    off (one copy of the weights), so `param_offload` here offloads that shared base."""

    param_offload: bool = False

    REFUSED_VERL_KEYS: ClassVar[dict[str, str]] = {
        **FSDPConfig.REFUSED_VERL_KEYS,
        "optimizer_offload": "the reference policy has no optimizer",
        "reshard_after_forward": "the reference shares the actor's FSDP units; set it in "
                                 "actor_rollout_ref.actor.fsdp_config",
    }


class ActorConfig(Section):
    strategy: str = "fsdp"
    optim: OptimConfig = Field(default_factory=OptimConfig)
    grad_clip: float = 1.0
    ppo_mini_batch_size: int = 8  # in prompts, as in verl
    ppo_micro_batch_size_per_gpu: int = 8  # in sequences
    # verl's dynamic batch size: micro-batches cut by tokens (rows x longest row) instead of rows
    use_dynamic_bsz: bool = False
    ppo_max_token_len_per_gpu: int = 16384
    ppo_epochs: int = 1
    # Deal the rows into mini-batches in a new seeded order each epoch (trainer.seed, the update's number and
    # the epoch); False (verl's default) keeps the rows in order.
    shuffle: bool = False
    clip_ratio: float = 0.2
    clip_ratio_low: Optional[float] = None  # None: clip_ratio
    clip_ratio_high: Optional[float] = None  # None: clip_ratio
    clip_ratio_c: float = 3.0  # dual-clip constant
    loss_agg_mode: str = "token-mean"
    entropy_coeff: float = 0.0
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.001
    kl_loss_type: str = "low_var_kl"
    policy_loss: PolicyLossConfig = Field(default_factory=PolicyLossConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    fsdp_config: FSDPConfig = Field(default_factory=FSDPConfig)


class ValKwargs(Section):
    do_sample: bool = False  # greedy validation
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1


class RolloutConfig(Section):
    name: str = "vllm"
    # Generation is one blocking call to the engine per batch (verl's `sync`); verl's `async` agent-loop
    # server mode is not implemented here.
    mode: Literal["sync"] = "sync"
    load_format: str = "safetensors"
    # Gather the LoRA tensors one decoder layer at a time (adapter sync and the final adapter); merged sync
    # always goes layer by layer, so there it changes nothing (config/inert.py warns).
    layered_summon: bool = False
    lora_sync: Literal["auto", "adapter", "merged"] = "auto"
    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    response_length: Optional[int] = None  # None: data.max_response_length
    gpu_memory_utilization: float = 0.5
    tensor_model_parallel_size: int = 1
    # verl's hybrid engine: on CUDA the engine frees its KV cache and offloads its weights while the actor
    # computes on the same GPU (vLLM sleep mode) and wakes before the weight sync. No effect on CPU.
    free_cache_engine: bool = True
    max_num_seqs: int = 256
    max_model_len: Optional[int] = None
    max_lora_rank: Optional[int] = None  # None: lora_rank rounded up to a value vLLM accepts
    enforce_eager: bool = True
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Keep the engine's log-prob of each sampled token (verl's name): the rollout_corr/ mismatch metrics are then
    # logged every step, and algorithm.rollout_correction needs it.
    calculate_log_probs: bool = False
    log_prob_micro_batch_size_per_gpu: int = 16
    log_prob_use_dynamic_bsz: Optional[bool] = None  # None: actor.use_dynamic_bsz
    log_prob_max_token_len_per_gpu: Optional[int] = None  # None: actor.ppo_max_token_len_per_gpu
    val_kwargs: ValKwargs = Field(default_factory=ValKwargs)
    multi_turn: MultiTurnConfig = Field(default_factory=MultiTurnConfig)  # tool-using rollouts (multi_turn_schema)
    agent: AgentConfig = Field(default_factory=AgentConfig)


class RefConfig(Section):
    log_prob_micro_batch_size_per_gpu: int = 16  # rows per micro-batch of the reference log-prob pass
    fsdp_config: RefFSDPConfig = Field(default_factory=RefFSDPConfig)


class ActorRolloutRefConfig(Section):
    # The actor, rollout and reference always share the workers' resources (verl's hybrid engine); separate
    # actor and rollout pools (false) are not implemented.
    hybrid_engine: Literal[True] = True
    model: ModelConfig = Field(default_factory=ModelConfig)
    actor: ActorConfig = Field(default_factory=ActorConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    ref: RefConfig = Field(default_factory=RefConfig)


# ------------------------------------------------------------------------------------------------------ critic
class CriticConfig(Section):
    """PPO's critic: a second LoRA adapter plus a value head on the actor's base model."""

    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-4))
    cliprange_value: float = 0.5
    ppo_micro_batch_size_per_gpu: int = 8
    ppo_epochs: Optional[int] = None  # None: actor.ppo_epochs
    grad_clip: float = 1.0
    loss_agg_mode: str = "token-mean"


# --------------------------------------------------------------------------------------------------- algorithm
class KLControlConfig(Section):
    type: Literal["fixed", "adaptive"] = "fixed"
    kl_coef: float = 0.001
    horizon: int = 10000
    target_kl: float = 0.1


class FilterGroupsConfig(Section):
    """DAPO's dynamic sampling: drop groups whose rewards are all equal, resample to fill the batch."""

    enable: bool = False
    metric: str = "acc"
    max_num_gen_batches: int = 10


class RolloutCorrectionConfig(Section):
    """verl's rollout-training mismatch correction (stages/train/rollout_corr.py); off unless set."""

    rollout_is: Optional[Literal["token", "sequence"]] = None  # truncated importance sampling level
    rollout_is_threshold: float = 2.0  # cap on an importance weight
    rollout_rs: Optional[str] = None  # rejection sampling options, comma-separated: token_k1, seq_mean_k3, ...
    rollout_rs_threshold: Optional[Union[str, float]] = None  # k1: "lower_upper" ratio bounds; k2/k3: upper
    bypass_mode: bool = False  # the engine's log-probs serve as the old log-probs (no separate pass)


class AlgorithmConfig(Section):
    adv_estimator: str = "grpo"
    gamma: float = 1.0
    lam: float = 1.0
    norm_adv_by_std_in_grpo: bool = True
    use_kl_in_reward: bool = False
    kl_penalty: str = "kl"  # KL estimator used in the reward: kl (k1), abs, mse (k2), low_var_kl (k3), k3+
    kl_ctrl: KLControlConfig = Field(default_factory=KLControlConfig)
    filter_groups: FilterGroupsConfig = Field(default_factory=FilterGroupsConfig)
    rollout_correction: RolloutCorrectionConfig = Field(default_factory=RolloutCorrectionConfig)


# -------------------------------------------------------------------------------------------------------- data
class DataConfig(Section):
    train_files: Union[str, list[str]] = "~/data/arithmetic/train.parquet"
    val_files: Union[str, list[str]] = "~/data/arithmetic/test.parquet"
    prompt_key: str = "prompt"
    train_batch_size: int = 8  # prompts per step
    val_batch_size: Optional[int] = Field(default=None, ge=1)  # prompts per validation generate call; None: all
    max_prompt_length: int = 256
    max_response_length: int = 64
    filter_overlong_prompts: bool = True
    truncation: Literal["error", "left", "right"] = "error"
    shuffle: bool = True
    seed: int = 1
    val_max_samples: Optional[int] = None
    return_raw_chat: bool = False  # keep each row's messages for the agent loops (multi_turn.enable needs it)
    # When the train/val files are missing, write them first with the named generator (the demo's
    # `arithmetic`, the same as `pipeline data make-arithmetic`). None: a missing file is an error.
    generate_if_missing: Optional[Literal["arithmetic"]] = None
    generate_kwargs: dict[str, Any] = Field(default_factory=dict)  # e.g. {ops: ["-"], n_test: 32}


class OverlongBufferConfig(Section):
    """DAPO's overlong reward shaping: a linear penalty over the last `len` tokens of the budget."""

    enable: bool = False
    len: int = 16
    penalty_factor: float = 1.0
    log: bool = False  # log the shaping as metrics: reward/overlong_reward (mean penalty), reward/overlong (share)


class RewardModelConfig(Section):
    enable: bool = False  # model-based rewards are not supported; rule-based and custom scorers are
    # Both run the same thing here: the scorer on each decoded response, then DAPO's overlong shaping when
    # overlong_buffer.enable (verl's `naive` manager ignores overlong_buffer; its `dapo` one applies it).
    # verl's `batch` and `prime` managers are not implemented.
    reward_manager: Literal["naive", "dapo"] = "naive"
    scorer: Optional[str] = None  # one registered scorer for every row (e.g. gsm8k_flexible); None: by data_source
    overlong_buffer: OverlongBufferConfig = Field(default_factory=OverlongBufferConfig)


class CustomRewardFunctionConfig(Section):
    path: Optional[str] = None
    name: str = "compute_score"


# ----------------------------------------------------------------------------------------------------- trainer
class TrainerConfig(Section):
    project_name: str = "lora-pipeline"
    experiment_name: str = "default"
    logger: Union[str, list[str]] = ["console", "mlflow"]
    nnodes: int = 1
    n_gpus_per_node: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_workers: int = 1  # actor workers on a CPU-only machine
    # Ray placement group strategy for the actor ranks' bundles (stages/train/placement.py): PACK fills a node
    # first, SPREAD puts ranks on different nodes.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    total_epochs: int = 1
    total_training_steps: Optional[int] = None
    save_freq: int = -1
    max_actor_ckpt_to_keep: Optional[int] = None  # keep the newest N checkpoints (None: all), as in verl
    test_freq: int = -1
    val_before_train: bool = True
    default_local_dir: str = "checkpoints/${trainer.project_name}/${trainer.experiment_name}"
    resume_mode: Literal["auto", "disable", "resume_path"] = "auto"
    resume_from_path: Optional[str] = None
    seed: int = 1
    critic_warmup: int = 0
    # Ours: every N steps, check after the weight sync that the rollout engine's log-probs on a few fixed tokens
    # moved with the actor's (stages/train/sync_guard.py); the run fails naming the step if not. 0: never.
    sync_check_freq: int = Field(default=1, ge=0)
    mlflow_tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else a local sqlite store
    # verl's dumps (stages/train/dumps.py): one JSONL per step of every sampled response with its score, never
    # overwriting; and N validation samples as a table in the trackers (MLflow: an artifact) and the outputs.
    rollout_data_dir: Optional[str] = None
    validation_data_dir: Optional[str] = None
    log_val_generations: int = Field(default=0, ge=0)


class RayInitConfig(Section):
    address: Optional[str] = None  # None: start a local Ray; "auto" or host:port joins a cluster
    num_cpus: Optional[int] = None


class Config(Section):
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    actor_rollout_ref: ActorRolloutRefConfig = Field(default_factory=ActorRolloutRefConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    reward_model: RewardModelConfig = Field(default_factory=RewardModelConfig)
    custom_reward_function: CustomRewardFunctionConfig = Field(default_factory=CustomRewardFunctionConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    ray_init: RayInitConfig = Field(default_factory=RayInitConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    # Where each key set by a layer came from (`a.b.c -> "the command line"`), filled by `load_config`; not
    # part of the config's values, its YAML or its digest.
    _sources: dict[str, str] = PrivateAttr(default_factory=dict)

    def source_of(self, key: str) -> str:
        """Where the value of dotted `key` came from: a config file, the command line, or the schema default."""
        return self._sources.get(key, "the schema default" if self._sources else "the config")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Every leaf as `a.b.c -> value` (MLflow params, diffs)."""
        return dict(_flatten(self.to_dict()))

    def digest(self) -> str:
        """A stable sha256 of the resolved config (lineage)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()
