"""Reading a serving capture folder: the request records and the feedback attached to them.

The folder is what `pipeline serve --capture DIR` writes (one writer per process, append-only JSONL shards):

    DIR/records/<host>-<pid>-<start ms>-<seq>.jsonl    {"kind": "request", "format": 1, "request_id": ..., ...}
    DIR/feedback/<host>-<pid>-<start ms>-<seq>.jsonl   {"kind": "feedback", "format": 1, "request_id": ..., ...}
    DIR/capture.json                                   {"format": "lora-pipeline-capture/1", "created": ISO}

    capture = read_capture("captures/arith")
    capture.records                  # request records, oldest first
    capture.feedback["req-..."]      # the last feedback for that request (time-ordered across shards)
    capture.torn_lines               # ["records/x.jsonl:17", ...]: a writer killed mid-line, skipped

A writer killed while writing leaves at most one incomplete line, at the end of its shard and without a newline:
that line is skipped and counted, since the request it described was never acknowledged as recorded. Any other
line that is not a valid record is damage a reader must not paper over: a DataError naming the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ground.errors import DataError

CAPTURE_FORMAT = "lora-pipeline-capture/1"
RECORD_FORMAT = 1
LABEL_SCORES = {"good": 1.0, "bad": 0.0}  # what a label counts as for a reader that needs a number
REQUEST_KEYS = ("request_id", "time", "adapter", "version", "completion")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def utc_now() -> str:
    """Now, as the capture spells its times (UTC, microseconds, `Z`); parse_time reads it back."""
    return datetime.now(timezone.utc).strftime(TIME_FORMAT)


def parse_time(text: str, where: str) -> datetime:
    """An ISO 8601 time as the writer spells it (`...Z`), as an aware datetime; DataError naming `where`."""
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00")) if isinstance(text, str) else None
    except ValueError:
        stamp = None
    if stamp is None or stamp.tzinfo is None:
        raise DataError(f"{where}: `time` must be an ISO 8601 UTC time like 2026-12-03T17:01:02.123Z; got {text!r:.80}.")
    return stamp


def feedback_score(feedback: dict | None) -> float | None:
    """A feedback record's number: its `score`, else its label's (good 1.0, bad 0.0); None without feedback."""
    if not feedback:
        return None
    if feedback.get("score") is not None:
        return float(feedback["score"])
    return LABEL_SCORES.get(feedback.get("label"))


@dataclass
class Capture:
    folder: Path
    records: list[dict] = field(default_factory=list)      # request records, oldest first
    feedback: dict[str, dict] = field(default_factory=dict)  # request id -> its last feedback record
    feedback_lines: int = 0                                   # feedback records read, repeats included
    torn_lines: list[str] = field(default_factory=list)      # "<shard>:<line>" of each skipped torn last line


def _shard_lines(path: Path, root: Path, torn: list[str]):
    """(line number, parsed object) for each line of one shard; a torn last line is skipped and noted in `torn`."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    ends_cleanly = raw.endswith(b"\n") or not raw
    if ends_cleanly:
        lines = lines[:-1]  # the empty piece after the final newline
    shown = path.relative_to(root)
    for number, line in enumerate(lines, start=1):
        is_last_unterminated = number == len(lines) and not ends_cleanly
        try:
            obj = json.loads(line.decode("utf-8"))
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            if is_last_unterminated:  # a writer killed mid-write: that record was never complete
                torn.append(f"{shown}:{number}")
                continue
            raise DataError(f"capture shard `{path}` line {number} is not a JSON object ({exc}); a capture is only "
                            "ever appended to, so this is damage: move the shard aside (or delete that line) and "
                            "build again.") from None
        yield number, obj


def _check(obj: dict, kind: str, where: str) -> dict:
    if obj.get("kind") != kind:
        raise DataError(f"{where}: expected a {kind!r} record, got kind={obj.get('kind')!r:.40}; a shard under "
                        f"{'records' if kind == 'request' else 'feedback'}/ holds only {kind} records.")
    if obj.get("format") != RECORD_FORMAT:
        raise DataError(f"{where}: record format {obj.get('format')!r:.40} is not {RECORD_FORMAT}, the one this "
                        "version reads; build the data set with the lora-pipeline version that wrote the capture.")
    needed = REQUEST_KEYS if kind == "request" else ("request_id", "time")
    missing = [k for k in needed if k not in obj]
    if missing:
        raise DataError(f"{where}: the {kind} record lacks {', '.join(missing)}.")
    obj["_time"] = parse_time(obj["time"], where)
    return obj


def _shards(folder: Path, sub: str) -> list[Path]:
    return sorted(p for p in (folder / sub).glob("*.jsonl") if p.is_file()) if (folder / sub).is_dir() else []


def read_capture(folder: str | Path) -> Capture:
    """Every request record and the last feedback per request id of the capture folder `folder`."""
    folder = Path(folder)
    if not (folder / "records").is_dir():
        raise DataError(f"--capture `{folder}` has no records/ folder: it is not a capture folder (one written by "
                        "`pipeline serve --capture DIR`), or nothing was captured yet. Point --capture at that DIR.")
    marker = folder / "capture.json"
    if marker.is_file():
        try:
            declared = json.loads(marker.read_text()).get("format")
        except (ValueError, AttributeError):
            declared = None
        if declared != CAPTURE_FORMAT:
            raise DataError(f"`{marker}` declares format {declared!r:.60}, not {CAPTURE_FORMAT!r}; this version "
                            "reads only that one.")
    capture = Capture(folder=folder)
    for shard in _shards(folder, "records"):
        for number, obj in _shard_lines(shard, folder, capture.torn_lines):
            capture.records.append(_check(obj, "request", f"capture shard `{shard}` line {number}"))
    capture.records.sort(key=lambda r: r["_time"])  # stable: a shard's own order breaks ties
    every_feedback = []
    for shard in _shards(folder, "feedback"):
        for number, obj in _shard_lines(shard, folder, capture.torn_lines):
            every_feedback.append(_check(obj, "feedback", f"capture shard `{shard}` line {number}"))
    every_feedback.sort(key=lambda f: f["_time"])  # time order across shards; file order within one
    for fb in every_feedback:
        capture.feedback[fb["request_id"]] = fb  # the last one wins
    capture.feedback_lines = len(every_feedback)
    return capture
