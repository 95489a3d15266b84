"""The vLLM rollout engine against PEFT/transformers on the tiny float32 model, in both sync modes.

One engine per mode for the whole module (an engine start costs ~30 s here).

Tolerance for log-probs: both sides compute in float32. vLLM fuses q/k/v and gate/up into single matmuls, applies
LoRA through its own kernels and uses its own attention kernel, so sums run in another order than in
transformers; float32 rounding (~6e-8 relative) on log-probs of magnitude ~log(384) ≈ 6 gives errors of order
1e-6. Measured here: at most 4.8e-7 (base and merged) and below 1e-5 (adapter). 1e-4 leaves room for other CPUs'
SIMD widths while staying 500x below MIN_ADAPTER_EFFECT, the least the adapter moves some log-prob, which the
tests also assert, so a sync that silently did nothing fails.
"""

from __future__ import annotations

import pytest
import torch

from ground.errors import ConfigError
from stages.train.rollout import RolloutEngine, resolve_sync_mode, vllm_max_lora_rank
from stages.train.sync_format import MergedModelWriter, merged_layers_from_peft, write_adapter

LOGPROB_ATOL = 1e-4
MIN_ADAPTER_EFFECT = 0.05  # the perturbed adapter must move some log-prob by more than this
LORA_RANK, LORA_ALPHA = 8, 16
ROLLOUT_CFG = dict(load_format="safetensors", gpu_memory_utilization=0.1, tensor_model_parallel_size=1,
                   dtype="float32", enforce_eager=True, max_num_seqs=8, max_lora_rank=None)
PROMPT = [5, 17, 42, 99, 7, 250, 12, 3, 64, 128]
RESPONSE = [33, 8, 200, 150, 9, 77, 301, 45]


# -- pure functions ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank,expected", [(1, 1), (2, 8), (8, 8), (9, 16), (16, 16), (17, 32), (64, 64),
                                           (65, 128), (300, 320), (321, 512), (512, 512)])
def test_vllm_max_lora_rank_rounds_up(rank, expected):
    assert vllm_max_lora_rank(rank) == expected


def test_vllm_max_lora_rank_above_max_names_key_and_limit():
    with pytest.raises(ConfigError) as err:
        vllm_max_lora_rank(513)
    assert "actor_rollout_ref.model.lora_rank=513" in str(err.value) and "512" in str(err.value)


def test_resolve_sync_mode():
    assert resolve_sync_mode("auto", "cpu") == "merged"
    assert resolve_sync_mode("auto", "cuda") == "adapter"
    assert resolve_sync_mode("adapter", "cpu") == "adapter"
    assert resolve_sync_mode("merged", "cuda:0") == "merged"
    with pytest.raises(ConfigError, match="lora_sync"):
        resolve_sync_mode("fast", "cpu")


