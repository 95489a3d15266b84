"""The fleet config: one YAML whose top level is the shared training config (the keys `pipeline train -c`
takes, verl names) plus `fleet.members:`, a list of the adapters to train at once.

    actor_rollout_ref: {model: {path: HuggingFaceTB/SmolLM2-135M-Instruct}}
    trainer: {total_training_steps: 20}
    fleet:
      members:
        - name: add
          data: {train_files: data/add/train.parquet, val_files: data/add/test.parquet}
          custom_reward_function: {path: examples/fleet/rewards.py, name: add_score}
        - name: spell
          data: {train_files: ..., val_files: ...}
          reward_model: {scorer: arithmetic}
          lora_rank: 8
          optim: {lr: 2e-5}

Each member gets a whole `Config` of its own: the shared keys with the member's keys laid over them, validated
as a single run's config is. Only the keys in MEMBER_KEYS may differ; any other key (the base, the algorithm,
the micro-batch layout, the strategy) is refused by name, because one actor and one engine serve every member.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ground.errors import ConfigError
from stages.train.fleet.members import FleetMember, check_members
from stages.train.fleet.rollout import check_batching

# A member's key (as written under fleet.members[i]) -> the shared config key it replaces for that member.
MEMBER_KEYS = {
    "data.train_files": "data.train_files",
    "data.val_files": "data.val_files",
    "reward_model.scorer": "reward_model.scorer",
    "custom_reward_function.path": "custom_reward_function.path",
    "custom_reward_function.name": "custom_reward_function.name",
    "lora_rank": "actor_rollout_ref.model.lora_rank",
    "lora_alpha": "actor_rollout_ref.model.lora_alpha",
    "target_modules": "actor_rollout_ref.model.target_modules",
    "optim.lr": "actor_rollout_ref.actor.optim.lr",
    "rollout.n": "actor_rollout_ref.rollout.n",
    "start_adapter": "actor_rollout_ref.model.lora_adapter_path",
    # each member's own publish gate (pipeline/fleet_pipeline.gate_member): one customer's bar may be higher
    "publish.min_improvement": "publish.min_improvement",
}
# The same keys spelled in full (verl names) are accepted too.
FULL_NAMES = {full: full for full in MEMBER_KEYS.values()}


@dataclass
class MemberSpec:
    """One member as parsed: its position, its whole config, and the settings the fleet actor needs."""

    index: int
    name: str
    cfg: Any  # config.Config: the shared config with this member's keys over it
    member: FleetMember
    start_adapter: str | None

    @property
    def where(self) -> str:
        return f"fleet.members[{self.index}] ({self.name})"


@dataclass
class FleetConfig:
    path: str
    shared: Any  # config.Config of the top level alone (what is the same for every member)
    members: list[MemberSpec]
    rollout_batching: str = "auto"  # how a step's members go to the engine (fleet/rollout.py)

    @property
    def target_modules(self):
        return self.shared.actor_rollout_ref.model.target_modules


def _flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _member_overrides(raw: Any, index: int) -> tuple[str, dict[str, Any]]:
    """(name, {full config key: value}) of one `fleet.members` entry; refuses keys that cannot differ."""
    from config import all_keys

    where = f"fleet.members[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} is {raw!r}, not a mapping. Write each member as `- name: NAME` followed by its "
                          "own keys (data.train_files, data.val_files, its reward, ...).")
    entry = dict(raw)
    name = entry.pop("name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where} has no name (got {name!r}). Give each member `name:`, the adapter name it "
                          "publishes under.")
    where = f"{where} ({name})"
    known = set(all_keys())
    overrides = {}
    for key, value in _flatten(entry).items():
        full = MEMBER_KEYS.get(key) or FULL_NAMES.get(key)
        if full is not None:
            overrides[full] = value
        elif key in known or any(k.startswith(key + ".") for k in known):
            raise ConfigError(f"{where}: key {key} cannot differ per member: one actor and one rollout engine serve "
                              "the whole fleet. Set it at the top level. Keys a member may set: "
                              f"{', '.join(MEMBER_KEYS)}.")
        else:
            raise ConfigError(f"{where}: unknown key {key}. Keys a member may set: {', '.join(MEMBER_KEYS)}.")
    for needed in ("data.train_files", "data.val_files"):
        if needed not in overrides:
            raise ConfigError(f"{where} has no {needed}: each member trains and validates on its own data. "
                              f"Set `data: {{{needed.split('.')[1]}: ...}}` under the member.")
    return name, overrides


def _refused_in_a_fleet(cfg) -> list[tuple[str, Any, str]]:
    """(key, value, why) of each shared setting the fleet's step would otherwise ignore silently. A verl user's
    key must do in a fleet what it does in a single run; where the fleet does not do it yet, it says so."""
    from stages.train.core_algos import needs_critic, needs_greedy_baseline

    arr, algo = cfg.actor_rollout_ref, cfg.algorithm
    optim, rc = arr.actor.optim, algo.rollout_correction
    found = []
    if algo.use_kl_in_reward:
        found.append(("algorithm.use_kl_in_reward", True, "the fleet's step does not subtract a KL penalty from the "
                      "rewards; use actor_rollout_ref.actor.use_kl_loss=true (a KL loss against the shared "
                      "reference, per member)"))
    if needs_critic(algo.adv_estimator):
        found.append(("algorithm.adv_estimator", algo.adv_estimator, "the fleet trains no critic (value model) "
                      "yet; use a critic-free estimator such as grpo, rloo or reinforce_plus_plus"))
    elif needs_greedy_baseline(algo.adv_estimator):
        found.append(("algorithm.adv_estimator", algo.adv_estimator, "the fleet does not roll out the greedy "
                      "baseline this estimator needs; use grpo or rloo"))
    if algo.filter_groups.enable:
        found.append(("algorithm.filter_groups.enable", True, "the fleet does not resample groups (DAPO's dynamic "
                      "sampling); leave it off"))
    for key in ("rollout_is", "rollout_rs"):
        if getattr(rc, key) is not None:
            found.append((f"algorithm.rollout_correction.{key}", getattr(rc, key), "the fleet's rollout does not "
                          "keep the engine's log-probs, which rollout correction needs; leave it unset"))
    if rc.bypass_mode:
        found.append(("algorithm.rollout_correction.bypass_mode", True, "the fleet's rollout does not keep the "
                      "engine's log-probs to use as the old ones; leave it off"))
    if arr.rollout.calculate_log_probs:
        found.append(("actor_rollout_ref.rollout.calculate_log_probs", True, "the fleet's rollout does not keep "
                      "the engine's log-probs (no rollout_corr/ metrics); leave it off"))
    if optim.lr_warmup_steps < 0 and optim.lr_warmup_steps_ratio > 0:
        found.append(("actor_rollout_ref.actor.optim.lr_warmup_steps_ratio", optim.lr_warmup_steps_ratio,
                      "a ratio of the run's steps, and each member's run length depends on its own data; set "
                      "actor_rollout_ref.actor.optim.lr_warmup_steps (a number of updates, counted per member)"))
    if arr.rollout.multi_turn.enable:
        found.append(("actor_rollout_ref.rollout.multi_turn.enable", True, "the fleet's rollout is one generate call "
                      "per prompt, without the agent loops that call tools; train tool-using adapters one run each"))
    if arr.rollout.agent.default_agent_loop:
        found.append(("actor_rollout_ref.rollout.agent.default_agent_loop", arr.rollout.agent.default_agent_loop,
                      "the fleet's rollout runs no agent loop; leave it unset"))
    if arr.model.share_prompt_forward:
        found.append(("actor_rollout_ref.model.share_prompt_forward", True, "the fleet's actor computes each row "
                      "in full (the same log-probs and gradients, without the speed-up); leave it off"))
    if cfg.trainer.critic_warmup > 0:
        found.append(("trainer.critic_warmup", cfg.trainer.critic_warmup, "the fleet has no critic and updates "
                      "the actor from the first step; set it to 0"))
    return found


def refuse_what_a_fleet_ignores(cfg, path: str | Path) -> None:
    """ConfigError naming the first shared setting a fleet cannot honour (see `_refused_in_a_fleet`)."""
    found = _refused_in_a_fleet(cfg)
    if found:
        key, value, why = found[0]
        others = f" (also refused here: {', '.join(k for k, _, _ in found[1:])})" if len(found) > 1 else ""
        raise ConfigError(f"Fleet config `{path}`: {key}={value!r} is not supported in fleet training: {why}.{others}")


def parse_fleet(path: str | Path, overrides: list[str] | None = None) -> FleetConfig:
    """Read and check a fleet YAML; `overrides` (`key=value`) apply to the shared part, as on `pipeline train`."""
    from config import load_config, read_yaml

    raw = read_yaml(path)
    fleet = raw.pop("fleet", None)
    if not isinstance(fleet, dict) or not isinstance(fleet.get("members"), list):
        raise ConfigError(f"Fleet config `{path}` has no `fleet.members:` list. Add `fleet: {{members: [...]}}` with "
                          "one entry per adapter (name, data.train_files, data.val_files, reward).")
    extra = sorted(set(fleet) - {"members", "rollout_batching"})
    if extra:
        raise ConfigError(f"Fleet config `{path}`: unknown key fleet.{extra[0]}; `fleet` holds `members` and "
                          "`rollout_batching`.")
    batching = check_batching(str(fleet.get("rollout_batching", "auto")), f"Fleet config `{path}`: fleet")
    shared = load_config(path, overrides, file_raw=raw)
    refuse_what_a_fleet_ignores(shared, path)  # the same for every member: these keys cannot differ per member
    members = []
    for index, entry in enumerate(fleet["members"]):
        name, member_keys = _member_overrides(entry, index)
        where = f"fleet.members[{index}] ({name})"
        # the member's keys are the last layer, as command-line overrides are (JSON is YAML: values parse back)
        member_over = list(overrides or []) + [f"{k}={json.dumps(v)}" for k, v in member_keys.items()]
        try:
            cfg = load_config(path, member_over, file_raw=json.loads(json.dumps(raw)))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        model = cfg.actor_rollout_ref.model
        if model.target_modules != shared.actor_rollout_ref.model.target_modules:
            # FleetLoRALinear gives every member a pair on each adapted layer; per-member layer sets are not built
            raise ConfigError(f"{where}: target_modules={model.target_modules!r} differs from the fleet's "
                              f"{shared.actor_rollout_ref.model.target_modules!r}; every member adapts the same "
                              "layers so far. Set target_modules at the top level only.")
        actor = cfg.actor_rollout_ref.actor
        member = FleetMember(name, lora_rank=int(model.lora_rank), lora_alpha=float(model.lora_alpha),
                             lr=float(actor.optim.lr), grad_clip=float(actor.grad_clip),
                             weight_decay=float(actor.optim.weight_decay), betas=tuple(actor.optim.betas))
        members.append(MemberSpec(index, name, cfg, member, model.lora_adapter_path))
    check_members([m.member for m in members])
    return FleetConfig(str(path), shared, members, batching)
