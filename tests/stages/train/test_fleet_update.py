"""Fleet training's actor update (stages/train/fleet): one update over rows of three members equals, for each
member, the project's single-adapter update (ActorWorker.update_actor) on that member's rows alone; a member
without rows keeps its weights and AdamW state bit for bit; adapters off is the base model.

Tiny model, float32, CPU, FSDP2 over gloo with world size 1 (as the actor workers run in the other tests).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from stages.train.fleet.members import BASE_ONLY, FleetMember
from tests.stages.train.toy_task import ragged_batch

TARGETS = ["q_proj", "v_proj", "lm_head"]
# different ranks, scalings, learning rates, weight decays; the second member's clip bound is below its norm
MEMBERS = [
    FleetMember("add", lora_rank=4, lora_alpha=8, lr=1e-2, grad_clip=1.0, weight_decay=0.01),
    FleetMember("sub", lora_rank=8, lora_alpha=32, lr=3e-2, grad_clip=0.05, weight_decay=0.1),
    FleetMember("spell", lora_rank=2, lora_alpha=2, lr=5e-3, grad_clip=1e9, weight_decay=0.0),
]
MICRO_ROWS = 6  # two micro-batches of 12 rows, each mixing all three members


@contextmanager
def gloo_world_of_one():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ground.ports import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _actor_cfg():
    from config import load_config

    return load_config(None, []).actor_rollout_ref.actor


@pytest.fixture(params=["loop", "stacked"])
def lora_path(request):
    """Both ways the fleet's LoRA layers compute (fleet/lora.py): each test's promise holds for either."""
    return request.param


def _fleet_model(model_dir, members=MEMBERS, gradient_checkpointing: bool = False, path: str = "stacked"):
    """The fleet model with B set to small random values (B = 0, PEFT's start, would leave A without gradient)."""
    from stages.train.fleet.lora import fleet_layers
    from stages.train.fleet.model import build_fleet_model

    model = build_fleet_model(str(model_dir), members, TARGETS, seed=3, dtype=torch.float32,
                              gradient_checkpointing=gradient_checkpointing)
    model.routing.path = path
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, layer in fleet_layers(model.lm):
            for b in layer.lora_B:
                b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    return model


def _mixed_batch(rows: int = 12):
    """Rows of three members interleaved (0, 1, 2, 0, ...), ragged lengths, some responses empty."""
    batch = ragged_batch(seed=5, rows=rows)
    member_of_row = torch.arange(rows) % 3
    return batch, member_of_row


def _fleet_state(model, optimizer, member: int) -> dict:
    """Member `member`'s weights and AdamW state, whole, by PEFT key (weights) and key + `/exp_avg` etc."""
    from stages.train.fleet.lora import fleet_layers

    out = {}
    for name, layer in fleet_layers(model.lm):
        for kind, params in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
            key = f"base_model.model.{name}.{kind}.weight"
            param = params[member]
            out[key] = _whole(param)
            for field, value in optimizer.adamw.state.get(param, {}).items():
                out[f"{key}/{field}"] = _whole(value)
    return out


def _whole(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def _alone(model_dir, tmp_path, member: FleetMember, start: dict, batch: dict, settings: tuple[str, ...] = (),
           num_mini_batches: int = 1, rl_steps: int = 1, reuse_forward_as_old: bool = False) -> dict:
    """The single-adapter path: an ActorWorker with this member's settings (+ `settings`, config overrides), its
    LoRA set to `start`, `rl_steps` update_actor calls over `batch` (this member's rows only), with the reference
    log-probs of its own reference pass when the KL loss is on; returns its weights and AdamW state as
    `_fleet_state`, and the grad norm the last update reports."""
    from config import load_config
    from ground.ports import free_port
    from stages.train import gather
    from stages.train.actor_worker import ActorWorker

    cfg = load_config(None, [
        f"actor_rollout_ref.model.path={model_dir}", f"actor_rollout_ref.model.lora_rank={member.lora_rank}",
        f"actor_rollout_ref.model.lora_alpha={member.lora_alpha}",
        f"actor_rollout_ref.model.target_modules=[{','.join(TARGETS)}]",
        f"actor_rollout_ref.actor.optim.lr={member.lr}", f"actor_rollout_ref.actor.optim.weight_decay={member.weight_decay}",
        f"actor_rollout_ref.actor.grad_clip={member.grad_clip}",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3", "trainer.device=cpu", "trainer.logger=[console]",
        *settings,
    ])
    worker = ActorWorker(0, 1, cfg.to_dict(), str(model_dir), False, 1, "cpu", 1)
    worker.init_distributed("127.0.0.1", free_port())
    try:
        worker.setup()
        named = [(n, p) for n, p in worker.model.named_parameters() if gather.is_policy_lora(n)]
        assert {gather.peft_name(n) for n, _ in named} == set(start)
        with torch.no_grad():
            for n, p in named:
                p.to_local().copy_(start[gather.peft_name(n)])
        if cfg.actor_rollout_ref.actor.use_kl_loss:
            batch = {**batch, "ref_log_probs": worker.compute_log_probs(batch, "ref")["log_probs"]}
        for _ in range(rl_steps):
            metrics = worker.update_actor(batch, num_mini_batches=num_mini_batches,
                                          reuse_forward_as_old=reuse_forward_as_old)
        out = {}
        for n, p in named:
            key = gather.peft_name(n)
            out[key] = _whole(p)
            for field, value in worker.optimizer.state[p].items():
                out[f"{key}/{field}"] = _whole(value)
        return {"state": out, "grad_norm": metrics["actor/grad_norm"]}
    finally:
        worker.shutdown()


def _assert_same(fleet: dict, alone: dict, what: str, exact: bool = False, lr: float = 0.0):
    """exact: bit for bit. Else AdamW's moments to float32 noise (3e-5 relative, or 1e-5 of the tensor's largest
    value), and the weights to 0.2% of one step: AdamW's first step moves an element by lr * g / (|g| + eps),
    which turns the float32 rounding of a gradient element near eps (1e-8) into a visible share of lr (seen
    here: q_proj elements with |g| ~ 3e-9 differ by 4e-4 lr while their moments agree to 1e-6; an lm_head
    element by 1.2e-3 lr once micro-batches are sorted by length; a moment of 1e-11 by 2e-5 after 8 steps).
    A wrong normalisation, warmup or mini-batch is off by a whole share of lr."""
    assert set(fleet) == set(alone), what
    for key in fleet:
        if exact:
            assert torch.equal(fleet[key], alone[key]), f"{what}: {key} changed"
            continue
        if key.endswith("/step"):
            assert torch.equal(fleet[key], alone[key]), f"{what}: {key}"
            continue
        if key.endswith(("/exp_avg", "/exp_avg_sq")):
            rtol, atol = 3e-5, 1e-5 * float(alone[key].abs().max())
        else:
            rtol, atol = 0.0, 2e-3 * lr
        torch.testing.assert_close(fleet[key], alone[key], rtol=rtol, atol=atol, msg=lambda m: f"{what}: {key}: {m}")


def test_one_mixed_update_equals_each_member_trained_alone(tiny_model_dir, tmp_path, lora_path):
    from stages.train.fleet.model import shard_fleet_model
    from stages.train.fleet.update import FleetOptimizer, update_step

    model = _fleet_model(tiny_model_dir, path=lora_path)
    starts = [model.adapter_tensors(m) for m in range(len(MEMBERS))]
    batch, member_of_row = _mixed_batch()
    alone = []
    for m, member in enumerate(MEMBERS):
        rows = (member_of_row == m).nonzero().squeeze(-1)
        own = {k: v.index_select(0, rows) for k, v in batch.items()}
        alone.append(_alone(tiny_model_dir, tmp_path, member, starts[m], own))

    with gloo_world_of_one() as mesh:
        shard_fleet_model(model, mesh=mesh)
        optimizer = FleetOptimizer(model)
        metrics = update_step(model, optimizer, batch, member_of_row, _actor_cfg(), micro_batch_rows=MICRO_ROWS)
        for m, member in enumerate(MEMBERS):
            state = _fleet_state(model, optimizer, m)
            assert state.keys() == alone[m]["state"].keys()
            assert int(state[next(k for k in state if k.endswith("/step"))]) == 1
            _assert_same(state, alone[m]["state"], f"member {member.name}", lr=member.lr)
            assert metrics[f"fleet/{member.name}/grad_norm"] == pytest.approx(alone[m]["grad_norm"], rel=1e-5)
    # the clip bound of "sub" was active, so per-member clipping was exercised, not just per-member norms
    assert alone[1]["grad_norm"] > MEMBERS[1].grad_clip


# KL loss against the shared reference, an entropy bonus, 2 mini-batches x 2 epochs, shuffled rows, a warmup
# that is still ramping, and a clip range the second update's ratios cross
RL_SETTINGS = ("actor_rollout_ref.actor.use_kl_loss=true", "actor_rollout_ref.actor.kl_loss_coef=0.5",
               "actor_rollout_ref.actor.kl_loss_type=low_var_kl", "actor_rollout_ref.actor.entropy_coeff=0.01",
               "actor_rollout_ref.actor.ppo_epochs=2", "actor_rollout_ref.actor.shuffle=true",
               "actor_rollout_ref.actor.optim.lr_warmup_steps=3", "actor_rollout_ref.actor.clip_ratio=0.05",
               "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=2", "trainer.seed=7")
UNEVEN = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 0, 2, 0, 1])  # 5, 4 and 3 rows: mini-batches of 3+2, 2+2, 2+1