# -- PEFT reference ---------------------------------------------------------------------------------------------
def _peft_model(model_dir, seed: int):
    """The tiny model with a rank-8 all-linear LoRA whose B is random (PEFT starts B at zero: a no-op adapter)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules="all-linear",
                                            lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


def _peft_config(model) -> dict:
    return model.peft_config["default"].to_dict()


@torch.no_grad()
def _hf_logprobs(model, prompt, response) -> list[float]:
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return [logp[i - 1, ids[0, i]].item() for i in range(len(prompt), ids.shape[1])]


@torch.no_grad()
def _hf_greedy(model, prompt, max_new_tokens) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def _write_merged(model, out_dir, base_dir) -> int:
    """Merge the adapter layer by layer, the way the actor does, and write every tensor."""
    writer = MergedModelWriter(out_dir, base_dir)
    for tensors in merged_layers_from_peft(model):
        writer.add(tensors)
    return writer.finish()


# -- adapter mode -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_engine(tiny_model_dir):
    with RolloutEngine(str(tiny_model_dir), ROLLOUT_CFG, lora_rank=LORA_RANK, max_model_len=256, seed=0,
                       sync_mode="adapter") as engine:
        yield engine


@pytest.mark.vllm
@pytest.mark.slow
def test_adapter_sync_matches_peft_and_reloads_in_place(adapter_engine, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base_lp = _hf_logprobs(base, PROMPT, RESPONSE)
    # before any adapter: the engine is the base model
    assert adapter_engine.score(PROMPT, RESPONSE) == pytest.approx(base_lp, abs=LOGPROB_ATOL)

    sync_dir = tmp_path / "adapter"
    first = _peft_model(tiny_model_dir, seed=1)
    nbytes = write_adapter(sync_dir, _lora_state(first), _peft_config(first))
    assert nbytes > 0
    out = adapter_engine.update_adapter(str(sync_dir))
    assert out["seconds"] > 0
    ids_after_first = adapter_engine.lora_ids
    assert len(ids_after_first) == 1

    expected = _hf_logprobs(first, PROMPT, RESPONSE)
    got = adapter_engine.score(PROMPT, RESPONSE)
    assert max(abs(a - b) for a, b in zip(expected, base_lp)) > MIN_ADAPTER_EFFECT  # the adapter matters
    assert got == pytest.approx(expected, abs=LOGPROB_ATOL)
    greedy_first = adapter_engine.generate([PROMPT], n=1, max_tokens=12, temperature=1.0, top_p=1.0, top_k=-1,
                                           greedy=True)[0][0]
    assert greedy_first["token_ids"] == _hf_greedy(first, PROMPT, 12)

    # (c) a second adapter written over the same folder replaces the first in place, under the same id
    second = _peft_model(tiny_model_dir, seed=2)
    write_adapter(sync_dir, _lora_state(second), _peft_config(second))
    adapter_engine.update_adapter(str(sync_dir))
    assert adapter_engine.lora_ids == ids_after_first
    expected2 = _hf_logprobs(second, PROMPT, RESPONSE)
    assert max(abs(a - b) for a, b in zip(expected2, expected)) > MIN_ADAPTER_EFFECT
    assert adapter_engine.score(PROMPT, RESPONSE) == pytest.approx(expected2, abs=LOGPROB_ATOL)


@pytest.mark.vllm
@pytest.mark.slow
def test_adapter_generate_shapes_and_sampled_logprobs(adapter_engine):
    prompts = [PROMPT, PROMPT[:4]]
    out = adapter_engine.generate(prompts, n=3, max_tokens=6, temperature=1.0, top_p=0.9, top_k=50)
    assert len(out) == 2 and all(len(samples) == 3 for samples in out)
    for samples, prompt in zip(out, prompts):
        for s in samples:
            assert 1 <= len(s["token_ids"]) <= 6 and len(s["logprobs"]) == len(s["token_ids"])
            assert s["finish_reason"] in ("length", "stop")
            assert all(lp <= 0.0 for lp in s["logprobs"])
            # the sampled-token log-probs are the model's raw (temperature-1) log-probs, as `score` gives
            assert adapter_engine.score(prompt, s["token_ids"]) == pytest.approx(s["logprobs"], abs=LOGPROB_ATOL)


# -- merged mode ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def merged_engine(tiny_model_dir):
    with RolloutEngine(str(tiny_model_dir), ROLLOUT_CFG, lora_rank=LORA_RANK, max_model_len=256, seed=0,
                       sync_mode="merged") as engine:
        yield engine


@pytest.mark.vllm
@pytest.mark.slow
def test_merged_sync_matches_peft_and_merge_and_unload(merged_engine, tiny_model_dir, tmp_path):
    model = _peft_model(tiny_model_dir, seed=3)
    expected = _hf_logprobs(model, PROMPT, RESPONSE)
    before = merged_engine.score(PROMPT, RESPONSE)
    assert max(abs(a - b) for a, b in zip(expected, before)) > MIN_ADAPTER_EFFECT

    nbytes = _write_merged(model, tmp_path / "merged", tiny_model_dir)
    base_bytes = sum(p.numel() * 4 for n, p in model.get_base_model().named_parameters() if ".lora_" not in n)
    assert nbytes >= base_bytes  # a full merged model: every base tensor, float32
    merged_engine.update_merged(str(tmp_path / "merged"))
    assert merged_engine.score(PROMPT, RESPONSE) == pytest.approx(expected, abs=LOGPROB_ATOL)

    merged_model = model.merge_and_unload()
    reference = _hf_greedy(merged_model, PROMPT, 16)
    got = merged_engine.generate([PROMPT], n=1, max_tokens=16, temperature=1.0, top_p=1.0, top_k=-1, greedy=True)
    ids = got[0][0]["token_ids"]
    assert ids == reference
