"""The synthetic arithmetic task the default demo trains on: "What is 3 + 5?" -> 8.

Single-digit addition and subtraction are the default: SmolLM2-135M-Instruct answers about 20% of them right
before training (measured; two-digit addition is near 0%), which leaves room to see RL learn. Rows are in verl's
format (see stages.train.data) with data_source `arithmetic`, scored by the `arithmetic` reward scorer.
"""

from __future__ import annotations

import itertools
import logging
import operator
import random
from pathlib import Path
from typing import Sequence

from ground.errors import ConfigError, DataError
from ground.new_files import existing, write_new_file

log = logging.getLogger(__name__)

OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
INSTRUCTION = "Answer with just the number."


def question_row(a: int, op: str, b: int, split: str, index: int) -> dict:
    """One verl-format row for `a op b`."""
    answer = OPERATIONS[op](a, b)
    return {
        "data_source": "arithmetic",
        "prompt": [{"role": "user", "content": f"What is {a} {op} {b}? {INSTRUCTION}"}],
        "ability": "arithmetic",
        "reward_model": {"style": "rule", "ground_truth": str(answer)},
        "extra_info": {"split": split, "index": index, "a": a, "b": b, "op": op},
    }


def _exists_error(paths: list[Path]) -> DataError:
    names = " and ".join(f"`{p}`" for p in paths)
    return DataError(f"{names} already exist{'s' if len(paths) == 1 else ''}; the arithmetic generator never "
                     "overwrites a file. Choose another --out folder, remove the file yourself, or pass --force "
                     "to replace it.")


def make_arithmetic(out_dir: str | Path, n_train: int = 1024, n_test: int = 64, low: int = 0, high: int = 9,
                    ops: Sequence[str] = ("+", "-"), seed: int = 0, train_name: str = "train.parquet",
                    test_name: str = "test.parquet", replace: bool = False) -> list[Path]:
    """Write `train.parquet` and `test.parquet` of single-operation questions; returns the two paths.

    Nothing that exists is overwritten unless `replace` (the CLI's --force): if either file exists, a DataError
    names it before anything is written. Each file is written under a temporary name in `out_dir` and then
    moved into place without replacing (ground.new_files), so a crash leaves no half-written parquet and a
    file that appears meanwhile is kept; a file this call already placed is removed again on such a failure.

    Operands are integers in [low, high]. Test questions are drawn first, without repeats; train questions come
    from the rest, each distinct question once before any repeats (the default pool, 10 x 10 x 2 = 200
    questions, is smaller than the default 1024 train rows). Train and test are disjoint unless the test split
    takes the whole pool (then the train split reuses it, with a warning).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad_ops = [op for op in ops if op not in OPERATIONS]
    if not ops or bad_ops:
        raise ConfigError(f"--ops {''.join(ops)!r}: valid operations are {', '.join(OPERATIONS)} (e.g. --ops +-).")
    if low > high:
        raise ConfigError(f"--low {low} is above --high {high}; operands are drawn from [low, high].")
    if n_train < 1 or n_test < 1:
        raise ConfigError(f"--train-size {n_train} and --test-size {n_test} must both be >= 1.")

    rng = random.Random(seed)
    pool = list(itertools.product(range(low, high + 1), sorted(set(ops)), range(low, high + 1)))
    rng.shuffle(pool)
    test_questions = [pool[i % len(pool)] for i in range(n_test)]
    rest = pool[n_test:]
    if not rest:
        log.warning("The test split takes all %d distinct questions; the train split reuses them.", len(pool))
        rest = pool
    train_questions = []
    while len(train_questions) < n_train:  # every distinct question once, then again in a new order
        block = rest[:]
        rng.shuffle(block)
        train_questions.extend(block[: n_train - len(train_questions)])

    out = Path(out_dir).expanduser()
    targets = [out / train_name, out / test_name]
    there = existing(targets)
    if there and not replace:
        raise _exists_error(there)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for path, split, questions in ((targets[0], "train", train_questions), (targets[1], "test", test_questions)):
            rows = [question_row(a, op, b, split, i) for i, (a, op, b) in enumerate(questions)]
            table = pa.Table.from_pylist(rows)
            write_new_file(path, lambda tmp: pq.write_table(table, tmp), replace=replace)
            written.append(path)
    except FileExistsError as exc:  # appeared after the check above: keep it, and take back our other file
        for path in written:
            path.unlink(missing_ok=True)
        raise _exists_error([Path(exc.filename)]) from None
    log.info("Wrote %d train and %d test arithmetic questions (operands %d..%d, ops %s) to %s",
             n_train, n_test, low, high, "".join(ops), out)
    return written
