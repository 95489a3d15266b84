"""Prompt data in verl's format, from parquet or JSONL, and a resumable, deterministic batch iterator.

A row (verl's RL dataset format):
    data_source:  str                       picks the reward scorer (e.g. "openai/gsm8k", "arithmetic")
    prompt:       [{"role": ..., "content": ...}, ...]   chat messages (key: data.prompt_key)
    ability:      str                       optional ("math", ...)
    reward_model: {"style": "rule", "ground_truth": str}
    extra_info:   dict                      optional; passed to the scorer
`.parquet` files are read with pyarrow; `.jsonl` files hold one such JSON object per line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from ground.errors import DataError

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".parquet", ".jsonl")


def _as_paths(files: str | Path | Sequence[str | Path]) -> list[Path]:
    items = [files] if isinstance(files, (str, Path)) else list(files)
    if not items:
        raise DataError("No data files given; set data.train_files / data.val_files to parquet or JSONL files.")
    return [Path(f).expanduser() for f in items]


def _missing_file_error(path: Path) -> DataError:
    return DataError(
        f"Data file `{path}` does not exist. Create the demo's arithmetic data with "
        f"`pipeline data make-arithmetic --out {path.parent}`, convert GSM8K with examples/gsm8k_to_parquet.py, "
        "or point data.train_files / data.val_files at your own parquet or JSONL files."
    )


def check_row(row: Any, where: str, prompt_key: str = "prompt") -> dict:
    """Validate one row's fields; a DataError names `where` (file and row) and the bad field."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object with data_source, {prompt_key}, reward_model; "
                        f"got {type(row).__name__}.")
    if not isinstance(row.get("data_source"), str) or not row["data_source"]:
        raise DataError(f"{where}: `data_source` must be a non-empty string (it picks the reward scorer); "
                        f"got {row.get('data_source')!r}.")
    messages = row.get(prompt_key)
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages)):
        raise DataError(f"{where}: `{prompt_key}` must be a non-empty list of chat messages "
                        f"[{{\"role\": ..., \"content\": ...}}]; got {messages!r:.200}.")
    reward = row.get("reward_model")
    if not isinstance(reward, dict) or reward.get("ground_truth") is None:
        raise DataError(f"{where}: `reward_model` must be an object with a `ground_truth`; got {reward!r:.200}.")
    if row.get("extra_info") is not None and not isinstance(row["extra_info"], dict):
        raise DataError(f"{where}: `extra_info` must be an object or absent; got {type(row['extra_info']).__name__}.")
    return row


def _read_file(path: Path) -> list[tuple[dict, str]]:
    """(row, 'file row N' label) pairs of one file, unvalidated; an empty file is an error of its own."""
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"`{path}` has no rows (an empty {path.suffix} file). Write verl-format rows into it "
                        "(data_source, prompt, reward_model), or point the data.*_files key at another file.")
    return rows


def _read_rows(path: Path) -> list[tuple[dict, str]]:
    if not path.is_file():
        raise _missing_file_error(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise DataError(f"Data file `{path}` is not a readable parquet file: {exc}") from exc
        return [(row, f"{path} row {i}") for i, row in enumerate(rows)]
    if path.suffix == ".jsonl":
        out = []
        with path.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path} line {line_no}"
                try:
                    out.append((json.loads(line), where))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}).") from None
        return out
    raise DataError(f"Data file `{path}` has suffix {path.suffix!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}.")


def _load_labelled(files, prompt_key: str = "prompt") -> list[tuple[dict, str]]:
    out = []
    for path in _as_paths(files):
        out.extend((check_row(row, where, prompt_key), where) for row, where in _read_file(path))
    return out


def load_rows(files: str | Path | Sequence[str | Path], prompt_key: str = "prompt") -> list[dict]:
    """Every row of the parquet/JSONL `files` (in order), validated; a DataError names the file and row."""
    return [row for row, _ in _load_labelled(files, prompt_key)]


def data_fingerprint(files: str | Path | Sequence[str | Path]) -> str:
    """sha256 over the files' bytes, in order (lineage: which data trained an adapter)."""
    digest = hashlib.sha256()
    for path in _as_paths(files):
        if not path.is_file():
            raise _missing_file_error(path)
        digest.update(f"{path.stat().st_size}:".encode())  # a length prefix keeps file boundaries unambiguous
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


