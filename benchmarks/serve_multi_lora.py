"""Many adapters behind one endpoint: throughput, latency and memory against the base model served alone.

Workload modelled on S-LoRA's synthetic trace (Sheng et al. 2023, https://arxiv.org/abs/2311.03285, section 7):
- adapter popularity follows a power law: adapter i (0-based) is picked with probability ~ 1 / (i + 1)^alpha;
- requests arrive as a Poisson process (exponential gaps) at `--rate` requests/s for `--duration` seconds;
- prompt and output lengths are uniform in [--prompt-len] and [--output-len] (outputs forced with ignore_eos).
The same seeded trace (arrivals, lengths, prompts) is replayed for every configuration; only the adapter
column changes. Each configuration gets a fresh server, so its memory is its own: the base alone (no LoRA),
then 1, 8, 32 and 128 registry adapters (synthetic rank-8 PEFT-format LoRAs on q_proj and v_proj).

Reported per configuration: requests/s and output tokens/s over the makespan (first arrival to last answer),
time to first token p50/p90 (streaming), failures, and the server process tree's peak memory (summed RSS and
PSS; RSS counts pages shared between the server's processes once per process, PSS splits them).

    .venv/bin/python benchmarks/serve_multi_lora.py                 # SmolLM2-135M, about 10 minutes
    .venv/bin/python benchmarks/serve_multi_lora.py --adapters 1 32 --duration 30   # quicker
    .venv/bin/python benchmarks/serve_multi_lora.py --adapters 32 --no-base-run --verify both   # verification cost
    .venv/bin/python benchmarks/serve_multi_lora.py --adapters 8 --no-base-run --raw-vllm        # against raw vLLM
    .venv/bin/python benchmarks/serve_multi_lora.py --adapters 8 --replicas 2 --max-loras 2      # routing comparison

The adapter configurations use `pipeline serve`'s default host-memory tier (serve/lora_tier.py) unless
--max-cpu-loras is given. --raw-vllm adds, after each, vLLM's own server with its filesystem resolver and the same
engine settings and tier (no registry, verification or middleware). --replicas N (> 1) replaces the single server
by `pipeline serve --replicas N --routing R` for each --routing and reads the adapter loads each replica made
from `pipeline_adapter_loads_total` on its /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.serve_targets import raw_adapter_folders  # noqa: E402
from ground.new_files import refuse_existing_out, write_new_text  # noqa: E402
from ground.ports import free_port  # noqa: E402

log = logging.getLogger("serve_multi_lora")

ROUTINGS = ("multiplexed", "round_robin")  # `pipeline serve --routing` values the replicated mode takes


# ------------------------------------------------------------------------------------------------ workload
def make_trace(n_requests_rate: float, duration: float, prompt_len: tuple[int, int], output_len: tuple[int, int],
               vocab: int, seed: int) -> list[dict]:
    """Poisson arrivals over `duration` s with uniform prompt/output lengths; prompts are random token ids."""
    rng = random.Random(seed)
    trace, t = [], rng.expovariate(n_requests_rate)
    while t < duration:
        n_prompt = rng.randint(*prompt_len)
        trace.append({"at": t, "prompt": [rng.randrange(100, vocab - 100) for _ in range(n_prompt)],
                      "max_tokens": rng.randint(*output_len), "u": rng.random()})
        t += rng.expovariate(n_requests_rate)
    return trace


def power_law_pick(u: float, n: int, alpha: float) -> int:
    """Inverse-CDF sample of adapter index i in [0, n) with P(i) ~ 1/(i+1)^alpha, from one uniform `u`."""
    weights = [1.0 / (i + 1) ** alpha for i in range(n)]
    target, acc = u * sum(weights), 0.0
    for i, w in enumerate(weights):
        acc += w
        if target <= acc:
            return i
    return n - 1


# ------------------------------------------------------------------------------------------------ adapters
def llama_shapes(config: dict) -> dict[str, tuple[int, int]]:
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    return {"self_attn.q_proj": (hidden, config["num_attention_heads"] * head_dim),
            "self_attn.v_proj": (hidden, config["num_key_value_heads"] * head_dim)}


def publish_adapters(base_dir: Path, registry_dir: Path, count: int, rank: int) -> list[str]:
    from tqdm import tqdm

    from registry import open_registry
    from tests.synthetic_lora import write_lora
    from ground.model_files import fingerprint

    reg = open_registry(str(registry_dir))
    config = json.loads((base_dir / "config.json").read_text())
    base_fp = fingerprint(base_dir)
    refs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in tqdm(range(count), desc="publish adapters"):
            src = write_lora(Path(tmp) / f"a{i}", rank=rank, alpha=2 * rank, layers=config["num_hidden_layers"],
                             seed=i, targets=("q_proj", "v_proj"), shapes=llama_shapes(config))
            refs.append(reg.publish(src, f"bench-{i:03d}", base_dir=base_dir, base_fingerprint=base_fp).ref)
    return refs


# ------------------------------------------------------------------------------------------------ load
async def replay(url: str, trace: list[dict], models: list[str], drain_timeout: float) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=drain_timeout)
    ttfts, out_tokens, failures, done_at = [], [], [], []
    start = time.monotonic()

    async def one(item, model):
        await asyncio.sleep(max(0.0, start + item["at"] - time.monotonic()))
        sent = time.monotonic()
        first, n = None, 0
        try:
            stream = await client.completions.create(model=model, prompt=item["prompt"], max_tokens=item["max_tokens"],
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text and first is None:
                    first = time.monotonic() - sent
                if chunk.choices:
                    n += 1  # one chunk per generated token with vLLM's streaming
            ttfts.append(first if first is not None else time.monotonic() - sent)
            out_tokens.append(n)
            done_at.append(time.monotonic())
        except Exception as exc:  # counted, not raised: one failure must not stop the measurement
            failures.append(repr(exc)[:200])

    tasks = [asyncio.create_task(one(item, model)) for item, model in zip(trace, models)]
    await asyncio.wait(tasks, timeout=trace[-1]["at"] + drain_timeout)
    for task in tasks:
        task.cancel()
    await client.close()
    makespan = (max(done_at) - start) if done_at else float("nan")
    q = statistics.quantiles(ttfts, n=10) if len(ttfts) >= 2 else [float("nan")] * 9
    return {"sent": len(trace), "completed": len(done_at), "failed": len(failures), "makespan_s": makespan,
            "req_per_s": len(done_at) / makespan, "out_tok_per_s": sum(out_tokens) / makespan,
            "ttft_p50_s": statistics.median(ttfts) if ttfts else float("nan"), "ttft_p90_s": q[8],
            "failure_examples": failures[:3]}


class MemorySampler:
    """Peak RSS/PSS of the server's process tree, sampled every `every` seconds in a thread."""

    def __init__(self, handle, every: float = 1.0):
        self.handle, self.every, self.peak = handle, every, {"rss_mib": 0.0, "pss_mib": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)

    def sample(self):
        mem = self.handle.memory_mib()
        for key in self.peak:
            self.peak[key] = max(self.peak[key], mem[key])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def verification_ms(log_path: Path) -> list[float]:
    """Per-adapter verification times the server logged (`verified NAME@V into ... in X ms`)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return []
    return [float(ms) for ms in re.findall(r"verified \S+ into \S+ in ([0-9.]+) ms", text)]


def start_target(kind: str, label: str, n_adapters: int, args, base_dir: Path, registry_dir: Path, verify: bool,
                 raw_dir: Path | None, log_path: Path, cpu_loras: dict):
    """Start the server a configuration measures: `pipeline serve` (kind "ours"), raw vLLM ("raw", with the
    host-memory tier `pipeline serve` chose for the same adapters, so only the registry layer differs), or
    `pipeline serve --replicas N --routing KIND` ("multiplexed", "round_robin")."""
    from benchmarks.serve_targets import start_raw_vllm, start_replicated
    from serve.server import start_server

    lora = n_adapters > 0
    max_loras = min(args.max_loras, max(n_adapters, 1))
    if kind == "ours":
        handle = start_server(base_dir, str(registry_dir), port=free_port(), base_name="base", enable_lora=lora,
                              max_loras=max_loras, max_cpu_loras=args.max_cpu_loras, lora_cache_gib=args.lora_cache_gib,
                              max_lora_rank=args.rank, max_model_len=args.max_model_len,
                              kv_cache_gib=args.kv_cache_gib, dtype=args.dtype, log_path=log_path,
                              verify_weights=verify)
        cpu_loras[n_adapters] = handle.max_cpu_loras
        log.info("%s: host-memory adapter tier: %s", label, handle.lora_tier)
        return handle
    if kind == "raw":
        return start_raw_vllm(base_dir, raw_dir, free_port(), max_loras, cpu_loras.get(n_adapters) or max_loras,
                              args.rank, args.max_model_len, args.kv_cache_gib, args.dtype, log_path)
    # each replica sizes its host-memory tier (and Serve's per-replica model cache, the same number) like the
    # single server: from --lora-cache-gib unless --max-cpu-loras is given
    extra = (["--max-cpu-loras", str(args.max_cpu_loras)] if args.max_cpu_loras
             else ["--lora-cache-gib", str(args.lora_cache_gib)])
    handle = start_replicated(base_dir, registry_dir, free_port(), args.replicas, kind, max_loras, args.rank,
                              args.max_model_len, args.kv_cache_gib, args.dtype, log_path, extra)
    chosen = re.search(r"adapter tier per replica: max_cpu_loras=(\d+)", handle.log_tail(10_000))
    cpu_loras[(kind, n_adapters)] = int(chosen.group(1)) if chosen else None
    return handle


def run_config(label: str, kind: str, n_adapters: int, args, base_dir: Path, registry_dir: Path, refs: list[str],
               trace: list[dict], verify: bool = True, raw_names: list[str] | None = None,
               raw_dir: Path | None = None, cpu_loras: dict | None = None) -> dict:
    from benchmarks.serve_targets import adapter_loads

    lora = n_adapters > 0
    names = raw_names if kind == "raw" else refs
    models = [names[power_law_pick(item["u"], n_adapters, args.alpha)] if lora else "base" for item in trace]
    t0 = time.monotonic()
    log_path = Path(tempfile.gettempdir()) / f"serve_multi_lora.{label}.log"
    log_path.unlink(missing_ok=True)
    handle = start_target(kind, label, n_adapters, args, base_dir, registry_dir, verify, raw_dir, log_path,
                          cpu_loras if cpu_loras is not None else {})
    replicated = kind in ROUTINGS
    try:
        started = time.monotonic() - t0
        idle = handle.memory_mib()
        loads_before = adapter_loads(handle.url) if replicated else {}
        with MemorySampler(handle) as mem:
            result = asyncio.run(replay(handle.url, trace, models, args.drain_timeout))
        loads_after = adapter_loads(handle.url) if replicated else {}
    finally:
        handle.stop()
    if replicated:
        if not loads_after:  # an absent counter must not read as "no loads"
            raise RuntimeError(f"{handle.url}: /metrics has no `pipeline_adapter_loads_total` samples after the run; "
                               f"see {log_path}")
        loads = {k: v - loads_before.get(k, 0.0) for k, v in loads_after.items()}
        result.update(replicas=args.replicas, routing=kind, adapter_loads=loads,
                      loads_per_100_requests=100 * sum(loads.values()) / max(result["completed"], 1))
    spent = verification_ms(log_path) if kind == "ours" else []
    result.update(server=kind, verified=verify and lora and kind != "raw", verify_count=len(spent),
                  verify_ms_total=sum(spent), verify_ms_max=max(spent, default=0.0),
                  max_cpu_loras=(cpu_loras or {}).get(n_adapters if kind in ("ours", "raw") else (kind, n_adapters)))
    result.update(config=label, adapters=n_adapters, distinct_adapters_used=len(set(models)) if lora else 0,
                  start_s=started, idle_rss_mib=idle["rss_mib"], idle_pss_mib=idle["pss_mib"],
                  peak_rss_mib=mem.peak["rss_mib"], peak_pss_mib=mem.peak["pss_mib"], load_avg=os.getloadavg())
    log.info("%s: %s", label, json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                          for k, v in result.items() if k != "failure_examples"}))
    return result


def table(results: list[dict], weights_mib: float) -> str:
    base = next((r for r in results if r["adapters"] == 0), None)
    one = next((r for r in results if r["adapters"] == 1), None)
    rows = ["| config | distinct used | req/s | out tok/s | vs 1 adapter | TTFT p50 s | TTFT p90 s | failed | "
            "peak RSS MiB | peak PSS MiB | PSS vs base | N merged models (arith.) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        vs_one = f"{r['out_tok_per_s'] / one['out_tok_per_s']:.0%}" if one and r["adapters"] else "-"
        vs_base = f"{r['peak_pss_mib'] / base['peak_pss_mib'] - 1:+.1%}" if base else "-"
        merged = (f"{base['peak_pss_mib'] + (r['adapters'] - 1) * weights_mib:,.0f} MiB"
                  if base and r["adapters"] else "-")
        rows.append(f"| {r['config']} | {r['distinct_adapters_used']} | {r['req_per_s']:.2f} | "
                    f"{r['out_tok_per_s']:.1f} | {vs_one} | {r['ttft_p50_s']:.2f} | {r['ttft_p90_s']:.2f} | "
                    f"{r['failed']}/{r['sent']} | {r['peak_rss_mib']:,.0f} | {r['peak_pss_mib']:,.0f} | {vs_base} | "
                    f"{merged} |")
    return "\n".join(rows)


def plan_configs(args) -> list[tuple[str, str, int, bool]]:
    """(label, server kind, adapters, verified) for each configuration, in the order they run."""
    if args.replicas > 1:
        return [(f"{n} adapters, {args.replicas} replicas, {routing}", routing, n, True)
                for n in args.adapters for routing in args.routing]
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.verify]
    configs = [] if args.no_base_run else [("base alone", "ours", 0, True)]
    for n in args.adapters:
        configs += [(f"{n} adapters" + ("" if verify else ", unverified"), "ours", n, verify) for verify in modes]
        if args.raw_vllm:
            configs.append((f"{n} adapters, raw vLLM", "raw", n, False))
    return configs


def comparisons(results: list[dict]) -> str:
    """The issue's targets as lines: TTFT p90 against one adapter, raw vLLM against ours, adapter loads per 100
    requests by routing."""
    lines = []
    one = next((r for r in results if r["adapters"] == 1 and r["server"] == "ours"), None)
    for r in results:
        if one and r["server"] == "ours" and r["adapters"] > 1:
            lines.append(f"{r['config']}: TTFT p90 {r['ttft_p90_s']:.2f} s = {r['ttft_p90_s'] / one['ttft_p90_s']:.1f}x "
                         f"the single adapter's {one['ttft_p90_s']:.2f} s (max_cpu_loras {r['max_cpu_loras']})")
        if r["server"] == "raw":
            ours = next((o for o in results if o["server"] == "ours" and o["adapters"] == r["adapters"]), None)
            if ours:
                lines.append(f"{r['adapters']} adapters: pipeline serve {ours['req_per_s']:.2f} req/s, raw vLLM "
                             f"{r['req_per_s']:.2f} req/s: {ours['req_per_s'] / r['req_per_s']:.2f}x")
    routed = [r for r in results if r["server"] in ROUTINGS]
    if routed:
        lines += ["", "| config | req/s | TTFT p50 s | TTFT p90 s | failed | adapter loads | loads per 100 requests |",
                  "|---|---|---|---|---|---|---|"]
        for r in routed:
            per_replica = ", ".join(f"{k}: {v:.0f}" for k, v in sorted(r["adapter_loads"].items()))
            lines.append(f"| {r['config']} | {r['req_per_s']:.2f} | {r['ttft_p50_s']:.2f} | {r['ttft_p90_s']:.2f} | "
                         f"{r['failed']}/{r['sent']} | {sum(r['adapter_loads'].values()):.0f} ({per_replica}) | "
                         f"{r['loads_per_100_requests']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="default", help="base model folder, or `default` (SmolLM2-135M-Instruct)")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--no-base-run", action="store_true", help="skip the base-alone configuration")
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate, requests/s")
    p.add_argument("--duration", type=float, default=45.0, help="seconds of arrivals per configuration")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to wait for answers after arrivals")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[8, 64])
    p.add_argument("--output-len", type=int, nargs=2, default=[8, 32])
    p.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of adapter popularity")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-loras", type=int, default=8, help="adapters per batch (vLLM --max-loras)")
    p.add_argument("--max-cpu-loras", type=int, default=None,
                   help="adapters kept loaded in host memory (default: the server's host-memory tier, sized from "
                        "--lora-cache-gib)")
    p.add_argument("--lora-cache-gib", type=float, default=None,
                   help="the host-memory tier's budget (default: `pipeline serve`'s default)")
    p.add_argument("--raw-vllm", action="store_true",
                   help="after each adapter configuration, the same on raw vLLM with its filesystem resolver (same "
                        "engine settings and host-memory tier, no registry): what the registry layer costs")
    p.add_argument("--replicas", type=int, default=1,
                   help="above 1: run `pipeline serve --replicas N --routing R` for each --routing instead of the "
                        "single server, and report adapter loads per 100 requests from its /metrics")
    p.add_argument("--routing", nargs="+", choices=ROUTINGS, default=list(ROUTINGS))
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--kv-cache-gib", type=float, default=0.5)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify", choices=["on", "off", "both"], default="on",
                   help="adapter verification (verified read-only copies, serve/verified.py): on, off (registry folders "
                        "straight to the engine), or both: every adapter configuration twice, to measure its cost")
    p.add_argument("--out", default="benchmarks/results/serve_multi_lora.json")
    p.add_argument("--force", action="store_true", help="replace --out if it exists (default: refuse)")
    args = p.parse_args(argv)
    if args.lora_cache_gib is None:
        from serve.lora_tier import DEFAULT_LORA_CACHE_GIB

        args.lora_cache_gib = DEFAULT_LORA_CACHE_GIB
    refuse_existing_out(p, [args.out], args.force)  # before minutes of measuring, not after
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpx2", "openai"):  # one line per request would bury the results
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from ground.model_files import weight_files
    from ground.base_model import resolve_model_path

    base_dir = resolve_model_path(args.base)
    config = json.loads((base_dir / "config.json").read_text())
    weights_mib = sum(f.stat().st_size for f in weight_files(base_dir)) / (1 << 20)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-registry-") as tmp:
        registry_dir = Path(tmp) / "registry"
        refs = publish_adapters(base_dir, registry_dir, max(args.adapters), args.rank)
        trace = make_trace(args.rate, args.duration, tuple(args.prompt_len), tuple(args.output_len),
                           config["vocab_size"], args.seed)
        log.info("trace: %d requests over %.0f s; model %s (%.0f MiB of weights); load average %s",
                 len(trace), args.duration, base_dir.name, weights_mib, load_before)
        raw_names = (raw_adapter_folders(registry_dir, refs, Path(tmp) / "raw", base_dir)
                     if args.raw_vllm and args.replicas == 1 else None)
        configs = plan_configs(args)
        cpu_loras: dict = {}  # adapters (or (routing, adapters)) -> max_cpu_loras chosen (raw vLLM gets the same)
        results = [run_config(label.replace(" ", "-").replace(",", ""), kind, n, args, base_dir, registry_dir, refs,
                              trace, verify, raw_names, Path(tmp) / "raw", cpu_loras)
                   for label, kind, n, verify in configs]
    for r, (label, *_) in zip(results, configs):
        r["config"] = label
    report = {"model": base_dir.name, "weights_mib": weights_mib, "args": vars(args), "load_before": load_before,
              "load_after": os.getloadavg(), "cpus": os.cpu_count(), "results": results}
    write_new_text(args.out, json.dumps(report, indent=1, default=str) + "\n", replace=args.force)
    print(f"\nmodel {base_dir.name}, {len(trace)} requests at {args.rate}/s for {args.duration:.0f} s, "
          f"load average before {load_before}, after {report['load_after']}\n")
    print(table(results, weights_mib))
    print(comparisons(results))
    for r in results:
        if r.get("verify_count"):
            print(f"{r['config']}: {r['verify_count']} adapters verified, {r['verify_ms_total']:.1f} ms in all "
                  f"(slowest {r['verify_ms_max']:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
