"""The config sections of the registry, publishing and serving (`registry.*`, `publish.*`, `serve.*`): ours, not
verl's. Part of `config.schema.Config`; kept apart so the training sections read as one file.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal, Optional

from pydantic import Field, field_validator, model_validator

from config.section import Section
from ground.capture_settings import folder_problem, hook_spec_problem
from ground.vllm_tool_parsers import unknown_tool_parser


class RegistryConfig(Section):
    uri: Optional[str] = None  # None: $PIPELINE_REGISTRY, else ./registry-store


class PublishConfig(Section):
    name: str = "arithmetic-grpo"
    alias: Optional[str] = "latest-good"
    tags: dict[str, str] = Field(default_factory=dict)
    min_improvement: float = 0.0  # publish only if adapter reward - base reward > this
    force: bool = False
    # Set (1-99): the new version gets `alias` (e.g. canary) and the name's route becomes prod=100-w alias=w, so
    # it takes w% of the bare name's traffic until `pipeline promote` or a rollback; no `prod` alias: alias only.
    canary_weight: Optional[int] = Field(default=None, ge=1, le=99)

    @model_validator(mode="after")
    def _canary_needs_alias(self):
        if self.canary_weight is not None and self.alias in (None, "prod"):
            raise ValueError(f"publish.canary_weight={self.canary_weight} routes that share of traffic to "
                             f"publish.alias, which is {self.alias!r}; set publish.alias=canary (any alias but prod)")
        return self


class AutoscalingConfig(Section):
    """Ray Serve's autoscaler for the replicated mode; unset (None) keeps a fixed `serve.replicas`."""

    min_replicas: Optional[int] = Field(default=None, ge=0)
    max_replicas: Optional[int] = Field(default=None, ge=1)
    target_ongoing_requests: Optional[float] = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _min_below_max(self):
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"serve.autoscaling.min_replicas ({self.min_replicas}) is above max_replicas "
                             f"({self.max_replicas}); set min_replicas <= max_replicas")
        return self

    def as_dict(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class RolloutConfig(Section):
    """Automatic rollback of a route's candidates while serving (serve/auto_rollback.py). Off by default: it writes
    to the registry, which a server otherwise only reads."""

    auto_rollback: bool = False
    # the sliding window the figures are taken over, and the answers a candidate needs in it before it is judged
    # (20 at a 10% canary is ~200 requests: few enough to stop a broken version early, enough that one unlucky
    # error is not 5%)
    window_s: float = Field(default=60.0, gt=0)
    min_requests: int = Field(default=20, ge=1)
    max_error_rate: float = Field(default=0.05, ge=0, le=1)  # 4xx + 5xx answers of the candidate, 0..1
    # the candidate's p90 end-to-end time over the heaviest target's (2xx answers only)
    max_latency_ratio: float = Field(default=2.0, gt=0)


class CaptureConfig(Section):
    """Recording what the served adapters were asked and answered (serve/capture.py). Off while `dir` is unset."""

    dir: Optional[str] = None  # the capture folder (created 0700); `pipeline serve --capture`
    rate: float = Field(default=1.0, ge=0, le=1)  # share of answered requests recorded
    redact: list[str] = Field(default_factory=list)  # regular expressions replaced in the text before writing
    redact_hook: Optional[str] = None  # `module:function`, str -> str, applied after the patterns
    max_shard_mb: float = Field(default=64.0, gt=0)  # a shard is closed and the next begun at this size

    @field_validator("redact")
    @classmethod
    def _patterns_compile(cls, patterns):
        # refused when the config loads, not when the serve stage starts after a whole training run
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regular expression ({exc}); fix the pattern "
                                 "(Python `re` syntax)") from None
        return patterns

    @field_validator("redact_hook")
    @classmethod
    def _hook_findable(cls, spec):  # its format and module, found without importing it (that runs the user's code)
        problem = spec and hook_spec_problem(spec)
        if problem:
            raise ValueError(f"{spec!r} {problem}")
        return spec

    @field_validator("dir")
    @classmethod
    def _folder_usable(cls, path):  # checked, not created: the server creates it when it starts
        problem = path and folder_problem(path)
        if problem:
            raise ValueError(f"{problem}; set it to a folder this user can create and write")
        return path


class ServeConfig(Section):
    enable: bool = False  # end the pipeline by serving what it published
    # above 1 (or with autoscaling / a Ray address): N vLLM replicas on Ray Serve behind one endpoint
    replicas: int = Field(default=1, ge=1)
    ray_address: Optional[str] = None  # None: start a local Ray; "auto" or host:port joins a cluster
    routing: Literal["multiplexed", "round_robin"] = "multiplexed"
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None
    max_loras: int = 4
    max_cpu_loras: Optional[int] = None  # None: as many as lora_cache_gib holds (serve/lora_tier.py)
    lora_cache_gib: float = 1.0  # host memory for loaded adapters, sizes max_cpu_loras
    # vLLM's KV cache in GiB (its --kv-cache-memory-bytes), the same in both modes and as `pipeline serve
    # --kv-cache-gib`: a fixed size works on a machine shared with other engines, where a memory fraction fails
    # or over-reserves.
    kv_cache_gib: float = Field(default=0.25, gt=0)
    # False: start the server, check that the published adapter answers one request, stop it (a smoke test
    # of what was published). True: keep serving in the foreground until Ctrl-C.
    keep_running: bool = False
    # vLLM's parser of the model's tool calls (`hermes` for what multi_turn.format=hermes trains): without one
    # vLLM refuses every tool_choice but "none" (auto, required, a named function) with a 400
    tool_call_parser: Optional[str] = None
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)

    @field_validator("tool_call_parser")
    @classmethod
    def _parser_vllm_knows(cls, name):
        # refused when the config loads, not when the serve stage starts after a whole training run
        problem = name is not None and unknown_tool_parser(name)
        if problem:
            raise ValueError(problem)
        return name

    REFUSED_VERL_KEYS: ClassVar[dict[str, str]] = {
        "gpu_memory_utilization": "the server sizes vLLM's KV cache in GiB, which overrides a memory fraction; "
                                  "set serve.kv_cache_gib",
    }
