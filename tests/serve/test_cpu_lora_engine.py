"""A real vLLM CPU engine with the segmented LoRA ops (ground/vllm_cpu_lora.py) serving 4 adapters and the base
in ONE batch: every request's greedy tokens equal transformers + PEFT's for its adapter, and so do the log-probs.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as the trainer runs it) so the test can see
that vLLM's general-plugin loading installed the ops. The requests interleave adapters (the same adapter at
non-adjacent positions) and include no-adapter requests, so decode takes the grouped path and -1 tokens share
the batch with all 4 slots occupied.

A batch of ONE adapter takes the merged-weight fast path (ground/vllm_cpu_lora_merged.py): counted, PEFT-equal,
and an adapter re-loaded in place with other weights (the same slot, as each training step does) answers with
the new weights, never the cached merge of the old ones.
"""

from __future__ import annotations

import gc
import os

import pytest

torch = pytest.importorskip("torch")

from ground.processes import shm_segments_of  # noqa: E402
from tests.serve.adapters import PROMPT, make_adapters  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

MAX_TOKENS = 8
LOGPROB_ATOL = 1e-3
# request order: adapters interleaved and repeated, base (None) requests among them
REQUEST_SEEDS = [1, 2, None, 3, 1, 4, 2, None, 4, 3]


@pytest.fixture(scope="module")
def four_adapters(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("cpu-lora")
    dirs, answers = make_adapters(tiny_model_dir, root, seeds=[1, 2, 3, 4], max_new_tokens=MAX_TOKENS)
    return dirs, answers


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from vllm import LLM

    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        env.delenv("LORA_PIPELINE_CPU_LORA_OPS", raising=False)
        env.delenv("LORA_PIPELINE_CPU_LORA_MERGED_SLOTS", raising=False)
        llm = LLM(model=str(tiny_model_dir), dtype="float32", enforce_eager=True, max_model_len=256,
                  gpu_memory_utilization=0.1, max_num_seqs=16, enable_lora=True, max_loras=4, max_lora_rank=8,
                  max_cpu_loras=4, seed=0)
        yield llm
        # the shared memory this process (which runs the engine) holds: none of it may outlive the engine
        segments = shm_segments_of([os.getpid()])
        llm.llm_engine.engine_core.shutdown()
        del llm
    gc.collect()
    assert not any(os.path.exists(s) for s in segments)


def _peft_logprobs(base_dir, adapter_dir, prompt_ids, response_ids) -> list[float]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model.eval()(input_ids=ids).logits[0].float(), dim=-1)
    return [logp[i - 1, ids[0, i]].item() for i in range(len(prompt_ids), ids.shape[1])]


def test_the_plugin_installed_the_segmented_ops(engine):
    import vllm.lora.punica_wrapper.punica_cpu as wrapper_module

    import ground.vllm_cpu_lora as segmented
    import ground.vllm_cpu_lora_fused as fused

    for name in segmented.PATCHED_NAMES:
        assert getattr(wrapper_module, name) is getattr(segmented, name)
    # and the fused per-layer path (tokens grouped once per forward, one shrink GEMM for all slices)
    assert wrapper_module.PunicaWrapperCPU.add_lora_linear is fused.add_lora_linear
    assert wrapper_module.PunicaWrapperCPU.update_metadata is fused.update_metadata


