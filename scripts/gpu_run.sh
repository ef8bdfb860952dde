#!/usr/bin/env bash
# The GPU stages (benchmarks, NLL checks, eager-path diagnostics). Runs on a GPU machine with the project's
# dependencies installed (plus liger-kernel and triton) and the offline model and texts already in .cache/streamkv:
#   bash scripts/gpu_run.sh check|bench-small|bench-big|quick|gemv|gemv7b|eager-modes|eager-plans|eager-managers
# (quick: the graph paths' NLL check + the fused graph path and HF static+compile on SmolLM2 and 7B;
#  gemv: scripts/gemv_bench.py + cudagraph_fused vs cudagraph_fused_gemv on SmolLM2 + their NLL check;
#  gemv7b: hill-climb the GEMV launch configs for 7B shapes, then 7B end to end with them, all GEMVs fused;
#  eager-modes: four identical short ring x eager runs in a row (16 vs 1 torch CPU threads), their
#  per-step timings and the GPU clocks, for the eager path's bimodal TPOT in docs/results/README.md;
#  eager-plans: two repeats of one concat x eager config in one process, cuDNN SDPA on and off;
#  eager-managers: Phase C's four eager runs in one process, per-step timings)
# Writes everything under $OUT (or ./gpu-out): check.json/check.log, bench/bench.{json,md}, logs; the runs of the
# eager-* stages go to ${RUNS:-runs}/STAGE.
set -uo pipefail
stage=${1:?usage: gpu_run.sh check|bench-small|bench-big|quick|gemv|gemv7b|eager-modes|eager-plans|eager-managers}
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
runs_root=${RUNS:-runs}
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
  eager-modes) # four identical short ring x eager runs in a row, alternating torch's 16 CPU threads with
               # 1 (OMP_NUM_THREADS=1); per-step timings (tokens-RUN.parquet) and GPU clocks come back
               { nproc; cat /proc/loadavg; cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null
                 python3 -c "import torch; print('torch threads', torch.get_num_threads())"; } | tee -a "$out/device-$stage.txt"
               nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,pstate,utilization.gpu --format=csv -lms 1000 \
                 > "$out/gpu-clocks.csv" & smi=$!
               args="dataset=wiki dataset.max_tokens=768 window=256 compress_every=32 policy=refresh
                 policy.refresh_budget=16 policy.max_drop=128 cache=ring backend=eager device=cuda progress=false"
               runs=$runs_root/eager-modes
               for run in threads16_a threads1_a threads16_b threads1_b; do
                 threads=${run#threads}; threads=${threads%_*}
                 OMP_NUM_THREADS=$threads python3 run.py $args hydra.run.dir="$runs/$run" > "$runs-$run.log" 2>&1
                 cp "$runs/$run/tokens.parquet" "$out/tokens-$run.parquet"
               done
               kill $smi
               python3 scripts/step_modes.py "$runs"/* --block 128 --out "$out/eager-modes.json" ;;
  eager-plans) # is the slow eager phase the attention building a plan per new key length? two repeats of one
               # concat x eager config in one process (the 2nd finds the plans of the 1st), with cuDNN SDPA
               # on (torch's default on H100) and off; step times of the growth phase (< n_sink + window) decide.
               # The host decode now excludes cuDNN whatever this flag says (streamkv/evaluate.py, host_attention),
               # so both halves measure the fix; docs/results/eager-modes/plans was measured before it existed.
               args="dataset=wiki dataset.max_tokens=1536 window=1024 compress_every=32 policy=streaming cache=concat
                 backend=eager device=cuda progress=false repeat=0,1"
               runs=$runs_root/eager-plans
               for sdpa in cudnn_on cudnn_off; do
                 on=True; [ $sdpa = cudnn_off ] && on=False
                 python3 -c "import runpy, sys, torch; torch.backends.cuda.enable_cudnn_sdp($on)
sys.argv = ['run.py', '-m'] + sys.argv[1:]; runpy.run_path('run.py', run_name='__main__')" \
                   $args hydra.sweep.dir="$runs/$sdpa" > "$out/eager-plans-$sdpa.log" 2>&1
                 for r in 0 1; do cp "$runs/$sdpa/$r/tokens.parquet" "$out/tokens-$sdpa-repeat$r.parquet"; done
               done
               python3 scripts/step_modes.py "$runs"/cudnn_*/[01] --block 256 --out "$out/eager-plans.json" ;;
  eager-managers) # Phase C's host-driven block (4 managers x eager, refresh 16 + max_drop 256, R = 32, wiki), one
               # process, repeat 0: with the host decode off cuDNN SDPA, is every run in one steady mode?
               runs=$runs_root/eager-managers
               python3 run.py -m dataset=wiki policy=refresh policy.refresh_budget=16 policy.max_drop=256 compress_every=32 \
                 cache=concat,soft_ring,ring,static backend=eager device=cuda progress=false hydra.sweep.dir="$runs" \
                 > "$out/eager-managers.log" 2>&1
               for r in 0 1 2 3; do cp "$runs/$r/tokens.parquet" "$out/tokens-manager$r.parquet"; done
               python3 scripts/step_modes.py "$runs"/[0-3] --block 512 --out "$out/eager-managers.json" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
