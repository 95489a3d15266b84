"""Data for examples/tool_calculator.yaml: two-digit multiplication with a calculator tool the model may call.

    python examples/tool_calculator_data.py            # writes data/tool_calculator/{train,test}.parquet

SmolLM2-135M-Instruct multiplies two-digit numbers wrongly almost every time unaided, but can copy a number it
is given: a task where calling the tool is what pays. Its chat template ignores the `tools` argument, so the
system prompt describes the calculator and the hermes call format itself, and one worked conversation
precedes the question. Rows are
verl's format, scored by the `arithmetic` scorer on the model's own tokens (its last number wins); each row
carries `agent_name: tool_agent`.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

SYSTEM_PROMPT = (
    "You have a calculator tool. To use it, write exactly one line like\n"
    '<tool_call>{"name": "calculator", "arguments": {"expression": "12 * 34"}}</tool_call>\n'
    "and stop. Its result comes back to you in the next message. Then reply with just the final number."
)


def _call(a: int, b: int) -> str:
    return f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{a} * {b}"}}}}</tool_call>'


# One worked conversation before the question: without it the base model never calls the tool (measured: 0 of
# 128 held-out samples), and RL has nothing to reinforce. The tool turn is rendered like the loop's own.
EXAMPLE = [{"role": "user", "content": "What is 23 * 41?"}, {"role": "assistant", "content": _call(23, 41)},
           {"role": "tool", "content": "943"}, {"role": "assistant", "content": "943"}]


def row(a: int, b: int, split: str, index: int) -> dict:
    return {
        "data_source": "arithmetic",
        "agent_name": "tool_agent",
        "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, *EXAMPLE,
                   {"role": "user", "content": f"What is {a} * {b}?"}],
        "ability": "arithmetic",
        "reward_model": {"style": "rule", "ground_truth": str(a * b)},
        "extra_info": {"split": split, "index": index, "a": a, "b": b, "op": "*"},
    }


def make(out_dir: Path, n_train: int, n_test: int, low: int, high: int, seed: int) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    pool = [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]
    rng.shuffle(pool)
    test, rest = pool[:n_test], pool[n_test:]  # held-out questions never appear in training
    train = [rest[i % len(rest)] for i in range(n_train)]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, split, pairs in (("train.parquet", "train", train), ("test.parquet", "test", test)):
        path = out_dir / name
        if path.exists():
            raise SystemExit(f"{path} exists; remove it or choose another --out.")
        pq.write_table(pa.Table.from_pylist([row(a, b, split, i) for i, (a, b) in enumerate(pairs)]), path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/tool_calculator"))
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--test-size", type=int, default=32)
    parser.add_argument("--low", type=int, default=10)
    parser.add_argument("--high", type=int, default=99)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for p in make(args.out, args.train_size, args.test_size, args.low, args.high, args.seed):
        print(p)
