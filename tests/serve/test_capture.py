"""Capture and feedback against one real `pipeline serve --capture` (tiny model, vLLM CPU, official `openai` client,
real HTTP for `POST /v1/feedback`), two adapters, API key on.

The capture's shards are rotated after every line (a tiny --capture-max-shard-mb), so the run-time failure test can
make the next shard impossible to create: the test runs as root here, and root writes through `chmod 0500`, so
the records folder is replaced by a regular file instead (the same ENOTDIR/EACCES path for the writer).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from registry import open_registry
from tests.serve.cli_server import ctrl_c_when_done, free_port, start_cli
from tests.synthetic_lora import write_lora

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

API_KEY = "capture-key-26"
SECRET = "SECRET-"  # every secret is SECRET-<digits>; the server's pattern hides them
PATTERN = r"SECRET-[0-9]+"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("capture")
    reg = open_registry(str(root / "registry"), mirror_mlflow=False)
    for name, seed in (("alpha", 1), ("beta", 2)):
        reg.publish(write_lora(root / f"lora-{name}", rank=8, alpha=16, seed=seed), name, base_dir=tiny_model_dir)
    reg.set_alias("beta", "prod", 1)
    capture_dir = root / "capture" / "store"  # created by the server, parents included
    port = free_port()
    cli, _, output = start_cli(
        ["--registry", str(root / "registry"), "--base", str(tiny_model_dir), "--port", str(port),
         "--max-loras", "2", "--max-model-len", "256", "--kv-cache-gib", "0.0625", "--dtype", "float32",
         "--served-name", "tiny-base", "--capture", str(capture_dir), "--capture-redact", PATTERN,
         "--capture-max-shard-mb", "0.0001"],
        env={"PIPELINE_SERVE_API_KEY": API_KEY})
    with ctrl_c_when_done(cli, output):
        url = f"http://127.0.0.1:{port}/v1"
        digests = {name: "sha256:" + hashlib.sha256(
            (reg.store.version_dir(name, 1) / "manifest.json").read_bytes()).hexdigest() for name in ("alpha", "beta")}
        yield {"url": url, "capture": capture_dir, "digests": digests,
               "client": openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=120)}


def read_records(capture: Path, kind: str = "records") -> list[dict]:
    lines = []
    for shard in sorted((capture / kind).glob("*.jsonl")):
        lines += [json.loads(line) for line in shard.read_text().splitlines()]
    return lines


def _ask(client, i: int) -> dict:
    """Request i of the 200: alternating adapters and endpoints; 0-9 opt out, 10-29 carry a secret, even ones
    ask for the token ids themselves."""
    model = "alpha" if i % 2 else "beta@prod"
    text = f"Question {i}: what is {i} + 1?" + (f" my card is {SECRET}{4000 + i} ok" if 10 <= i < 30 else "")
    extra_body = {"return_token_ids": True} if i % 4 in (0, 1) else {}
    extra_headers = {}
    if i < 5:
        extra_headers["x-capture"] = "off"
    elif i < 10:
        extra_body["capture"] = False
    if i % 3 == 0:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": text}], max_tokens=3, temperature=0,
            extra_body=extra_body, extra_headers=extra_headers)
    else:
        raw = client.completions.with_raw_response.create(
            model=model, prompt=text, max_tokens=3, temperature=0, extra_body=extra_body, extra_headers=extra_headers)
    answer = raw.http_response.json()
    return {"i": i, "id": raw.headers["x-request-id"], "status": raw.http_response.status_code, "answer": answer,
            "adapter": model.split("@")[0], "asked_ids": bool(extra_body.get("return_token_ids")),
            "chat": i % 3 == 0}


def test_two_adapters_200_requests_190_records(served):
    with ThreadPoolExecutor(8) as pool:
        asked = list(pool.map(lambda i: _ask(served["client"], i), range(200)))
    assert all(a["status"] == 200 for a in asked)
    assert len({a["id"] for a in asked}) == 200 and all(a["id"].startswith("req-") for a in asked)
    records = {r["request_id"]: r for r in read_records(served["capture"])}
    ours = {a["id"]: a for a in asked}
    captured = [ours[rid] for rid in records if rid in ours]
    assert len(captured) == 190 and len([r for r in read_records(served["capture"]) if r["request_id"] in ours]) == 190
    assert not any(a["i"] < 10 for a in captured)  # every opt-out, header or field, is absent
    for a in asked:
        choice = a["answer"]["choices"][0]
        if not a["asked_ids"]:  # asked for by the capture only: taken out of the caller's answer
            assert choice.get("token_ids") is None and choice.get("prompt_token_ids") is None, a
            assert a["answer"].get("prompt_token_ids") is None, a
        if a["i"] < 10:
            continue
        r = records[a["id"]]
        assert (r["adapter"], r["version"], r["manifest_digest"]) == (a["adapter"], 1, served["digests"][a["adapter"]])
        assert r["requested_model"] == ("alpha" if a["i"] % 2 else "beta@prod")
        assert r["endpoint"] == ("chat" if a["chat"] else "completion")
        assert r["finish_reason"] == choice["finish_reason"] and r["completion_tokens"] == a["answer"]["usage"][
            "completion_tokens"]
        if 10 <= a["i"] < 30:
            assert r["redacted"] is True and r["token_ids"] is None and r["prompt_token_ids"] is None
            assert "[REDACTED]" in json.dumps(r["messages"] or r["prompt"])
        else:
            assert r["redacted"] is False and isinstance(r["token_ids"], list) and r["token_ids"]
            if a["asked_ids"]:  # the ids the caller got are the ids on disk
                assert r["token_ids"] == choice["token_ids"]
                assert r["prompt_token_ids"] == a["answer"].get("prompt_token_ids", choice.get("prompt_token_ids"))
    on_disk = b"".join(p.read_bytes() for p in served["capture"].rglob("*") if p.is_file())
    assert SECRET.encode() not in on_disk
    assert (served["capture"].stat().st_mode & 0o777) == 0o700
    assert json.loads((served["capture"] / "capture.json").read_text())["format"] == "lora-pipeline-capture/1"


def test_streamed_answers_are_captured_from_their_chunks(served):
    """A stream reaches the caller chunk by chunk, untouched; its record holds the text the chunks spelled."""
    for secret in ("", f" {SECRET}77"):
        raw = served["client"].chat.completions.with_raw_response.create(
            model="alpha", messages=[{"role": "user", "content": "Stream please" + secret}], max_tokens=3,
            stream=True, temperature=0)
        request_id = raw.headers["x-request-id"]
        chunks = list(raw.parse())
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks and raw.http_response.status_code == 200
        assert all(getattr(c.choices[0], "token_ids", None) is None for c in chunks if c.choices)  # not asked
        # written before the stream's [DONE] went out, which the client read before returning
        [record] = [r for r in read_records(served["capture"]) if r["request_id"] == request_id]
        assert record["endpoint"] == "chat" and record["adapter"] == "alpha" and record["version"] == 1
        assert record["completion"] == streamed and record["finish_reason"] in ("length", "stop")
        assert record["messages"][0]["content"] == "Stream please" + (" [REDACTED]" if secret else "")
        assert record["redacted"] is bool(secret) and record["token_ids"] is None
    assert SECRET.encode() not in b"".join(p.read_bytes() for p in served["capture"].rglob("*.jsonl"))


def test_refused_requests_are_not_captured(served):
    before = len(read_records(served["capture"]))
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served["url"], api_key="wrong", max_retries=0).completions.create(
            model="alpha", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        served["client"].completions.create(model="nosuch", prompt="hi", max_tokens=2)
    assert len(read_records(served["capture"])) == before


def test_feedback_100_posts(served):
    captured = [r["request_id"] for r in read_records(served["capture"])][:92]
    assert len(captured) == 92
    post = httpx.Client(base_url=served["url"], headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    calls = [{"request_id": rid, "score": i / 100} if i % 2 else {"request_id": rid, "label": "good"}
             for i, rid in enumerate(captured)]
    calls += [{"request_id": captured[k], "label": "bad", "comment": "changed my mind"} for k in range(3)]
    calls += [{"request_id": f"req-{'0' * 31}{k}", "score": 1} for k in range(5)]  # never captured
    statuses = [post.post("/feedback", json=body).status_code for body in calls]
    assert len(calls) == 100 and statuses == [200] * 95 + [404] * 5
    stored = read_records(served["capture"], "feedback")
    assert len(stored) == 95
    last = {}
    for f in stored:  # in file order per id, as the readers apply them: the last wins
        last[f["request_id"]] = f
    assert [last[captured[k]]["label"] for k in range(3)] == ["bad"] * 3
    assert last[captured[5]]["score"] == 0.05 and last[captured[4]]["label"] == "good"
    for body, field in (({"request_id": captured[0], "score": "high"}, "score"),
                        ({"request_id": captured[0], "label": "meh"}, "label"),
                        ({"score": 1}, "request_id")):
        reply = post.post("/feedback", json=body)
        assert reply.status_code == 400 and f"`{field}`" in reply.json()["error"]["message"], reply.text
    assert httpx.post(served["url"] + "/feedback", json=calls[0]).status_code == 401  # the key, as everywhere


def test_a_folder_unwritable_at_run_time_costs_no_request(served):
    records = served["capture"] / "records"
    moved = served["capture"] / "records.moved"
    records.rename(moved)
    records.write_text("not a folder\n")  # the next shard cannot be created (root writes through chmod 0500)
    try:
        for i in range(5):
            reply = served["client"].completions.create(model="alpha", prompt=f"Still there {i}?", max_tokens=2)
            assert reply.choices
    finally:
        records.unlink()
        moved.rename(records)
    metrics = httpx.get(served["url"].removesuffix("/v1") + "/metrics",
                        headers={"Authorization": f"Bearer {API_KEY}"}).text
    lost = [line for line in metrics.splitlines() if line.startswith("lora_pipeline_capture_records_lost_total ")]
    assert lost and float(lost[0].split()[1]) >= 5, lost
    before = len(read_records(served["capture"]))  # writable again: recorded again
    served["client"].completions.create(model="alpha", prompt="Back?", max_tokens=2)
    assert len(read_records(served["capture"])) == before + 1


def test_an_unwritable_capture_folder_is_refused_at_start(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    pipeline = os.path.join(os.path.dirname(sys.executable), "pipeline")
    run = subprocess.run([pipeline, "serve", "--capture", str(blocker / "capture")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert str(blocker / "capture") in run.stderr and "Traceback" not in run.stderr
