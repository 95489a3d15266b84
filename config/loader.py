"""Loading and validating the config (the schema itself is in `config.schema`).

A config is built from three layers, later ones winning: the schema's defaults, a YAML file (`-c FILE`) and
`a.b.c=value` overrides from the command line (verl/Hydra style; a leading `+` is accepted and ignored).
Unknown keys are errors that suggest the nearest valid key; cross-field rules live in `validate()`.
"""

from __future__ import annotations

import difflib
import logging
import posixpath
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ground.errors import ConfigError
from ground.mlflow_uri import CREDENTIAL_VARS, redact_uri, secret_parts

from config.inert import warn_inert_keys
from config.loggers import check_loggers
from config.schema import Config
from config.yaml_limits import MAX_BYTES, check_key_segments, load_bounded, read_bounded

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- loading
def all_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every valid dotted key of the schema, sections included."""
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.append(path)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(all_keys(ann, path + "."))
    return keys


def _unknown_key_error(path: str, source: str, section: type[BaseModel] | None = None) -> ConfigError:
    refused = getattr(section, "REFUSED_VERL_KEYS", None)
    if refused is not None:  # a verl section where several of verl's keys exist but are not honoured here
        parent, _, leaf = path.rpartition(".")
        why = f" ({refused[leaf]})" if leaf in refused else ""
        return ConfigError(
            f"Config key `{path}` (from {source}) is not supported{why}. `{parent}` supports: "
            f"{', '.join(section.model_fields)}."
        )
    keys = all_keys()
    close = difflib.get_close_matches(path, keys, n=1, cutoff=0.6)
    if not close:  # a right leaf under a wrong section, e.g. model.lora_rank
        leaf = path.rsplit(".", 1)[-1]
        close = [k for k in keys if k.endswith("." + leaf) or k == leaf][:1]
    hint = f" Did you mean `{close[0]}`?" if close else " Run `pipeline config show` to list the valid keys."
    return ConfigError(f"Unknown config key `{path}` (from {source}).{hint}")


def _check_keys(raw: dict[str, Any], model: type[BaseModel], source: str, prefix: str = "") -> None:
    for key, value in raw.items():
        path = f"{prefix}{key}"
        field = model.model_fields.get(key)
        if field is None:
            raise _unknown_key_error(path, source, model)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if not isinstance(value, dict):
                raise ConfigError(f"`{path}` (from {source}) is a section; give its keys, e.g. `{path}.<key>=...`.")
            _check_keys(value, ann, source, path + ".")


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(arg: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], parsed value). Values are parsed as YAML: True, 3, 1e-5, [a,b]."""
    if "=" not in arg:
        raise ConfigError(f"Override `{arg}` is not of the form key=value, e.g. `actor_rollout_ref.model.lora_rank=64`.")
    key, _, text = arg.partition("=")
    key = key.strip().lstrip("+~")
    check_key_segments(key, arg)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"Override `{arg}` has an empty key part.")
    try:
        value = load_bounded(text, f"The value of override `{key}`") if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key.split("."), value


def overrides_to_dict(overrides: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arg in overrides:
        parts, value = parse_override(arg)
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override `{arg}` sets a key under `{part}`, which an earlier override set to a value.")
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"Config file `{path}` does not exist. Pass an existing YAML file with -c, or none for the default demo.")
    try:
        data = load_bounded(read_bounded(p, f"Config file `{path}`"), f"Config file `{path}`") or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file `{path}` is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file `{path}` must hold a mapping of sections at the top level.")
    return data


def _interpolate(d: dict[str, Any], root: dict[str, Any], budget: list[int] | None = None) -> dict[str, Any]:
    """Resolve `${a.b}` references in string values (verl's checkpoint dir uses them).

    What the references add, over all values together, is bounded by MAX_BYTES: a small file of many
    `${a}` naming one large value would otherwise build gigabytes of strings."""
    budget = [MAX_BYTES] if budget is None else budget

    def lookup(match: re.Match) -> str:
        node: Any = root
        for part in match.group(1).split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"Config reference `${{{match.group(1)}}}` names no key.")
            node = node[part]
        text = str(node)
        budget[0] -= len(text)
        if budget[0] < 0:
            raise ConfigError(f"Config references (`${{...}}`) expand to more than {MAX_BYTES:,} characters in all "
                              f"(at `${{{match.group(1)}}}`); a reference names a short value such as a name or a "
                              "folder.")
        return text

    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out[key] = _interpolate(value, root, budget)
        elif isinstance(value, str) and "${" in value:
            out[key] = re.sub(r"\$\{([^}]+)\}", lookup, value)
        else:
            out[key] = value
    return out


