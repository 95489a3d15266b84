"""Fleet training (issue #28, in progress): many LoRA adapters ("members") trained at once on one base.

- `members`: what each member brings (name, rank, alpha, learning rate, clipping, weight decay).
- `lora`: the multi-member LoRA linear layer and the row routing that picks each row's member.
- `model`: the base with every member's LoRA attached, and log-probs of a batch mixing members.
- `update`: one optimizer with a parameter group per member, per-member token-mean losses, one update step.
- `config`: the fleet YAML (shared config + fleet.members), each member's whole config, refused keys.
- `worker`: the fleet's FSDP2 actor (a Ray actor); `engine`: the vLLM engine with a LoRA slot per member.
- `recipe`: one run (`FleetRun`): rollouts per member, one update, syncs, checkpoints, failures, the outcome;
  `validation`: each member's held-out reward.

What is not wired yet is listed in docs/training.md, "Fleet training".
"""
