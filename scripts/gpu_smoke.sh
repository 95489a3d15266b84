#!/usr/bin/env bash
# GPU smoke test of the actor update path (FSDP2 over NCCL, bf16, world size 1) on a model built locally.
# Needs PyTorch, transformers, PEFT, pydantic and PyYAML; no vLLM, no Ray, no network. Without CUDA it says so
# and exits 0. Arguments go to scripts/gpu_smoke.py (--shape tiny|smollm2-135m, --steps N, --cpu, ...;
# --members 1,4,16: the fleet update path, N adapters mixed in one batch, in scripts/gpu_smoke_fleet.py).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" scripts/gpu_smoke.py "$@"
