"""A fleet step's rollout (stages/train/fleet/rollout.py, engine.py): the choice between one call per member and
one mixed multi-LoRA call, and, on a real vLLM CPU engine, that a mixed call gives each member's rows that
member's adapter: greedy tokens equal transformers + PEFT's for the member, as one call per member gives them."""

from __future__ import annotations

import pytest

from ground.errors import ConfigError
from stages.train.fleet.rollout import BatchingChoice


def test_auto_tries_each_way_once_then_keeps_the_faster_per_token():
    choice = BatchingChoice("auto")
    assert choice.next_way(3) == "per_member"
    choice.record("per_member", seconds=6.0, tokens=300, live_members=3)  # 20 ms/token
    assert choice.next_way(3) == "mixed"
    choice.record("mixed", seconds=3.0, tokens=200, live_members=3)  # 15 ms/token: faster per token
    assert [choice.next_way(3) for _ in range(3)] == ["mixed"] * 3
    choice.record("mixed", seconds=99.0, tokens=1, live_members=3)  # later steps do not reopen the choice
    assert choice.next_way(3) == "mixed"
    assert choice.next_way(1) == "per_member"  # one member left: a single-adapter call either way

    slower_mixed = BatchingChoice("auto")
    slower_mixed.record("per_member", 2.0, 200, 2)
    slower_mixed.record("mixed", 3.0, 200, 2)
    assert slower_mixed.next_way(2) == "per_member"
    resumed = BatchingChoice("auto")
    resumed.load_state_dict(slower_mixed.state_dict())
    assert resumed.next_way(2) == "per_member" and resumed.trials == slower_mixed.trials


def test_a_one_member_step_is_not_a_trial_and_a_fixed_way_is_kept():
    choice = BatchingChoice("auto")
    choice.record("per_member", 1.0, 10, live_members=1)
    assert choice.trials == {} and choice.next_way(2) == "per_member"
    fixed = BatchingChoice("mixed")
    fixed.record("mixed", 1.0, 10, 3)
    assert fixed.next_way(3) == "mixed" and fixed.trials == {}
    fixed.load_state_dict({"chosen": "per_member"})  # a resumed run with a fixed way keeps the config's way
    assert fixed.next_way(3) == "mixed"


def test_a_misspelt_batching_is_refused_by_name(tmp_path):
    from stages.train.fleet.config import parse_fleet

    path = tmp_path / "fleet.yaml"
    path.write_text("fleet:\n  rollout_batching: mixt\n  members:\n    - name: a\n"
                    "      data: {train_files: a.parquet, val_files: b.parquet}\n")
    with pytest.raises(ConfigError, match=r"rollout_batching='mixt' is not one of auto, mixed, per_member"):
        parse_fleet(path)


@pytest.mark.slow
@pytest.mark.vllm
def test_a_mixed_call_gives_every_member_its_own_adapter(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from stages.train.fleet.engine import FleetEngine
    from tests.serve.adapters import PROMPT, make_adapters

    seeds = [1, 2, 3]
    dirs, answers = make_adapters(tiny_model_dir, tmp_path, seeds=seeds, max_new_tokens=6)
    assert len({tuple(answers[s]) for s in seeds}) == 3  # the adapters answer differently: a mix-up would show
    prompt = AutoTokenizer.from_pretrained(tiny_model_dir)(PROMPT).input_ids
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("LORA_PIPELINE_CPU_LORA_MERGED_SLOTS", "3")
    cfg = dict(load_format="safetensors", gpu_memory_utilization=0.1, dtype="float32", enforce_eager=True,
               max_num_seqs=16)
    engine = FleetEngine(str(tiny_model_dir), cfg, lora_rank=8, max_model_len=128, seed=0, members=3)
    try:
        for seed in seeds:
            engine.update_member(f"m{seed}", str(dirs[seed]))
        # members with different prompt counts (greedy: n=1), in an order that is not the slots' order
        calls = [{"name": f"m{seed}", "prompts": [prompt] * count, "n": n, "max_tokens": 6, "temperature": 1.0,
                  "top_p": 1.0, "top_k": -1, "greedy": True} for seed, count, n in ((2, 1, 1), (1, 3, 1), (3, 2, 1))]

        per_member = [engine.generate_member(c["name"], c["prompts"], n=c["n"], max_tokens=6, temperature=1.0,
                                             top_p=1.0, top_k=-1, greedy=True) for c in calls]
        for way, outputs in (("mixed", engine.generate_members(calls)), ("per_member", per_member)):
            for call, per_prompt in zip(calls, outputs):
                seed = int(call["name"][1:])
                assert len(per_prompt) == len(call["prompts"])
                for samples in per_prompt:
                    assert len(samples) == call["n"]
                    assert all(s["token_ids"] == answers[seed] for s in samples), (way, call["name"])
    finally:
        engine.shutdown()
