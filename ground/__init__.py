"""The ground floor: helpers every other package may use, importing nothing of ours.

errors (the user-facing exception family), model_files (safetensors checks, fingerprints), adapter_files (PEFT
adapter file names and keys), vllm_lora (vLLM's LoRA limits and ids), processes (process and /dev/shm
helpers), mlflow_uri (where runs are tracked), names (registries of named components), new_files (write a
file only where nothing exists yet, through a temporary name).
"""
