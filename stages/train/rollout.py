"""The vLLM rollout engine: generates responses with the current policy and receives weight syncs in place.

A plain class so the trainer can wrap it as a Ray actor (`ray.remote(num_cpus=1)(RolloutEngine)`) and tests or
scripts can use it in-process (vLLM starts its engine core in a subprocess: callers need a `__main__` guard).

Two ways to bring the engine up to date after an actor update (`actor_rollout_ref.rollout.lora_sync`):
- adapter: LoRA enabled in vLLM; the trainer writes the adapter (sync_format.write_adapter) and
  `update_adapter` reloads it in place under one stable LoRA id. Few bytes per sync, but every decode step runs
  the LoRA kernels, which are slow on CPU.
- merged: LoRA disabled; the trainer writes W + (alpha/r)·B·A (sync_format.MergedModelWriter) and
  `update_merged` reloads the base weights in place. More bytes per sync, rollouts at base speed.
"""

from __future__ import annotations

import logging
import os
import time

from ground.errors import ConfigError
from ground.logs import redirect_process_output
from ground.processes import child_pids, remove_files, shm_segments_of
from ground.vllm_lora import VLLM_LORA_RANKS, max_lora_rank_for, stable_lora_id

log = logging.getLogger(__name__)

SYNC_MODES = ("adapter", "merged")
ADAPTER_NAME = "policy"


def vllm_max_lora_rank(rank: int) -> int:
    """`ground.vllm_lora.max_lora_rank_for` for the training config: an error names the config key."""
    if rank < 1:
        raise ConfigError(f"actor_rollout_ref.model.lora_rank={rank} must be >= 1.")
    allowed = max_lora_rank_for(rank)
    if allowed is not None:
        return allowed
    raise ConfigError(
        f"actor_rollout_ref.model.lora_rank={rank} is above {VLLM_LORA_RANKS[-1]}, the largest LoRA rank the vLLM "
        f"rollout engine supports (it accepts max_lora_rank in {list(VLLM_LORA_RANKS)}). "
        f"Set actor_rollout_ref.model.lora_rank to {VLLM_LORA_RANKS[-1]} or less."
    )


def resolve_sync_mode(lora_sync: str, device: str) -> str:
    """`auto` -> `merged` on CPU (vLLM's CPU LoRA kernels are slow), `adapter` on CUDA (few bytes per sync)."""
    if lora_sync in SYNC_MODES:
        return lora_sync
    if lora_sync != "auto":
        raise ConfigError(
            f"actor_rollout_ref.rollout.lora_sync={lora_sync!r} is not one of auto, adapter, merged. "
            "Set actor_rollout_ref.rollout.lora_sync=auto."
        )
    return "adapter" if str(device).startswith("cuda") else "merged"


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _use_every_allowed_core() -> None:
    """Compute threads = the cores this process may run on, set before vLLM's CPU worker freezes the count.

    Ray gives an actor with num_cpus=1 OMP_NUM_THREADS=1, and vLLM 0.32's CPU backend binds threads to cores only
    in its multiprocess executor, not in the single-process one a one-shard engine uses, so the engine decoded
    on one thread (one core of two here, measured: 99.9% CPU, 74 tokens/s). The engine and the actor workers take
    turns (generate, then update), so while it generates the engine can have every core.
    """
    import torch

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, threads))


def sampling_params(*, n: int, max_tokens: int, temperature: float, top_p: float, top_k: int | None,
                    greedy: bool = False):
    """vLLM SamplingParams of a rollout: the sampled token's own log-prob, ids only (no detokenizing)."""
    from vllm import SamplingParams

    return SamplingParams(
        n=n,
        max_tokens=max_tokens,
        temperature=0.0 if greedy else temperature,
        top_p=1.0 if greedy else top_p,
        top_k=0 if greedy or top_k is None or top_k < 1 else top_k,
        logprobs=0,  # the sampled token's own log-prob, nothing else
        detokenize=False,  # the trainer works on ids; skipping text saves CPU
    )


