"""A LoRA linear layer holding one (A, B) pair per fleet member, and the routing that says which rows are whose.

Why our own layer and not PEFT with several adapters: PEFT mixes adapters within a batch only for inference
(`adapter_names`, a forward pre-hook per call), and its layers keep one active adapter for training. Here every
targeted linear computes the base product once for all rows, then each row's low-rank product with its own
member's weights: rows are grouped by member before the forward (`FleetRouting`), so a member's rows are one
slice, and no weight is copied per row or per token.

Two ways to compute the low-rank products, equal up to float rounding (`FleetRouting.path`):
- `stacked` (the default): every present member's A stacked into one matrix and B into another, so each layer
  runs two matmuls whatever the number of members; a per-row mask (the row's member's scaling on that member's
  rank columns, 0 elsewhere) keeps each row on its own member, in the forward and in the gradients. It
  multiplies every row by every present member's rank, which costs little beside the base product: measured
  on a 2-core CPU (SmolLM2 shapes, fp32, one update) 13.3 s against the loop's 13.9 s for 3 members and
  21.9 s against 22.1 s for 8; on an H200 (bf16, 16 members x 8 rows) 1.66 s against 2.93 s, where the
  loop's ~10 kernel launches per member and layer dominate.
- `loop`: for each member, its two small matmuls on its own rows; the least arithmetic, and the reference the
  tests hold `stacked` to.

The routing is one object shared by every layer of the model and set before each forward. It stays set until
the next one, so that a non-reentrant gradient checkpoint, which recomputes a layer's forward during backward,
routes the rows as the forward did.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ground.errors import ConfigError
from stages.train.fleet.members import BASE_ONLY, FleetMember


class FleetRouting:
    """Which member each row of the current forward belongs to, as contiguous segments of rows.

    segments: (member index, first row, end row) for the rows that carry an adapter; rows outside every segment
    (member BASE_ONLY) get the base alone. touch: members that have no row in this forward but must still get a
    (zero) gradient, because they have rows elsewhere in the mini-batch: under FSDP every rank must reduce the
    same gradients, and a member whose rows all sit on another rank would otherwise have none here.
    """

    PATHS = ("stacked", "loop")

    def __init__(self, members: list[FleetMember], path: str = "stacked"):
        self.ranks = [m.lora_rank for m in members]
        self.scalings = [m.scaling for m in members]
        self.path = path
        self.segments: list[tuple[int, int, int]] = []
        self.touch: list[int] = []
        self._masks: dict = {}

    @property
    def present(self) -> list[int]:
        """Members whose weights this forward uses: those with rows, in row order, then the touched ones."""
        return [m for m, _, _ in self.segments] + self.touch

    @property
    def path(self) -> str:
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        if value not in self.PATHS:
            raise ValueError(f"fleet LoRA path {value!r} is not one of {', '.join(self.PATHS)}")
        self._path = value

    def route(self, member_of_row: torch.Tensor, touch: list[int] | None = None) -> None:
        """member_of_row [b]: each row's member index (BASE_ONLY for the base); rows must be grouped by member."""
        ids = member_of_row.tolist()
        segments: list[tuple[int, int, int]] = []
        start = 0
        for row in range(1, len(ids) + 1):
            if row == len(ids) or ids[row] != ids[start]:
                if ids[start] != BASE_ONLY:
                    segments.append((ids[start], start, row))
                start = row
        members = [m for m, _, _ in segments]
        if len(set(members)) != len(members):
            raise ValueError(f"rows are not grouped by member (member of each row: {ids}); sort them first "
                             "(fleet.model.group_rows)")
        self.segments = segments
        self.touch = [m for m in (touch or []) if m not in members]
        self._masks = {}

    def base_only(self) -> None:
        self.segments, self.touch, self._masks = [], [], {}

    def column_mask(self, rows: int, device: torch.device) -> torch.Tensor:
        """[rows, sum of the present members' ranks], float32: row i, column j is scaling_m when row i is member
        m's and column j one of m's rank columns in the stacked A (members in `present` order), else 0. Built
        once per forward and device, then shared by every layer. Float32 whatever the compute dtype: a scaling
        such as 0.3 rounded to bf16 would scale a member's whole update by 1.003."""
        if device not in self._masks:
            mask = torch.zeros(rows, sum(self.ranks[m] for m in self.present))
            # segments come first in `present`, so segment k's columns follow the ranks of segments 0..k-1
            first_column = 0
            for member, start, end in self.segments:
                mask[start:end, first_column:first_column + self.ranks[member]] = self.scalings[member]
                first_column += self.ranks[member]
            self._masks[device] = mask.to(device)
        return self._masks[device]


