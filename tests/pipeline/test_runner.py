import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pipeline.cli import cli_entry
from config import load_config
from ground.errors import PipelineError, StageError
from pipeline.runner import Pipeline, Run, Stage, read_manifest


def _pipeline(calls, fail_at=None):
    def make(name):
        def run(ctx):
            calls.append(name)
            if name == fail_at:
                raise StageError(f"{name} broke")
            (ctx.stage_dir / "out.txt").write_text(name)
            return {"seen": sorted(ctx.outputs), "file": str(ctx.stage_dir / "out.txt")}

        return Stage(name, run)

    return Pipeline("toy", [make("a"), make("b"), make("c")])


def test_manifest_records_each_stage(tmp_path):
    calls = []
    run = Run.create(_pipeline(calls), load_config(), tmp_path / "r")
    outputs = run.execute()
    m = read_manifest(tmp_path / "r")
    assert calls == ["a", "b", "c"]
    assert m["status"] == "succeeded"
    assert [s["status"] for s in m["stages"]] == ["succeeded"] * 3
    assert outputs["c"]["seen"] == ["a", "b"]  # each stage sees the outputs before it
    assert all(s["started"] and s["ended"] for s in m["stages"])
    assert (tmp_path / "r" / "config.yaml").is_file()


def test_failure_is_recorded_and_resume_skips_finished(tmp_path):
    calls = []
    run = Run.create(_pipeline(calls, fail_at="b"), load_config(), tmp_path / "r")
    with pytest.raises(StageError, match="b broke"):
        run.execute()
    m = read_manifest(tmp_path / "r")
    assert [s["status"] for s in m["stages"]] == ["succeeded", "failed", "pending"]
    assert m["stages"][1]["error"] == "b broke"
    assert (tmp_path / "r" / "a" / "out.txt").read_text() == "a"  # finished outputs intact

    calls.clear()
    resumed = Run.resume({"toy": _pipeline(calls)}, tmp_path / "r")
    resumed.execute()
    assert calls == ["b", "c"]
    assert read_manifest(tmp_path / "r")["status"] == "succeeded"


def test_cleanup_runs_on_failure(tmp_path):
    cleaned = []
    ok = Stage("a", lambda ctx: {"x": 1}, cleanup=lambda out: cleaned.append(out))
    bad = Stage("b", lambda ctx: (_ for _ in ()).throw(RuntimeError("boom")))
    run = Run.create(Pipeline("toy", [ok, bad]), load_config(), tmp_path / "r")
    with pytest.raises(StageError, match="RuntimeError: boom"):
        run.execute()
    assert cleaned == [{"x": 1}]
    assert "traceback" in read_manifest(tmp_path / "r")["stages"][1]


def test_existing_run_dir_is_refused(tmp_path):
    Run.create(_pipeline([]), load_config(), tmp_path / "r")
    assert cli_entry(["run", "stage-model", "--run-dir", str(tmp_path / "r")]) == 2