class RolloutEngine:
    """vLLM `LLM` with the policy's current weights. See the module docstring for the two sync modes.

    Log-probs (`generate`'s "logprobs", `score`) are vLLM's raw log-probs: log-softmax of the model's logits,
    before temperature, top-k or top-p, i.e. the policy's distribution at temperature 1.
    """

    def __init__(self, model_dir: str, rollout_cfg: dict, *, lora_rank: int, max_model_len: int, seed: int,
                 sync_mode: str, max_loras: int = 1):
        if sync_mode not in SYNC_MODES:
            raise ConfigError(f"sync_mode={sync_mode!r} must be one of {SYNC_MODES} (resolve `auto` first).")
        redirect_process_output("rollout")  # vLLM's own output too: into the run's log file, not the console
        from vllm import LLM

        self.model_dir = str(model_dir)
        self.sync_mode = sync_mode
        self.max_model_len = int(max_model_len)
        self._lora_request = None  # set by the first update_adapter
        self._lora_id = stable_lora_id(f"{ADAPTER_NAME}:{self.model_dir}")
        self._llm = None
        kwargs = dict(
            model=self.model_dir,
            load_format=rollout_cfg.get("load_format", "safetensors"),
            gpu_memory_utilization=rollout_cfg.get("gpu_memory_utilization", 0.5),
            tensor_parallel_size=rollout_cfg.get("tensor_model_parallel_size", 1),
            dtype=rollout_cfg.get("dtype", "auto"),
            enforce_eager=rollout_cfg.get("enforce_eager", True),
            # engine-level seed: a per-request SamplingParams(seed=...) crashes vLLM's CPU engine
            seed=seed,
            max_model_len=self.max_model_len,
            max_num_seqs=rollout_cfg.get("max_num_seqs", 256),
        )
        self._sleeping = False
        self.sleep_mode = bool(rollout_cfg.get("free_cache_engine")) and _on_cuda()
        if self.sleep_mode:  # colocated with an actor rank: give the GPU memory back while the actor computes
            kwargs["enable_sleep_mode"] = True
        if int(kwargs["tensor_parallel_size"]) > 1 and _on_cuda():
            # shards started by vLLM's Ray executor inside our placement group (stages/train/placement.py)
            kwargs["distributed_executor_backend"] = "ray"
        if sync_mode == "adapter":
            configured = rollout_cfg.get("max_lora_rank")
            max_rank = vllm_max_lora_rank(max(lora_rank, configured or 0))
            # max_loras > 1: a fleet's engine holds every member's adapter (stages/train/fleet/engine.py)
            kwargs.update(enable_lora=True, max_lora_rank=max_rank, max_loras=max_loras, max_cpu_loras=max_loras)
        if not _on_cuda():
            _use_every_allowed_core()
        log.info("starting vLLM rollout engine (%s sync) on %s", sync_mode, self.model_dir)
        t0 = time.perf_counter()
        children_before = child_pids()
        self._llm = LLM(**kwargs)
        # The processes this engine started (its engine core), whose shared memory `shutdown` cleans up.
        self._engine_pids = sorted(child_pids() - children_before)
        self.start_seconds = time.perf_counter() - t0
        log.info("rollout engine up in %.1f s", self.start_seconds)

    # -- generation ---------------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], *, n: int, max_tokens: int | list[int], temperature: float,
                 top_p: float, top_k: int, greedy: bool = False) -> list[list[dict]]:
        """For each prompt (token ids), n responses: {"token_ids", "logprobs" (of each sampled token), "finish_reason"}.

        `max_tokens` is one budget for all prompts, or one per prompt (multi-turn samples are at different turns).
        """
        def params(budget: int):
            return sampling_params(n=n, max_tokens=budget, temperature=temperature, top_p=top_p, top_k=top_k,
                                   greedy=greedy)

        per_prompt = [params(b) for b in max_tokens] if isinstance(max_tokens, list) else params(max_tokens)
        return self.generate_with(prompts, per_prompt, self._lora_request)

    def generate_with(self, prompts: list[list[int]], params, lora_requests) -> list[list[dict]]:
        """One vLLM call: `params` and `lora_requests` are one for all prompts or one per prompt."""
        from vllm.inputs import TokensPrompt

        outputs = self._llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                     lora_request=lora_requests, use_tqdm=False)
        results = []
        for out in outputs:
            samples = []
            for comp in out.outputs:
                ids = list(comp.token_ids)
                logprobs = [float(step[tok].logprob) for tok, step in zip(ids, comp.logprobs)]
                samples.append({"token_ids": ids, "logprobs": logprobs, "finish_reason": str(comp.finish_reason)})
            results.append(samples)
        return results

    def score(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """Log-prob of each response token given the prompt and the response before it, under the current weights."""
        return self.score_many([(prompt_ids, response_ids)])[0]

    def score_many(self, pairs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """`score` for many (prompt_ids, response_ids) pairs in one engine call."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        for prompt, response in pairs:
            if not prompt or not response:
                raise ValueError("score needs a non-empty prompt and response")
            if len(prompt) + len(response) >= self.max_model_len:
                raise ValueError(f"prompt+response is {len(prompt) + len(response)} tokens; max_model_len is "
                                 f"{self.max_model_len}")
        # prompt_logprobs=0 asks for the log-prob of each actual prompt token only (vLLM always includes the
        # actual token, whether or not it is in the top-k); position i is log p(x_i | x_<i).
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self._llm.generate([TokensPrompt(prompt_token_ids=list(p) + list(r)) for p, r in pairs], params,
                                     lora_request=self._lora_request, use_tqdm=False)
        scores = []
        for (prompt, response), out in zip(pairs, outputs):
            full = list(prompt) + list(response)
            per_position = out.prompt_logprobs
            scores.append([float(per_position[i][full[i]].logprob) for i in range(len(prompt), len(full))])
        return scores

    # -- weight sync ----------------------------------------------------------------------------------------------
    def update_adapter(self, adapter_dir: str) -> dict:
        """Load (first call) or reload in place (later calls) the PEFT adapter in adapter_dir under one LoRA id.

        The load happens here, not lazily at the next generate, so the returned seconds are the whole reload.
        """
        if self.sync_mode != "adapter":
            raise RuntimeError("update_adapter needs sync_mode='adapter'; this engine runs merged weights")
        from vllm.lora.request import LoRARequest

        t0 = time.perf_counter()
        reload = LoRARequest(ADAPTER_NAME, self._lora_id, str(adapter_dir), load_inplace=True)
        self._llm.llm_engine.add_lora(reload)
        # Requests then name the same id without load_inplace: vLLM would otherwise reload it at every step.
        self._lora_request = LoRARequest(ADAPTER_NAME, self._lora_id, str(adapter_dir))
        # Cached prefix KV was computed with the old adapter under the same id: drop it.
        self._llm.reset_prefix_cache()
        return {"seconds": time.perf_counter() - t0}

    def update_merged(self, model_dir: str) -> dict:
        """Replace the engine's weights in place with those in model_dir (a MergedModelWriter folder)."""
        if self.sync_mode != "merged":
            raise RuntimeError("update_merged needs sync_mode='merged'; this engine has LoRA enabled")
        t0 = time.perf_counter()
        self._llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir)})
        self._llm.reset_prefix_cache()  # KV cached under the old weights is stale
        return {"seconds": time.perf_counter() - t0}

    def sleep(self) -> None:
        """Free the KV cache and offload the weights (CUDA sleep mode only; a no-op otherwise)."""
        if self.sleep_mode and not self._sleeping:
            self._llm.sleep(level=1)
            self._sleeping = True

    def wake_up(self) -> None:
        if self._sleeping:
            self._llm.wake_up()
            self._sleeping = False

    @property
    def lora_ids(self) -> set[int]:
        """LoRA ids loaded in the engine (one at most; stays the same id across reloads)."""
        return set(self._llm.llm_engine.list_loras()) if self.sync_mode == "adapter" else set()

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the engine core subprocess and remove the shared-memory segments it mapped. Safe to call twice."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        segments = shm_segments_of(self._engine_pids)
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # the engine may already be gone (killed, crashed); cleanup below still runs
            log.warning("rollout engine shutdown raised", exc_info=True)
        del llm
        import gc

        gc.collect()
        # a clean shutdown unlinks them; a crashed core leaves them in RAM
        if remove_files(segments):
            log.info("removed leftover shared memory of the rollout engine")

    def __enter__(self) -> "RolloutEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass
