"""Checkpoints: every `trainer.save_freq` steps, and `trainer.resume_mode=auto` picks up the latest one.

Layout under `trainer.default_local_dir` (verl's names):
    latest_checkpointed_iteration.txt      the step of the newest complete checkpoint
    global_step_<N>/
        adapter/                           the policy as a PEFT adapter (adapter_config.json keeps lora_alpha)
        critic.safetensors                 PPO only: the critic adapter and the value head (full tensors)
        optimizer.pt, scheduler.pt         full (unsharded) optimizer state keyed by parameter name, so a resume
        critic_optimizer.pt, ...           may use another number of workers
        rng_rank<r>.pt                     each worker's torch RNG state
        trainer_state.json                 step, data position, KL coefficient, driver RNG (written last)

A checkpoint is written into `global_step_<N>.partial` and renamed when complete, then the pointer file is
replaced atomically: a run killed while saving leaves the previous checkpoint as the latest. Our own files
load with `torch.load(weights_only=True)`; nothing foreign is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from ground.adapter_files import ADAPTER_WEIGHTS
from ground.errors import StageError
from ground.new_files import write_new_text

log = logging.getLogger(__name__)

LATEST = "latest_checkpointed_iteration.txt"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^global_step_(\d+)$")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"global_step_{step}"


def partial_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"global_step_{step}.partial"


# ---------------------------------------------------------------------------------------- worker side
def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def save_worker_state(worker, ckpt_dir: str) -> None:
    """Run on every rank (the gathers are collectives); rank 0 writes the shared files."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from stages.train import gather
    from stages.train.sync_format import write_adapter

    out = Path(ckpt_dir)
    rank0 = worker.rank == 0
    lora = gather.gather_lora(worker.model, layered=True)
    optim = get_optimizer_state_dict(worker.model, worker.optimizer, options=_options(cpu_offload=True))
    critic_tensors = critic_optim = None
    if worker.with_critic:
        critic_tensors = {n: gather.full_tensor(p).cpu().contiguous() for n, p in worker.model.named_parameters()
                          if p.requires_grad and not gather.is_policy_lora(n)}
        critic_optim = get_optimizer_state_dict(worker.model, worker.critic_optimizer,
                                                options=_options(cpu_offload=True))
    if rank0:
        write_adapter(out / "adapter", lora, worker.peft_config())
        torch.save(optim, out / "optimizer.pt")
        torch.save(worker.scheduler.state_dict(), out / "scheduler.pt")
        if worker.with_critic:
            save_file(critic_tensors, str(out / "critic.safetensors"))
            torch.save(critic_optim, out / "critic_optimizer.pt")
            torch.save(worker.critic_scheduler.state_dict(), out / "critic_scheduler.pt")
    torch.save(torch.get_rng_state(), out / f"rng_rank{worker.rank}.pt")


