"""Each fleet member's held-out reward: its val_files through the engine with its own adapter, scored by its
own reward, sampled as its rollout.val_kwargs says (the single path's `Trainer.validate`, per member)."""

from __future__ import annotations

import time


def validation_sampling(cfg) -> dict:
    """val_kwargs as `generate` arguments: sampled (n draws) or greedy (one)."""
    vk = cfg.actor_rollout_ref.rollout.val_kwargs
    if vk.do_sample:
        return dict(n=vk.n, temperature=vk.temperature, top_p=vk.top_p, top_k=vk.top_k)
    return dict(greedy=True, n=1, temperature=0.0, top_p=1.0, top_k=-1)


def validate_member(engine, tokenizer, member) -> dict:
    """{"val/reward", "val/acc" (when the reward gives one), "val/seconds"} of one member (a MemberRun)."""
    import ray

    from stages.train.batch import flatten_generation

    cfg = member.spec.cfg
    t0 = time.perf_counter()
    items = member.val_items
    size = cfg.data.val_batch_size or max(len(items), 1)
    budget = cfg.actor_rollout_ref.rollout.response_length or cfg.data.max_response_length
    scores, accs = [], []
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        outputs = ray.get(engine.generate_member.remote(member.name, [it["prompt_ids"] for it in chunk],
                                                        max_tokens=budget, **validation_sampling(cfg)))
        r = flatten_generation(chunk, outputs)
        texts = tokenizer.batch_decode(r.response_ids, skip_special_tokens=True)
        results = member.reward_fn([it["data_source"] for it in r.items], texts,
                                   [it["ground_truth"] for it in r.items], [it["extra_info"] for it in r.items])
        scores += [float(x["score"]) for x in results]
        accs += [x["acc"] for x in results if x.get("acc") is not None]
    out = {"val/reward": sum(scores) / max(len(scores), 1), "val/seconds": time.perf_counter() - t0}
    if accs:
        out["val/acc"] = sum(float(a) for a in accs) / len(accs)
    return out
