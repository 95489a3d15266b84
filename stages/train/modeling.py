"""The actor's model: one base model, the policy LoRA adapter, and (for PPO) a critic adapter plus a value head.

Everything shares the frozen base weights, so the reference policy (adapter disabled) and the critic cost no
second copy of the base. `PolicyValueModel.forward(mode=...)` picks which of the three is computed; it is the
FSDP2 root module, so its forward hooks gather the root-level parameters (embeddings, norm, lm_head, value head)
for whichever mode runs.

Batch layout (as verl): `input_ids` [B, P+R] = left-padded prompt (P) + right-padded response (R);
the logits at position P-1+t predict response token t, so the response's logits are `logits[:, -R-1:-1]`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

POLICY = "default"  # PEFT's default adapter name: the trained policy (what gets published)
CRITIC = "critic"  # PPO's value adapter


def lora_config(model_cfg, adapter_path: str | None = None):
    from peft import LoraConfig

    target = model_cfg.target_modules
    return LoraConfig(
        r=model_cfg.lora_rank,
        lora_alpha=model_cfg.lora_alpha,
        target_modules=target if isinstance(target, str) else list(target),
        exclude_modules=model_cfg.exclude_modules,
        lora_dropout=0.0,  # dropout would make the old/new log-prob ratio noisy for no gain in RL
        bias="none",
        task_type="CAUSAL_LM",
    )


@contextlib.contextmanager
def active_adapter(peft_model, name: str):
    """Route every LoRA layer through adapter `name` for the duration.

    PEFT's own `set_adapter` also flips requires_grad (freezing the other adapter), which must not change
    under FSDP once the optimizer holds the parameters; setting the layers' active adapter directly does not.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
    previous = [m._active_adapter for m in layers]
    for m in layers:
        m._active_adapter = name
    try:
        yield
    finally:
        for m, prev in zip(layers, previous):
            m._active_adapter = prev


class PolicyValueModel(nn.Module):
    """A PEFT model plus an optional value head; `forward(mode)` with mode in {policy, ref, value}."""

    def __init__(self, peft_model, with_critic: bool):
        super().__init__()
        self.peft = peft_model
        self.with_critic = with_critic
        if with_critic:
            hidden = peft_model.get_base_model().config.hidden_size
            self.value_head = nn.Linear(hidden, 1, bias=True)
            nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1) ** 0.5)
            nn.init.zeros_(self.value_head.bias)

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.peft.get_base_model().model.layers)

    def forward(self, input_ids, attention_mask, position_ids, mode: str = "policy", logits_to_keep: int = 0):
        """logits_to_keep > 0 (policy, ref): logits of the last that many positions only, [B, logits_to_keep, V];
        the response's log-probs need R + 1 of them, and the lm_head over the prompt positions is wasted work."""
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        lm_kwargs = {**kwargs, "logits_to_keep": kept_positions(input_ids.shape[1], logits_to_keep, input_ids.device)}
        if mode == "ref":
            with self.peft.disable_adapter():
                return self.peft(**lm_kwargs).logits
        if mode == "value":
            with active_adapter(self.peft, CRITIC):
                hidden = self.peft.get_base_model().model(**kwargs).last_hidden_state
            # clone: FSDP2 warns about returning a view (an in-place op on it would skip its backward hook)
            return self.value_head(hidden).squeeze(-1).float().clone()
        if mode != "policy":
            raise ValueError(f"unknown forward mode {mode!r}")
        ctx = active_adapter(self.peft, POLICY) if self.with_critic else contextlib.nullcontext()
        with ctx:
            return self.peft(**lm_kwargs).logits


def kept_positions(seq_len: int, logits_to_keep: int, device) -> int | torch.Tensor:
    """The last `logits_to_keep` positions as an index tensor for transformers' `logits_to_keep` (0: all).

    transformers slices hidden[:, -k:, :] for an int; that slice is not contiguous, and under autograd
    torch.matmul does not fold a non-contiguous [B, k, H] input into one matrix product: it runs a batched
    product against the lm_head weight expanded to [B, H, V] and copies that expansion (B x the vocabulary
    matrix, 1.8 GB per micro-batch of 32 at SmolLM2's shapes; measured 5.8 of a 26 s update on this CPU).
    Indexing with a tensor gives a contiguous [B, k, H] copy, so the lm_head is one [B*k, H] x [H, V] product.
    """
    if logits_to_keep <= 0 or logits_to_keep >= seq_len:
        return 0
    return torch.arange(seq_len - logits_to_keep, seq_len, device=device)


def response_log_probs(logits: torch.Tensor, responses: torch.Tensor, temperature: float = 1.0):
    """Log-probs of the sampled response tokens.

    logits [B, P+R, V] (whole sequence) -> the R positions that predict the response; responses [B, R].
    Returns (log_probs [B, R] float32, response_logits [B, R, V] float32, temperature-scaled).
    The logits are divided by the sampling temperature, as vLLM does before sampling, so the PPO ratio compares
    the same distributions that produced the samples.
    """
    r = responses.shape[1]
    return token_log_probs(logits[:, -r - 1 : -1], responses, temperature)