def load_worker_state(worker, ckpt_dir: str) -> dict:
    """Every rank reads the full tensors and keeps its own shard (the files are on a shared filesystem)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from stages.train import gather

    src = Path(ckpt_dir)
    saved = load_file(str(src / "adapter" / ADAPTER_WEIGHTS))
    names = {gather.peft_name(n): n for n, _ in worker.model.named_parameters() if gather.is_policy_lora(n)}
    if set(saved) != set(names):
        raise StageError(
            f"Checkpoint {src} does not match this model's LoRA layout (rank, target_modules or "
            f"exclude_modules changed since it was written). Resume with the original config, or start fresh "
            f"with trainer.resume_mode=disable."
        )
    state = {names[k]: v for k, v in saved.items()}
    if worker.with_critic:
        state.update(load_file(str(src / "critic.safetensors")))
    set_model_state_dict(worker.model, state, options=_options(strict=False))

    def load(name):
        return torch.load(src / name, weights_only=True)

    set_optimizer_state_dict(worker.model, worker.optimizer, load("optimizer.pt"), options=_options())
    worker.scheduler.load_state_dict(load("scheduler.pt"))
    if worker.with_critic:
        set_optimizer_state_dict(worker.model, worker.critic_optimizer, load("critic_optimizer.pt"),
                                 options=_options())
        worker.critic_scheduler.load_state_dict(load("critic_scheduler.pt"))
    rng = src / f"rng_rank{worker.rank}.pt"
    if rng.is_file():  # absent when resuming with more workers than wrote the checkpoint
        torch.set_rng_state(load(rng.name))
    return {"lr": worker.scheduler.get_last_lr()[0]}


# ---------------------------------------------------------------------------------------- driver side
def begin(root: str | Path, step: int) -> Path:
    tmp = partial_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(root: str | Path, step: int, trainer_state: dict, keep_last: int | None = None) -> Path:
    """Write the trainer state into the partial dir, rename it into place, then move the pointer."""
    tmp, final = partial_dir(root, step), step_dir(root, step)
    (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_new_text(Path(root) / LATEST, str(step), replace=True)  # readers see the old pointer or the new one
    if keep_last:  # trainer.max_actor_ckpt_to_keep; the one just written is always among the kept
        for old in sorted(all_steps(root))[:-keep_last]:
            shutil.rmtree(step_dir(root, old), ignore_errors=True)
    log.info("checkpoint saved: %s", final)
    return final


def all_steps(root: str | Path) -> list[int]:
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / TRAINER_STATE).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_resume_dir(trainer_cfg) -> Path | None:
    """The checkpoint to resume from under `trainer.resume_mode`, or None to start fresh."""
    mode = trainer_cfg.resume_mode
    if mode == "disable":
        return None
    if mode == "resume_path":
        if not trainer_cfg.resume_from_path:
            raise StageError("trainer.resume_mode=resume_path needs trainer.resume_from_path=<checkpoint dir>.")
        path = Path(trainer_cfg.resume_from_path).expanduser()
        if not (path / TRAINER_STATE).is_file():
            raise StageError(
                f"trainer.resume_from_path=`{path}` is not a complete checkpoint (no {TRAINER_STATE}). Point it at "
                "a global_step_<N> folder under trainer.default_local_dir."
            )
        return path
    root = Path(trainer_cfg.default_local_dir).expanduser()
    pointer = root / LATEST
    if pointer.is_file():
        text = pointer.read_text().strip()
        if text.isdigit() and (step_dir(root, int(text)) / TRAINER_STATE).is_file():
            return step_dir(root, int(text))
    steps = all_steps(root)  # the pointer is missing or stale: fall back to the newest complete checkpoint
    return step_dir(root, steps[-1]) if steps else None


OUTPUT_NAMES = ("adapter", "history.jsonl", "train_outputs.json")  # what train() writes into its out folder


def check_fresh_start(out_dir: str | Path, checkpoint_root: str | Path, resume: Path | None,
                      replace: bool = False) -> None:
    """Refuse to start a new training run over an earlier run's checkpoints or outputs (unless `replace`).

    A run that resumes continues its own checkpoints and outputs, so it may replace them. A run that starts
    from scratch would delete `history.jsonl`, replace `adapter/` and overwrite `global_step_<N>` folders of
    the same numbers, none of which it wrote: that needs `--force` (`replace`)."""
    if resume is not None or replace:
        return
    root, out = Path(checkpoint_root).expanduser(), Path(out_dir).expanduser()
    found = [step_dir(root, s).name for s in all_steps(root)]
    if (root / LATEST).exists():
        found.append(LATEST)
    if found:
        raise StageError(
            f"trainer.default_local_dir=`{root}` already holds checkpoints of an earlier run ({', '.join(found[:5])}) "
            "and this run starts from scratch, so it would overwrite them. Resume them with "
            "trainer.resume_mode=auto, choose a new trainer.default_local_dir, or pass --force to replace them."
        )
    there = [name for name in OUTPUT_NAMES if (out / name).exists()]
    if there:
        raise StageError(
            f"The training output folder `{out}` already holds {', '.join(there)} of an earlier run, which a new "
            "run would replace. Choose a new --out-dir (or trainer.default_local_dir), or pass --force to "
            "replace them."
        )


def read_trainer_state(ckpt: Path) -> dict:
    return json.loads((ckpt / TRAINER_STATE).read_text())
