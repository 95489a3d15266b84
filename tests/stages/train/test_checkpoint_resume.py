"""Kill a training run (SIGKILL, whole process tree) after a checkpoint, resume with trainer.resume_mode=auto.

RLOO, 6 steps, a checkpoint every 2. The resumed run must reach the same final step, redo only the steps after
the checkpoint, continue the optimizer (Adam's step count), the LR schedule (warmup) and the data position, and
its adapter must differ from the checkpointed one by no more than the steps it ran could move it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.stages.train.toy_task import toy_overrides

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

STEPS, SAVE_FREQ, LR, WARMUP = 6, 2, 1e-2, 6


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the run and every process it started (Ray's raylet/GCS, workers, the engine)."""
    import psutil

    try:
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = [proc.pid]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _load_adapter(step_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(step_dir / "adapter" / "adapter_model.safetensors"))


def test_kill_after_checkpoint_then_resume(tiny_model_dir, tmp_path):
    from pipeline.config import load_config
    from stages.train import train

    ckpt_root = tmp_path / "ckpts"
    overrides = toy_overrides(tiny_model_dir, tmp_path, STEPS, extra={
        "algorithm.adv_estimator": "rloo",
        "actor_rollout_ref.actor.optim.lr": LR,
        "actor_rollout_ref.actor.optim.lr_warmup_steps": WARMUP,
        "actor_rollout_ref.actor.optim.weight_decay": 0.0,
        "trainer.save_freq": SAVE_FREQ,
        "trainer.val_before_train": False,
        "trainer.default_local_dir": str(ckpt_root),
        "trainer.resume_mode": "auto",
    })
    code = "import sys; from pipeline.cli import cli_entry; sys.exit(cli_entry(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "train", *overrides], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = ckpt_root / "latest_checkpointed_iteration.txt"
    try:
        deadline = time.time() + 400
        while not pointer.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        _kill_tree(proc)
    assert pointer.is_file(), "the run never wrote a checkpoint"
    killed_at = int(pointer.read_text())
    assert killed_at < STEPS, "the run finished before it could be killed"
    saved = _load_adapter(ckpt_root / f"global_step_{killed_at}")

    cfg = load_config(None, overrides)
    outputs = train(cfg, str(tiny_model_dir), "fp")

    # Same final step; the history holds every step once, the resumed ones finite.
    assert outputs["steps"] == STEPS
    history = [json.loads(x) for x in Path(outputs["history_path"]).read_text().splitlines()]
    steps = [h for h in history if "reward/mean" in h]
    assert [h["step"] for h in steps] == list(range(1, STEPS + 1))
    for h in steps[killed_at:]:
        assert all(math.isfinite(v) for v in h.values() if isinstance(v, float))
    # The LR warmup continued where it stopped (a fresh scheduler would restart at LR/WARMUP).
    first_resumed = steps[killed_at]
    assert first_resumed["actor/lr"] == pytest.approx(LR * (killed_at + 1) / WARMUP)
    # Adam continued: its step count covers the steps before the kill too.
    optim = torch.load(ckpt_root / f"global_step_{STEPS}" / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in optim["state"].values()} == {STEPS}
    # The data position continued: 64 prompts / 4 per batch = 16 batches per epoch, STEPS consumed.
    state = json.loads((ckpt_root / f"global_step_{STEPS}" / "trainer_state.json").read_text())
    assert state["data"]["step_in_epoch"] == STEPS and state["data"]["epoch"] == 0
    # The resumed adapter = the checkpointed one + what (STEPS - killed_at) Adam steps can move: Adam moves a
    # weight by at most about lr per step (|m_hat / sqrt(v_hat)| <= ~1 here; 1.5 leaves room), weight decay is 0.
    final = _load_adapter(ckpt_root / f"global_step_{STEPS}")
    max_move = max((final[k] - saved[k]).abs().max().item() for k in saved)
    assert 0 < max_move <= 1.5 * LR * (STEPS - killed_at)
    # ... and the final adapter the stage returns is that checkpoint's adapter.
    from safetensors.torch import load_file

    returned = load_file(str(Path(outputs["adapter_dir"]) / "adapter_model.safetensors"))
    assert all(torch.equal(returned[k], final[k]) for k in final)
    # The resumed run continued the same MLflow run.
    assert outputs["mlflow_run_id"] == state["mlflow_run_id"]
