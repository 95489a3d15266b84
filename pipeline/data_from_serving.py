"""`pipeline data from-serving`: a training set from what an adapter's users asked, with their feedback.

    pipeline data from-serving arith@prod --capture captures/ --out data/from-arith --min-score 0.5

reads the capture folder that `pipeline serve --capture DIR` wrote (ground/capture_records.py), keeps the records
of the adapter (NAME: every version; NAME@7: that one; NAME@alias: the version the registry's alias names now)
inside the time window, drops those scored below --min-score, deduplicates by prompt (the newest record of each
prompt is kept) and writes OUT/train.parquet in the chosen format plus OUT/capture_dataset.json, the manifest a
training run on that file carries into its published version's lineage (ground/capture_dataset.py).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from datetime import datetime
from pathlib import Path

import click

from ground.capture_dataset import DATASET_MANIFEST, MANIFEST_FORMAT, file_digest
from ground.capture_records import Capture, feedback_score, parse_time, read_capture, utc_now
from ground.errors import ConfigError, DataError
from ground.new_files import existing, refuse_registry_folder, write_new_file, write_new_text

FORMATS = ("verl", "trl-prompt-completion", "trl-unpaired-preference", "messages")
DATA_FILE = "train.parquet"
DEFAULT_DATA_SOURCE = "feedback_match"  # the scorer that rewards a response with its matching answer's feedback


def resolve_versions(reference: str, registry_uri: str | None) -> tuple[str, list[int] | None, dict]:
    """NAME -> (NAME, None = every version); NAME@7 -> [7]; NAME@alias (or @latest) -> the registry's version now."""
    from registry.refs import parse_ref

    name, version, alias = parse_ref(reference)
    described = {"reference": reference, "name": name}
    if version is not None:
        return name, [version], {**described, "versions": [version]}
    if alias is None and "@" not in reference:
        return name, None, {**described, "versions": "all"}
    from registry import open_registry

    reg = open_registry(registry_uri, mirror_mlflow=False)
    resolved = reg.resolve(reference)
    return name, [resolved.version], {**described, "versions": [resolved.version], "registry": reg.uri,
                                      "resolved": resolved.ref}


def prompt_messages(record: dict) -> list[dict]:
    """The request as chat messages (role, text content); a completion request's prompt becomes one user turn."""
    if record.get("messages") is None:
        return [{"role": "user", "content": record.get("prompt") or ""}]
    messages = []
    for m in record["messages"]:
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        messages.append({"role": str(m.get("role")), "content": "" if content is None else str(content)})
    return messages


def prompt_key(record: dict) -> str:
    return json.dumps(prompt_messages(record), sort_keys=True, ensure_ascii=False)


def _in_window(record: dict, since: datetime | None, until: datetime | None) -> bool:
    return (since is None or record["_time"] >= since) and (until is None or record["_time"] < until)


def select(capture: Capture, name: str, versions: list[int] | None, since: datetime | None,
           until: datetime | None, min_score: float | None, fmt: str) -> tuple[list[dict], dict, dict]:
    """(kept records, newest first per prompt; counts per step; every scored answer per prompt key)."""
    counts = {"read": len(capture.records), "torn_lines": len(capture.torn_lines)}
    steps = []  # (filter name, records left), to name the filter that emptied the set

    left = [r for r in capture.records if r.get("adapter") == name and (versions is None or r.get("version") in versions)]
    steps.append(("adapter", len(left)))
    left = [r for r in left if _in_window(r, since, until)]
    steps.append(("window", len(left)))
    # every answer with feedback of each prompt, before the score filter: the reward needs the bad ones too
    answers: dict[str, list[dict]] = {}
    for r in left:
        score = feedback_score(capture.feedback.get(r["request_id"]))
        if score is not None:
            answers.setdefault(prompt_key(r), []).append(
                {"completion": r["completion"], "score": score, "request_id": r["request_id"]})
    if min_score is not None:
        scores = {r["request_id"]: feedback_score(capture.feedback.get(r["request_id"])) for r in left}
        left = [r for r in left if scores[r["request_id"]] is not None and scores[r["request_id"]] >= min_score]
        steps.append(("min_score", len(left)))
    if fmt == "trl-unpaired-preference":  # a label needs feedback
        left = [r for r in left if r["request_id"] in capture.feedback]
        steps.append(("feedback", len(left)))
    newest: dict[str, dict] = {}
    for r in left:  # records are oldest first: the last one seen per prompt is the newest
        newest[prompt_key(r)] = r
    kept = sorted(newest.values(), key=lambda r: r["_time"])
    before = counts["read"]
    for step, n in steps:
        counts[{"adapter": "other_adapters", "window": "outside_window", "min_score": "below_min_score",
                "feedback": "without_feedback"}[step]] = before - n
        before = n
    counts["deduplicated"] = before - len(kept)
    counts["kept"] = len(kept)
    counts["kept_with_feedback"] = sum(r["request_id"] in capture.feedback for r in kept)
    counts["feedback_records"] = capture.feedback_lines
    return kept, {"steps": steps, "counts": counts}, answers


