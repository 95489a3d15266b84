"""The report of a fleet run (`pipeline run train-fleet`): every member's training reward curve and validation
points on one figure, and a short section per member (status, error, reward before/after, gate decision,
published reference). Built, like the single run's report (pipeline/report.py), from the manifest alone: the
train_fleet stage's outcome and the publish_fleet stage's per-member outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FIGURE = "fleet_rewards.png"


def fleet_summary(train: dict[str, Any], publish: dict[str, Any]) -> dict[str, Any] | None:
    """{"steps", "history_path", "mlflow_run_id", "members": {name: facts}}; None when this is no fleet run."""
    members = train.get("members")
    if not isinstance(members, dict):
        return None
    published = publish.get("members") or {}
    rows = {}
    for name, member in members.items():
        gate = published.get(name) or {}
        rows[name] = {
            "status": gate.get("status") or member.get("status"),
            "error": member.get("error"),
            "start_reward": member.get("val_reward_before"),
            "adapter_reward": member.get("val_reward_after"),
            "decision": gate.get("decision"),
            "ref": gate.get("ref"),
            "mlflow_run_id": member.get("mlflow_run_id"),
        }
    return {"steps": train.get("steps"), "history_path": train.get("history_path"),
            "mlflow_run_id": train.get("mlflow_run_id"), "members": rows}


def plot_fleet_rewards(history: list[dict[str, Any]], fleet: dict[str, Any], out: Path) -> str | None:
    """One PNG: per member, its batch reward per step (line) and its held-out reward (squares: before training
    at step 0, then each validation), in one colour per member. Returns the file name, None without data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    drawn = False
    for index, (name, member) in enumerate(fleet["members"].items()):
        colour = f"C{index % 10}"
        key, val_key = f"members/{name}/reward/mean", f"members/{name}/val/reward"
        train = [(r["step"], r[key]) for r in history if key in r]
        val = [(r["step"], r[val_key]) for r in history if val_key in r]
        if member.get("start_reward") is not None:
            val.insert(0, (0, member["start_reward"]))
        if train:
            ax.plot(*zip(*train), marker="o", ms=3, color=colour, label=f"{name} ({member['status']})")
        if val:
            ax.plot(*zip(*val), ls="none", marker="s", ms=6, mfc="none", color=colour,
                    label=None if train else f"{name} ({member['status']})")
        drawn = drawn or bool(train or val)
    if not drawn:
        plt.close(fig)
        return None
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title("Fleet: batch reward per member (lines), held-out reward (squares)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(out / FIGURE, dpi=110)
    plt.close(fig)
    return FIGURE


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def render_fleet(fleet: dict[str, Any]) -> list[str]:
    """The per-member sections as Markdown lines."""
    lines = ["", f"## Fleet members ({len(fleet['members'])}, {_fmt(fleet['steps'])} steps)"]
    if fleet.get("mlflow_run_id"):
        lines += ["", f"MLflow fleet run: `{fleet['mlflow_run_id']}` (one child run per member)"]
    for name, m in fleet["members"].items():
        lines += ["", f"### {name}", "", f"- status: **{m['status']}**"]
        if m.get("error"):
            error = m["error"]
            lines.append(f"- error: {error.get('type')} at step {error.get('step')}: {error.get('message')}")
        improvement = (m["adapter_reward"] - m["start_reward"]
                       if m["start_reward"] is not None and m["adapter_reward"] is not None else None)
        lines.append(f"- held-out reward: before {_fmt(m['start_reward'])}, after {_fmt(m['adapter_reward'])}"
                     f" (improvement {_fmt(improvement)})")
        if m.get("decision"):
            lines.append(f"- publish decision: {m['decision']}")
        lines.append(f"- published: `{m['ref']}`" if m.get("ref") else "- published: nothing")
        if m.get("mlflow_run_id"):
            lines.append(f"- MLflow run: `{m['mlflow_run_id']}`")
    return lines
