"""The adapter lifecycle as a loop, on the tiny test model: canary, promotion, automatic rollback, history.

    .venv/bin/python examples/lifecycle_walkthrough.py [--workdir DIR] [--requests 200]

Runs every step with the real `pipeline` commands (each printed as `$ pipeline ...` with what it printed) against
a local registry and one `pipeline serve --auto-rollback` server, queried with the official `openai` client:

1. v1 (an adapter that answers the four held-out sums off by one) is published as `adder@prod`;
2. v2 is trained further from `adder@prod`'s files to answer them right, published as `canary`, and given 10% of
   the bare name's traffic with a route;
3. callers with distinct `user` values are split 90/10, each always on one version; `pipeline serve status`
   shows the figures per version;
4. `pipeline promote` gates v2 (held-out reward offline, serving metrics online) and moves prod to it;
5. v3 (v1's files again, standing in for a bad training run) is published as the next canary, its files are
   damaged on disk after the server loaded them (the server refuses it with 422 from then on), and the server
   takes it out of the route by itself;
6. `pipeline registry history` shows every move; `pipeline rollback adder prod` undoes the promotion.

The tiny model and the adapters come from the test suite's helpers (tests/tiny_model.py,
tests/pipeline/answer_adapters.py): a few seconds of supervised fine-tuning make LoRAs whose answers a scorer
can tell apart, which a few RL steps on a model this small would not. docs/lifecycle.md shows one run's output.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test suite's tiny model and answer adapters
from walkthrough_shell import sh, start_serve  # noqa: E402  (examples/, the folder of this script)

NAME, API_KEY = "adder", "walkthrough-key"


def start_server(registry: Path, base: Path, port: int, log_path: Path) -> subprocess.Popen:
    args = ["serve", "--registry", str(registry), "--base", str(base), "--port", str(port), "--api-key", API_KEY,
            "--max-model-len", "256", "--auto-rollback", "--rollout-window-s", "60", "--rollout-min-requests", "5",
            "--rollout-max-error-rate", "0.2"]
    server = start_serve(args, port, API_KEY, log_path)
    print(log_path.read_text().strip().splitlines()[-1], flush=True)
    return server


def ask_many(client, count: int, tag: str) -> Counter:
    """`count` requests for the bare name, each from its own `user`; the versions that answered (or errors)."""
    import openai

    seen: Counter = Counter()
    for i in range(count):
        try:
            reply = client.chat.completions.create(
                model=NAME, user=f"{tag}-{i}", max_tokens=8, temperature=0,
                messages=[{"role": "user", "content": "What is 3 + 4? Answer with just the number."}])
            seen[reply.model] += 1
        except openai.APIStatusError as exc:
            seen[f"HTTP {exc.status_code}"] += 1
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="Folder for the model, adapters and registry (default: temp)")
    parser.add_argument("--requests", type=int, default=200, help="Requests per traffic phase.")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    from openai import OpenAI

    from ground.ports import free_port
    from registry import open_registry
    from tests.pipeline.answer_adapters import make_answer_adapter, write_val_data
    from tests.tiny_model import build_tiny_model

    work = Path(args.workdir or tempfile.mkdtemp(prefix="lifecycle-"))
    work.mkdir(parents=True, exist_ok=True)
    base = build_tiny_model(work / "tiny-llama")
    val = write_val_data(work / "heldout.parquet")
    store = work / "registry"
    shutil.rmtree(store, ignore_errors=True)  # a fresh registry each run
    os.environ["PIPELINE_REGISTRY"] = str(store)  # every `pipeline registry ...` below uses it
    reg = open_registry(str(store))

    print("# 1. v1 to prod", flush=True)
    if not (work / "v1").exists():  # adapters are kept in --workdir: a second run reuses them
        make_answer_adapter(base, work / "v1", offset=1)
    sh("registry", "publish", str(work / "v1"), "--name", NAME, "--base", str(base), "--alias", "prod")

    print("\n# 2. v2, trained from adder@prod, as a 10% canary", flush=True)
    if not (work / "v2").exists():
        make_answer_adapter(base, work / "v2", offset=0, start_from=reg.resolve(f"{NAME}@prod").path)
    sh("registry", "publish", str(work / "v2"), "--name", NAME, "--base", str(base), "--alias", "canary",
       "--parent-version", "1")
    sh("registry", "route", "set", NAME, "prod=90", "canary=10", "--reason", "v2 as a 10% canary")

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    server = start_server(store, base, port, work / "server.log")
    try:
        client = OpenAI(base_url=url, api_key=API_KEY, max_retries=0)
        print(f"\n# 3. {args.requests} callers, one request each", flush=True)
        print("answered by:", dict(ask_many(client, args.requests, "phase1")), flush=True)
        again = ask_many(client, 20, "phase1")  # the same users again: each stays on its version
        print("the first 20 users again:", dict(again), flush=True)
        sh("serve", "status", "--url", url, "--api-key", API_KEY)

        print("\n# 4. promote v2 (the 2-core machine's latency is noisy: the TTFT ratio gets room)", flush=True)
        sh("promote", NAME, "--candidate", "canary", "--to", "prod", "--data", str(val), "--base", str(base),
           "--url", url, "--api-key", API_KEY, "--min-requests", "5", "--max-ttft-ratio", "3")
        sh("registry", "route", "show", NAME)

        print("\n# 5. a bad v3 as the next canary: its files are damaged after the server loaded them", flush=True)
        # v3's answers never matter (the server refuses it once damaged): v1's files stand in for a bad run
        sh("registry", "publish", str(work / "v1"), "--name", NAME, "--base", str(base), "--alias", "canary",
           "--parent-version", "2")
        client.chat.completions.create(model=f"{NAME}@canary", max_tokens=4,
                                       messages=[{"role": "user", "content": "What is 1 + 1?"}])  # loaded, verified
        weights = reg.resolve(f"{NAME}@canary").path / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
        print(f"(flipped one bit of {weights})", flush=True)
        sh("registry", "route", "set", NAME, "prod=50", "canary=50", "--reason", "v3 as a 50% canary")
        print("answered by:", dict(ask_many(client, args.requests, "phase2")), flush=True)
        time.sleep(2)
        sh("registry", "route", "show", NAME)
        cli_output = (work / "server.log").read_text()
        logs = [work / "server.log"] + [Path(p) for p in re.findall(r"\(log: (\S+?)\)", cli_output)]
        warnings = [line for log in logs if log.is_file() for line in log.read_text().splitlines()
                    if f"route of {NAME} set to" in line]
        print("server log:", *warnings[-1:], flush=True)
    finally:
        # SIGTERM, which `pipeline serve` takes as Ctrl-C (a background process may have SIGINT ignored): it
        # stops its engine and removes its shared memory
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=300)

    print("\n# 6. the history, and a manual rollback of the promotion", flush=True)
    sh("registry", "history", NAME)
    sh("rollback", NAME, "prod")
    print(f"\nworkdir: {work}", flush=True)


if __name__ == "__main__":
    main()
