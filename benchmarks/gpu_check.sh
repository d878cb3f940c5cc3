#!/usr/bin/env bash
# One call on a lent GPU gives this session's GPU figures (one markdown file, the commands inside):
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: $OUT if set (the device tool), else benchmarks/results
#   DRY_RUN=1 bash benchmarks/gpu_check.sh /tmp/x  # the same steps on the CPU with the tiny model (a few seconds)
# Measured: decoder-loop prefill of the LLaVA-1.5-7B architecture (random fp16 weights) at batch 1 and 8, unpruned,
# keep-all and the AdaptInfer "64" / "128" presets, with SDPA and (when installed) FlashAttention-2. Eager forward
# only: a compiled / graph-captured pruned forward, the vision tower and time-to-first-token are issue 17's open part.
# Budget: about 5 minutes on an H100/H200 (the 7B build dominates); leave time for a rerun within 15 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"
if [ "${DRY_RUN:-0}" = "1" ]; then
  MODELS="tiny"; BATCHES="1 2"; REPEATS=1; WARMUP=0; DEVICE=cpu
else
  MODELS="llava-1.5-7b-arch"; BATCHES="1 8"; REPEATS=20; WARMUP=3; DEVICE=cuda
fi
ATTN="sdpa"
if "$PY" -c "import flash_attn" 2>/dev/null && [ "$DEVICE" = cuda ]; then ATTN="sdpa flash_attention_2"; fi
"$PY" - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
PYEOF
"$PY" benchmarks/prefill_latency.py --models $MODELS --batch $BATCHES --attn $ATTN --repeats "$REPEATS" \
  --warmup "$WARMUP" --device "$DEVICE" --out "$OUT_DIR/gpu_check_prefill.md"
echo "wrote $OUT_DIR/gpu_check_prefill.md"