def row_of(record: dict, fmt: str, capture: Capture, answers: dict, data_source: str, good_score: float) -> dict:
    messages = prompt_messages(record)
    answer = [{"role": "assistant", "content": record["completion"]}]
    score = feedback_score(capture.feedback.get(record["request_id"]))
    if fmt == "verl":
        truth = {"answers": answers.get(prompt_key(record), [])}
        return {"data_source": data_source, "prompt": messages, "ability": "serving",
                "reward_model": {"style": "rule", "ground_truth": json.dumps(truth, ensure_ascii=False)},
                "extra_info": {"request_id": record["request_id"], "adapter": record["adapter"],
                               "version": record.get("version"), "time": record["time"], "feedback_score": score}}
    if fmt == "trl-prompt-completion":
        return {"prompt": messages, "completion": answer}
    if fmt == "trl-unpaired-preference":
        return {"prompt": messages, "completion": answer, "label": bool(score is not None and score >= good_score)}
    return {"messages": messages + answer}


def check_data_source(data_source: str, fmt: str, custom_reward: bool) -> None:
    """A verl row's data_source picks its reward scorer at training's first reward: a name no scorer takes is refused
    here, before a data set is written, unless the run that trains on it scores rows with a reward of its own."""
    from stages.train.rewards import DATA_SOURCE_SCORERS

    if fmt != "verl" or custom_reward or data_source in DATA_SOURCE_SCORERS:
        return
    known = sorted(DATA_SOURCE_SCORERS)
    close = difflib.get_close_matches(data_source, known, n=1)
    hint = f" Did you mean --data-source {close[0]}?" if close else ""
    raise ConfigError(f"--data-source {data_source!r}: no reward scorer takes that data_source, so training would "
                      f"stop at its first reward; known: {', '.join(known)}.{hint} If the training run scores these "
                      "rows with its own reward (custom_reward_function.path or reward_model.scorer), pass "
                      "--custom-reward.")


def _empty_error(capture_dir, reference: str, selection: dict, since, until, min_score) -> DataError:
    emptied = next((step for step, n in selection["steps"] if n == 0), None)
    counts = selection["counts"]
    why = {
        None: f"the capture at `{capture_dir}` holds no records yet",
        "adapter": f"none of its {counts['read']} records is of `{reference}`",
        "window": f"none of the records of `{reference}` falls in the window --since {since} --until {until}",
        "min_score": f"no record of `{reference}` in the window has feedback scoring at least --min-score {min_score}",
        "feedback": "no record left has feedback, which trl-unpaired-preference needs for its label",
    }[emptied if counts["read"] else None]
    return DataError(f"from-serving would write an empty data set: {why} (counts: "
                     f"{', '.join(f'{k} {v}' for k, v in counts.items())}). Widen that filter, or serve with "
                     "--capture longer first.")


