"""Reading a capture folder: records oldest first, the last feedback per request wins (in time order across
shards), a torn last line is skipped and counted, any other bad line is an error naming its file and line."""

from __future__ import annotations

import pytest

from ground.capture_records import feedback_score, read_capture
from ground.errors import DataError
from tests.capture_folders import feedback_record, request_record, write_shard


def test_records_in_time_order_across_shards(tmp_path):
    late = request_record("q late", "a", seconds=5)
    early = request_record("q early", "a", seconds=1)
    write_shard(tmp_path, "records", [late], name="host-1-1-00000")
    write_shard(tmp_path, "records", [early], name="host-2-1-00000")
    capture = read_capture(tmp_path)
    assert [r["request_id"] for r in capture.records] == [early["request_id"], late["request_id"]]
    assert capture.torn_lines == []


def test_last_feedback_wins_by_time_across_shards_and_by_file_order_within_one(tmp_path):
    a, b = request_record("q1", "x"), request_record("q2", "y")
    write_shard(tmp_path, "records", [a, b])
    # a: the later time sits in the shard that sorts first; b: two lines at the same time, file order decides
    write_shard(tmp_path, "feedback", [feedback_record(a["request_id"], score=0.9, seconds=30)], name="h-1-1-00000")
    write_shard(tmp_path, "feedback", [feedback_record(a["request_id"], score=0.1, seconds=20),
                                       feedback_record(b["request_id"], label="bad", seconds=20),
                                       feedback_record(b["request_id"], label="good", seconds=20)], name="h-2-1-00000")
    capture = read_capture(tmp_path)
    assert feedback_score(capture.feedback[a["request_id"]]) == 0.9
    assert capture.feedback[b["request_id"]]["label"] == "good"
    assert feedback_score(capture.feedback[b["request_id"]]) == 1.0
    assert capture.feedback_lines == 4


def test_a_torn_last_line_is_skipped_and_counted(tmp_path):
    good = request_record("q", "a")
    write_shard(tmp_path, "records", [good], tail=b'{"kind": "request", "format": 1, "request_id": "req-ab')
    write_shard(tmp_path, "feedback", [feedback_record(good["request_id"], score=0.5)], tail=b'{"kind": "feedb')
    capture = read_capture(tmp_path)
    assert [r["request_id"] for r in capture.records] == [good["request_id"]]
    assert sorted(capture.torn_lines) == ["feedback/host-1-1764780000000-00000.jsonl:2",
                                          "records/host-1-1764780000000-00000.jsonl:2"]
    assert feedback_score(capture.feedback[good["request_id"]]) == 0.5


def test_a_bad_line_before_the_end_is_an_error_naming_file_and_line(tmp_path):
    write_shard(tmp_path, "records", [request_record("q", "a"), request_record("q2", "b")])
    shard = tmp_path / "records" / "host-1-1764780000000-00000.jsonl"
    lines = shard.read_bytes().split(b"\n")
    shard.write_bytes(b"\n".join([lines[0], b"{not json", *lines[2:]]))
    with pytest.raises(DataError, match=r"records/host-1-1764780000000-00000\.jsonl` line 2 is not a JSON"):
        read_capture(tmp_path)


def test_a_record_without_its_keys_or_of_another_format_is_an_error(tmp_path):
    broken = request_record("q", "a")
    del broken["completion"]
    write_shard(tmp_path, "records", [request_record("q", "a"), broken])
    with pytest.raises(DataError, match=r"line 2: the request record lacks completion"):
        read_capture(tmp_path)
    newer = request_record("q", "a")
    newer["format"] = 2
    write_shard(tmp_path / "b", "records", [newer])
    with pytest.raises(DataError, match=r"record format 2 is not 1"):
        read_capture(tmp_path / "b")


def test_not_a_capture_folder(tmp_path):
    with pytest.raises(DataError, match=r"has no records/ folder"):
        read_capture(tmp_path)
