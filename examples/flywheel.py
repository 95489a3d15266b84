"""The data flywheel on the tiny test model: serve with capture, feedback, a data set, the next adapter, lineage.

    .venv/bin/python examples/flywheel.py [--workdir DIR]

Every step is a real `pipeline` command (printed as `$ pipeline ...` with what it printed), against a local
registry and one `pipeline serve --capture` server, asked with the official `openai` client; feedback goes over
plain HTTP (httpx), since the `openai` client has no call for `POST /v1/feedback`:

1. v1 of `arith` (a LoRA that answers four held-out sums) is published as `arith@prod`;
2. `pipeline serve --capture` serves it; users ask 16 questions (each twice, greedy), four of them the sums v1
   was fitted to, and mark each answer `good` when its number is right, `bad` otherwise;
3. `pipeline data from-serving arith@prod` turns the capture into verl's parquet with the feedback as ground truth;
4. `pipeline run train-and-publish` trains `arith` from `arith@prod` on it for 2 steps, the `feedback_match`
   scorer rewarding a response with the feedback of the captured answer it equals, and publishes v2 as a 10%
   canary (`publish.alias=canary publish.canary_weight=10`);
5. `pipeline registry show arith@canary` shows v2's lineage back to the capture manifest and its digest.

The tiny model and the first adapter come from the test suite's helpers (tests/tiny_model.py,
tests/pipeline/answer_adapters.py). docs/flywheel.md walks through the same loop on your own model.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test suite's tiny model and answer adapter
from walkthrough_shell import sh, start_serve  # noqa: E402  (examples/, the folder of this script)

NAME, API_KEY = "arith", "flywheel-key"


def chat_and_judge(url: str) -> None:
    """Users ask; each judges the answer by its number. Returns nothing: the capture holds it all."""
    import httpx
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=API_KEY, max_retries=0)
    questions = [(a, op, b) for a in (3, 5, 8, 9) for op, b in (("+", 4), ("-", 2), ("+", 1), ("-", 6))]
    good = bad = 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        for _ in range(2):
            for a, op, b in questions:
                raw = client.chat.completions.with_raw_response.create(
                    model=f"{NAME}@prod", max_tokens=24, temperature=0,
                    messages=[{"role": "user", "content": f"What is {a} {op} {b}? Answer with just the number."}])
                answer = raw.parse().choices[0].message.content
                found = re.findall(r"-?\d+", answer)
                right = bool(found) and int(found[-1]) == (a + b if op == "+" else a - b)
                reply = http.post("/feedback", json={"request_id": raw.headers["x-request-id"],
                                                     "label": "good" if right else "bad"})
                reply.raise_for_status()
                good, bad = good + right, bad + (not right)
    print(f"{good + bad} answers, feedback: {good} good, {bad} bad", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="Folder for the model, adapters and registry (default: temp)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    from ground.ports import free_port
    from tests.pipeline.answer_adapters import make_answer_adapter
    from tests.tiny_model import build_tiny_model

    started = time.time()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="flywheel-"))
    work.mkdir(parents=True, exist_ok=True)
    base = build_tiny_model(work / "tiny-llama")
    for fresh in ("registry", "capture", "from-arith", "runs"):  # a fresh loop each run; the adapter is reused
        shutil.rmtree(work / fresh, ignore_errors=True)
    store = work / "registry"
    os.environ["PIPELINE_REGISTRY"] = str(store)  # every `pipeline registry ...` below uses it

    print("# 1. v1 to prod", flush=True)
    if not (work / "v1").exists():
        make_answer_adapter(base, work / "v1", offset=0)
    sh("registry", "publish", str(work / "v1"), "--name", NAME, "--base", str(base), "--alias", "prod")

    print("\n# 2. serve arith@prod with capture; users ask and judge", flush=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    server = start_serve(["serve", "--registry", str(store), "--base", str(base), "--port", str(port),
                           "--api-key", API_KEY, "--max-model-len", "256", "--capture", str(work / "capture")],
                         port, API_KEY, work / "server.log")
    try:
        chat_and_judge(url)
    finally:
        server.send_signal(signal.SIGTERM)  # `pipeline serve` takes it as Ctrl-C: engine and shared memory go
        server.wait(timeout=300)

    print("\n# 3. the training set from the capture", flush=True)
    sh("data", "from-serving", f"{NAME}@prod", "--capture", str(work / "capture"), "--out", str(work / "from-arith"))

    print("\n# 4. train arith from arith@prod on it, publish v2 as a 10% canary", flush=True)
    data = work / "from-arith" / "train.parquet"
    sh("run", "train-and-publish", "--run-dir", str(work / "runs" / "flywheel"),
       f"actor_rollout_ref.model.path={base}", f"registry.uri={store}",
       f"actor_rollout_ref.model.lora_adapter_path={NAME}@prod",
       f"data.train_files={data}", f"data.val_files={data}", "data.train_batch_size=4",
       "data.max_prompt_length=64", "data.max_response_length=24", "data.generate_if_missing=null",
       "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
       "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8", "actor_rollout_ref.actor.optim.lr=1e-3",
       "actor_rollout_ref.rollout.gpu_memory_utilization=0.1", "actor_rollout_ref.rollout.dtype=float32",
       "actor_rollout_ref.rollout.lora_sync=merged", "actor_rollout_ref.rollout.val_kwargs.do_sample=False",
       "actor_rollout_ref.rollout.val_kwargs.n=1", "trainer.cpu_workers=1", "trainer.total_training_steps=2",
       "trainer.test_freq=-1", "trainer.save_freq=-1", "trainer.logger=[console]",
       f"publish.name={NAME}", "publish.alias=canary", "publish.canary_weight=10",
       "publish.force=True")  # two steps on 32 rows need not beat v1: the loop, not the gain, is shown here

    print("\n# 5. v2's lineage, back to the captured requests", flush=True)
    sh("registry", "show", f"{NAME}@canary")
    sh("registry", "route", "show", NAME)
    print(f"\nworkdir: {work}; {time.time() - started:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
