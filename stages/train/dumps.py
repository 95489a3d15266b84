"""What the model wrote, on disk and in the trackers: verl's `trainer.rollout_data_dir`,
`trainer.validation_data_dir` and `trainer.log_val_generations`.

A dump is one JSONL file per step, `<step>.jsonl`, one line per sampled response with verl's fields (input,
output, gts, score, step) plus ours (acc when the scorer gives one). A file is never overwritten: when
`<step>.jsonl` already exists (a second run into the same folder, a resumed run repeating a step) the dump goes to
`<step>-2.jsonl`, `<step>-3.jsonl`, ... (ground.new_files refuses to replace a file, even one that appears
meanwhile).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from ground.new_files import write_new_text

log = logging.getLogger(__name__)

TABLE_SEED = 42  # verl picks the logged validation samples with a fixed seed, so each step shows the same prompts


def generation_rows(tokenizer, rollout, step: int) -> list[dict]:
    """One dict per response of a scored `batch.Rollout`, in verl's dump layout."""
    inputs = tokenizer.batch_decode(rollout.prompt_ids, skip_special_tokens=True)
    outputs = tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
    rows = []
    for i, (prompt, output) in enumerate(zip(inputs, outputs)):
        row = {"input": prompt, "output": output, "gts": rollout.items[i].get("ground_truth"),
               "score": rollout.scores[i], "step": step}
        if rollout.accs and rollout.accs[i] is not None:
            row["acc"] = rollout.accs[i]
        rows.append(row)
    return rows


def dump_generations(folder: str | Path, step: int, rows: list[dict]) -> Path:
    """Write `rows` as `<folder>/<step>.jsonl` (or the first free `<step>-k.jsonl`); returns the file."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    for k in range(1, 10_000):
        target = folder / (f"{step}.jsonl" if k == 1 else f"{step}-{k}.jsonl")
        try:
            return write_new_text(target, text)
        except FileExistsError:
            if k == 1:
                log.warning("%s exists (an earlier run's dump); writing this one beside it", target)
    raise FileExistsError(f"no free dump name for step {step} in {folder}")


def read_dumps(folder: str | Path) -> dict[str, list[dict]]:
    """Every dump file of `folder` by file name, its lines parsed (for tests and users' scripts)."""
    return {p.name: [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
            for p in sorted(Path(folder).expanduser().glob("*.jsonl"))}


def pick_table(rows: list[dict], n: int) -> list[dict]:
    """`n` validation samples for the trackers' table: sorted by input, then a seeded shuffle (as verl)."""
    if n <= 0:
        return []
    ordered = sorted(rows, key=lambda row: row["input"])
    random.Random(TABLE_SEED).shuffle(ordered)
    return ordered[:n]
