"""Per-phase time of RL training steps in each weight-sync mode (not a test).

Runs a few steps of the default config (config/cpu_quickstart.yaml: SmolLM2-135M, LoRA rank 16
all-linear, GRPO, 8 prompts x 8 responses) once with `actor_rollout_ref.rollout.lora_sync=adapter` and once with
`merged`, each in a fresh process (own Ray, own engine), and writes a Markdown table: seconds per phase, rollout
tokens/s, bytes per sync and the sync's share of the step. The first step is a warm-up and is left out of the
medians. No validation, checkpoints or MLflow during the run, so only the training step is timed.

    .venv/bin/python benchmarks/train_step.py                       # both modes, 4 steps each
    .venv/bin/python benchmarks/train_step.py --steps 6 --modes merged -o benchmarks/results/train_step.md
    .venv/bin/python benchmarks/train_step.py -- data.train_batch_size=4   # extra config overrides after --
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ground.new_files import refuse_existing_out, write_new_text  # noqa: E402

PHASES = ("generate", "old_log_prob", "reference", "update", "sync", "step")


def run_one(mode: str, steps: int, overrides: list[str], out_json: Path) -> None:
    """Train `steps` steps in sync mode `mode` in a scratch folder; write the per-step history to out_json."""
    import logging

    from config import load_config
    from ground.base_model import resolve_model_path
    from stages.train import train

    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix=f"train-step-{mode}-"))
    os.chdir(work)  # the default config's data paths and output folder are relative to the current directory
    cfg = load_config(None, [
        f"actor_rollout_ref.rollout.lora_sync={mode}",
        f"trainer.total_training_steps={steps}",
        "trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.save_freq=-1",
        "trainer.logger=[console]", f"trainer.default_local_dir={work / 'out'}",
        *overrides,
    ])
    model_dir = resolve_model_path(cfg.actor_rollout_ref.model.path)
    t0 = time.perf_counter()
    outputs = train(cfg, str(model_dir), out_dir=str(work / "out"))
    history = [json.loads(line) for line in Path(outputs["history_path"]).read_text().splitlines() if line.strip()]
    steps_only = [h for h in history if "timing/step" in h]
    adapter_bytes = sum(p.stat().st_size for p in Path(outputs["adapter_dir"]).iterdir())
    out_json.write_text(json.dumps({"mode": mode, "sync_mode": outputs["sync_mode"], "steps": steps_only,
                                    "adapter_bytes": adapter_bytes, "seconds": time.perf_counter() - t0,
                                    "load_avg": os.getloadavg()}, indent=2))


def summarize(result: dict) -> dict:
    steps = result["steps"][1:] or result["steps"]  # drop the warm-up step
    med = lambda key: statistics.median(h.get(key, 0.0) for h in steps)  # noqa: E731
    row = {p: med(f"timing/{p}") for p in PHASES}
    sync_s = med("sync/gather_write_s") + med("sync/load_s")
    row.update(tokens_per_s=med("perf/generate_tokens_per_s"), sync_bytes=med("sync/bytes"),
               sync_total_s=sync_s, sync_share=sync_s / max(row["step"], 1e-9), n_steps=len(steps))
    return row


def table(results: list[dict], header: str) -> str:
    lines = [header, "",
             "| sync mode | step s | generate s | old log-prob s | reference s | update s | sync s (gather+write / load) "
             "| rollout tokens/s | bytes per sync | sync share of step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = summarize(r)
        steps = r["steps"][1:] or r["steps"]
        gw = statistics.median(h["sync/gather_write_s"] for h in steps)
        ld = statistics.median(h["sync/load_s"] for h in steps)
        lines.append(
            f"| {r['sync_mode']} | {s['step']:.1f} | {s['generate']:.1f} | {s['old_log_prob']:.2f} | "
            f"{s['reference']:.2f} | {s['update']:.1f} | {s['sync_total_s']:.2f} ({gw:.2f} / {ld:.2f}) | "
            f"{s['tokens_per_s']:.0f} | {s['sync_bytes'] / 1e6:.1f} MB | {100 * s['sync_share']:.1f}% |")
    adapter = next((r for r in results if r["sync_mode"] == "adapter"), None)
    if adapter:
        lines += ["", f"Adapter size on disk (final PEFT adapter): {adapter['adapter_bytes'] / 1e6:.1f} MB."]
    return "\n".join(lines)


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="training steps per mode (the first is a warm-up)")
    parser.add_argument("--modes", default="adapter,merged")
    parser.add_argument("-o", "--out", default="benchmarks/results/train_step.md")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one mode in this process
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--force", action="store_true", help="replace --out (and its .json) if they exist")
    args = parser.parse_args(argv)
    if not args.one:
        refuse_existing_out(parser, [args.out, str(Path(args.out).with_suffix(".json"))] if args.out else [],
                            args.force)
    if args.one:
        run_one(args.one, args.steps, extra, Path(args.json))
        return 0

    from tqdm import tqdm

    results = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for mode in tqdm(args.modes.split(","), desc="sync modes"):
            out_json = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", mode, "--steps", str(args.steps),
                   "--json", str(out_json), "--", *extra]
            proc = subprocess.run(cmd, cwd=ROOT)
            if proc.returncode != 0:
                print(f"{mode}: training failed (exit {proc.returncode})", file=sys.stderr)
                return proc.returncode
            results.append(json.loads(out_json.read_text()))
    header = (f"Default config (cpu_quickstart: SmolLM2-135M bf16, LoRA r=16 all-linear, 8 prompts x 8 responses, "
              f"16 response tokens), {args.steps} steps per mode, medians over steps 2-{args.steps}; "
              f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after."
              + (f" Overrides: {' '.join(extra)}." if extra else ""))
    text = table(results, header)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_new_text(args.out, text + "\n", replace=args.force)
        write_new_text(Path(args.out).with_suffix(".json"), json.dumps(results, indent=2), replace=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
