#!/bin/bash
# Student training on the GPUs of one machine, one process per GPU.
#   launch/train_gpu.sh --config launch/configs/dros_ml100k_dllm2rec.yaml [key=value ...] [--resume]
# Variables: NPROC (default: all visible GPUs), PORT (default 29533), ZERO (1 or 2: DeepSpeed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
NPROC="${NPROC:-$("$PY" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
CONFIG_FILE=accelerate_config.yaml
if [ -n "${ZERO:-}" ]; then CONFIG_FILE="launch/accelerate_zero${ZERO}.yaml"; fi
exec "$PY" -m accelerate.commands.launch --config_file "$CONFIG_FILE" --num_processes "$NPROC" \
    --main_process_port "${PORT:-29533}" -m dllm2rec train "$@"
