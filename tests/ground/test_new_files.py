"""ground.new_files: a target that exists is never opened for writing, and a failed write leaves no trace."""

from __future__ import annotations

import pytest

from ground.new_files import write_new_file, write_new_text


def _hidden_leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_existing_target_is_refused_before_writing(tmp_path):
    target = tmp_path / "mine.txt"
    target.write_text("the user's")
    calls = []
    with pytest.raises(FileExistsError):
        write_new_file(target, calls.append)
    assert calls == [] and target.read_text() == "the user's" and _hidden_leftovers(tmp_path) == []


def test_a_file_appearing_while_writing_is_kept(tmp_path):
    target = tmp_path / "data.parquet"

    def write(tmp):
        tmp.write_text("generated")
        target.write_text("another writer's")  # the race: the name is taken after the check

    with pytest.raises(FileExistsError):
        write_new_file(target, write)
    assert target.read_text() == "another writer's" and _hidden_leftovers(tmp_path) == []


def test_a_crash_mid_write_leaves_neither_target_nor_temp(tmp_path):
    target = tmp_path / "data.parquet"

    def write(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_new_file(target, write)
    assert list(tmp_path.iterdir()) == []


def test_new_target_written_and_replace_only_when_asked(tmp_path):
    target = tmp_path / "a.txt"
    write_new_text(target, "one")
    assert target.read_text() == "one"
    with pytest.raises(FileExistsError):
        write_new_text(target, "two")
    write_new_text(target, "two", replace=True)
    assert target.read_text() == "two" and _hidden_leftovers(tmp_path) == []
