"""Fleet training (issue #28, in progress): many LoRA adapters ("members") trained at once on one base.

- `members`: what each member brings (name, rank, alpha, learning rate, clipping, weight decay).
- `lora`: the multi-member LoRA linear layer and the row routing that picks each row's member.
- `model`: the base with every member's LoRA attached, and log-probs of a batch mixing members.
- `update`: one optimizer with a parameter group per member, per-member token-mean losses, one update step.

Not wired into the trainer yet: the actor worker, rollout, checkpoints and publish still train one adapter.
"""