# Choosing one of these algorithm names sets the recipe's defaults beneath the user's own keys: each stays
# overridable. (`ppo` and `dapo` are recipes; their advantage estimators are `gae` and `grpo`.)
ALGORITHM_PRESETS: dict[str, dict[str, Any]] = {
    # DAPO (https://arxiv.org/abs/2503.14476): clip-higher, token-mean loss, dynamic sampling, overlong shaping.
    "dapo": {
        "actor_rollout_ref": {"actor": {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "loss_agg_mode": "token-mean"}},
        "algorithm": {"filter_groups": {"enable": True}},
        "reward_model": {"overlong_buffer": {"enable": True}},
    },
}


DEFAULT_CONFIG = Path(__file__).parent / "cpu_quickstart.yaml"
EMBEDDED_DEFAULT = "the embedded default config (config/cpu_quickstart.yaml)"
COMMAND_LINE = "the command line"
DATA_PATH_KEYS = ("data.train_files", "data.val_files")
GENERATE_KEY = "data.generate_if_missing"


def _leaf_keys(raw: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            keys.extend(_leaf_keys(value, f"{prefix}{key}."))
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _scope_generation(raw: dict[str, Any], ranks: dict[str, int], sources: dict[str, str]) -> None:
    """Drop `data.generate_if_missing` when a data path was set in a later layer than the generator.

    The generator belongs to the paths it was set with: the embedded default's `data/arithmetic/*.parquet`, or
    paths the user named in the same file (or on the command line) where they asked for generation. A path the
    user typed after that (a `-c FILE` over the embedded default, or a command-line override) is their own
    data, and a missing one must be an error, never a file the demo writes (a typo would otherwise fill a new
    path with demo data, or, next to an existing file, overwrite it)."""
    data = raw.get("data") or {}
    if data.get("generate_if_missing") is None:
        return
    gen_rank = ranks.get(GENERATE_KEY, -1)
    later = [k for k in DATA_PATH_KEYS if ranks.get(k, -1) > gen_rank]
    if not later:
        return
    data["generate_if_missing"] = None
    sources[GENERATE_KEY] = (f"{sources[GENERATE_KEY]}, turned off because {' and '.join(later)} came from "
                             f"{sources[later[0]]}")
    log.debug("data.generate_if_missing is off: %s set by the user, so a missing file is an error, not generated "
             "(set data.generate_if_missing=arithmetic on the command line to generate into them).",
             " and ".join(later))


def load_config(config_file: str | Path | None = None, overrides: list[str] | None = None, *,
                file_raw: dict[str, Any] | None = None) -> Config:
    """Defaults <- algorithm preset <- YAML file <- overrides, then type checks and cross-field validation.

    Without a file, the embedded CPU demo (`config/cpu_quickstart.yaml`) is the file. The loaded
    config records where each key came from (`cfg.source_of("data.train_files")`). `file_raw`: the file's
    content already read (a fleet config passes its shared part, without its `fleet` section)."""
    raw: dict[str, Any] = {}
    layers: list[tuple[str, dict[str, Any]]] = []
    if file_raw is not None:
        _check_keys(file_raw, Config, f"config file {config_file}")
        layers.append((f"config file {config_file}", file_raw))
    elif config_file is None:
        file_raw = read_yaml(DEFAULT_CONFIG)
        _check_keys(file_raw, Config, f"config file {DEFAULT_CONFIG}")
        layers.append((EMBEDDED_DEFAULT, file_raw))
    else:
        file_raw = read_yaml(config_file)
        _check_keys(file_raw, Config, f"config file {config_file}")
        layers.append((f"config file {config_file}", file_raw))
    if overrides:
        over = overrides_to_dict(overrides)
        _check_keys(over, Config, COMMAND_LINE)
        layers.append((COMMAND_LINE, over))
    sources: dict[str, str] = {}
    ranks: dict[str, int] = {}
    for rank, (label, layer_raw) in enumerate(layers):
        raw = _deep_merge(raw, layer_raw)
        for key in _leaf_keys(layer_raw):
            sources[key], ranks[key] = label, rank
    _scope_generation(raw, ranks, sources)
    preset = ALGORITHM_PRESETS.get(str(raw.get("algorithm", {}).get("adv_estimator", "")))
    if preset:
        raw = _deep_merge(preset, raw)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "union[")))
        value = "" if loc in URI_KEYS else f" {err.get('input')!r}"  # a URI's value may hold a secret
        raise ConfigError(f"Config key `{loc}` has a bad value{value}: {err['msg']}.") from None
    cfg = Config.model_validate(_interpolate(cfg.to_dict(), cfg.to_dict()))
    cfg._sources = sources
    validate(cfg)
    warn_inert_keys(cfg)  # valid keys that change nothing in this mode (config/inert.py)
    check_uris(cfg)
    check_param_keys(cfg)
    return cfg