def build(capture_dir, reference: str, out_dir, *, since: str | None = None, until: str | None = None,
          min_score: float | None = None, fmt: str = "verl", registry_uri: str | None = None,
          data_source: str = DEFAULT_DATA_SOURCE, good_score: float = 0.5, custom_reward: bool = False) -> dict:
    """Write OUT/train.parquet and OUT/capture_dataset.json; returns the manifest plus its own digest."""
    import pandas as pd

    check_data_source(data_source, fmt, custom_reward)

    out_dir = Path(out_dir)
    refuse_registry_folder(out_dir, "--out")
    targets = [out_dir / DATA_FILE, out_dir / DATASET_MANIFEST]
    there = existing(targets)
    if there:
        raise DataError(f"{' and '.join(f'`{p}`' for p in there)} already exist(s); from-serving never overwrites "
                        "a data set (a run may have trained on it). Choose a new --out folder.")
    window = [parse_time(t, f"--{k} {t!r}") if t else None for k, t in (("since", since), ("until", until))]
    name, versions, adapter = resolve_versions(reference, registry_uri)
    capture = read_capture(capture_dir)
    kept, selection, answers = select(capture, name, versions, *window, min_score, fmt)
    if not kept:
        raise _empty_error(capture_dir, reference, selection, since, until, min_score)
    rows = [row_of(r, fmt, capture, answers, data_source, good_score) for r in kept]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_new_file(out_dir / DATA_FILE, lambda tmp: pd.DataFrame(rows).to_parquet(tmp, index=False))
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": utc_now(),
        "capture": str(Path(capture_dir).resolve()),
        "adapter": adapter,
        "window": {"since": since, "until": until, "first": kept[0]["time"], "last": kept[-1]["time"]},
        "filters": {"min_score": min_score, "data_source": data_source,
                    "good_score": good_score if fmt == "trl-unpaired-preference" else None},
        "dedupe": "by prompt (the chat messages, or a completion's prompt); the newest record of each is kept",
        "counts": selection["counts"],
        "torn_lines": capture.torn_lines,
        "output_format": fmt,
        "files": {DATA_FILE: file_digest(out_dir / DATA_FILE)},
    }
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    write_new_text(out_dir / DATASET_MANIFEST, text)
    return {**manifest, "manifest": str(out_dir / DATASET_MANIFEST),
            "manifest_digest": "sha256:" + hashlib.sha256(text.encode()).hexdigest()}


@click.command("from-serving")
@click.argument("reference")
@click.option("--capture", "capture_dir", required=True, type=click.Path(file_okay=False),
              help="The folder `pipeline serve --capture DIR` writes.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Where train.parquet and capture_dataset.json go (never overwritten).")
@click.option("--since", default=None, help="Only records answered at or after this UTC time (ISO 8601).")
@click.option("--until", default=None, help="Only records answered before this UTC time (ISO 8601).")
@click.option("--min-score", type=float, default=None,
              help="Only records whose feedback scores at least this (good = 1.0, bad = 0.0); drops unscored ones.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="verl", show_default=True,
              help="verl's RL parquet (what `pipeline train` reads), or TRL's data set types.")
@click.option("--data-source", default=DEFAULT_DATA_SOURCE, show_default=True,
              help="verl rows' data_source, which picks their reward scorer (see `pipeline algorithms`).")
@click.option("--custom-reward", is_flag=True,
              help="The run that trains on this set scores its rows with its own reward (custom_reward_function.path "
                   "or reward_model.scorer): --data-source may then be a name no built-in scorer takes.")
@click.option("--good-score", type=float, default=0.5, show_default=True,
              help="trl-unpaired-preference: a feedback score at least this is label true.")
@click.option("--registry", "registry_uri", default=None,
              help="Where NAME@alias resolves (default: $PIPELINE_REGISTRY, then ./registry-store).")
def from_serving_cmd(reference, capture_dir, out_dir, since, until, min_score, fmt, data_source, custom_reward,
                     good_score, registry_uri):
    """A training set from what REFERENCE (NAME, NAME@V or NAME@alias) was asked and answered while serving."""
    result = build(capture_dir, reference, out_dir, since=since, until=until, min_score=min_score, fmt=fmt,
                   registry_uri=registry_uri, data_source=data_source, good_score=good_score,
                   custom_reward=custom_reward)
    counts = result["counts"]
    click.echo(f"wrote {Path(out_dir) / DATA_FILE} ({counts['kept']} rows, {fmt}; {counts['kept_with_feedback']} with "
               f"feedback) from {counts['read']} captured records: "
               + ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("read", "kept", "kept_with_feedback")))
    click.echo(f"manifest {result['manifest']} {result['manifest_digest']}")
