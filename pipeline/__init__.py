"""lora-pipeline: stage a base model, train a LoRA adapter with RL, publish it, serve many adapters."""

__version__ = "0.1.0"
