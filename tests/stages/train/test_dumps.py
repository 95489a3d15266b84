"""Rollout and validation dumps (stages/train/dumps.py): one JSONL per step, never overwriting."""

from __future__ import annotations

import pytest

from stages.train import dumps


def test_a_dump_per_step_and_a_second_dump_of_a_step_goes_beside_the_first(tmp_path):
    first = dumps.dump_generations(tmp_path / "rollouts", 1, [{"input": "1+1=", "output": "2", "score": 1.0}])
    again = dumps.dump_generations(tmp_path / "rollouts", 1, [{"input": "1+1=", "output": "3", "score": 0.0}])
    third = dumps.dump_generations(tmp_path / "rollouts", 1, [])
    assert (first.name, again.name, third.name) == ("1.jsonl", "1-2.jsonl", "1-3.jsonl")
    files = dumps.read_dumps(tmp_path / "rollouts")
    assert files["1.jsonl"] == [{"input": "1+1=", "output": "2", "score": 1.0}]  # the first is untouched
    assert files["1-2.jsonl"][0]["output"] == "3" and files["1-3.jsonl"] == []


def test_the_table_is_the_same_seeded_pick_whatever_order_the_rows_come_in():
    rows = [{"input": f"q{i}", "output": "a", "score": float(i)} for i in range(10)]
    table = dumps.pick_table(rows, 3)
    assert len(table) == 3 and table == dumps.pick_table(list(reversed(rows)), 3)
    assert dumps.pick_table(rows, 0) == [] and len(dumps.pick_table(rows, 50)) == 10


def test_generation_rows_have_verls_fields():
    from stages.train.batch import Rollout

    class Chars:  # token id = character code
        def batch_decode(self, ids, skip_special_tokens=True):
            return ["".join(map(chr, x)) for x in ids]

    r = Rollout([[49, 43, 49, 61]], [[50]], ["u1"], [{"ground_truth": "2"}], ["stop"], [1.0], [1.0])
    assert dumps.generation_rows(Chars(), r, 4) == [
        {"input": "1+1=", "output": "2", "gts": "2", "score": 1.0, "step": 4, "acc": 1.0}]


@pytest.mark.parametrize("key", ["rollout_data_dir", "validation_data_dir", "log_val_generations"])
def test_the_keys_are_verls_and_off_by_default(key):
    from config.schema import Config

    assert getattr(Config().trainer, key) in (None, 0)