class PromptDataset:
    """Rows with their chat template applied: items with prompt_ids, messages, data_source, ground_truth, ...

    Prompts longer than data.max_prompt_length tokens are dropped (data.filter_overlong_prompts, the count is
    logged) or else truncated on the side data.truncation names ("error" refuses them).
    """

    def __init__(self, files, tokenizer, data_cfg, max_samples: Optional[int] = None):
        self.files = [str(p) for p in _as_paths(files)]
        limit = data_cfg.max_prompt_length
        self.items: list[dict] = []
        dropped = 0
        labelled = _load_labelled(files, data_cfg.prompt_key)
        for row, where in labelled:
            messages = row[data_cfg.prompt_key]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            # The template already wrote the special tokens; letting the tokenizer add a BOS again would double it.
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > limit:
                if data_cfg.filter_overlong_prompts:
                    dropped += 1
                    continue
                if data_cfg.truncation == "error":
                    raise DataError(
                        f"{where}: the prompt is {len(ids)} tokens, over data.max_prompt_length={limit}. Raise "
                        "data.max_prompt_length, set data.filter_overlong_prompts=True to drop such prompts, or "
                        "data.truncation=left/right to cut them."
                    )
                ids = ids[-limit:] if data_cfg.truncation == "left" else ids[:limit]
            self.items.append({
                "prompt_ids": list(ids),
                "messages": messages,
                "data_source": row["data_source"],
                "ability": row.get("ability"),
                "ground_truth": row["reward_model"]["ground_truth"],
                "extra_info": row.get("extra_info") or {},
                "agent_name": row.get("agent_name"),  # the row's agent loop (stages/train/agent_loops.py); None: default
                # Stable across processes and runs (hashlib, never hash()): groups responses by prompt.
                "uid": hashlib.sha256(where.encode()).hexdigest()[:16],
            })
            if max_samples is not None and len(self.items) >= max_samples:
                break
        if dropped:
            log.info("Dropped %d of %d prompts longer than data.max_prompt_length=%d tokens (%s)",
                     dropped, len(labelled), limit, ", ".join(self.files))
        self.num_dropped = dropped
        if not self.items:
            raise DataError(f"No prompts left in {', '.join(self.files)} after dropping {dropped} over "
                            f"data.max_prompt_length={limit} tokens; raise data.max_prompt_length.")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class BatchIterator:
    """Deterministic batches of dataset items with a resumable position.

    Epoch e visits the items in the order of a permutation seeded by (seed, e) (or in file order without
    shuffle); incomplete final batches are dropped so every step has `batch_size` prompts. `for batch in it`
    runs to the end of the current epoch; `next_batch()` rolls over into the next. `state_dict()` is the position,
    so a checkpoint resumes on the exact next batch.
    """

    def __init__(self, dataset: Sequence[dict], batch_size: int, shuffle: bool = True, seed: int = 1):
        if len(dataset) < batch_size:
            raise DataError(f"The data has {len(dataset)} prompts, fewer than one batch of {batch_size} "
                            "(data.train_batch_size); add data or lower the batch size.")
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.epoch, self.step_in_epoch = 0, 0

    def __len__(self) -> int:
        return len(self.dataset) // self.batch_size

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[dict]:
        if self.step_in_epoch >= len(self):
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        start = self.step_in_epoch * self.batch_size
        batch = [self.dataset[i] for i in self._order(self.epoch)[start:start + self.batch_size]]
        self.step_in_epoch += 1
        return batch

    def __iter__(self) -> Iterator[list[dict]]:
        if self.step_in_epoch >= len(self):  # the previous epoch is finished: start the next
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        while self.step_in_epoch < len(self):
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed,
                "shuffle": self.shuffle, "batch_size": self.batch_size, "dataset_size": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        changed = [k for k in ("seed", "shuffle", "batch_size", "dataset_size") if state.get(k) != mine[k]]
        if changed:
            raise DataError(
                "The checkpoint's data position does not fit this data: "
                + ", ".join(f"{k} was {state.get(k)!r}, now {mine[k]!r}" for k in changed)
                + ". Resume with the same data and data.* settings, or start a new run."
            )
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
