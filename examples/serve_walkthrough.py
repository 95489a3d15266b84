"""Serving walkthrough: several adapters, one base model, one endpoint.

    .venv/bin/python examples/serve_walkthrough.py [--registry DIR] [--port 8000]

1. stage the packaged base model (SmolLM2-135M-Instruct);
2. publish three adapters to a registry: the ones `pipeline run train-and-publish` published there already,
   topped up with freshly initialised PEFT LoRA adapters (random B, so each answers differently) as stand-ins;
3. start one vLLM OpenAI-compatible server for the base, with the registry's LoRA resolver;
4. ask the base and each adapter the same question with the official `openai` client, by NAME, NAME@VERSION and
   NAME@ALIAS; list `/v1/models`;
5. move an alias and watch the next request follow it, without a restart.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

QUESTION = [{"role": "user", "content": "What is 7 - 9? Answer with just the number."}]


def make_standin_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A PEFT LoRA adapter on q_proj/v_proj with random (non-zero) B, saved as PEFT saves any adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)  # PEFT starts B at zero (a no-op adapter); a stand-in should differ
    model.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default="registry-store")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    from openai import OpenAI

    from registry import open_registry
    from serve.server import start_server
    from ground.default_model import default_model_dir

    base = default_model_dir()
    reg = open_registry(args.registry)
    names = [n for n in reg.list_adapters() if reg.resolve(n).metadata.get("base_model") == "smollm2-135m-instruct"]
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(["walkthrough-a", "walkthrough-b", "walkthrough-c"]):
            if len(names) >= 3:
                break
            folder = make_standin_adapter(base, Path(tmp) / name, seed=i)
            version = reg.publish(folder, name, base_dir=base, alias="prod", tags={"origin": "serve_walkthrough"},
                                  lineage={"base_model": "smollm2-135m-instruct"})
            print(f"published {version.ref} (alias prod)")
            names.append(name)
    first = reg.resolve(names[0])
    reg.set_alias(names[0], "prod", first.version)
    second = reg.publish(reg.resolve(names[0]).path, names[0], base_dir=base, tags={"origin": "serve_walkthrough"},
                         lineage={"base_model": "smollm2-135m-instruct", "note": "a second version"})

    with start_server(base, reg.uri, port=args.port, max_loras=4, max_model_len=512) as server:
        client = OpenAI(base_url=server.url, api_key="none")
        print("\n/v1/models:", ", ".join(m.id for m in client.models.list().data))
        for model in [server.base_name, *names, first.ref, f"{names[0]}@prod"]:
            reply = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0)
            print(f"{model:>32} -> answered by {reply.model:<24} {reply.choices[0].message.content!r}")
        reg.set_alias(names[0], "prod", second.version)
        print(f"\nmoved {names[0]}@prod -> {second.ref}")
        time.sleep(1.5)  # the server re-reads aliases at most once a second (pipeline serve --alias-ttl)
        reply = client.chat.completions.create(model=f"{names[0]}@prod", messages=QUESTION, max_tokens=12,
                                               temperature=0)
        print(f"{names[0] + '@prod':>32} -> answered by {reply.model}")


if __name__ == "__main__":
    main()
