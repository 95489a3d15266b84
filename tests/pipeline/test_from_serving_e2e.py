"""The loop end to end, all real: `pipeline serve --capture` (tiny model, vLLM CPU) serves two adapters, the
official `openai` client asks 160 questions, `POST /v1/feedback` (httpx) scores 100 answers (5 of them for ids
nobody was given: 404; 3 scored twice: the last wins), `pipeline data from-serving arith@prod` builds the verl
set, `pipeline run train-and-publish` trains two steps from arith@prod on it with the feedback reward and
publishes arith@2, whose lineage names the capture manifest and its digest."""

from __future__ import annotations

import json
import os
import signal

import httpx
import openai
import pytest

from pipeline.cli import cli_entry
from pipeline.runner import read_manifest
from registry import open_registry
from stages.train.data import load_rows
from tests.serve.cli_server import free_port, start_cli
from tests.stages.train.toy_task import toy_overrides
from tests.synthetic_lora import write_lora

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

API_KEY = "flywheel-key"
ARITH_ASKS = 100  # to arith@prod; questions repeat after 90, so from-serving drops 10 older duplicates
OTHER_ASKS = 60   # to the other adapter


def _question(i: int) -> str:
    return f"What is {i % 90} + 1?"


def _serve_and_collect(tmp_path, tiny_model_dir, store, capture_dir) -> dict:
    port = free_port()
    cli, _, output = start_cli(
        ["--registry", str(store), "--base", str(tiny_model_dir), "--port", str(port), "--max-loras", "2",
         "--max-model-len", "256", "--kv-cache-gib", "0.0625", "--dtype", "float32", "--served-name", "tiny-base",
         "--capture", str(capture_dir)], env={"PIPELINE_SERVE_API_KEY": API_KEY})
    try:
        url = f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=120)
        ids = []
        for i in range(ARITH_ASKS + OTHER_ASKS):  # one at a time: "the newest of a prompt" is then the later ask
            model = "arith@prod" if i < ARITH_ASKS else "other"
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": _question(i)}], max_tokens=4, temperature=0)
            ids.append(raw.headers["x-request-id"])
        statuses = []
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
            def feedback(body):
                statuses.append(http.post("/feedback", json=body).status_code)
            for i in range(95):  # arith answers 0-94: scores 0, 0.25, ..., 1
                feedback({"request_id": ids[i], "score": (i % 5) / 4})
            for i in range(5):  # ids nobody was given
                feedback({"request_id": f"req-{i:032x}", "score": 1.0})
            for i in (0, 1, 2):  # scored again: the last wins (0 -> good, 0.25 -> bad, 0.5 -> 0.75)
                feedback([{"request_id": ids[0], "label": "good"}, {"request_id": ids[1], "label": "bad"},
                          {"request_id": ids[2], "score": 0.75}][i])
        assert statuses == [200] * 95 + [404] * 5 + [200] * 3
        return {"ids": ids}
    finally:
        cli.send_signal(signal.SIGINT)
        try:
            cli.communicate(timeout=90)
        finally:
            if cli.poll() is None:
                os.killpg(cli.pid, signal.SIGKILL)
                cli.wait()


def test_capture_feedback_from_serving_train_publish_lineage(tmp_path, tiny_model_dir, capsys):
    store = tmp_path / "registry"
    reg = open_registry(str(store), mirror_mlflow=False)
    reg.publish(write_lora(tmp_path / "arith1", rank=4, alpha=8.0, seed=3, base_model=str(tiny_model_dir)),
                "arith", base_dir=tiny_model_dir, alias="prod")
    reg.publish(write_lora(tmp_path / "other1", rank=4, alpha=8.0, seed=4, base_model=str(tiny_model_dir)),
                "other", base_dir=tiny_model_dir)
    capture_dir = tmp_path / "capture"
    ids = _serve_and_collect(tmp_path, tiny_model_dir, store, capture_dir)["ids"]

    out = tmp_path / "from-arith"
    capsys.readouterr()
    assert cli_entry(["data", "from-serving", "arith@prod", "--capture", str(capture_dir), "--out", str(out),
                      "--registry", str(store)]) == 0
    digest = capsys.readouterr().out.split()[-1]
    manifest = json.loads((out / "capture_dataset.json").read_text())
    counts = manifest["counts"]
    assert (counts["read"], counts["other_adapters"], counts["deduplicated"], counts["kept"]) == (160, 60, 10, 90)
    assert counts["feedback_records"] == 98  # the 404s were never written
    rows = load_rows(out / "train.parquet")
    kept = {row["extra_info"]["request_id"] for row in rows}
    assert kept == set(ids[10:ARITH_ASKS])  # each repeated question keeps its newer ask
    truths = {row["prompt"][0]["content"]: json.loads(row["reward_model"]["ground_truth"]) for row in rows}
    scores = {a["request_id"]: a["score"] for truth in truths.values() for a in truth["answers"]}
    assert len(scores) == 95 and (scores[ids[0]], scores[ids[1]], scores[ids[2]]) == (1.0, 0.0, 0.75)
    assert scores[ids[3]] == 0.75 and scores[ids[94]] == 1.0

    run_dir = tmp_path / "runs" / "flywheel"
    overrides = toy_overrides(tiny_model_dir, tmp_path, steps=2, extra={
        "registry.uri": str(store),
        "actor_rollout_ref.model.lora_adapter_path": "arith@prod",
        "data.train_files": str(out / "train.parquet"),
        "data.val_files": str(out / "train.parquet"),
        "custom_reward_function.path": "null",  # the rows' data_source, feedback_match, scores them
        "publish.name": "arith",
        "publish.alias": "candidate",
        "publish.force": True,  # two steps need not beat the start; this test is about the lineage
        "trainer.cpu_workers": 1,
    })
    assert cli_entry(["run", "train-and-publish", "--run-dir", str(run_dir), *overrides]) == 0
    published = {s["name"]: s["outputs"] for s in read_manifest(run_dir)["stages"]}["publish"]
    assert published["ref"] == "arith@2"
    lineage = open_registry(str(store), mirror_mlflow=False).resolve("arith@candidate").lineage
    [captured] = lineage["capture_datasets"]
    assert captured["manifest"] == str((out / "capture_dataset.json").resolve())
    assert captured["manifest_digest"] == digest and captured["data_file_matches"] is True
    assert captured["capture"] == str(capture_dir.resolve()) and captured["counts"] == counts
    assert captured["adapter"]["resolved"] == "arith@1"
    assert lineage["start_adapter"]["ref"] == "arith@1"
