#!/usr/bin/env bash
# Device-side driver for the named sweeps on the lent GPU (see docs/results/README.md):
#   source .devcarry/bootstrap.sh && bash scripts/gpu_sweeps.sh [budget_s]
# Runs Phase A / Phase B core 8 on wiki and book with the fast path (ring + cudagraph_fused) on
# SmolLM2-135M real weights, into $HOME/streamkv-sweeps (kept while the machine is warm, so a
# second identical call resumes and skips finished runs). Each step is guarded by `timeout` so
# the records are always tarred into $OUT/records.tar.gz (+ $OUT/sweeps.log) before the limit.
set -uo pipefail
budget=${1:-560}
t0=$(date +%s)
out=${OUT:-gpu-out}; mkdir -p "$out"
work=$HOME/streamkv-sweeps; mkdir -p "$work"
log=$work/sweeps.log
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false STREAMKV_CACHE=$PWD/.cache/streamkv
common="cache=ring backend=cudagraph_fused device=cuda progress=false"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } | tee -a "$log"
step() {  # name, args...
  local name=$1; shift
  local left=$(( budget - ($(date +%s) - t0) - 25 ))
  if [ "$left" -lt 30 ]; then echo "== SKIP $name (time left ${left}s)" | tee -a "$log"; return; fi
  echo "== $(date -u +%T) $name (limit ${left}s): $*" | tee -a "$log"
  timeout "$left" python3 run.py -m "$@" $common hydra.sweep.dir="$work/$name" >>"$log" 2>&1
  echo "== $(date -u +%T) $name rc=$?" | tee -a "$log"
}
step phase_a_wiki      +sweep=phase_a dataset=wiki
step phase_b_wiki      +sweep=phase_b_core8 dataset=wiki
step phase_b_book      +sweep=phase_b_core8 dataset=book repeat=0
step phase_a_book      +sweep=phase_a dataset=book repeat=0
step phase_b_book_r1   +sweep=phase_b_core8 dataset=book repeat=1
cd "$work" && tar czf "$out/records.tar.gz" --exclude='.submitit' --exclude='*.pt' --exclude='*.bin' --exclude='*.safetensors' */ 2>>"$log"
grep -h -o '"status": *"[a-z]*"' */*/result.json 2>/dev/null | sort | uniq -c | tee -a "$log"
cp "$log" "$out/sweeps.log"; tail -c 4000 "$log"
