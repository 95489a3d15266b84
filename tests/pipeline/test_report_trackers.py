"""The run's report (and `pipeline runs show`) shows the first rows of trainer.log_val_generations' table, the
rollout-training mismatch, and where each of trainer.logger's trackers wrote; the default demo measures the mismatch."""

from __future__ import annotations

from config import load_config
from pipeline.cli import cli_entry
from pipeline.report import REPORT_TABLE_ROWS, write_report
from pipeline.runner import Pipeline, Run, Stage

ROWS = [{"input": f"user What is {i} + 1? | assistant", "output": f"{i + 1}\ndone", "gts": str(i + 1),
         "score": 1.0 if i % 2 else 0.0, "step": 20} for i in range(7)]
LOGGERS = {"mlflow": "run abc123 at sqlite:///x.db", "wandb": "/r/train/wandb/offline-run-1 (offline; upload with "
           "`wandb sync /r/train/wandb/offline-run-1`)", "tensorboard": "/r/train/tensorboard_log/p/e",
           "file": "/r/train/file_log/p/e.jsonl"}
MISMATCH = {"steps": 20, "kl": 0.002, "k3_kl": 0.0025, "log_ppl_abs_diff": 0.018, "chi2_token": 0.006}


def _run(tmp_path, train_outputs):
    stages = [Stage("train", lambda ctx: {"val_reward_before": 0.1, "val_reward_after": 0.6, **train_outputs})]
    run = Run.create(Pipeline("toy", stages), load_config(), tmp_path / "runs" / "r1")
    run.execute()
    return run


def test_report_and_runs_show_have_the_generations_mismatch_and_loggers(tmp_path, capsys):
    run = _run(tmp_path, {"val_generations": ROWS, "loggers": LOGGERS, "rollout_mismatch": MISMATCH})
    text = write_report(run.run_dir).read_text()
    assert f"## Validation generations (step 20, {REPORT_TABLE_ROWS} of the 7 logged by trainer.log_val_generations)" in text
    table = [line for line in text.splitlines() if line.startswith("| user What is")]
    assert len(table) == REPORT_TABLE_ROWS
    # a | in the text is escaped and a newline flattened, so each row stays one Markdown row of 4 cells
    assert table[1] == "| user What is 1 + 1? \\| assistant | 2 done | 2 | 1.000 |"
    assert "Rollout-training mismatch (the engine's log-probs against the actor's, mean of 20 steps): k3 KL 0.0025" in text
    assert "## Where the training was logged" in text
    for name, where in LOGGERS.items():
        assert f"| {name} | `{where}` |" in text
    assert cli_entry(["runs", "show", "r1", "--root", str(tmp_path / "runs")]) == 0
    shown = capsys.readouterr().out
    assert "| wandb | `/r/train/wandb/offline-run-1" in shown and "| user What is 0 + 1?" in shown


def test_a_run_without_them_has_no_such_sections(tmp_path):
    text = write_report(_run(tmp_path, {}).run_dir).read_text()
    assert "Validation generations" not in text and "Where the training was logged" not in text
    assert "mismatch" not in text


def test_the_default_demo_keeps_the_engines_log_probs_so_its_report_has_the_mismatch():
    # without them the trainer logs no rollout_corr/ metrics and the report has no mismatch line
    cfg = load_config()
    assert cfg.actor_rollout_ref.rollout.calculate_log_probs is True
    assert cfg.algorithm.rollout_correction.rollout_is is None  # measured, not corrected