def test_run_dir_holding_other_files_is_refused_untouched(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    files = {"config.yaml": "my own config\n", "report.md": "my own report\n", "notes.txt": "x"}
    for name, text in files.items():
        (mine / name).write_text(text)
    assert cli_entry(["run", "stage-model", "--run-dir", str(mine)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in mine.iterdir()} == files  # no manifest, report or config written
    a_file = tmp_path / "a-file"
    a_file.write_text("keep")
    with pytest.raises(PipelineError, match="not an empty folder"):
        Run.create(_pipeline([]), load_config(), a_file)
    assert a_file.read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    Run.create(_pipeline([]), load_config(), empty)  # a new or empty folder is fine
    assert (empty / "manifest.json").is_file()


def test_ctrl_c_leaves_a_resumable_manifest(tmp_path, tiny_model_dir):
    """SIGINT during a slow stage: manifest says interrupted, exit 130, and --resume finishes the run."""
    script = textwrap.dedent(f"""
        import time, sys
        from pipeline.runner import Pipeline, Run, Stage
        from config import load_config
        def slow(ctx):
            print("ready", flush=True)
            time.sleep(60)
        p = Pipeline("toy", [Stage("a", lambda ctx: {{"a": 1}}), Stage("slow", slow)])
        try:
            Run.create(p, load_config(), {str(tmp_path / "r")!r}).execute()
        except KeyboardInterrupt:
            sys.exit(130)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd())
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert m["status"] == "interrupted"
    assert [s["status"] for s in m["stages"]] == ["succeeded", "interrupted"]
    calls = []
    p = Pipeline("toy", [Stage("a", lambda ctx: calls.append("a")), Stage("slow", lambda ctx: calls.append("slow"))])
    Run.resume({"toy": p}, tmp_path / "r").execute()
    assert calls == ["slow"]


def test_cli_stage_model_pipeline_on_local_dir(tmp_path, tiny_model_dir, capsys):
    rc = cli_entry(["run", "stage-model", f"actor_rollout_ref.model.path={tiny_model_dir}",
                    "--run-dir", str(tmp_path / "r")])
    assert rc == 0
    m = read_manifest(tmp_path / "r")
    assert m["stages"][0]["outputs"]["model_dir"] == str(tiny_model_dir)
    assert len(m["stages"][0]["outputs"]["fingerprint"]) == 64


def test_cli_prints_message_not_traceback(capsys):
    assert cli_entry(["config", "show", "actor_rollout_ref.actor.strategy=megatron"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_mlflow_parent_and_nested_stage_runs(tmp_path, tiny_model_dir):
    from mlflow.tracking import MlflowClient

    from ground.mlflow_uri import PARENT_TAG, tracking_uri

    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    rc = cli_entry(["run", "stage-model", f"actor_rollout_ref.model.path={tiny_model_dir}",
                    f"trainer.mlflow_tracking_uri={uri}", "trainer.project_name=t", "--run-dir", str(tmp_path / "r")])
    assert rc == 0
    m = read_manifest(tmp_path / "r")
    client = MlflowClient(uri)
    parent = client.get_run(m["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["actor_rollout_ref.model.path"] == str(tiny_model_dir)
    child = client.get_run(m["stages"][0]["mlflow_run_id"])
    assert child.data.tags[PARENT_TAG] == parent.info.run_id
    assert child.data.tags["output.fingerprint"] == m["stages"][0]["outputs"]["fingerprint"]
    assert tracking_uri(uri) == uri


@pytest.mark.parametrize("override, message", [
    ("algorithm.adv_estimator=grpoo", "algorithm.adv_estimator='grpoo': no advantage estimator has that name; valid: gae"),
    ("actor_rollout_ref.actor.policy_loss.loss_mode=vanila", "loss_mode='vanila': no policy loss"),
    ("actor_rollout_ref.actor.loss_agg_mode=token_mean", "loss_agg_mode='token_mean': no loss aggregation mode"),
    ("algorithm.kl_penalty=k4", "algorithm.kl_penalty='k4': no KL estimator"),
    ("reward_model.scorer=gsm9k", "reward_model.scorer='gsm9k': no reward scorer"),
])
@pytest.mark.parametrize("command", ["run", "train", "config show"])
def test_a_misspelt_component_name_fails_before_any_run_directory(tmp_path, monkeypatch, capsys, override,
                                                                   message, command):
    monkeypatch.chdir(tmp_path)
    args = {"run": ["run", "train-and-publish"], "train": ["train"], "config show": ["config", "show"]}[command]
    args = [*args, override]
    assert cli_entry(args) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no runs/, no mlruns/, no data written


def test_trust_remote_code_is_refused_by_name():
    from ground.errors import ConfigError

    with pytest.raises(ConfigError, match="trust_remote_code=True: .* Set actor_rollout_ref.model.trust_remote_code=False"):
        load_config(None, ["actor_rollout_ref.model.trust_remote_code=True"])


def test_console_is_short_and_the_run_log_holds_the_rest(tmp_path, tiny_model_dir, capsys):
    import logging

    run_dir = tmp_path / "r"
    assert cli_entry(["run", "stage-model", "--run-dir", str(run_dir),
                      f"actor_rollout_ref.model.path={tiny_model_dir}"]) == 0
    logging.getLogger("vllm.engine").warning("a library warning")  # after the run: file only, never console
    logging.getLogger("stages.train").warning("our own warning")   # ours: console and file
    err = capsys.readouterr().err
    assert "stage stage_model: started" in err and "stage stage_model: succeeded" in err
    assert "fingerprint" not in err and "a library warning" not in err and "our own warning" in err
    log_text = (run_dir / "pipeline.log").read_text()
    assert "INFO stages.stage_model: Base model" in log_text and "fingerprint" in log_text
    assert "WARNING vllm.engine: a library warning" in log_text


def test_pipeline_run_warns_that_it_replaces_a_set_default_local_dir(tmp_path, monkeypatch, caplog):
    # `pipeline run` keeps checkpoints in the run directory (for --resume): a default_local_dir the user set is
    # not read, and its pre-run check says so; left at its default, nothing is said.
    import logging

    from pipeline.pipelines import _check_train

    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        _check_train(load_config(None, []))
        assert "default_local_dir" not in caplog.text
        _check_train(load_config(None, ["trainer.default_local_dir=mine"]))
    assert "trainer.default_local_dir=mine (the command line) is not used by this command" in caplog.text
