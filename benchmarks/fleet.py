"""The example fleet (examples/fleet/fleet.yaml, 3 members) trained as one fleet against three separate runs of the
same members, one after the other, with the same steps and shapes (issue #28). Not a test.

- Fleet: `pipeline run train-fleet -c fleet.yaml`: stage, one run training every member, publish each.
- Separate: for each member, `pipeline run train-and-publish -c member.yaml`, where member.yaml is the shared
  config with that member's keys over it (exactly the config the fleet gives that member) and publish.name
  its name.
Each side runs in its own fresh processes from a clean working folder with its own registry; wall time is measured
around the processes, start to the last published version (imports, model staging, engine start, validation,
publish all included). The held-out reward gain of a member is its reward after training minus before, on its
val_files with rollout.val_kwargs, as each side's own validation measured it. `publish.min_improvement=-1` on
both sides, so that every member is published and timed whatever its gain.

    .venv/bin/python benchmarks/fleet.py --out benchmarks/results/fleet.json      # --steps N to shorten
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ground.new_files import refuse_existing_out, write_new_text  # noqa: E402

EXAMPLE = ROOT / "examples" / "fleet" / "fleet.yaml"
PIPELINE = [str(Path(sys.executable).parent / "pipeline")]  # the console script of this environment


def _run(args: list[str], cwd: Path, log: Path) -> float:
    """Seconds the command took; its output goes to `log`; a failure stops the benchmark with the log's tail."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_REGISTRY": str(cwd / "registry-store")}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(args, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - t0
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{' '.join(args)} exited {code} after {seconds:.0f} s; log {log}:\n{tail}")
    return seconds


def _outputs(run_dir: Path, stage: str) -> dict:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return next(e for e in manifest["stages"] if e["name"] == stage)["outputs"]


def _workdir(root: Path, name: str) -> Path:
    """A clean folder with the example's data and reward file, as a user's checkout would have them."""
    work = root / name
    (work / "examples" / "fleet").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "fleet" / "rewards.py", work / "examples" / "fleet" / "rewards.py")
    subprocess.check_call([sys.executable, str(ROOT / "examples" / "fleet" / "make_data.py")], cwd=work,
                          stdout=subprocess.DEVNULL)
    return work


def run_fleet(root: Path, overrides: list[str]) -> dict:
    work = _workdir(root, "fleet")
    run_dir = work / "runs" / "fleet"
    seconds = _run(PIPELINE + ["run", "train-fleet", "-c", str(EXAMPLE), "--run-dir", str(run_dir), *overrides],
                   work, work / "fleet.log")
    trained = _outputs(run_dir, "train_fleet")
    published = _outputs(run_dir, "publish_fleet")["members"]
    history = [json.loads(x) for x in (run_dir / "train_fleet" / "history.jsonl").read_text().splitlines()]
    steps = [h for h in history if "timing/step" in h]
    members = {}
    for name, member in trained["members"].items():
        before, after = member["val_reward_before"], member["val_reward_after"]
        members[name] = {"status": published[name]["status"], "ref": published[name].get("ref"),
                         "reward_before": before, "reward_after": after,
                         "gain": after - before if before is not None and after is not None else None}
    return {"wall_s": seconds, "steps": trained["steps"], "members": members,
            "step_s": [h["timing/step"] for h in steps], "generate_s": [h["timing/generate"] for h in steps],
            "update_s": [h["timing/update"] for h in steps],
            "generate_mixed": [h["timing/generate_mixed"] for h in steps]}


def member_configs(overrides: list[str], out: Path) -> dict[str, Path]:
    """{name: a single run's config file}: the config the fleet gives each member, publishing under its name."""
    from stages.train.fleet.config import parse_fleet

    fleet = parse_fleet(EXAMPLE, overrides)
    files = {}
    for spec in fleet.members:
        cfg = spec.cfg.model_copy(deep=True)
        cfg.publish.name = spec.name
        path = out / f"{spec.name}.yaml"
        path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        files[spec.name] = path
    return files


def run_separate(root: Path, overrides: list[str]) -> dict:
    work = _workdir(root, "separate")
    configs = member_configs(overrides, work)
    members, total = {}, 0.0
    for name, path in configs.items():
        run_dir = work / "runs" / name
        seconds = _run(PIPELINE + ["run", "train-and-publish", "-c", str(path), "--run-dir", str(run_dir)], work,
                       work / f"{name}.log")
        total += seconds
        evaluation = _outputs(run_dir, "evaluate")
        history = [json.loads(x) for x in (run_dir / "train" / "history.jsonl").read_text().splitlines()]
        steps = [h for h in history if "timing/step" in h]
        members[name] = {"wall_s": seconds, "ref": _outputs(run_dir, "publish").get("ref"),
                         "reward_before": evaluation.get("start_reward"),
                         "reward_after": evaluation.get("adapter_reward"), "gain": evaluation.get("improvement"),
                         "step_s": [h["timing/step"] for h in steps]}
    return {"wall_s": total, "members": members}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="trainer.total_training_steps (default: the example's)")
    parser.add_argument("--side", choices=("both", "fleet", "separate"), default="both")
    parser.add_argument("--work", default=None, help="working folder (default: a new temporary one, removed)")
    parser.add_argument("--out", default=None, help="JSON results file")
    parser.add_argument("--force", action="store_true", help="replace --out")
    args = parser.parse_args()
    if args.out:
        refuse_existing_out(parser, [args.out], args.force)
    overrides = ["publish.min_improvement=-1"]
    if args.steps:
        overrides.append(f"trainer.total_training_steps={args.steps}")
    root = Path(args.work or tempfile.mkdtemp(prefix="fleet-bench-"))
    result: dict = {"example": str(EXAMPLE.relative_to(ROOT)), "overrides": overrides,
                    "load_avg_start": os.getloadavg()}
    try:
        if args.side in ("both", "fleet"):
            result["fleet"] = run_fleet(root, overrides)
            print(f"fleet: {result['fleet']['wall_s']:.0f} s", flush=True)
        if args.side in ("both", "separate"):
            result["separate"] = run_separate(root, overrides)
            print(f"separate: {result['separate']['wall_s']:.0f} s", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(root, ignore_errors=True)
    result["load_avg_end"] = os.getloadavg()
    if "fleet" in result and "separate" in result:
        fleet, separate = result["fleet"], result["separate"]
        result["wall_ratio"] = fleet["wall_s"] / separate["wall_s"]
        print(f"wall time: fleet {fleet['wall_s']:.0f} s, three runs {separate['wall_s']:.0f} s "
              f"({result['wall_ratio']:.2f}x; target <= 0.6x)")
        print("| member | fleet gain | separate gain | fleet - separate |\n|---|---|---|---|")
        for name, member in fleet["members"].items():
            alone = separate["members"][name]["gain"]
            diff = member["gain"] - alone if member["gain"] is not None and alone is not None else None
            print(f"| {name} | {member['gain']:+.3f} | {alone:+.3f} | {diff:+.3f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_new_text(args.out, json.dumps(result, indent=2), replace=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
