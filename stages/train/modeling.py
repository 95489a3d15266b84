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

    def forward(self, input_ids, attention_mask, position_ids, mode: str = "policy"):
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if mode == "ref":
            with self.peft.disable_adapter():
                return self.peft(**kwargs).logits
        if mode == "value":
            with active_adapter(self.peft, CRITIC):
                hidden = self.peft.get_base_model().model(**kwargs).last_hidden_state
            # clone: FSDP2 warns about returning a view (an in-place op on it would skip its backward hook)
            return self.value_head(hidden).squeeze(-1).float().clone()
        if mode != "policy":
            raise ValueError(f"unknown forward mode {mode!r}")
        ctx = active_adapter(self.peft, POLICY) if self.with_critic else contextlib.nullcontext()
        with ctx:
            return self.peft(**kwargs).logits


def response_log_probs(logits: torch.Tensor, responses: torch.Tensor, temperature: float = 1.0):
    """Log-probs of the sampled response tokens.

    logits [B, P+R, V] (whole sequence) -> the R positions that predict the response; responses [B, R].
    Returns (log_probs [B, R] float32, response_logits [B, R, V] float32, temperature-scaled).
    The logits are divided by the sampling temperature, as vLLM does before sampling, so the PPO ratio compares
    the same distributions that produced the samples.
    """
    r = responses.shape[1]
    resp_logits = logits[:, -r - 1 : -1].float()
    if temperature != 1.0:
        resp_logits = resp_logits / temperature
    log_probs = torch.log_softmax(resp_logits, dim=-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    return log_probs, resp_logits


def load_base_model(model_dir: str, dtype: torch.dtype, gradient_checkpointing: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.config.use_cache = False
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (only LoRA weights need grads) and with FSDP2.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_model(model_dir: str, model_cfg, *, with_critic: bool, seed: int, dtype: torch.dtype) -> PolicyValueModel:
    """Base model -> PEFT LoRA (new, or continued from `lora_adapter_path`) -> optional critic adapter + head.

    Seeded identically on every rank, so every rank builds the same initial LoRA weights before sharding.
    Only LoRA parameters (and the value head) stay trainable.
    """
    from peft import PeftModel, get_peft_model

    torch.manual_seed(seed)
    base = load_base_model(model_dir, dtype, model_cfg.enable_gradient_checkpointing)
    if model_cfg.lora_adapter_path:
        peft_model = PeftModel.from_pretrained(base, model_cfg.lora_adapter_path, is_trainable=True)
        log.info("continuing from the adapter at %s", model_cfg.lora_adapter_path)
    else:
        peft_model = get_peft_model(base, lora_config(model_cfg))
    if with_critic:
        peft_model.add_adapter(CRITIC, lora_config(model_cfg))
    model = PolicyValueModel(peft_model, with_critic)
    for name, param in model.named_parameters():
        param.requires_grad = ".lora_" in name or name.startswith("value_head.")
    # LoRA weights and the head train in float32 whatever the base dtype: Adam on bf16 weights loses updates.
    for name, param in model.named_parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def peft_config_dict(model: PolicyValueModel) -> dict:
    """The policy adapter's LoraConfig as the dict PEFT writes to adapter_config.json (lora_alpha kept)."""
    cfg = model.peft.peft_config[POLICY].to_dict()
    return json.loads(json.dumps(cfg, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))

