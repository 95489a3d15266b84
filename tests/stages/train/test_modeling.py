"""PolicyValueModel's lm_head over the last positions only (`logits_to_keep`): same logits and gradients as the
whole-sequence lm_head, and no batched product against the expanded vocabulary matrix (the slow path measured in
docs/training.md: a non-contiguous slice under autograd made torch.matmul copy the lm_head weight per row)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from config import load_config
from stages.train.modeling import build_model, kept_positions


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _model_and_batch(tiny_model_dir):
    cfg = load_config(None, [f"actor_rollout_ref.model.path={tiny_model_dir}", "actor_rollout_ref.model.lora_rank=8",
                             "actor_rollout_ref.model.target_modules=all-linear", "trainer.logger=[console]"])
    model = build_model(str(tiny_model_dir), cfg.actor_rollout_ref.model, with_critic=False, seed=3,
                        dtype=torch.float32)
    with torch.no_grad():  # non-zero B, so the LoRA path contributes to logits and gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 300, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, as the trainer's prompts have
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return model, ids, mask, position_ids


def test_kept_positions_is_an_index_of_the_last_positions_or_zero_for_all():
    assert kept_positions(10, 0, "cpu") == 0
    assert kept_positions(10, 10, "cpu") == 0 and kept_positions(10, 12, "cpu") == 0
    assert kept_positions(10, 3, "cpu").tolist() == [7, 8, 9]


def test_last_positions_logits_and_grads_equal_the_whole_sequence_and_skip_batched_matmul(tiny_model_dir):
    model, ids, mask, pos = _model_and_batch(tiny_model_dir)
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    keep = 5

    full = model(ids, mask, pos, logits_to_keep=0)[:, -keep:]
    full.float().logsumexp(-1).sum().backward()
    grads_full = [p.grad.clone() for p in lora]
    model.zero_grad(set_to_none=True)

    with _OpNames() as ops:
        last = model(ids, mask, pos, logits_to_keep=keep)
        last.float().logsumexp(-1).sum().backward()
    assert last.shape == full.shape
    torch.testing.assert_close(last, full, rtol=1e-5, atol=1e-5)
    for g_full, p in zip(grads_full, lora):
        torch.testing.assert_close(p.grad, g_full, rtol=1e-4, atol=1e-6)
    assert "bmm" not in ops.names, sorted(ops.names)
