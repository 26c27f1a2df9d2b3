#!/usr/bin/env bash
# Teacher LoRA fine-tune + full-coverage title generation on ONE GPU machine that has PyTorch,
# transformers, peft and accelerate but no vLLM, no FAISS and no network (the machine this
# project was lent; see RESULTS.md §3b). Embedding and FAISS grounding then run where vLLM is:
#   python -m teacher run --config launch/configs/teacher_ml100k_full.yaml --rank R --world 4 --phases embed,ground
#
# Inputs: runs/data/ml-100k; the SmolLM2 GGUF (GGUF_PARTS: its pieces, in order, when it had to
# travel split) or an already converted model in $DLLM2REC_CACHE; GGUF_WHEEL: the `gguf` wheel
# when the machine lacks it. Outputs under $OUT (each re-written as soon as it is complete, so a
# run stopped by a time limit still returns what it finished): device.log, lora.tgz (adapter in
# bf16 + manifest), generate.tgz (the generate shards under <output_dir>/work).
# Tiny local rehearsal: FT_OVERRIDES / GEN_OVERRIDES (dotted overrides) shrink both stages.
set -euo pipefail
OUT=${OUT:-runs/device_out}
mkdir -p "$OUT"
FT_CONFIG=${FT_CONFIG:-launch/configs/teacher_finetune_ml100k_gpu.yaml}
GEN_CONFIG=${GEN_CONFIG:-launch/configs/teacher_ml100k_full.yaml}
WORLD=${WORLD:-4}
PY=${PY:-python3}
export DLLM2REC_CACHE=${DLLM2REC_CACHE:-/tmp/dllm2rec-cache} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec > >(tee -a "$OUT/device.log") 2>&1
t0=$(date +%s)
stamp() { echo "[device +$(( $(date +%s) - t0 )) s] $*"; }

stamp "start on $(hostname); $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
if [ -n "${GGUF_WHEEL:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/gguf-site "$GGUF_WHEEL"
  export PYTHONPATH=/tmp/gguf-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
$PY -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"

gguf_arg=()
if [ -n "${GGUF_PARTS:-}" ]; then
  gguf=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
  cat $GGUF_PARTS > "$gguf"
  if [ -n "${GGUF_SHA256:-}" ]; then echo "$GGUF_SHA256  $gguf" | sha256sum -c -; fi
  gguf_arg=(--gguf "$gguf")
fi
stamp "convert base model"
$PY -m teacher model convert "${gguf_arg[@]}"
stamp "base model digest $($PY -m teacher model digest)"

stamp "fine-tune ($FT_CONFIG ${FT_OVERRIDES:-})"
$PY -m teacher finetune --config "$FT_CONFIG" progress=false ${FT_OVERRIDES:-}
lora=$($PY -c "import sys; from teacher.finetune import load_finetune_config as l; print(l(sys.argv[1], sys.argv[2:]).output_dir)" "$FT_CONFIG" ${FT_OVERRIDES:-})
# ship the adapter in bf16 (half the bytes); generation below uses the fp32 original
rm -rf /tmp/lora_ship && mkdir -p /tmp/lora_ship && cp -r "$lora"/. /tmp/lora_ship/
$PY - /tmp/lora_ship/adapter/adapter_model.safetensors <<'PYEOF'
import sys
from safetensors.torch import load_file, save_file
p = sys.argv[1]
t = load_file(p)
save_file({k: v.bfloat16() if v.is_floating_point() else v for k, v in t.items()}, p, metadata={"format": "pt"})
PYEOF
tar czf "$OUT/lora.tgz.tmp" -C /tmp/lora_ship . && mv "$OUT/lora.tgz.tmp" "$OUT/lora.tgz"
stamp "adapter shipped ($(du -h "$OUT/lora.tgz" | cut -f1))"

teacher_out=$($PY -c "import sys; from teacher.config import load_teacher_config as l; print(l(sys.argv[1], sys.argv[2:]).output_dir)" "$GEN_CONFIG" ${GEN_OVERRIDES:-})
for rank in $(seq 0 $((WORLD - 1))); do
  stamp "generate shard $rank/$WORLD"
  $PY -m teacher generate --config "$GEN_CONFIG" --rank "$rank" --world "$WORLD" --quiet ${GEN_OVERRIDES:-}
  tar czf "$OUT/generate.tgz.tmp" -C "$teacher_out" work/generate && mv "$OUT/generate.tgz.tmp" "$OUT/generate.tgz"
done
stamp "done"