# Every key of the config becomes an MLflow param of the run (pipeline/tracking.py, the trainer's run), and MLflow
# refuses a whole batch for one bad key, after the run directory exists. Free-form sections
# (data.generate_kwargs) take any YAML key, so their keys are held to MLflow's rule here.
PARAM_KEY_RE = re.compile(r"[/\w.\- :]{1,250}")


def check_param_keys(cfg: Config) -> None:
    for key in cfg.flat():
        normal = posixpath.normpath(key)
        if not PARAM_KEY_RE.fullmatch(key) or normal != key or normal.startswith(("..", "/")):
            shown = key if len(key) <= 80 else f"{key[:80]}... ({len(key)} characters)"
            raise ConfigError(
                f"Config key `{shown}` (from {cfg.source_of(key)}) cannot be recorded as an MLflow param: keys "
                "are at most 250 characters of letters, digits, '_', '-', '.', ' ', ':' and '/', without '//', "
                "'/./', '..' or a leading '/'. Rename it."
            )


# A URI in the config ends up in the run's config.yaml, its MLflow params and its messages, so it must hold no
# secret; MLflow's client and our registry client take credentials from the environment instead.
URI_KEYS = ("registry.uri", "trainer.mlflow_tracking_uri")


def check_uris(cfg: Config) -> None:
    """Refuse user-info (`user:password@`) and a query (`?token=...`) in the config's URIs, showing neither."""
    for key in URI_KEYS:
        section, _, leaf = key.partition(".")
        value = getattr(getattr(cfg, section), leaf)
        parts = secret_parts(value) if value else []
        if not parts:
            continue
        where = f"`{key}={redact_uri(value)}` (from {cfg.source_of(key)})"
        if "user-info" in parts:
            raise ConfigError(
                f"{where} holds credentials; they would be written into the run's config.yaml and MLflow params. "
                f"Remove `user:password@` from the URI and set {CREDENTIAL_VARS} in the environment instead"
                + (" (a database tracking store takes its whole URI from $MLFLOW_TRACKING_URI, which is never "
                   "written into a run)." if key == "trainer.mlflow_tracking_uri" else ".")
            )
        raise ConfigError(
            f"{where} has a query or fragment (`?...`, `#...`), which may hold a token and would be written into "
            f"the run's config.yaml and MLflow params. Remove it; set {CREDENTIAL_VARS} in the environment for "
            "credentials" + (", or give the whole URI in $MLFLOW_TRACKING_URI, which is never written into a run."
                             if key == "trainer.mlflow_tracking_uri" else ".")
        )


# -------------------------------------------------------------------------------------------------- validation
SUPPORTED_STRATEGIES = ("fsdp", "fsdp2")
SUPPORTED_ROLLOUTS = ("vllm",)
SUPPORTED_LOAD_FORMATS = ("safetensors", "auto")


