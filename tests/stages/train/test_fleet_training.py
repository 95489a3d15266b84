"""Fleet training end to end on the tiny model, through the real CLI (`pipeline train --fleet`): real Ray, one
real vLLM CPU engine with a LoRA slot per member, one FSDP2 actor over gloo. One 2-step run of five members
(three learn the toy task, one has no train file, one has a reward function that raises) is shared by the assertions; the last test
resumes it for a third step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tests.stages.train.fleet_helpers import write_fleet

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

GOOD = ("add", "sub", "spell")


def _cli(*args):
    from pipeline.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def fleet_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    path = write_fleet(tiny_model_dir, root, steps=2)
    out = root / "out"
    result = _cli("train", "--fleet", str(path), "--out-dir", str(out))
    assert result.exit_code == 0, result.output
    return {"root": root, "path": path, "out": out, "output": result.output,
            "outcome": json.loads((out / "fleet_outcome.json").read_text())}


def test_the_broken_member_fails_alone_with_its_error(fleet_run):
    members = fleet_run["outcome"]["members"]
    assert {n: m["status"] for n, m in members.items()} == {"add": "finished", "sub": "finished", "spell": "finished",
                                                            "nodata": "failed", "broken": "failed"}
    nodata = members["nodata"]["error"]
    assert nodata["type"] == "DataError" and "missing.parquet" in nodata["message"] and nodata["step"] == 1
    error = members["broken"]["error"]
    assert error["type"] == "RewardError" and "deliberately broken reward" in error["message"]
    assert error["step"] == 1 and members["broken"]["adapter_dir"] is None
    assert fleet_run["output"].count("deliberately broken reward") == 1  # said once, in the closing summary
    assert fleet_run["outcome"]["steps"] == 2
    entries = [json.loads(x) for x in (fleet_run["out"] / "history.jsonl").read_text().splitlines()]
    history = [h for h in entries if "timing/step" in h]
    assert [h["step"] for h in history] == [1, 2]
    for h in history:  # the others trained both steps; the broken one has no metrics after failing
        assert all(f"members/{n}/reward/mean" in h and f"members/{n}/actor/grad_norm" in h for n in GOOD)
        assert not any(k.startswith(("members/broken/", "members/nodata/")) for k in h)
    # rollout_batching=auto: step 1 one call per member, step 2 one mixed multi-LoRA call, then the faster one
    assert [h["timing/generate_mixed"] for h in history] == [0.0, 1.0]
    assert "fleet rollout: one call per member" in fleet_run["output"]
    # each member's own rollout.n: sub samples 2 per prompt, the others 4 (4 prompts per step)
    assert [history[0][f"members/{n}/rows"] for n in GOOD] == [16.0, 8.0, 16.0]
    # each member's held-out reward before training (adapters at B = 0: the base) and after the last step
    validation = [h for h in entries if "timing/step" not in h]
    assert [h["step"] for h in validation] == [2] and all(f"members/{n}/val/reward" in validation[0] for n in GOOD)
    for name in GOOD:
        assert isinstance(members[name]["val_reward_before"], float)
        assert members[name]["val_reward_after"] == validation[0][f"members/{name}/val/reward"]
    # the base is the same for every member and the toy reward is shared: equal rewards before training
    assert len({members[n]["val_reward_before"] for n in GOOD}) == 1
    assert members["broken"]["val_reward_before"] is None and members["nodata"]["val_reward_after"] is None


def test_each_finished_member_is_a_peft_adapter_of_its_own(fleet_run, tiny_model_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ranks = {"add": 8, "sub": 4, "spell": 2}
    weights = {}
    for name in GOOD:
        folder = Path(fleet_run["outcome"]["members"][name]["adapter_dir"])
        assert folder == fleet_run["out"] / "members" / name / "adapter"
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] == ranks[name]
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(folder))
        assert model.peft_config["default"].r == ranks[name]
        weights[name] = load_file(str(folder / "adapter_model.safetensors"))
        # trained: B moved away from its zero start
        assert any(t.abs().max() > 0 for k, t in weights[name].items() if "lora_B" in k)
    key = next(k for k in weights["add"] if "lora_B" in k)
    shapes = {n: tuple(weights[n][key].shape) for n in GOOD}
    assert len(set(shapes.values())) == 3  # each its own rank
    assert not (fleet_run["out"] / "members" / "broken").exists()
    assert not (fleet_run["out"] / "members" / "nodata").exists()


def test_resume_continues_every_member_from_the_last_checkpoint(fleet_run):
    out = fleet_run["out"]
    saved = torch.load(out / "checkpoints" / "global_step_2" / "fleet_lora.pt", weights_only=True)
    again = _cli("train", "--fleet", str(fleet_run["path"]), "--out-dir", str(out), "--resume",
                 "trainer.total_training_steps=3")
    assert again.exit_code == 0, again.output
    outcome = json.loads((out / "fleet_outcome.json").read_text())
    assert outcome["steps"] == 3
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "timing/step" in h] == [1, 2, 3]  # only the third step ran
    # the third step went the way the first two measured faster (kept in the checkpoint, not measured again)
    state = json.loads((out / "checkpoints" / "global_step_2" / "trainer_state.json").read_text())
    chosen = state["rollout_batching"]["chosen"]
    assert chosen in ("mixed", "per_member") and set(state["rollout_batching"]["trials"]) == {"mixed", "per_member"}
    assert [h for h in history if "timing/step" in h][-1]["timing/generate_mixed"] == float(chosen == "mixed")
    assert "fleet rollout: one call per member" not in again.output
    # the resumed run kept the validation before training from the checkpoint (it did not validate again)
    before = {n: m["val_reward_before"] for n, m in fleet_run["outcome"]["members"].items()}
    assert {n: m["val_reward_before"] for n, m in outcome["members"].items()} == before
    assert outcome["members"]["broken"]["status"] == "failed"  # its failure is remembered, not retried
    assert outcome["members"]["broken"]["error"]["step"] == 1
    # the third step continued step 2's weights and AdamW state: every stepped parameter is at step 3 (a fresh
    # start would be at 1), the broken member (index 4: never stepped) has no state
    resumed = torch.load(out / "checkpoints" / "global_step_3" / "fleet_lora.pt", weights_only=True)
    assert set(resumed) == set(saved)
    optim = torch.load(out / "checkpoints" / "global_step_3" / "fleet_optimizer.pt", weights_only=True)["state"]
    steps = {name.rsplit(".", 1)[-1]: float(state["step"]) for name, state in optim.items()}
    assert steps == {"0": 3.0, "1": 3.0, "2": 3.0}, steps  # members add, sub, spell; nodata/broken never stepped
    # each member's update count (its warmup and shuffle seed) continued too: a fresh count would read 1
    counts = json.loads((out / "checkpoints" / "global_step_3" / "fleet_updates.json").read_text())
    assert counts == {"add": 3, "sub": 3, "spell": 3, "nodata": 0, "broken": 0}, counts


def test_a_checkpointed_folder_is_not_restarted_by_accident(fleet_run):
    from ground.errors import StageError

    with pytest.raises(StageError, match="--resume to continue it, --force to start over"):
        _cli("train", "--fleet", str(fleet_run["path"]), "--out-dir", str(fleet_run["out"]))
