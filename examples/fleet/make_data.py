"""Data of the example fleet (examples/fleet/fleet.yaml): three arithmetic-style tasks, one folder each.

    python examples/fleet/make_data.py            # writes data/fleet/{add,sub,spell}/{train,test}.parquet

- add:   "What is 3 + 5? Answer with just the number."  -> 8      (the demo's arithmetic rows, + only)
- sub:   "What is 7 - 2? Answer with just the number."  -> 5      (- only)
- spell: "What is 3 + 4? Answer with the number spelled out as one English word." -> seven (sums 0..9)

add and sub are scored by the built-in `arithmetic` scorer (their rows' data_source); spell by
examples/fleet/rewards.py. Existing files are kept unless --force.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from stages.train.arithmetic import make_arithmetic  # noqa: E402

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPELL_INSTRUCTION = "Answer with the number spelled out as one English word."


def spell_row(a: int, b: int, split: str, index: int) -> dict:
    return {
        "data_source": "fleet_spell",
        "prompt": [{"role": "user", "content": f"What is {a} + {b}? {SPELL_INSTRUCTION}"}],
        "ability": "arithmetic",
        "reward_model": {"style": "rule", "ground_truth": WORDS[a + b]},
        "extra_info": {"split": split, "index": index, "a": a, "b": b, "op": "+"},
    }


def make_spell(out: Path, n_train: int, n_test: int, seed: int, force: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    targets = [out / "train.parquet", out / "test.parquet"]
    if any(p.exists() for p in targets) and not force:
        print(f"{out}: exists, kept (--force replaces it)")
        return
    pool = [(a, b) for a in range(10) for b in range(10) if a + b <= 9]  # 55 questions
    rng = random.Random(seed)
    rng.shuffle(pool)
    test, rest = pool[:n_test], pool[n_test:]
    train = [rest[i % len(rest)] for i in range(n_train)]
    out.mkdir(parents=True, exist_ok=True)
    for path, split, questions in ((targets[0], "train", train), (targets[1], "test", test)):
        rows = [spell_row(a, b, split, i) for i, (a, b) in enumerate(questions)]
        pq.write_table(pa.Table.from_pylist(rows), path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/fleet")
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--test-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    root = Path(args.out)
    for name, op in (("add", "+"), ("sub", "-")):
        folder = root / name
        if (folder / "train.parquet").exists() and not args.force:
            print(f"{folder}: exists, kept (--force replaces it)")
            continue
        make_arithmetic(folder, n_train=args.train_size, n_test=args.test_size, ops=(op,), seed=args.seed,
                        replace=args.force)
    make_spell(root / "spell", args.train_size, args.test_size, args.seed, args.force)
    print(f"wrote the example fleet's data under {root}")


if __name__ == "__main__":
    main()
