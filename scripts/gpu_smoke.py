"""GPU smoke test of the actor's update path: FSDP2 over NCCL, bf16, world size 1, on a model built here.

No downloads, no vLLM, no Ray: a Llama model with SmolLM2-135M's shapes (or `--shape tiny`) is initialised at
random and saved as safetensors in a temp dir, then one ActorWorker (the training stage's own class) runs
`update_actor` (PPO loss, backward, AdamW step on the LoRA weights) and `compute_log_probs` on a random batch
of `--rows` x (`--prompt` + `--response`) tokens, and the adapter sync gather. Prints step time and loss.

    bash scripts/gpu_smoke.sh                          # CUDA: SmolLM2-135M shapes, 16 x (64 + 32) tokens
    bash scripts/gpu_smoke.sh --shape tiny --steps 3
    bash scripts/gpu_smoke.sh --cpu --shape tiny       # the same path on CPU over gloo (checks the script)
    bash scripts/gpu_smoke.sh --members 1,4,16         # fleet training: N adapters mixed in one batch, step
                                                       # time per N at --rows-per-member rows each
    bash scripts/gpu_smoke.sh --members --lora-path loop   # the same with the per-member loop in every layer

Without CUDA (and without --cpu) it says so and exits 0: there is nothing to smoke-test.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # SmolLM2-135M-Instruct's architecture (the benchmark model), random weights.
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=512, max_position_embeddings=512),
}


def build_model_dir(shape: str, out: Path, dtype) -> Path:
    """A random-weight Llama folder (config.json + model.safetensors); no tokenizer is needed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=True, rope_theta=10000.0)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    return out


def random_batch(rows: int, prompt: int, response: int, vocab: int, seed: int = 0) -> dict:
    """Rows of varying prompt/response length, in the trainer's layout (stages/train/batch.py)."""
    import random

    import torch

    from stages.train.batch import build_tensors

    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(prompt // 2, prompt))] for _ in range(rows)]
    responses = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, response))] for _ in range(rows)]
    batch = build_tensors(prompts, responses, pad_id=0)
    gen = torch.Generator().manual_seed(seed)
    batch["advantages"] = torch.randn(batch["response_mask"].shape, generator=gen) * batch["response_mask"]
    batch["old_log_probs"] = torch.zeros_like(batch["response_mask"])
    return batch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=32)
    ap.add_argument("--cpu", action="store_true", help="run the same path on CPU over gloo (no CUDA needed)")
    ap.add_argument("--members", nargs="?", const="1,4,16", default=None,
                    help="fleet update path instead: step time for each member count (default 1,4,16)")
    ap.add_argument("--rows-per-member", type=int, default=8, help="with --members: rows of each member per batch")
    ap.add_argument("--lora-path", choices=["stacked", "loop"], default="stacked",
                    help="with --members: how the fleet's LoRA layers compute (stages/train/fleet/lora.py)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    try:
        import torch
    except ImportError:
        print("gpu_smoke: PyTorch is not installed; nothing to run.")
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print(f"gpu_smoke: CUDA is not available (torch {torch.__version__}, no visible GPU); nothing to run. "
              "Run it on a machine with a GPU, or pass --cpu to exercise the same path on CPU.")
        return 0
    missing = [m for m in ("transformers", "peft", "pydantic", "yaml", "safetensors") if not _importable(m)]
    if missing:
        print(f"gpu_smoke: missing Python packages {missing}; install them (pip install {' '.join(missing)}).")
        return 1
    device = "cpu" if args.cpu else "cuda"
    dtype = torch.bfloat16

    from config import load_config
    from stages.train.actor_worker import ActorWorker
    from ground.ports import free_port

    if args.members is not None:
        from gpu_smoke_fleet import run_fleet_smoke

        with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
            model_dir = build_model_dir(args.shape, Path(tmp) / "model", dtype)
            print(f"gpu_smoke: fleet device={device} ({_device_name(device)}) shape={args.shape} members={args.members} "
                  f"lora_path={args.lora_path}")
            return run_fleet_smoke(args, str(model_dir), device, SHAPES[args.shape]["vocab_size"], random_batch, _clock)

    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        t0 = time.perf_counter()
        model_dir = build_model_dir(args.shape, Path(tmp) / "model", dtype)
        build_s = time.perf_counter() - t0
        cfg = load_config(None, [
            f"actor_rollout_ref.model.path={model_dir}", "actor_rollout_ref.model.dtype=bfloat16",
            "actor_rollout_ref.model.lora_rank=16", "actor_rollout_ref.model.lora_alpha=32",
            "actor_rollout_ref.model.target_modules=all-linear",
            f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={args.rows}",
            f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={args.rows}",
            "actor_rollout_ref.actor.optim.lr=1e-4", f"trainer.device={device}", "trainer.logger=[console]",
        ])
        t0 = time.perf_counter()
        worker = ActorWorker(0, 1, cfg.to_dict(), str(model_dir), False, args.steps, device, torch.get_num_threads())
        worker.init_distributed("127.0.0.1", free_port())
        info = worker.setup()
        setup_s = time.perf_counter() - t0
        backend = torch.distributed.get_backend()
        batch = random_batch(args.rows, args.prompt, args.response, SHAPES[args.shape]["vocab_size"])
        tokens = int(batch["attention_mask"].sum())
        print(f"gpu_smoke: device={device} ({_device_name(device)}) backend={backend} dtype={info['dtype']} "
              f"shape={args.shape} trainable_lora_params={info['trainable_params']:,} "
              f"batch={args.rows}x{batch['input_ids'].shape[1]} ({tokens} real tokens) "
              f"model_build={build_s:.1f}s worker_setup={setup_s:.1f}s")
        times = []
        try:
            for step in range(1, args.steps + 1):
                marks = [_clock(device)]
                batch["old_log_probs"] = worker.compute_log_probs(batch)["log_probs"]
                marks.append(_clock(device))
                metrics = worker.update_actor(batch, num_mini_batches=1, reuse_forward_as_old=False)
                marks.append(_clock(device))
                sync = worker.sync_weights(str(Path(tmp) / "adapter"), "adapter", layered=True)
                marks.append(_clock(device))
                times.append(marks[-1] - marks[0])
                log_probs_s, update_s, gather_s = (b - a for a, b in zip(marks, marks[1:]))
                print(f"gpu_smoke: step {step}: {times[-1]:.3f} s (log-probs {log_probs_s:.3f}, update "
                      f"{update_s:.3f}, adapter gather {gather_s:.3f} for {sync['bytes'] / 1e6:.1f} MB) "
                      f"pg_loss={metrics['actor/pg_loss']:.5f} grad_norm={metrics['actor/grad_norm']:.4f} "
                      f"entropy={metrics['actor/entropy']:.3f}")
        finally:
            worker.shutdown()
        steady = times[1:] or times
        peak = f" peak_memory={torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device == "cuda" else ""
        print(f"gpu_smoke: OK median step {statistics.median(steady):.3f} s over {len(steady)} step(s) after the "
              f"first; {tokens / statistics.median(steady):.0f} tokens/s{peak}")
    return 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _clock(device: str) -> float:
    """Wall time once the GPU's queued work is done (kernels run asynchronously)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device == "cuda" else "CPU"


if __name__ == "__main__":
    sys.exit(main())
