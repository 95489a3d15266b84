import json

from pipeline.cli import cli_entry
from config import load_config
from pipeline.report import REPORT, write_report
from pipeline.runner import Pipeline, Run, Stage


def _run_with_history(tmp_path):
    hist = tmp_path / "history.jsonl"
    rows = [{"step": 0, "val/reward": 0.2, "val/acc": 0.2}]
    rows += [{"step": i, "reward/mean": 0.1 * i, "reward/std": 0.05} for i in range(1, 6)]
    rows += [{"step": 5, "val/reward": 0.6, "val/acc": 0.6}]
    hist.write_text("\n".join(json.dumps(r) for r in rows))
    stages = [
        Stage("train", lambda ctx: {"history_path": str(hist), "val_reward_before": 0.2, "val_reward_after": 0.6,
                                    "phase_seconds": {"generate": 1.5, "update": 2.0}}),
        Stage("evaluate", lambda ctx: {"start_reward": 0.2, "adapter_reward": 0.6,
                                       "decision": "publish: adapter beats base by 0.400 > 0.0"}),
        Stage("publish", lambda ctx: {"ref": "demo@3"}),
    ]
    run = Run.create(Pipeline("toy", stages), load_config(), tmp_path / "runs" / "r1")
    run.execute()
    return run


def test_report_has_curves_table_timings_and_ref(tmp_path):
    run = _run_with_history(tmp_path)
    path = write_report(run.run_dir)
    text = path.read_text()
    assert path.name == REPORT
    assert "| start: base model | 0.200 |" in text and "| adapter | 0.600 |" in text
    assert "`demo@3`" in text and "| generate | 1.50 |" in text
    for png in ("reward_curve.png", "validation_curve.png"):
        assert f"![{png}]({png})" in text
        assert (run.run_dir / png).read_bytes()[:4] == b"\x89PNG"


def test_runs_list_and_show(tmp_path, capsys):
    _run_with_history(tmp_path)
    assert cli_entry(["runs", "list", "--root", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "r1" in out and "0.200 -> 0.600" in out and "demo@3" in out
    assert cli_entry(["runs", "show", "r1", "--root", str(tmp_path / "runs")]) == 0
    assert "| adapter | 0.600 |" in capsys.readouterr().out
