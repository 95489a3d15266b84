"""One real 2-step training run on the tiny model (Ray, 2 FSDP2 workers, a real vLLM engine) with all five loggers:
MLflow on the real tracking server, W&B offline (WANDB_MODE=offline, the real `wandb` package), TensorBoard and
verl's JSONL file. Every metric MLflow gets is read back from each of the others with their own formats' readers.
One run for all of them: CI time matters."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.stages.train.toy_task import toy_overrides

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of a W&B run file (`run-<id>.wandb`), read with wandb's own record schema.

    wandb 0.31 no longer ships a Python reader for its transaction log; the container is LevelDB's log format
    (32 KiB blocks of chunks: crc32 4 bytes, length 2, type 1; FULL=1, FIRST=2, MIDDLE=3, LAST=4) after a 7-byte
    `:W&B` header, each record a `wandb_internal_pb2.Record` protobuf."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    pos, parts, rows = 7, [], []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_one_run_writes_every_mlflow_metric_to_wandb_tensorboard_and_the_file(tiny_model_dir, tmp_path,
                                                                              mlflow_server, monkeypatch):
    import wandb
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from config import load_config
    from stages.train import train

    for var in ("WANDB_DIR", "TENSORBOARD_DIR", "VERL_FILE_LOGGER_PATH", "VERL_FILE_LOGGER_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    wandb.teardown()  # wandb reads WANDB_* once per process: make it read this test's

    out = tmp_path / "out"
    cfg = load_config(None, toy_overrides(tiny_model_dir, tmp_path, steps=2, extra={
        "trainer.logger": "[console,mlflow,wandb,tensorboard,file]",
        "trainer.project_name": "loggers", "trainer.experiment_name": "all-five",
        "trainer.mlflow_tracking_uri": mlflow_server.url,
        "trainer.log_val_generations": 3,
        "trainer.val_before_train": False,
    }))
    try:
        outputs = train(cfg, str(tiny_model_dir), "fp", out_dir=str(out))
    finally:
        wandb.teardown()
    history = [json.loads(x) for x in Path(outputs["history_path"]).read_text().splitlines()]
    steps = {h["step"]: h for h in history if "reward/mean" in h}
    assert sorted(steps) == [1, 2]

    # MLflow: what every other logger must also hold
    run = MlflowClient(mlflow_server.url).get_run(outputs["mlflow_run_id"])
    mlflow_keys = set(run.data.metrics)
    assert {"reward/mean", "timing/step", "val/reward"} <= mlflow_keys

    where = outputs["loggers"]
    assert set(where) == {"mlflow", "wandb", "tensorboard", "file"}
    assert outputs["mlflow_run_id"] in where["mlflow"]

    # W&B offline: a run folder under the training folder, its history holding our metrics
    folders = list((out / "wandb").glob("offline-run-*"))
    assert len(folders) == 1 and str(folders[0]) in where["wandb"] and "wandb sync" in where["wandb"]
    rows = wandb_history(next(folders[0].glob("run-*.wandb")))
    by_step: dict[int, dict] = {}
    for row in rows:
        by_step.setdefault(row["_step"], {}).update(row)
    assert mlflow_keys <= {k for row in rows for k in row}
    for step in (1, 2):
        assert by_step[step]["reward/mean"] == pytest.approx(steps[step]["reward/mean"], abs=1e-12)
    # the validation table as a W&B table (3 rows), at the step of the validation
    assert by_step[2]["val/generations/_type"] == "table-file" and by_step[2]["val/generations/nrows"] == 3
    table = json.loads((folders[0] / "files" / by_step[2]["val/generations/path"]).read_text())
    assert "input" in table["columns"] and "score" in table["columns"] and len(table["data"]) == 3

    # TensorBoard: the folder verl would use, rooted in the training folder; tensorboard's reader reads it back
    tb = out / "tensorboard_log" / "loggers" / "all-five"
    assert where["tensorboard"] == str(tb) and list(tb.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tb))
    events.Reload()
    assert mlflow_keys <= set(events.Tags()["scalars"])
    tb_reward = {e.step: e.value for e in events.Scalars("reward/mean")}
    for step in (1, 2):
        assert tb_reward[step] == pytest.approx(steps[step]["reward/mean"], rel=1e-6)  # stored as float32
    assert "val/generations/text_summary" in events.Tags()["tensors"]

    # verl's file logger: one {"step", "data"} line per record
    path = out / "file_log" / "loggers" / "all-five.jsonl"
    assert where["file"] == str(path)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert mlflow_keys <= {k for line in lines for k in line["data"]}
    file_reward = {x["step"]: x["data"]["reward/mean"] for x in lines if "reward/mean" in x["data"]}
    assert file_reward == {s: steps[s]["reward/mean"] for s in (1, 2)}