def validate(cfg: Config) -> None:
    """Cross-field rules. Each error names the key, the value and the fix."""
    m = cfg.actor_rollout_ref.model
    actor = cfg.actor_rollout_ref.actor
    rollout = cfg.actor_rollout_ref.rollout
    if m.lora_rank <= 0:
        raise ConfigError(
            f"actor_rollout_ref.model.lora_rank={m.lora_rank}: this project trains LoRA adapters only, so the rank "
            "must be > 0 (typical: 8-64). Set e.g. actor_rollout_ref.model.lora_rank=16."
        )
    if m.lora_alpha <= 0:
        raise ConfigError(
            f"actor_rollout_ref.model.lora_alpha={m.lora_alpha}: LoRA scales its update by alpha/rank, so alpha must be "
            "> 0 (commonly the rank or twice it). Set e.g. actor_rollout_ref.model.lora_alpha=32."
        )
    if actor.strategy not in SUPPORTED_STRATEGIES:
        raise ConfigError(
            f"actor_rollout_ref.actor.strategy={actor.strategy!r} is not supported; supported: fsdp (FSDP2). "
            "Set actor_rollout_ref.actor.strategy=fsdp."
        )
    if rollout.name not in SUPPORTED_ROLLOUTS:
        raise ConfigError(
            f"actor_rollout_ref.rollout.name={rollout.name!r} is not supported; supported: vllm. "
            "Set actor_rollout_ref.rollout.name=vllm."
        )
    if rollout.load_format not in SUPPORTED_LOAD_FORMATS:
        raise ConfigError(
            f"actor_rollout_ref.rollout.load_format={rollout.load_format!r} cannot be used with LoRA: the vLLM engine "
            "must hold the real base weights, because after each step it receives only the LoRA tensors (never the "
            "base). With 'dummy' the adapter would be applied to random weights. "
            "Set actor_rollout_ref.rollout.load_format=safetensors."
        )
    if not 0 < rollout.gpu_memory_utilization <= 1:
        raise ConfigError(
            f"actor_rollout_ref.rollout.gpu_memory_utilization={rollout.gpu_memory_utilization} must be in (0, 1]; on "
            "CPU it is the share of host RAM vLLM reserves (0.2-0.3 fits 24 GiB)."
        )
    if rollout.n < 1:
        raise ConfigError(f"actor_rollout_ref.rollout.n={rollout.n} must be >= 1 (responses per prompt).")
    for key in ("train_batch_size", "max_prompt_length", "max_response_length"):
        if getattr(cfg.data, key) <= 0:
            raise ConfigError(f"data.{key}={getattr(cfg.data, key)} must be > 0.")
    if actor.ppo_mini_batch_size <= 0 or actor.ppo_micro_batch_size_per_gpu <= 0:
        raise ConfigError("actor_rollout_ref.actor.ppo_mini_batch_size and ppo_micro_batch_size_per_gpu must be > 0.")
    budgets = {"actor_rollout_ref.actor.ppo_max_token_len_per_gpu": actor.ppo_max_token_len_per_gpu,
               "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu": rollout.log_prob_max_token_len_per_gpu}
    for key, value in budgets.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value} must be > 0 (tokens per micro-batch with use_dynamic_bsz; verl's "
                              "rule of thumb is 2-3x max_prompt_length + max_response_length).")
    check_loggers(cfg)  # known names, and the optional package of each installed (config/loggers.py)
    keep = cfg.trainer.max_actor_ckpt_to_keep
    if keep is not None and keep < 1:
        raise ConfigError(
            f"trainer.max_actor_ckpt_to_keep={keep} must be >= 1 (the newest checkpoint is what a resume needs), "
            "or null to keep every checkpoint."
        )
    if m.trust_remote_code:
        raise ConfigError(
            "actor_rollout_ref.model.trust_remote_code=True: this project loads only model architectures that "
            "transformers and vLLM implement themselves, and never runs Python code shipped inside a model folder. "
            "Set actor_rollout_ref.model.trust_remote_code=False (Llama, Qwen2/2.5/3, Mistral, Gemma and other "
            "native architectures need no remote code)."
        )
    if cfg.reward_model.enable:
        raise ConfigError(
            "reward_model.enable=True: model-based reward models are not supported; rewards come from the rule-based "
            "scorers (by data_source) or custom_reward_function.path. Set reward_model.enable=False."
        )
    # Registry-backed names in the algorithm sections are checked where the registries live (stages.train),
    # so this module does not import torch.
