"""Capture folders written the way `pipeline serve --capture DIR` writes them (the shared record spec), for the
readers' tests: request records and feedback as JSONL shards under records/ and feedback/."""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timedelta, timezone
from pathlib import Path

T0 = datetime(2026, 12, 3, 17, 0, 0, tzinfo=timezone.utc)


def iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def request_record(question: str, answer: str, *, adapter="arith", version=1, seconds=0.0, request_id=None,
                   endpoint="chat") -> dict:
    chat = endpoint == "chat"
    return {
        "kind": "request", "format": 1,
        "request_id": request_id or f"req-{secrets.token_hex(16)}",
        "time": iso(T0 + timedelta(seconds=seconds)),
        "adapter": adapter, "version": version, "manifest_digest": f"sha256:{'ab' * 32}",
        "requested_model": f"{adapter}@prod", "route_target": None, "endpoint": endpoint,
        "messages": [{"role": "user", "content": question}] if chat else None,
        "prompt": None if chat else question,
        "completion": answer, "prompt_token_ids": [1, 2, 3], "token_ids": [4, 5],
        "finish_reason": "stop", "latency_s": 0.1, "prompt_tokens": 3, "completion_tokens": 2, "redacted": False,
    }


def feedback_record(request_id: str, *, score=None, label=None, seconds=100.0, comment=None) -> dict:
    return {"kind": "feedback", "format": 1, "request_id": request_id, "time": iso(T0 + timedelta(seconds=seconds)),
            "score": score, "label": label, "comment": comment}


def write_shard(folder: Path, sub: str, records: list[dict], name: str = "host-1-1764780000000-00000",
                tail: bytes = b"") -> Path:
    """Append `records` as JSONL lines to DIR/sub/name.jsonl, then the raw bytes `tail` (a torn line, say)."""
    (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "capture.json").exists() or (folder / "capture.json").write_text(
        json.dumps({"format": "lora-pipeline-capture/1", "created": iso(T0)}))
    path = folder / sub / f"{name}.jsonl"
    with open(path, "ab") as f:
        for record in records:
            f.write(json.dumps(record).encode() + b"\n")
        f.write(tail)
    return path
