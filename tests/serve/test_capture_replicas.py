"""Capture with `pipeline serve --replicas 2` (Ray Serve, tiny model, vLLM CPU), driven by the official client.

The capture is written where the middleware runs: the ingress process, in front of both replicas. A replica
SIGKILLed under load costs no record: every request answered with 200 has exactly one record (a request the
ingress sent again to the other replica is recorded once, when its answer goes out), and the records name answers
of both replicas (`x-served-by-replica`).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from registry import open_registry
from tests.serve.cli_server import ctrl_c_when_done, free_port
from tests.serve.shared_server import our_replica_pids
from tests.serve.test_capture import read_records
from tests.serve.test_replicas import start_replicated_cli
from tests.synthetic_lora import write_lora

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

API_KEY = "capture-replicas-key"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("capture-replicas")
    reg = open_registry(str(root / "registry"), mirror_mlflow=False)
    for name, seed in (("alpha", 1), ("beta", 2)):
        reg.publish(write_lora(root / f"lora-{name}", rank=8, alpha=16, seed=seed), name, base_dir=tiny_model_dir)
    port = free_port()
    cli, output = start_replicated_cli(
        ["--registry", str(root / "registry"), "--base", str(tiny_model_dir), "--port", str(port),
         "--replicas", "2", "--routing", "round_robin", "--max-loras", "2", "--max-model-len", "256",
         "--kv-cache-gib", "0.0625", "--dtype", "float32", "--served-name", "tiny-base",
         "--capture", str(root / "capture")],
        env={"PIPELINE_SERVE_API_KEY": API_KEY})
    with ctrl_c_when_done(cli, output, timeout=180):
        url = f"http://127.0.0.1:{port}/v1"
        yield {"url": url, "capture": root / "capture", "cli_pid": cli.pid,
               "client": openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=120)}


def test_a_callers_own_request_id_names_its_record(served):
    """Serve's proxy keeps a caller's `x-request-id`: a well-formed one names the record (sent twice, two records
    share it), one that feedback could never name is refused with 400 naming the header, and nothing is recorded."""
    client = served["client"]
    with pytest.raises(openai.BadRequestError, match="x-request-id"):
        client.completions.create(model="alpha", prompt="Hi?", max_tokens=2, temperature=0,
                                  extra_headers={"x-request-id": "not an/id"})
    for _ in range(2):
        raw = client.completions.with_raw_response.create(model="alpha", prompt="Hi?", max_tokens=2, temperature=0,
                                                          extra_headers={"x-request-id": "client-chosen.1"})
        assert raw.headers["x-request-id"] == "client-chosen.1"
    ids = [r["request_id"] for r in read_records(served["capture"])]
    assert "not an/id" not in ids and ids.count("client-chosen.1") == 2


def test_sigkill_of_a_replica_loses_no_record(served):
    client = served["client"]
    earlier = Counter(r["request_id"] for r in read_records(served["capture"]))  # the module's other tests' records
    before = our_replica_pids(served["cli_pid"])
    assert len(before) == 2, before
    victim = sorted(before)[0]
    answered, failed, killed = [], [], threading.Event()

    def one(i: int):
        try:
            raw = client.completions.with_raw_response.create(
                model="alpha" if i % 2 else "beta", prompt=f"Question {i}?", max_tokens=8, temperature=0)
            answered.append((raw.headers["x-request-id"], raw.headers.get("x-served-by-replica"),
                             raw.http_response.status_code))
        except Exception as exc:  # a failed request must simply have no record; counted below
            failed.append(repr(exc))
        if len(answered) >= 20 and not killed.is_set():
            killed.set()
            os.kill(victim, signal.SIGKILL)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(100)))
    assert killed.is_set() and len(answered) + len(failed) == 100
    assert all(status == 200 for _, _, status in answered)
    counts = Counter(r["request_id"] for r in read_records(served["capture"])) - earlier
    ours = {request_id: replica for request_id, replica, _ in answered}
    assert {rid: counts[rid] for rid in ours} == {rid: 1 for rid in ours}  # none lost, none twice
    assert sum(counts.values()) == len(ours)  # and nothing for a request that was not answered
    assert len({ours[rid] for rid in ours}) >= 2, "the records name answers of both replicas"
    shards = list((served["capture"] / "records").glob("*.jsonl"))
    writers = {shard.name.rsplit("-", 3)[1] for shard in shards}  # HOST-PID-MS-SEQ.jsonl
    assert len(writers) == 1, shards  # one writer: the ingress process (the replicas do not write)
    assert json.loads(shards[0].read_text().splitlines()[0])["adapter"] in ("alpha", "beta")
