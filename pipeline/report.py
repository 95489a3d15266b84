"""The run report: reward and validation curves as pictures, the before/after table, per-phase timings and
the registry reference a run published. Built from the run's manifest alone, so `pipeline runs show` and the
Markdown report always agree. A fleet run's members (figure and sections) come from pipeline/fleet_report.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.fleet_report import fleet_summary, plot_fleet_rewards, render_fleet
from pipeline.runner import MANIFEST, read_manifest

log = logging.getLogger(__name__)

REPORT = "report.md"


def _outputs(manifest: dict[str, Any], stage: str) -> dict[str, Any]:
    for entry in manifest["stages"]:
        if entry["name"] == stage:
            return entry.get("outputs") or {}
    return {}


def read_history(path: str | Path | None) -> list[dict[str, Any]]:
    if not path or not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def summary(run_dir: str | Path) -> dict[str, Any]:
    """The facts a report shows, as plain data."""
    m = read_manifest(run_dir)
    validation = "greedy"
    config_file = Path(run_dir) / "config.yaml"
    if config_file.is_file():
        import yaml

        vk = (yaml.safe_load(config_file.read_text()) or {}).get("actor_rollout_ref", {}).get("rollout", {}).get(
            "val_kwargs", {})
        if vk.get("do_sample"):
            validation = f"sampled: mean of {vk.get('n', 1)} samples per question at temperature {vk.get('temperature')}"
    train = _outputs(m, "train")
    evaluation = _outputs(m, "evaluate")
    publish = _outputs(m, "publish")
    return {
        "run_id": m["run_id"],
        "pipeline": m["pipeline"],
        "status": m["status"],
        "created": m.get("created"),
        "validation": validation,
        "stages": [
            {"name": e["name"], "status": e["status"], "seconds": e.get("seconds"), "error": e.get("error")}
            for e in m["stages"]
        ],
        "start_point": evaluation.get("start_point", "base model"),
        "start_reward": evaluation.get("start_reward", train.get("val_reward_before")),
        "adapter_reward": evaluation.get("adapter_reward", train.get("val_reward_after")),
        "start_acc": evaluation.get("start_acc", train.get("val_acc_before")),
        "adapter_acc": evaluation.get("adapter_acc", train.get("val_acc_after")),
        "decision": evaluation.get("decision"),
        "published_ref": publish.get("ref"),
        "phase_seconds": train.get("phase_seconds") or {},
        "startup_seconds": train.get("startup_seconds") or {},
        "steps": train.get("steps"),
        "history_path": train.get("history_path"),
        "rollout_mismatch": train.get("rollout_mismatch"),
        "val_generations": train.get("val_generations") or [],
        "loggers": train.get("loggers") or {},
        "mlflow_parent_run_id": m.get("mlflow_parent_run_id"),
        "fleet": fleet_summary(_outputs(m, "train_fleet"), _outputs(m, "publish_fleet")),
    }


def plot_curves(history: list[dict[str, Any]], out: Path, validation: str = "greedy") -> list[str]:
    """Training reward per step and validation reward over steps, one PNG each. Returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, ax, title: str, name: str) -> None:
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    written: list[str] = []
    train_rows = [r for r in history if "reward/mean" in r]
    val_rows = [r for r in history if "val/reward" in r]
    if train_rows:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        steps = [r["step"] for r in train_rows]
        mean = [r["reward/mean"] for r in train_rows]
        ax.plot(steps, mean, marker="o", ms=3, label="batch reward (mean)")
        if all("reward/std" in r for r in train_rows):
            std = [r["reward/std"] for r in train_rows]
            ax.fill_between(steps, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)], alpha=0.2)
        ax.set_ylabel("reward")
        save(fig, ax, "Training reward", "reward_curve.png")
    if val_rows:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot([r["step"] for r in val_rows], [r["val/reward"] for r in val_rows], marker="s", color="tab:green",
                label=f"validation reward ({validation.split(':')[0]})")
        if all("val/acc" in r and r["val/acc"] is not None for r in val_rows):
            ax.plot([r["step"] for r in val_rows], [r["val/acc"] for r in val_rows], ls="--", color="tab:olive",
                    label="validation accuracy")
        save(fig, ax, "Validation", "validation_curve.png")
    return written


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_text(s: dict[str, Any]) -> list[str]:
    """The report body as Markdown lines (also what `pipeline runs show` prints)."""
    lines = [f"# Run {s['run_id']}", "", f"Pipeline `{s['pipeline']}`, status **{s['status']}**, created {s['created']}.", ""]
    lines += ["## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    for st in s["stages"]:
        err = f" ({st['error']})" if st.get("error") else ""
        lines.append(f"| {st['name']} | {st['status']}{err} | {_fmt(st['seconds'], 1)} |")
    if s.get("fleet"):  # a fleet run: each member has its own before/after, decision and reference
        lines += render_fleet(s["fleet"])
    else:
        lines += ["", f"## Before / after (held-out validation, {s['validation']})", "",
                  "| model | reward | accuracy |", "|---|---|---|"]
        lines.append(f"| start: {s['start_point']} | {_fmt(s['start_reward'])} | {_fmt(s['start_acc'])} |")
        lines.append(f"| adapter | {_fmt(s['adapter_reward'])} | {_fmt(s['adapter_acc'])} |")
        if s["decision"]:
            lines += ["", f"Publish decision: {s['decision']}"]
        lines += ["", f"Published: `{s['published_ref']}`" if s["published_ref"] else "Published: nothing"]
    mismatch = s.get("rollout_mismatch")
    if mismatch:  # actor_rollout_ref.rollout.calculate_log_probs=true (docs/training.md)
        lines += ["", f"Rollout-training mismatch (the engine's log-probs against the actor's, mean of "
                      f"{mismatch['steps']} steps): k3 KL {mismatch['k3_kl']:.3g}, kl {mismatch['kl']:.3g}, "
                      f"mean |log-ppl diff| {mismatch['log_ppl_abs_diff']:.3g}, chi2 {mismatch['chi2_token']:.3g}"]
    lines += _generations_table(s.get("val_generations") or [])
    if s["phase_seconds"]:
        lines += ["", "## Time per training step, by phase (mean seconds)", "", "| phase | seconds |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v, 2)} |" for k, v in s["phase_seconds"].items()]
    if s["startup_seconds"]:
        lines += ["", "## Training start-up (seconds per part)", "",
                  "Engine and workers count from their common launch; data, tracking and validation overlap them.", "",
                  "| part | seconds |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v, 1)} |" for k, v in s["startup_seconds"].items()]
    if s["mlflow_parent_run_id"]:
        lines += ["", f"MLflow parent run: `{s['mlflow_parent_run_id']}`"]
    if s.get("loggers"):  # trainer.logger's trackers and where each wrote
        lines += ["", "## Where the training was logged", "", "| logger | where |", "|---|---|"]
        lines += [f"| {name} | `{where}` |" for name, where in s["loggers"].items()]
    return lines


REPORT_TABLE_ROWS = 5  # the report shows the first rows; every row is in MLflow / W&B and validation_data_dir


def _generations_table(rows: list[dict[str, Any]]) -> list[str]:
    """The first rows of the last validation's `trainer.log_val_generations` table."""
    if not rows:
        return []

    def cell(value: Any) -> str:
        text = _fmt(value) if isinstance(value, float) else str(value if value is not None else "-")
        text = text.replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= 120 else "..." + text[-117:]  # a prompt's end is where the question is

    shown = rows[:REPORT_TABLE_ROWS]
    lines = ["", f"## Validation generations (step {shown[0].get('step', '-')}, {len(shown)} of the "
                 f"{len(rows)} logged by trainer.log_val_generations)", "",
             "| input | output | ground truth | score |", "|---|---|---|---|"]
    lines += [f"| {cell(r.get('input'))} | {cell(r.get('output'))} | {cell(r.get('gts'))} | {cell(r.get('score'))} |"
              for r in shown]
    return lines


def write_report(run_dir: str | Path) -> Path:
    """Write `report.md` (and its PNG curves) into the run directory."""
    run_dir = Path(run_dir)
    s = summary(run_dir)
    pictures = plot_curves(read_history(s["history_path"]), run_dir, s["validation"])
    if s.get("fleet"):
        figure = plot_fleet_rewards(read_history(s["fleet"]["history_path"]), s["fleet"], run_dir)
        pictures += [figure] if figure else []
    lines = render_text(s)
    if pictures:
        lines += ["", "## Curves", ""] + [f"![{p}]({p})" for p in pictures]
    path = run_dir / REPORT
    path.write_text("\n".join(lines) + "\n")
    return path


def list_runs(root: str | Path = "runs") -> list[dict[str, Any]]:
    rows = []
    for manifest in sorted(Path(root).glob(f"*/{MANIFEST}")):
        try:
            s = summary(manifest.parent)
        except (ValueError, KeyError) as exc:
            log.warning("skipping %s: %s", manifest, exc)
            continue
        rows.append(s)
    return rows