class FleetLoRALinear(nn.Module):
    """`base(x) + scaling_m * B_m A_m x` for the rows of each member m; `base(x)` for BASE_ONLY rows.

    Parameters `lora_A.<m>` [r_m, in] and `lora_B.<m>` [out, r_m], float32, created before FSDP wraps the model
    so that sharding sees them. Rows are dim 0 of the input ([rows, ..., in]).
    """

    def __init__(self, base: nn.Linear, members: list[FleetMember], routing: FleetRouting):
        super().__init__()
        self.base = base
        self.routing = routing
        device = base.weight.device if base.weight.device.type != "meta" else None
        self.lora_A = nn.ParameterList(
            [nn.Parameter(torch.zeros(m.lora_rank, base.in_features, device=device)) for m in members])
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.zeros(base.out_features, m.lora_rank, device=device)) for m in members])

    @torch.no_grad()
    def reset_member(self, member: int, generator: torch.Generator) -> None:
        """PEFT's default init: A as nn.Linear's kaiming-uniform (bound 1/sqrt(in)), B zeros (the start is the base)."""
        weight = self.lora_A[member]
        bound = 1.0 / math.sqrt(weight.shape[1])
        weight.copy_(torch.rand(weight.shape, generator=generator) * (2 * bound) - bound)
        self.lora_B[member].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        segments, touch = self.routing.segments, self.routing.touch
        if not segments and not touch:
            return out
        if self.routing.path == "stacked":
            return out + self._stacked_low_rank(x).to(out.dtype)
        pieces, row = [], 0
        for member, start, end in segments:
            if start > row:  # base-only rows before this segment add nothing
                pieces.append(out.new_zeros((start - row, *out.shape[1:])))
            a, b = self.lora_A[member], self.lora_B[member]
            low_rank = F.linear(F.linear(x[start:end].to(a.dtype), a), b)
            pieces.append((low_rank * self.routing.scalings[member]).to(out.dtype))
            row = end
        if segments and row < x.shape[0]:
            pieces.append(out.new_zeros((x.shape[0] - row, *out.shape[1:])))
        if pieces:
            out = out + torch.cat(pieces, dim=0)
        for member in touch:  # a zero that still reaches this member's weights in backward
            out = out + (self.lora_A[member].sum() + self.lora_B[member].sum()).to(out.dtype) * 0.0
        return out

    def _stacked_low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """Every row's low-rank product in two matmuls over the present members' stacked weights. Only present
        members enter: an absent member's weights get no gradient (None, so AdamW skips it), a touched member's
        get zeros (its mask columns are 0 on every row), as in the loop."""
        present = self.routing.present
        a = torch.cat([self.lora_A[m] for m in present], dim=0)  # [R, in], R = sum of present ranks
        b = torch.cat([self.lora_B[m] for m in present], dim=1)  # [out, R]
        h = F.linear(x.to(a.dtype), a)  # [rows, ..., R]
        mask = self.routing.column_mask(x.shape[0], h.device)
        h = (h.float() * mask.view(mask.shape[0], *([1] * (h.dim() - 2)), mask.shape[1])).to(h.dtype)
        return F.linear(h, b)


def target_linears(model: nn.Module, target_modules: str | list[str]) -> list[tuple[str, nn.Linear]]:
    """(qualified name, layer) of the linears to adapt. A list names module suffixes (`q_proj`, `lm_head`) as
    PEFT's target_modules does; "all-linear" is every linear except the output layer, as in PEFT."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if target_modules == "all-linear":
            hit = module is not output
        else:
            names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
            hit = name.rsplit(".", 1)[-1] in names
        if hit:
            found.append((name, module))
    return found


def attach_fleet_lora(model: nn.Module, members: list[FleetMember], target_modules: str | list[str],
                      seed: int) -> FleetRouting:
    """Replace each targeted linear of `model` by a FleetLoRALinear over it (in place); freeze everything else.

    Member i's weights are initialised from a generator seeded with seed + i, in module order (A as PEFT's
    default, B zeros). Returns the routing object shared by all the layers.
    """
    routing = FleetRouting(members)
    targets = target_linears(model, target_modules)
    if not targets:
        raise ConfigError(f"target_modules={target_modules!r} matches no linear layer of this model; name module "
                          "suffixes such as q_proj, v_proj, or use all-linear.")
    for param in model.parameters():
        param.requires_grad = False
    layers = []
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = FleetLoRALinear(linear, members, routing)
        setattr(parent, child, layer)
        layers.append(layer)
    for index in range(len(members)):
        gen = torch.Generator().manual_seed(seed + index)
        for layer in layers:
            layer.reset_member(index, gen)
    return routing


def fleet_layers(model: nn.Module) -> list[tuple[str, FleetLoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FleetLoRALinear)]


def member_parameters(model: nn.Module, member: int) -> list[nn.Parameter]:
    """Member `member`'s LoRA weights, A then B of each adapted layer in module order."""
    params = []
    for _, layer in fleet_layers(model):
        params += [layer.lora_A[member], layer.lora_B[member]]
    return params


def member_adapter_tensors(model: nn.Module, member: int) -> dict[str, torch.Tensor]:
    """Member `member`'s LoRA weights under the keys of PEFT's adapter_model.safetensors
    (`base_model.model.<layer>.lora_A.weight`), whole (gathered from FSDP shards: every rank must call this)."""
    out = {}
    for name, layer in fleet_layers(model):
        for kind, params in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
            data = params[member].detach()
            data = data.full_tensor() if hasattr(data, "full_tensor") else data
            out[f"base_model.model.{name}.{kind}.weight"] = data.cpu()
    return out
