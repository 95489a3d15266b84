"""Rollout and validation dumps from real runs on the tiny model (Ray, 2 FSDP2 workers, a real vLLM engine),
tracked on the real MLflow server: every sampled response with its score per step, the validation table as an
MLflow artifact, and a second run into the same folders keeps the first's files."""

from __future__ import annotations

import pytest

from stages.train.dumps import read_dumps
from tests.stages.train.toy_task import toy_overrides

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def _run(model_dir, root, out, steps, mlflow_uri):
    from config import load_config
    from stages.train import train

    cfg = load_config(None, toy_overrides(model_dir, root, steps=steps, extra={
        "trainer.rollout_data_dir": str(root / "rollouts"),
        "trainer.validation_data_dir": str(root / "validation"),
        "trainer.log_val_generations": 3,
        "trainer.val_before_train": True,
        "trainer.mlflow_tracking_uri": mlflow_uri,
    }))
    return train(cfg, str(model_dir), "fp", out_dir=str(out))


def test_dumps_hold_every_response_per_step_and_a_second_run_keeps_the_first(tiny_model_dir, tmp_path,
                                                                              mlflow_server):
    import mlflow
    from mlflow.tracking import MlflowClient

    first = _run(tiny_model_dir, tmp_path, tmp_path / "out1", 2, mlflow_server.url)
    rollouts = read_dumps(tmp_path / "rollouts")
    assert sorted(rollouts) == ["1.jsonl", "2.jsonl"]
    for step in (1, 2):
        rows = rollouts[f"{step}.jsonl"]
        assert len(rows) == 4 * 4  # train_batch_size prompts x rollout.n responses
        assert all(r["step"] == step and isinstance(r["score"], float) and r["input"] and "output" in r
                   for r in rows)
    validation = read_dumps(tmp_path / "validation")
    assert sorted(validation) == ["0.jsonl", "2.jsonl"]  # before training, and the closing validation
    assert all("score" in r and "gts" in r for r in validation["2.jsonl"])
    # the table: 3 validation samples as an MLflow artifact of the run, and in the outputs
    assert len(first["val_generations"]) == 3
    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_experiment("tests")  # load_table searches the current experiment: toy_overrides' project_name
    table = mlflow.load_table("val_generations/step_2.json", run_ids=[first["mlflow_run_id"]])
    assert len(table) == 3 and set(table.columns) >= {"input", "output", "score"}
    assert MlflowClient(mlflow_server.url).get_run(first["mlflow_run_id"])

    before = {name: (tmp_path / "rollouts" / name).read_bytes() for name in rollouts}
    _run(tiny_model_dir, tmp_path, tmp_path / "out2", 1, mlflow_server.url)
    again = read_dumps(tmp_path / "rollouts")
    assert sorted(again) == ["1-2.jsonl", "1.jsonl", "2.jsonl"]
    assert {name: (tmp_path / "rollouts" / name).read_bytes() for name in rollouts} == before
