"""Ray Serve's autoscaler behind `pipeline serve`: start with one replica, load it, watch a second one start.

    .venv/bin/python benchmarks/serve_autoscaling.py --base /path/to/tiny --adapters 4 --duration 150

Starts `start_replicated(autoscaling={min_replicas: 1, max_replicas: 2, target_ongoing_requests: T})` (what
`pipeline serve --min-replicas 1 --max-replicas 2 --target-ongoing-requests T` runs) on a fresh registry of
synthetic adapters, then keeps `--concurrency` streams of requests going for `--duration` seconds (round-robin
over the base and the adapters). Reported: seconds from the start of the load until a second replica first
answered (the `x-served-by-replica` header), Serve's replica count over time, requests answered per replica,
failures, and how long start-up took.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="base model folder (the tests' tiny model is enough)")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--target-ongoing-requests", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=150.0, help="seconds of load")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--port", type=int, default=8421)
    args = p.parse_args(argv)

    import openai
    from ray import serve

    from registry import open_registry
    from serve.replicas.app import APP_NAME, start_replicated
    from serve.replicas.ingress import REPLICA_DEPLOYMENT
    from tests.synthetic_lora import write_lora

    base = Path(args.base).absolute()
    with tempfile.TemporaryDirectory(prefix="bench-autoscale-") as tmp:
        reg = open_registry(str(Path(tmp) / "registry"))
        refs = [reg.publish(write_lora(Path(tmp) / f"a{i}", seed=i), f"a{i}", base_dir=base).ref
                for i in range(args.adapters)]
        t0 = time.monotonic()
        server = start_replicated(base, reg.uri, replicas=1, port=args.port, max_loras=2, max_model_len=256,
                                  kv_cache_gib=0.0625, dtype="float32", base_name="base",
                                  autoscaling={"min_replicas": 1, "max_replicas": 2,
                                               "target_ongoing_requests": args.target_ongoing_requests})
        started_s = time.monotonic() - t0
        with server:
            client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=300)
            models = ["base", *refs]
            served, failures, first_seen, counts = {}, [], {}, []
            load_start = time.monotonic()
            stop, lock = threading.Event(), threading.Lock()

            def worker(k: int) -> None:
                i = k
                while not stop.is_set():
                    try:
                        raw = client.completions.with_raw_response.create(
                            model=models[i % len(models)], prompt="Hello there", max_tokens=args.max_tokens,
                            temperature=0, extra_body={"ignore_eos": True})
                        name = raw.headers.get("x-served-by-replica")
                        with lock:
                            served[name] = served.get(name, 0) + 1
                            first_seen.setdefault(name, round(time.monotonic() - load_start, 1))
                    except Exception as exc:  # counted and reported
                        with lock:
                            failures.append(repr(exc)[:200])
                    i += args.concurrency

            threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(args.concurrency)]
            for t in threads:
                t.start()
            while time.monotonic() - load_start < args.duration:
                status = serve.status().applications[APP_NAME].deployments[REPLICA_DEPLOYMENT]
                counts.append((round(time.monotonic() - load_start, 1), dict(status.replica_states)))
                time.sleep(5)
            stop.set()
            for t in threads:
                t.join(timeout=300)
        report = {"started_s": round(started_s, 1), "target_ongoing_requests": args.target_ongoing_requests,
                  "concurrency": args.concurrency, "duration_s": args.duration, "answered": sum(served.values()),
                  "failed": len(failures), "failure_examples": failures[:3], "answered_per_replica": served,
                  "first_answer_s_per_replica": first_seen, "replica_states_over_time": counts}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
