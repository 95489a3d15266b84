"""What `pipeline serve --capture` costs: two servers with the same settings, capture off and on, the same requests.

The tiny test model (tests/tiny_model.py, 2 layers, hidden 64) with one synthetic adapter, so the engine's own
time is small and the middleware's share is as large as it gets. Both servers run at once; batches of --batch
completions (max_tokens --max-tokens, temperature 0, --concurrency threads, the official `openai` client) go to
one then the other, alternating, --rounds times each, so a change in the machine's load (other jobs) hits both
modes alike. Reports req/s per batch and, per mode, all its requests over all its batches' time, and the load
average before and after.

    .venv/bin/python benchmarks/capture_overhead.py                       # 6 rounds of 200 requests per mode
    .venv/bin/python benchmarks/capture_overhead.py --rounds 3 --batch 100 --out benchmarks/results/x.json
    .venv/bin/python benchmarks/capture_overhead.py --one-server --rounds 10   # one engine: captured vs opted out
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ground.ports import free_port  # noqa: E402
from serve.capture import CaptureSettings, capture_env  # noqa: E402
from serve.server import start_server  # noqa: E402


def run_batch(client, requests: int, concurrency: int, max_tokens: int) -> float:
    """Seconds to answer `requests` completions from `concurrency` threads."""
    def ask(i: int) -> None:
        client.completions.create(model="bench", prompt=f"Question {i}: what is {i} + 1?", max_tokens=max_tokens,
                                  temperature=0)

    with ThreadPoolExecutor(concurrency) as pool:
        started = time.perf_counter()
        list(pool.map(ask, range(requests)))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=200, help="requests per batch")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6, help="batches per mode")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--one-server", action="store_true",
                        help="one server with capture on; 'off' batches opt out per request (x-capture: off), so "
                             "both modes share the engine, its cores and its start order")
    args = parser.parse_args()

    import openai

    from registry import open_registry
    from tests.synthetic_lora import write_lora
    from tests.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="capture-bench-"))
    base = build_tiny_model(work / "tiny-llama")
    reg = open_registry(str(work / "registry"), mirror_mlflow=False)
    reg.publish(write_lora(work / "lora", rank=8, alpha=16, seed=1), "bench", base_dir=base)
    servers = {}
    try:
        for mode in ("on",) if args.one_server else ("off", "on"):
            env = capture_env(CaptureSettings(str(work / "capture")) if mode == "on" else None)
            servers[mode] = start_server(base, str(work / "registry"), port=free_port(), max_loras=1,
                                         max_model_len=256, kv_cache_gib=0.0625, dtype="float32", env=env)
        clients = {mode: openai.OpenAI(base_url=h.url, api_key="none", max_retries=0, timeout=120)
                   for mode, h in servers.items()}
        if args.one_server:
            clients["off"] = openai.OpenAI(base_url=servers["on"].url, api_key="none", max_retries=0, timeout=120,
                                           default_headers={"x-capture": "off"})
        for client in clients.values():  # warm-up: adapter load, first batches
            run_batch(client, 4 * args.concurrency, args.concurrency, args.max_tokens)
        load_before = os.getloadavg()
        batches = []
        for r in range(args.rounds):
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                seconds = run_batch(clients[mode], args.batch, args.concurrency, args.max_tokens)
                batches.append({"mode": mode, "seconds": round(seconds, 3), "req_per_s": round(args.batch / seconds, 2)})
                print(json.dumps(batches[-1]), flush=True)
        load_after = os.getloadavg()
    finally:
        for handle in servers.values():
            handle.stop()
    summary = {mode: round(args.batch * args.rounds / sum(b["seconds"] for b in batches if b["mode"] == mode), 2)
               for mode in ("off", "on")}
    summary["on_over_off"] = round(summary["on"] / summary["off"], 3)
    result = {"req_per_s": summary, "one_server": args.one_server, "batches": batches, "batch": args.batch,
              "rounds": args.rounds,
              "concurrency": args.concurrency, "max_tokens": args.max_tokens,
              "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after]}
    print(json.dumps({k: v for k, v in result.items() if k != "batches"}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
