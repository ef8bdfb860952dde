#!/usr/bin/env bash
# Device-side driver for the lent GPU machine (see /work/shared/device/README.md for the carry):
#   source .devcarry/bootstrap.sh && bash scripts/gpu_run.sh check|bench-small|bench-big|quick|gemv|gemv7b
# (quick: the graph paths' NLL check + the fused graph path and HF static+compile on SmolLM2 and 7B;
#  gemv: scripts/gemv_bench.py + cudagraph_fused vs cudagraph_fused_gemv on SmolLM2 + their NLL check;
#  gemv7b: hill-climb the GEMV launch configs for 7B shapes, then 7B end to end with them, all GEMVs fused)
# Writes everything under $OUT (or ./gpu-out): check.json/check.log, bench/bench.{json,md}, logs.
set -uo pipefail
stage=${1:?usage: gpu_run.sh check|bench-small|bench-big|quick|gemv|gemv7b}
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$out/device-$stage.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$out/device-$stage.txt"
case "$stage" in
  check)       python3 scripts/gpu_check.py --out "$out" 2>&1 | tee "$out/check.log" ;;
  bench-small) python3 -m streamkv.bench --models smollm2 --out "$out/bench" 2>&1 | tee "$out/bench-smollm2.log" ;;
  bench-big)   python3 -m streamkv.bench --models llama-1.1b,llama-7b --out "$out/bench" 2>&1 | tee "$out/bench-big.log" ;;
  quick)       python3 scripts/gpu_check.py --quick --out "$out" 2>&1 | tee "$out/check.log"
               python3 -m streamkv.bench --models smollm2,llama-7b --only "HF Static" "x cudagraph_fused" \
                 --out "$out/bench" 2>&1 | tee "$out/bench.log" ;;
  gemv)        python3 scripts/gemv_bench.py --out "$out/gemv_bench.json" 2>&1 | tee "$out/gemv_bench.log"
               python3 -m streamkv.bench --models smollm2 --only "ring x cudagraph_fused streaming R=32" \
                 "ring x cudagraph_fused_gemv" "static x cudagraph_fused_gemv" "static x cudagraph_fused streaming R=32" \
                 --out "$out/bench" 2>&1 | tee "$out/bench.log"
               python3 scripts/gpu_check.py --quick --paths "cudagraph_fused" --out "$out" 2>&1 | tee "$out/check.log" ;;
  gemv7b)      # tune the fused GEMVs for Llama-2-7B's shapes, then time them end to end with every GEMV fused
               python3 scripts/gemv_bench.py --models llama-7b --sweep-models llama-7b --rounds 4 --budget-s 240 \
                 --out "$out/gemv7b.json" 2>&1 | tee "$out/gemv7b.log"
               python3 -m streamkv.bench --models llama-7b --only "HF Static" "ring x cudagraph_fused streaming R=32" \
                 "ring x cudagraph_fused_gemv streaming R=32" --gemv-configs "$out/gemv7b.json" --gemv-max-mb 0 \
                 --out "$out/bench" 2>&1 | tee "$out/bench.log" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
