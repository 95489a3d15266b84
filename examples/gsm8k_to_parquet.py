"""Convert the public GSM8K parquet files (openai/gsm8k, config `main`) into this project's training format.

GSM8K's rows have `question` and `answer`, where the answer's reasoning ends with `#### N`. Each becomes a
verl-format row with data_source `openai/gsm8k`, scored by the `gsm8k` reward scorer (strict `#### N`):

    python examples/gsm8k_to_parquet.py \\
        --train gsm8k/main/train-00000-of-00001.parquet --test gsm8k/main/test-00000-of-00001.parquet \\
        --out ~/data/gsm8k
    pipeline run train-and-publish -c examples/qwen2_5_3b_gsm8k_grpo_lora.yaml \\
        data.train_files=~/data/gsm8k/train.parquet data.val_files=~/data/gsm8k/test.parquet

No download happens here: get the files with `huggingface-cli download openai/gsm8k --repo-type dataset`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ground.new_files import existing, write_new_file

# The instruction verl's GSM8K recipe appends, so the model writes the marker the strict scorer reads.
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def convert_row(question: str, answer: str, split: str, index: int) -> dict:
    found = _FINAL.findall(answer)
    if not found:
        raise ValueError(f"{split} row {index}: the answer has no `#### N` final answer")
    return {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": f"{question} {INSTRUCTION}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": found[-1].replace(",", "")},
        "extra_info": {"split": split, "index": index, "question": question, "answer": answer},
    }


def convert_file(src: str | Path, dst: str | Path, split: str, replace: bool = False) -> int:
    """Convert one GSM8K parquet file; returns the number of rows written.

    An existing `dst` is never overwritten unless `replace` (FileExistsError); the file is written under a
    temporary name and moved into place, so a crash leaves no half-written parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(Path(src).expanduser(), columns=["question", "answer"])
    rows = [convert_row(q, a, split, i) for i, (q, a) in
            enumerate(zip(table.column("question").to_pylist(), table.column("answer").to_pylist()))]
    dst = Path(dst).expanduser()
    dst.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    write_new_file(dst, lambda tmp: pq.write_table(table, tmp), replace=replace)
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="GSM8K train parquet (columns question, answer)")
    parser.add_argument("--test", required=True, help="GSM8K test parquet")
    parser.add_argument("--out", required=True, help="output folder for train.parquet and test.parquet")
    parser.add_argument("--force", action="store_true", help="replace train.parquet / test.parquet if they exist")
    args = parser.parse_args(argv)
    there = existing([Path(args.out).expanduser() / f"{split}.parquet" for split in ("train", "test")])
    if there and not args.force:
        print(f"error: {' and '.join(map(str, there))} already exist(s); choose another --out or pass --force to "
              "replace", file=sys.stderr)
        return 2
    for split, src in (("train", args.train), ("test", args.test)):
        if not Path(src).expanduser().is_file():
            print(f"error: {src} does not exist", file=sys.stderr)
            return 2
        try:
            n = convert_file(src, Path(args.out) / f"{split}.parquet", split, replace=args.force)
        except FileExistsError as exc:
            print(f"error: {exc.filename} appeared meanwhile; not overwritten", file=sys.stderr)
            return 2
        except ValueError as exc:
            print(f"error: {src}: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {n} rows to {Path(args.out) / f'{split}.parquet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