def test_four_adapters_in_one_batch_equal_peft(engine, four_adapters, tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    import vllm.lora.punica_wrapper.punica_cpu as wrapper_module

    import ground.vllm_cpu_lora as segmented
    import ground.vllm_cpu_lora_fused as fused

    dirs, answers = four_adapters
    prompt_ids = AutoTokenizer.from_pretrained(tiny_model_dir)(PROMPT).input_ids
    requests = {seed: LoRARequest(f"adapter-{seed}", seed, str(dirs[seed])) for seed in dirs}
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, detokenize=False,
                            ignore_eos=False)
    fused_calls = []  # the engine's LoRA layers must take the fused path, not fall back to vLLM's method
    original_fused = fused.add_lora_linear

    def counted(wrapper, y, x, *args, **kwargs):
        fused_calls.append(x.shape[0] == wrapper._segmented_groups[0])
        return original_fused(wrapper, y, x, *args, **kwargs)

    monkeypatch.setattr(wrapper_module.PunicaWrapperCPU, "add_lora_linear", counted)
    all_slot_calls = fused.stats["all_slot_calls"]
    outputs = engine.generate([TokensPrompt(prompt_token_ids=prompt_ids)] * len(REQUEST_SEEDS), params,
                              lora_request=[requests.get(seed) for seed in REQUEST_SEEDS], use_tqdm=False)

    assert fused_calls and all(fused_calls)
    assert fused.stats["all_slot_calls"] > all_slot_calls  # the mixed decode batches took the all-slot products
    distinct = {tuple(answers[seed]) for seed in answers}
    assert len(distinct) == len(answers)  # 4 adapters and the base answer differently: a mix-up would show
    peft_logprobs = {}
    for seed, out in zip(REQUEST_SEEDS, outputs):
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        expected = answers[seed]
        assert ids == expected, f"adapter {seed}: engine {ids} != PEFT {expected}"
        if seed not in peft_logprobs:
            peft_logprobs[seed] = _peft_logprobs(tiny_model_dir, dirs.get(seed), prompt_ids, ids)
        got = [step[token].logprob for token, step in zip(ids, completion.logprobs)]
        assert got == pytest.approx(peft_logprobs[seed], abs=LOGPROB_ATOL), f"adapter {seed}"


def _greedy(engine, tiny_model_dir, lora_request, copies: int):
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt_ids = AutoTokenizer.from_pretrained(tiny_model_dir)(PROMPT).input_ids
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, detokenize=False)
    outputs = engine.generate([TokensPrompt(prompt_token_ids=prompt_ids)] * copies, params,
                              lora_request=lora_request, use_tqdm=False)
    return prompt_ids, [out.outputs[0] for out in outputs]


def test_a_single_adapter_batch_runs_on_merged_weights_and_equals_peft(engine, four_adapters, tiny_model_dir):
    from vllm.lora.request import LoRARequest

    import ground.vllm_cpu_lora_merged as merged

    dirs, answers = four_adapters
    before = dict(merged.stats)
    prompt_ids, completions = _greedy(engine, tiny_model_dir, LoRARequest("adapter-2", 2, str(dirs[2])), copies=3)
    assert merged.stats["merged_forwards"] > before["merged_forwards"]  # the fast path ran
    expected = _peft_logprobs(tiny_model_dir, dirs[2], prompt_ids, answers[2])
    for completion in completions:
        ids = list(completion.token_ids)
        assert ids == answers[2]
        got = [step[token].logprob for token, step in zip(ids, completion.logprobs)]
        assert got == pytest.approx(expected, abs=LOGPROB_ATOL)


def test_an_adapter_reloaded_in_place_answers_with_its_new_weights(engine, four_adapters, tiny_model_dir):
    """Same adapter id, same slot, new weights (load_inplace, as a training step's sync): no stale merge."""
    from vllm.lora.request import LoRARequest

    import ground.vllm_cpu_lora_merged as merged

    dirs, answers = four_adapters
    _, first = _greedy(engine, tiny_model_dir, LoRARequest("in-place", 9, str(dirs[1])), copies=2)
    assert [list(c.token_ids) for c in first] == [answers[1]] * 2
    merges = merged.stats["merges"]
    _, second = _greedy(engine, tiny_model_dir, LoRARequest("in-place", 9, str(dirs[3]), load_inplace=True),
                        copies=2)
    assert merged.stats["merges"] > merges  # the new weights were merged afresh
    assert [list(c.token_ids) for c in second] == [answers[3]] * 2


def test_an_adapter_reloaded_in_place_in_a_mixed_batch(engine, four_adapters, tiny_model_dir):
    """A mixed batch (the all-slot products, with their cached layouts) right after an in-place reload."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    dirs, answers = four_adapters
    prompt_ids = AutoTokenizer.from_pretrained(tiny_model_dir)(PROMPT).input_ids
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, detokenize=False)

    def mixed(moving_dir: str, inplace: bool) -> list[list[int]]:
        moving = LoRARequest("moving", 11, moving_dir, load_inplace=inplace)
        requests = [moving, LoRARequest("adapter-4", 4, str(dirs[4])), None] * 2
        outputs = engine.generate([TokensPrompt(prompt_token_ids=prompt_ids)] * len(requests), params,
                                  lora_request=requests, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]

    assert mixed(str(dirs[1]), inplace=False) == [answers[1], answers[4], answers[None]] * 2
    assert mixed(str(dirs[2]), inplace=True) == [answers[2], answers[4], answers[None]] * 2
