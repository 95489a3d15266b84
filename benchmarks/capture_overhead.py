"""What `pipeline serve --capture` costs: the same server settings with capture off and on, the same requests.

The tiny test model (tests/tiny_model.py, 2 layers, hidden 64) with one synthetic adapter, so the engine's own
time is small and the middleware's share is as large as it gets. For each round the server is started, warmed
up, sent --requests completions (max_tokens --max-tokens, temperature 0) from --concurrency threads through the
official `openai` client, and stopped. Rounds alternate off/on (--rounds each), so a change in the machine's
load hits both. Reports req/s per round and the median per mode, and the load average before each round.

    .venv/bin/python benchmarks/capture_overhead.py                       # 2 rounds each, 400 requests
    .venv/bin/python benchmarks/capture_overhead.py --rounds 1 --requests 200 --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ground.ports import free_port  # noqa: E402
from serve.capture import CaptureSettings, capture_env  # noqa: E402
from serve.server import start_server  # noqa: E402


def one_round(base: Path, registry: str, capture_dir: Path | None, requests: int, concurrency: int,
              max_tokens: int) -> dict:
    import openai

    env = capture_env(CaptureSettings(str(capture_dir)) if capture_dir else None)
    load = os.getloadavg()
    handle = start_server(base, registry, port=free_port(), max_loras=1, max_model_len=256, kv_cache_gib=0.0625,
                          dtype="float32", env=env)
    with handle:
        client = openai.OpenAI(base_url=handle.url, api_key="none", max_retries=0, timeout=120)

        def ask(i: int) -> None:
            client.completions.create(model="bench", prompt=f"Question {i}: what is {i} + 1?",
                                      max_tokens=max_tokens, temperature=0)

        with ThreadPoolExecutor(concurrency) as pool:  # warm-up: adapter load, first batches
            list(pool.map(ask, range(2 * concurrency)))
            started = time.perf_counter()
            list(pool.map(ask, range(requests)))
            elapsed = time.perf_counter() - started
    return {"capture": capture_dir is not None, "requests": requests, "seconds": round(elapsed, 3),
            "req_per_s": round(requests / elapsed, 2), "loadavg_before": [round(x, 2) for x in load]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    from registry import open_registry
    from tests.synthetic_lora import write_lora
    from tests.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="capture-bench-"))
    base = build_tiny_model(work / "tiny-llama")
    reg = open_registry(str(work / "registry"), mirror_mlflow=False)
    reg.publish(write_lora(work / "lora", rank=8, alpha=16, seed=1), "bench", base_dir=base)
    rounds = []
    for r in range(args.rounds):
        for on in (False, True):
            result = one_round(base, str(work / "registry"), work / f"capture-{r}" if on else None, args.requests,
                               args.concurrency, args.max_tokens)
            print(json.dumps(result), flush=True)
            rounds.append(result)
    summary = {mode: statistics.median(x["req_per_s"] for x in rounds if x["capture"] == (mode == "on"))
               for mode in ("off", "on")}
    summary["on_over_off"] = round(summary["on"] / summary["off"], 3)
    print(json.dumps({"median_req_per_s": summary, "concurrency": args.concurrency, "max_tokens": args.max_tokens}))
    if args.out:
        Path(args.out).write_text(json.dumps({"rounds": rounds, "median_req_per_s": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
