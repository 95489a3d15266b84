"""Real PEFT adapters on the tiny model: publish -> load back with PEFT gives the same outputs; merged export
equals base plus adapter; a plain export loads too."""

from __future__ import annotations

import json

import pytest

from ground.errors import RegistryError
from registry import open_registry

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def peft_adapter(tiny_model_dir, tmp_path_factory):
    """A PEFT LoRA (alpha != r, so the scale matters) with non-zero B (PEFT initialises B to zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.eval()
    out = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(out)
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 11]])
    with torch.no_grad():
        logits = model(ids).logits
    return out, ids, logits


def _base(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_published_adapter_loads_back_with_same_outputs(peft_adapter, tiny_model_dir, tmp_path):
    from peft import PeftModel

    adapter, ids, want = peft_adapter
    reg = open_registry(str(tmp_path / "store"), mirror_mlflow=False)
    av = reg.publish(adapter, "tiny", alias="prod")  # base found via base_model_name_or_path (a local folder)
    assert av.metadata["base_path"] == str(tiny_model_dir.absolute())
    assert json.loads((av.path / "adapter_config.json").read_text())["lora_alpha"] == 12
    loaded = PeftModel.from_pretrained(_base(tiny_model_dir), reg.resolve("tiny@prod").path).eval()
    with torch.no_grad():
        got = loaded(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():
        base_logits = _base(tiny_model_dir)(ids).logits
    assert (base_logits - want).abs().max() > 1e-2  # the adapter really changes the outputs

    # a plain export is the same adapter
    out = reg.export("tiny@1", tmp_path / "export")
    exported = PeftModel.from_pretrained(_base(tiny_model_dir), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, want, rtol=0, atol=0)


def test_merged_export_equals_base_plus_adapter(peft_adapter, tiny_model_dir, tmp_path, tiny_model_copy):
    from transformers import AutoModelForCausalLM

    adapter, ids, want = peft_adapter
    reg = open_registry(str(tmp_path / "store"), mirror_mlflow=False)
    reg.publish(adapter, "tiny", base_dir=tiny_model_dir)
    out = reg.export("tiny", tmp_path / "merged", merge=True)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert (out / "tokenizer.json").is_file() and not list(out.glob("adapter_*"))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    with pytest.raises(RegistryError, match="not empty"):
        reg.export("tiny", out, merge=True)
    # a different base (same shapes, other weights) is refused by its fingerprint
    from safetensors.torch import load_file, save_file
    w = tiny_model_copy / "model.safetensors"
    tensors = load_file(w)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, w, metadata={"format": "pt"})
    with pytest.raises(RegistryError, match="fingerprint"):
        reg.export("tiny", tmp_path / "merged2", merge=True, base_dir=tiny_model_copy)
