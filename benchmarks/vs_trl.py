"""Ours against TRL's GRPOTrainer + PEFT, side by side at equal shapes (not a test).

Shapes (issue 11): SmolLM2-135M-Instruct (the packaged default), LoRA r=16 alpha=32 on all linear layers,
GRPO, 4 prompts x 4 responses per step, at most 32 new tokens, 15 steps, the demo's arithmetic questions and
reward, no KL term, lr 2e-4. Each side runs in a fresh process; wall time is measured around that process (start
to final adapter on disk, imports and model load included). Step time is each side's own per-step timing
(ours: `timing/step` in the history; TRL: a callback from step begin to step end); medians leave out step 1.

TRL is installed into a throwaway virtual environment (`--trl-venv`, default under the system temp dir) whose
`.pth` file reuses this environment's torch / transformers / PEFT; it is never a dependency of this project.

    .venv/bin/python benchmarks/vs_trl.py                      # both sides, Markdown table to stdout
    .venv/bin/python benchmarks/vs_trl.py --steps 15 -o benchmarks/results/vs_trl.md   # --force to replace it
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ground.new_files import refuse_existing_out, write_new_text  # noqa: E402

TRL_VERSION = "1.16.0"
PROMPTS, RESPONSES, MAX_NEW, RANK, ALPHA, LR = 4, 4, 32, 16, 32, 2e-4


# ------------------------------------------------------------------------------------------------------ ours
def run_ours(steps: int, work: Path, out_json: Path) -> None:
    import logging

    from config import load_config
    from ground.base_model import resolve_model_path
    from stages.train import train

    logging.basicConfig(level=logging.WARNING)
    os.chdir(work)
    cfg = load_config(None, [
        f"data.train_batch_size={PROMPTS}", f"actor_rollout_ref.rollout.n={RESPONSES}",
        f"data.max_response_length={MAX_NEW}", f"actor_rollout_ref.actor.ppo_mini_batch_size={PROMPTS}",
        f"actor_rollout_ref.model.lora_rank={RANK}", f"actor_rollout_ref.model.lora_alpha={ALPHA}",
        f"actor_rollout_ref.actor.optim.lr={LR}", f"trainer.total_training_steps={steps}",
        # like TRL's run: no validation and no checkpoints during training (the final adapter is still written;
        # the recipe's closing validation is kept small: 8 questions, 1 sample each)
        "trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.save_freq=-1",
        "data.val_max_samples=8", "actor_rollout_ref.rollout.val_kwargs.n=1",
        "trainer.logger=[console]", f"trainer.default_local_dir={work / 'out'}",
        # each prompt once for its 4 responses (off in the demo's config, see docs/training.md)
        "actor_rollout_ref.model.share_prompt_forward=true",
    ])
    model_dir = resolve_model_path(cfg.actor_rollout_ref.model.path)
    outputs = train(cfg, str(model_dir), out_dir=str(work / "out"))
    history = [json.loads(x) for x in Path(outputs["history_path"]).read_text().splitlines() if x.strip()]
    out_json.write_text(json.dumps({
        "steps": [h["timing/step"] for h in history if "timing/step" in h],
        "phases": {p: [h[f"timing/{p}"] for h in history if f"timing/{p}" in h] for p in ("generate", "update", "sync")},
        "startup": outputs["startup_seconds"], "dtype": str(cfg.actor_rollout_ref.model.dtype),
        "model_dir": str(model_dir)}))


# ------------------------------------------------------------------------------------------------------- TRL
def run_trl(steps: int, work: Path, out_json: Path, model_dir: str) -> None:
    import pandas as pd
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from stages.train.arithmetic import make_arithmetic
    from stages.train.rewards.scorers import arithmetic as arithmetic_score

    torch.manual_seed(0)
    train_path, _ = make_arithmetic(work / "data", seed=0)
    rows = pd.read_parquet(train_path).to_dict("records")
    data = Dataset.from_list([{"prompt": [dict(m) for m in r["prompt"]],
                               "ground_truth": r["reward_model"]["ground_truth"]} for r in rows])

    def reward(completions, ground_truth, **_):
        return [float(arithmetic_score(c[0]["content"], t, {})["score"]) for c, t in zip(completions, ground_truth)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._t = [], 0.0

        def on_step_begin(self, *args, **kwargs):
            self._t = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.times.append(time.perf_counter() - self._t)

    timer = StepTimer()
    config = GRPOConfig(
        output_dir=str(work / "trl-out"), per_device_train_batch_size=PROMPTS * RESPONSES,
        num_generations=RESPONSES, max_completion_length=MAX_NEW, max_steps=steps, learning_rate=LR,
        beta=0.0, temperature=1.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        bf16=False, seed=0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=config, train_dataset=data,
                          peft_config=LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear",
                                                 task_type="CAUSAL_LM", lora_dropout=0.0),
                          callbacks=[timer])
    trainer.train()
    trainer.save_model(str(work / "trl-adapter"))
    out_json.write_text(json.dumps({"steps": timer.times, "dtype": "float32"}))


def ensure_trl_venv(venv: Path) -> Path:
    """A throwaway venv that sees this environment's packages (a .pth file) and adds TRL and datasets."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import trl, datasets"], capture_output=True).returncode == 0:
        return python
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_reuse_project_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"trl=={TRL_VERSION}",
                    "datasets"], check=True)
    return python


