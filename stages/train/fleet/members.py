"""A fleet's members: the per-adapter settings the shared actor update needs.

Everything else (the base, the algorithm, the micro-batch layout) is shared by the whole fleet.
"""

from __future__ import annotations

from dataclasses import dataclass

from ground.errors import ConfigError

BASE_ONLY = -1  # a row's member index meaning "adapters off": the base model, which is the shared reference policy


@dataclass(frozen=True)
class FleetMember:
    name: str
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lr: float = 1e-5
    grad_clip: float = 1.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)

    @property
    def scaling(self) -> float:
        """PEFT's LoRA scaling alpha / r (no rsLoRA)."""
        return self.lora_alpha / self.lora_rank


def check_members(members: list[FleetMember], where: str = "fleet.members") -> None:
    """Refuse an empty fleet, a duplicate name and a rank below 1, naming the member."""
    if not members:
        raise ConfigError(f"{where} is empty: a fleet trains at least one adapter. Add a member with its own name.")
    seen: set[str] = set()
    for i, member in enumerate(members):
        if member.name in seen:
            raise ConfigError(f"{where}[{i}].name={member.name!r} is used twice: each member publishes under its own "
                              "name. Rename one of them.")
        seen.add(member.name)
        if member.lora_rank < 1:
            raise ConfigError(f"{where}[{i}] ({member.name}): lora_rank={member.lora_rank} must be at least 1.")
        if member.grad_clip <= 0:
            raise ConfigError(f"{where}[{i}] ({member.name}): grad_clip={member.grad_clip} must be positive "
                              "(1.0 is the usual value).")