def token_log_probs(resp_logits: torch.Tensor, responses: torch.Tensor, temperature: float = 1.0):
    """resp_logits [B, R, V] (the logits predicting each response token) -> (log_probs [B, R] float32,
    the temperature-scaled float32 logits [B, R, V])."""
    resp_logits = resp_logits.float()
    if temperature != 1.0:
        resp_logits = resp_logits / temperature
    log_probs = torch.log_softmax(resp_logits, dim=-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    return log_probs, resp_logits


def load_base_model(model_dir: str, dtype: torch.dtype, gradient_checkpointing: bool, on_meta: bool = False):
    """The base model, whole in host memory, or (on_meta) its architecture with meta parameters to be sharded and
    then filled by `sharded_load.fill_shards`."""
    from transformers import AutoModelForCausalLM

    from stages.train.sharded_load import empty_base_model

    if on_meta:
        model = empty_base_model(model_dir, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.config.use_cache = False
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (only LoRA weights need grads) and with FSDP2.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    return [m for m in peft_model.modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def init_lora_weights(peft_model, seed: int) -> None:
    """PEFT's default LoRA init (A: kaiming-uniform as nn.Linear, B: zeros) from `seed`, in module order.

    Done here rather than by PEFT at construction, so the values do not depend on what else consumed the RNG
    before (loading the base whole or on the meta device) nor on the base dtype PEFT first casts them to.
    """
    gen = torch.Generator().manual_seed(seed)
    for layer in _lora_layers(peft_model):
        for name in layer.lora_A.keys():
            weight = layer.lora_A[name].weight
            # kaiming_uniform_(a=sqrt(5)) on a [r, in] weight: bound = 1/sqrt(in)
            bound = 1.0 / math.sqrt(weight.shape[1])
            weight.copy_(torch.rand(weight.shape, generator=gen, dtype=torch.float32) * (2 * bound) - bound)
            layer.lora_B[name].weight.zero_()
            if layer.lora_B[name].bias is not None:
                layer.lora_B[name].bias.zero_()


def _adapter_lora_config(adapter_path: str):
    from peft import LoraConfig

    cfg = LoraConfig.from_pretrained(adapter_path)
    cfg.inference_mode = False
    return cfg


def load_adapter_weights(peft_model, adapter_path: str) -> None:
    """Copy the saved policy adapter (adapter_model.safetensors) into the policy's LoRA weights; every one of
    them must be in the file and nothing else."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from ground.errors import StageError

    saved = load_file(str(Path(adapter_path) / "adapter_model.safetensors"))
    expected = {n.replace(f".{POLICY}.", ".") for n, _ in peft_model.named_parameters()
                if ".lora_" in n and f".{POLICY}." in n}
    missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
    if missing or extra:
        raise StageError(
            f"actor_rollout_ref.model.lora_adapter_path=`{adapter_path}` does not fit this base model: "
            f"{len(missing)} LoRA tensors missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]}). "
            "Point it at an adapter trained on this base model."
        )
    set_peft_model_state_dict(peft_model, saved, adapter_name=POLICY)


def build_model(model_dir: str, model_cfg, *, with_critic: bool, seed: int, dtype: torch.dtype,
                on_meta: bool = False) -> PolicyValueModel:
    """Base model -> PEFT LoRA (new, or continued from `lora_adapter_path`) -> optional critic adapter + head.

    on_meta: the base's parameters stay on the meta device (see sharded_load); LoRA tensors and the value head
    are real either way. LoRA weights are initialised from `seed` (identical on every rank and in both loading
    modes), then overwritten from `lora_adapter_path` when one is given. Only LoRA parameters (and the value
    head) stay trainable, in float32 whatever the base dtype: Adam on bf16 weights loses updates.
    """
    from peft import get_peft_model

    from stages.train.sharded_load import materialize_meta_lora

    base = load_base_model(model_dir, dtype, model_cfg.enable_gradient_checkpointing, on_meta=on_meta)
    adapter_path = model_cfg.lora_adapter_path
    peft_model = get_peft_model(base, _adapter_lora_config(adapter_path) if adapter_path else lora_config(model_cfg))
    if with_critic:
        peft_model.add_adapter(CRITIC, lora_config(model_cfg))
    materialize_meta_lora(peft_model)
    for name, param in peft_model.named_parameters():
        param.requires_grad = ".lora_" in name
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    init_lora_weights(peft_model, seed)
    if adapter_path:
        load_adapter_weights(peft_model, adapter_path)
        log.info("continuing from the adapter at %s", adapter_path)
    torch.manual_seed(seed)  # the value head's init
    model = PolicyValueModel(peft_model, with_critic)
    for name, param in model.named_parameters():
        param.requires_grad = ".lora_" in name or name.startswith("value_head.")
    return model


def peft_config_dict(model: PolicyValueModel) -> dict:
    """The policy adapter's LoraConfig as the dict PEFT writes to adapter_config.json (lora_alpha kept)."""
    cfg = model.peft.peft_config[POLICY].to_dict()
    return json.loads(json.dumps(cfg, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))

