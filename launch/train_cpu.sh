#!/bin/bash
# Multi-process student training WITHOUT GPUs (gloo), e.g. to test distribution on a laptop/CI.
#   launch/train_cpu.sh --config launch/configs/sasrec_ml100k.yaml [key=value ...] [--resume]
# Variables: NPROC (processes, default 2), PORT (default 29533), ZERO (1 or 2: DeepSpeed ZeRO-1/2
# via launch/accelerate_zero$ZERO.yaml; default: plain DDP).
# Why these flags (verified, docs/PLATFORM notes): `--cpu --num_processes 2` silently starts ONE
# process and `--multi_gpu` alone starts unsynchronised copies; `--multi_gpu` + ACCELERATE_USE_CPU=1
# is the combination that trains one synchronised model over gloo.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ -n "${ZERO:-}" ]; then
    # NOT ACCELERATE_USE_CPU here: it makes Accelerate silently drop DeepSpeed. DeepSpeed falls back
    # to its CPU accelerator by itself; the trainer adds the gloo process-group backend.
    unset ACCELERATE_USE_CPU
    set -- --config_file "launch/accelerate_zero${ZERO}.yaml" --num_processes "${NPROC:-2}" \
        --main_process_port "${PORT:-29533}" -m dllm2rec train "$@"
else
    export ACCELERATE_USE_CPU=1
    set -- --multi_gpu --num_processes "${NPROC:-2}" --main_process_port "${PORT:-29533}" -m dllm2rec train "$@"
fi
exec "$PY" -m accelerate.commands.launch "$@"