# ------------------------------------------------------------------------------------------------------ main
def timed_run(python: str, side: str, steps: int, work: Path, extra: list[str], lock: str | None) -> dict:
    """One side in a fresh process, timed from its start to its exit (after the final adapter is written).

    With `lock`, an exclusive flock on that file is held for the run, so other heavy jobs sharing the machine
    (and the lock) do not run at the same time and skew the times."""
    import contextlib
    import fcntl

    with open(lock, "a") if lock else contextlib.nullcontext() as held:
        if held:
            fcntl.flock(held, fcntl.LOCK_EX)
        return _run_side(python, side, steps, work, extra)


def _run_side(python: str, side: str, steps: int, work: Path, extra: list[str]) -> dict:
    out_json = work / f"{side}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    subprocess.run([python, str(Path(__file__).resolve()), "--side", side, "--steps", str(steps), "--work",
                    str(work), "--json", str(out_json), *extra], env=env, check=True, cwd=work)
    result = json.loads(out_json.read_text())
    result["wall"] = time.perf_counter() - t0
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--trl-venv", default=str(Path(tempfile.gettempdir()) / "lora-pipeline-trl-venv"))
    ap.add_argument("-o", "--out", help="write the Markdown table here (and the raw figures beside it as .json)")
    ap.add_argument("--force", action="store_true", help="replace --out (and its .json) if they exist")
    ap.add_argument("--lock", help="hold an exclusive flock on this file during each side's run")
    ap.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.out:
        refuse_existing_out(ap, [args.out, str(Path(args.out).with_suffix(".json"))], args.force)
    if args.side == "ours":
        run_ours(args.steps, Path(args.work), Path(args.json))
        return 0
    if args.side == "trl":
        run_trl(args.steps, Path(args.work), Path(args.json), args.model_dir)
        return 0

    from ground.base_model import resolve_model_path

    trl_python = ensure_trl_venv(Path(args.trl_venv))
    # The packaged model is converted once (cached); do that before either side's clock starts.
    model_dir = str(resolve_model_path("smollm2-135m-instruct"))
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as tmp:
        ours_dir, trl_dir = Path(tmp, "ours"), Path(tmp, "trl")
        ours_dir.mkdir()
        trl_dir.mkdir()
        ours = timed_run(sys.executable, "ours", args.steps, ours_dir, [], args.lock)
        trl = timed_run(str(trl_python), "trl", args.steps, trl_dir, ["--model-dir", model_dir], args.lock)
    med = lambda xs: statistics.median(xs[1:] or xs)  # noqa: E731
    phases = " / ".join(f"{p} {med(v):.1f}" for p, v in ours["phases"].items())
    lines = [
        f"SmolLM2-135M-Instruct, LoRA r={RANK} all-linear, GRPO, {PROMPTS} prompts x {RESPONSES} responses, <= {MAX_NEW} "
        f"new tokens, {args.steps} steps; medians over steps 2-{args.steps}; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the end.", "",
        "| | median step s | whole run s (start to final adapter) | dtype |", "|---|---|---|---|",
        f"| ours (`pipeline train`) | {med(ours['steps']):.2f} ({phases}) | {ours['wall']:.0f} | {ours['dtype']} |",
        f"| TRL {TRL_VERSION} GRPOTrainer + PEFT | {med(trl['steps']):.2f} | {trl['wall']:.0f} | {trl['dtype']} |",
        "",
        f"Step time ours / TRL: {med(ours['steps']) / med(trl['steps']):.2f} (target <= 0.33); whole run: "
        f"{ours['wall'] / trl['wall']:.2f} (target <= 0.5). Our start-up parts (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in ours["startup"].items()),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_new_text(args.out, text + "\n", replace=args.force)
        write_new_text(Path(args.out).with_suffix(".json"), json.dumps({"ours": ours, "trl": trl}, indent=2),
                       replace=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