def _own_rows(batch: dict, rows: torch.Tensor) -> dict:
    """A member's rows as its own run batches them: padded to its own longest response (build_tensors' width),
    which seq-mean-token-sum-norm divides by."""
    from stages.train.fleet.mini_batches import response_lengths

    own = {k: v.index_select(0, rows) for k, v in batch.items()}
    width = max(1, int(response_lengths(own).max()))
    cut = own["responses"].shape[1] - width
    return {k: (v[:, : v.shape[1] - cut] if k in ("input_ids", "attention_mask", "position_ids") else v[:, :width])
            for k, v in own.items()}


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                           "seq-mean-token-sum-norm"])
def test_kl_entropy_mini_batches_and_epochs_equal_each_member_trained_alone(tiny_model_dir, tmp_path, lora_path, loss_agg_mode):
    """Two RL steps with the verl keys a single run honours, rows of three members mixed in every micro-batch:
    each member ends with the weights and AdamW state of the single path run on its own rows alone."""
    from config import load_config
    from stages.train.fleet.model import shard_fleet_model
    from stages.train.fleet.update import FleetOptimizer
    from stages.train.fleet.update_loop import update_members

    settings = (*RL_SETTINGS, f"actor_rollout_ref.actor.loss_agg_mode={loss_agg_mode}")
    model = _fleet_model(tiny_model_dir, path=lora_path)
    starts = [model.adapter_tensors(m) for m in range(len(MEMBERS))]
    batch = ragged_batch(seed=5, rows=len(UNEVEN))
    alone = [_alone(tiny_model_dir, tmp_path, member, starts[m], _own_rows(batch, (UNEVEN == m).nonzero().squeeze(-1)),
                    settings, num_mini_batches=2, rl_steps=2)
             for m, member in enumerate(MEMBERS)]

    cfg = load_config(None, [*settings, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4"])
    updates = [0, 0, 0]
    with gloo_world_of_one() as mesh:
        shard_fleet_model(model, mesh=mesh)
        optimizer = FleetOptimizer(model)
        for _ in range(2):
            metrics = update_members(model, optimizer, cfg, batch, UNEVEN, updates)
        assert updates == [2, 2, 2]
        for m, member in enumerate(MEMBERS):
            state = _fleet_state(model, optimizer, m)
            # 2 RL steps x 2 epochs x 2 mini-batches, each member stepping on its own share of each
            assert int(state[next(k for k in state if k.endswith("/step"))]) == 8
            _assert_same(state, alone[m]["state"], f"member {member.name} ({loss_agg_mode})", lr=member.lr)
            assert metrics[f"fleet/{member.name}/optimizer_steps"] == 4
            assert metrics[f"fleet/{member.name}/lr"] == pytest.approx(member.lr * 2 / 3)  # warmup: update 2 of 3
            assert metrics[f"fleet/{member.name}/kl_loss"] > 0


def test_the_on_policy_shortcut_equals_each_member_trained_alone_with_it(tiny_model_dir, tmp_path, lora_path):
    """One epoch over one mini-batch: the fleet step skips the old-log-prob pass (its batch has none) and takes
    the update's own forward, as the single path's shortcut does; two RL steps (the second off the first's
    weights) end where each member's own shortcut run ends. Without the shortcut the batch's stale old
    log-probs (random here) would give other ratios, clipping and weights."""
    from config import load_config
    from stages.train.fleet.model import shard_fleet_model
    from stages.train.fleet.update import FleetOptimizer
    from stages.train.fleet.update_loop import on_policy, update_members

    settings = ("data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
                "actor_rollout_ref.actor.clip_ratio=0.05")
    model = _fleet_model(tiny_model_dir, path=lora_path)
    starts = [model.adapter_tensors(m) for m in range(len(MEMBERS))]
    batch = ragged_batch(seed=9, rows=len(UNEVEN))
    alone = [_alone(tiny_model_dir, tmp_path, member, starts[m], _own_rows(batch, (UNEVEN == m).nonzero().squeeze(-1)),
                    settings, rl_steps=2, reuse_forward_as_old=True)
             for m, member in enumerate(MEMBERS)]
    cfg = load_config(None, [*settings, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4"])
    assert on_policy(cfg)
    without_old = {k: v for k, v in batch.items() if k != "old_log_probs"}
    with gloo_world_of_one() as mesh:
        shard_fleet_model(model, mesh=mesh)
        optimizer = FleetOptimizer(model)
        for _ in range(2):
            update_members(model, optimizer, cfg, without_old, UNEVEN, [0, 0, 0])
        for m, member in enumerate(MEMBERS):
            _assert_same(_fleet_state(model, optimizer, m), alone[m]["state"], f"member {member.name}", lr=member.lr)
        two = load_config(None, [*settings, "actor_rollout_ref.actor.ppo_epochs=2"])
        assert not on_policy(two)
        with pytest.raises(ValueError, match="no old_log_probs"):
            update_members(model, optimizer, two, without_old, UNEVEN, [0, 0, 0])


def test_a_member_without_rows_keeps_weights_and_optimizer_state_bit_for_bit(tiny_model_dir, lora_path):
    from stages.train.fleet.model import shard_fleet_model
    from stages.train.fleet.update import FleetOptimizer, update_step

    model = _fleet_model(tiny_model_dir, path=lora_path)
    batch, member_of_row = _mixed_batch()
    with gloo_world_of_one() as mesh:
        shard_fleet_model(model, mesh=mesh)
        optimizer = FleetOptimizer(model)
        update_step(model, optimizer, batch, member_of_row, _actor_cfg(), micro_batch_rows=MICRO_ROWS)
        before = [_fleet_state(model, optimizer, m) for m in range(3)]
        # step 2: "sub" (weight decay 0.1, so a step without gradient would still move it) has no rows at all;
        # then a step where its rows are all empty responses (rows, but not one token)
        no_rows = member_of_row.clone()
        no_rows[no_rows == 1] = BASE_ONLY
        update_step(model, optimizer, batch, no_rows, _actor_cfg(), micro_batch_rows=MICRO_ROWS)
        empty = {**batch, "response_mask": batch["response_mask"].clone()}
        empty["response_mask"][member_of_row == 1] = 0
        update_step(model, optimizer, empty, member_of_row, _actor_cfg(), micro_batch_rows=MICRO_ROWS)
        after = [_fleet_state(model, optimizer, m) for m in range(3)]
    _assert_same(after[1], before[1], "member without rows", exact=True)
    for m in (0, 2):  # the others did move and count their steps
        assert not torch.equal(after[m]["base_model.model.lm_head.lora_A.weight"],
                               before[m]["base_model.model.lm_head.lora_A.weight"])
        assert int(after[m]["base_model.model.lm_head.lora_A.weight/step"]) == 3


def test_adapters_off_is_the_base_model_and_rows_of_a_mixed_batch_get_their_own_member(tiny_model_dir, lora_path):
    from transformers import AutoModelForCausalLM

    from stages.train.fleet.model import log_probs, shard_fleet_model
    from stages.train.modeling import response_log_probs

    batch, member_of_row = _mixed_batch()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"]).logits
    base_lp, _ = response_log_probs(base_logits, batch["responses"])
    mask = batch["response_mask"].bool()

    model = _fleet_model(tiny_model_dir, path=lora_path)
    with gloo_world_of_one() as mesh:
        shard_fleet_model(model, mesh=mesh)
        reference = log_probs(model, batch, torch.full_like(member_of_row, BASE_ONLY))
        mixed_with_ref = member_of_row.clone()
        mixed_with_ref[::4] = BASE_ONLY  # rows 0, 4, 8: the reference, inside a batch of members
        mixed = log_probs(model, batch, mixed_with_ref)
        each_alone = [log_probs(model, batch, torch.full_like(member_of_row, m)) for m in range(3)]

    torch.testing.assert_close(reference[mask], base_lp[mask], rtol=1e-5, atol=1e-6)
    for row, m in enumerate(mixed_with_ref.tolist()):
        want = base_lp[row] if m == BASE_ONLY else each_alone[m][row]
        torch.testing.assert_close(mixed[row][mask[row]], want[mask[row]], rtol=1e-5, atol=1e-6)
    # and the members' random B does change the policy, so the comparisons above could tell them apart
    assert (each_alone[1][mask] - base_lp[mask]).abs().max() > 1e-3


def test_gradient_checkpointing_recomputes_each_row_with_its_own_member(tiny_model_dir, lora_path):
    """The routing stays set after the forward, so checkpointing's recomputation in backward sees the same
    members per row; the update equals the one without checkpointing."""
    from stages.train.fleet.model import shard_fleet_model
    from stages.train.fleet.update import FleetOptimizer, update_step

    batch, member_of_row = _mixed_batch()
    states = []
    for checkpointing in (False, True):
        model = _fleet_model(tiny_model_dir, gradient_checkpointing=checkpointing, path=lora_path)
        with gloo_world_of_one() as mesh:
            shard_fleet_model(model, mesh=mesh)
            optimizer = FleetOptimizer(model)
            update_step(model, optimizer, batch, member_of_row, _actor_cfg(), micro_batch_rows=MICRO_ROWS)
            states.append([_fleet_state(model, optimizer, m) for m in range(3)])
    assert model.lm.is_gradient_checkpointing
    for m, member in enumerate(MEMBERS):
        _assert_same(states[1][m], states[0][m], f"member {member.name} with checkpointing", lr=member.lr)


def test_stacked_and_loop_paths_give_the_same_logits_and_gradients_and_leave_absent_members_alone(tiny_model_dir):
    """Rows of members 0 and 2 and of the base, member 1 touched (rows on another rank), no other member: the
    stacked matmuls give the loop's logits and gradients; the touched member gets zeros, not None. A mask that
    let a row reach another member's columns (or a stack in another order than the mask's) changes them."""
    from stages.train.fleet.lora import fleet_layers

    members = [*MEMBERS, FleetMember("absent", lora_rank=3, lora_alpha=6)]
    batch, _ = _mixed_batch()
    member_of_row = torch.tensor([2, 2, 2, 0, 0, BASE_ONLY, BASE_ONLY, 2, 0, 0, 2, BASE_ONLY])
    order = torch.sort(member_of_row, stable=True).indices
    rows = {k: batch[k].index_select(0, order) for k in ("input_ids", "attention_mask", "position_ids")}
    results = {}
    for path in ("loop", "stacked"):
        model = _fleet_model(tiny_model_dir, members=members, path=path)
        logits = model(rows["input_ids"], rows["attention_mask"], rows["position_ids"], member_of_row[order],
                       touch=[1])
        (logits.float() ** 2).mean().backward()
        grads = {(n, kind, m): p.grad for n, layer in fleet_layers(model.lm)
                 for kind, params in (("A", layer.lora_A), ("B", layer.lora_B)) for m, p in enumerate(params)}
        results[path] = (logits.detach(), grads)
    (loop_logits, loop_grads), (stacked_logits, stacked_grads) = results["loop"], results["stacked"]
    torch.testing.assert_close(stacked_logits, loop_logits, rtol=1e-5, atol=1e-6)
    for key, grad in loop_grads.items():
        member = key[2]
        if member == 3:
            assert grad is None and stacked_grads[key] is None, key
        elif member == 1:
            assert torch.count_nonzero(grad) == 0 and torch.count_nonzero(stacked_grads[key]) == 0, key
        else:
            torch.testing.assert_close(stacked_grads[key], grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{key}: {m}")
            assert torch.count_nonzero(grad) > 0, key


def test_fleet_members_targets_and_loss_mode_are_checked_by_name():
    from ground.errors import ConfigError
    from stages.train.fleet.lora import attach_fleet_lora
    from stages.train.fleet.members import check_members
    from stages.train.fleet.update import update_step

    with pytest.raises(ConfigError, match="target_modules=\\['k_proj'\\] matches no linear"):
        attach_fleet_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), MEMBERS, ["k_proj"], seed=0)
    cfg = _actor_cfg()
    cfg.loss_agg_mode = "token-median"
    with pytest.raises(ConfigError, match="token-median"):
        update_step(None, None, {}, torch.zeros(0), cfg, micro_batch_rows=1)

    with pytest.raises(ConfigError, match="'add' is used twice"):
        check_members([FleetMember("add"), FleetMember("add")])
    with pytest.raises(ConfigError, match=r"\(sub\): lora_rank=0"):
        check_members([FleetMember("add"), FleetMember("sub", lora_rank=0)])
