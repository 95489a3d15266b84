"""Data loading from parquet and JSONL written here, prompt templating, over-long prompts, batching, resume."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from config import DataConfig
from ground.errors import DataError
from stages.train.data import BatchIterator, PromptDataset, data_fingerprint, load_rows


def row(question: str, answer: str = "8", source: str = "arithmetic") -> dict:
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": question}],
        "ability": "arithmetic",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"index": 0},
    }


ROWS = [row("What is 3 + 5?"), row("What is 2 + 2?", "4"), row("What is 9 - 1?", "8")]


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# ------------------------------------------------------------------------------------------------ load_rows


def test_parquet_and_jsonl_load_the_same_rows(tmp_path):
    pq_file = write_parquet(tmp_path / "a.parquet", ROWS)
    js_file = write_jsonl(tmp_path / "b.jsonl", ROWS)
    assert load_rows(str(pq_file)) == ROWS
    assert load_rows(js_file) == ROWS
    assert load_rows([pq_file, js_file]) == ROWS + ROWS


def test_malformed_jsonl_row_names_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], '{"data_source": "arithmetic", "prompt": [', ROWS[1]])
    with pytest.raises(DataError, match=r"bad.jsonl line 2: not valid JSON"):
        load_rows(bad)
    missing_truth = dict(ROWS[1], reward_model={"style": "rule"})
    bad2 = write_jsonl(tmp_path / "bad2.jsonl", [ROWS[0], missing_truth])
    with pytest.raises(DataError, match=r"bad2.jsonl line 2: `reward_model` must be an object with a `ground_truth`"):
        load_rows(bad2)


def test_malformed_parquet_row_names_file_and_row(tmp_path):
    rows = [ROWS[0], ROWS[1], dict(ROWS[2], prompt=[{"role": "user", "content": None}])]
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(DataError, match=r"bad.parquet row 2: `prompt` must be a non-empty list of chat messages"):
        load_rows(path)
    no_source = write_parquet(tmp_path / "ns.parquet", [dict(ROWS[0], data_source="")])
    with pytest.raises(DataError, match="ns.parquet row 0: `data_source`"):
        load_rows(no_source)


def test_missing_file_says_how_to_create_it(tmp_path):
    with pytest.raises(DataError) as err:
        load_rows(tmp_path / "nowhere" / "train.parquet")
    assert "does not exist" in str(err.value) and "pipeline data make-arithmetic --out" in str(err.value)
    with pytest.raises(DataError, match="supported: .parquet, .jsonl"):
        load_rows(write_jsonl(tmp_path / "x.csv", ROWS))


def test_empty_file_has_its_own_error(tmp_path):
    empty = tmp_path / "empty.parquet"
    write_parquet(empty, ROWS)
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(empty).slice(0, 0), empty)  # the schema, no rows
    with pytest.raises(DataError, match=r"`.*empty.parquet` has no rows") as err:
        load_rows(empty)
    assert "max_prompt_length" not in str(err.value)
    blank = tmp_path / "empty.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(DataError, match=r"`.*empty.jsonl` has no rows"):
        load_rows(blank)


def test_fingerprint_follows_bytes(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS)
    first = data_fingerprint(a)
    assert first == data_fingerprint([str(a)]) and len(first) == 64
    write_jsonl(a, ROWS[:2])
    assert data_fingerprint(a) != first


# ------------------------------------------------------------------------------------------- PromptDataset


def test_dataset_applies_chat_template(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "t.parquet", ROWS)
    ds = PromptDataset(path, tokenizer, DataConfig())
    assert len(ds) == 3
    item = ds[0]
    expected = tokenizer.apply_chat_template(ROWS[0]["prompt"], add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(item["prompt_ids"]) == expected
    assert expected.rstrip().endswith("assistant")  # the generation prompt is there
    assert item["ground_truth"] == "8" and item["data_source"] == "arithmetic" and item["messages"] == ROWS[0]["prompt"]
    # uids: distinct per row, identical when the same file is loaded again
    assert len({it["uid"] for it in ds.items}) == 3
    assert [it["uid"] for it in PromptDataset(path, tokenizer, DataConfig()).items] == [it["uid"] for it in ds.items]


def test_overlong_prompts_dropped_with_count(tmp_path, tokenizer, caplog):
    rows = ROWS + [row("What is " + " + ".join(["1"] * 200) + "?", "200")]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="stages.train.data"):
        ds = PromptDataset(path, tokenizer, DataConfig(max_prompt_length=64))
    assert len(ds) == 3 and ds.num_dropped == 1
    assert "Dropped 1 of 4 prompts longer than data.max_prompt_length=64" in caplog.text


def test_overlong_prompts_truncated_or_refused(tmp_path, tokenizer):
    rows = [row("What is " + " + ".join(["1"] * 200) + "?", "200")]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    full = PromptDataset(path, tokenizer, DataConfig(max_prompt_length=4096))[0]["prompt_ids"]
    left = PromptDataset(path, tokenizer, DataConfig(max_prompt_length=64, filter_overlong_prompts=False,
                                                     truncation="left"))[0]["prompt_ids"]
    right = PromptDataset(path, tokenizer, DataConfig(max_prompt_length=64, filter_overlong_prompts=False,
                                                      truncation="right"))[0]["prompt_ids"]
    assert left == full[-64:] and right == full[:64]
    with pytest.raises(DataError, match=r"long.jsonl line 1: the prompt is \d+ tokens, over data.max_prompt_length=64"):
        PromptDataset(path, tokenizer, DataConfig(max_prompt_length=64, filter_overlong_prompts=False))
    with pytest.raises(DataError, match="No prompts left"):
        PromptDataset(path, tokenizer, DataConfig(max_prompt_length=64))


# ---------------------------------------------------------------------------------------------- batching


def test_batches_are_deterministic_and_cover_each_epoch():
    data = [{"i": i} for i in range(10)]
    a = BatchIterator(data, batch_size=3, shuffle=True, seed=7)
    b = BatchIterator(data, batch_size=3, shuffle=True, seed=7)
    epoch0 = [[x["i"] for x in batch] for batch in a]
    assert epoch0 == [[x["i"] for x in batch] for batch in b]
    assert len(epoch0) == 3 and len({i for batch in epoch0 for i in batch}) == 9  # the last partial batch dropped
    epoch1 = [[x["i"] for x in batch] for batch in a]
    assert epoch1 != epoch0 and a.epoch == 1
    unshuffled = BatchIterator(data, batch_size=4, shuffle=False)
    assert [x["i"] for x in unshuffled.next_batch()] == [0, 1, 2, 3]


def test_resume_continues_on_the_next_batch():
    data = [{"i": i} for i in range(12)]
    straight = BatchIterator(data, batch_size=4, seed=3)
    reference = [straight.next_batch() for _ in range(7)]  # crosses two epoch boundaries
    first = BatchIterator(data, batch_size=4, seed=3)
    for _ in range(4):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = BatchIterator(data, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(3)] == reference[4:]
    with pytest.raises(DataError, match="dataset_size was 12, now 8"):
        BatchIterator(data[:8], batch_size=4, seed=3).load_state_dict(state)


def test_too_little_data_for_one_batch():
    with pytest.raises(DataError, match="fewer than one batch of 8"):
        BatchIterator([{"i": 0}] * 3, batch_size=8)
