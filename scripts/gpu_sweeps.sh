#!/usr/bin/env bash
# The named sweeps on a GPU machine with the project's dependencies installed and the offline model and texts
# in .cache/streamkv (see docs/results/README.md):
#   bash scripts/gpu_sweeps.sh LIMIT_S STEP...      (LIMIT_S: wall-clock seconds for all steps together)
# STEP is a name below (e.g. b2_book); each runs one named sweep with the fast path
# (ring + cudagraph_fused, SmolLM2-135M real weights) into ${SWEEPS:-$HOME/streamkv-sweeps}/STEP.
# Resumable across calls and machines: a step's sweep dir is first seeded from the committed
# docs/results/records/STEP (its result.json files are enough for run.py to skip finished runs), and
# a second identical command skips what is done. Each step is guarded by `timeout`, so every step's records
# are tarred into $OUT/rec-STEP.tar.gz (+ $OUT/sweeps.log) before the limit, their paths made relative to the
# sweep dir first (scripts/relativize_records.py), ready to be committed under docs/results/records/.
set -uo pipefail
limit=${1:?usage: gpu_sweeps.sh LIMIT_S STEP...}; shift
t0=$(date +%s)
out=${OUT:-gpu-out}; mkdir -p "$out"
work=${SWEEPS:-$HOME/streamkv-sweeps}; mkdir -p "$work"
log=$work/sweeps.log
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false STREAMKV_CACHE=$PWD/.cache/streamkv
fast="cache=ring backend=cudagraph_fused device=cuda progress=false"
declare -A STEPS=(
  [phase_a_wiki]="+sweep=phase_a dataset=wiki"
  [phase_a_book]="+sweep=phase_a dataset=book repeat=0"
  [phase_a_book_r1]="+sweep=phase_a dataset=book repeat=1"
  [phase_b_wiki]="+sweep=phase_b_core8 dataset=wiki"
  [phase_b_book]="+sweep=phase_b_core8 dataset=book repeat=0"
  [phase_b_book_r1]="+sweep=phase_b_core8 dataset=book repeat=1"
  [b2_wiki]="+sweep=b2_overlap dataset=wiki"
  [b2_book]="+sweep=b2_overlap dataset=book"
  [b3_wiki]="+sweep=b3_refresh_sinks dataset=wiki"
  [b3_book]="+sweep=b3_refresh_sinks dataset=book repeat=0"
  [b3_book_r1]="+sweep=b3_refresh_sinks dataset=book repeat=1"
  [b4_wiki]="+sweep=b4_adaptive dataset=wiki"
  [b4_book]="+sweep=b4_adaptive dataset=book"
  [e_wiki]="+sweep=phase_e_baselines dataset=wiki"
  [e_book]="+sweep=phase_e_baselines dataset=book"
  [c_wiki]="+sweep=phase_c_managers dataset=wiki"
  [d_wiki]="+sweep=phase_d_fused dataset=wiki"
  [e_shift_wiki]="+sweep=phase_e_shift dataset=wiki cache=static backend=cudagraph_fused"
  [e_shift_book]="+sweep=phase_e_shift dataset=book cache=static backend=cudagraph_fused"
  # B4 on the static layout, where the entropy-driven runs go online on the graph path (not eager)
  [b4_wiki_static]="+sweep=b4_adaptive dataset=wiki cache=static backend=cudagraph_fused"
  [b4_book_static]="+sweep=b4_adaptive dataset=book cache=static backend=cudagraph_fused"
  # pass-key retrieval, one step per text length (the preset names its cache and backend per block)
  [passkey_2048]="+sweep=passkey dataset.length=2048"
  [passkey_4096]="+sweep=passkey dataset.length=4096"
  [passkey_8192]="+sweep=passkey dataset.length=8192"
  # the attention refresh with a larger region at the same KV budget (streaming R = 1 beside it)
  [passkey_region_2048]="+sweep=passkey_refresh_region dataset.length=2048"
  [passkey_region_4096]="+sweep=passkey_refresh_region dataset.length=4096"
  [passkey_region_8192]="+sweep=passkey_refresh_region dataset.length=8192"
  # book / wiki PPL at the pass-key budget: the 128-token attention refresh beside the pass-key sweep's policies
  [refresh_ppl_wiki]="+sweep=refresh_region_ppl dataset=wiki"
  [refresh_ppl_book]="+sweep=refresh_region_ppl dataset=book repeat=0"
  # the regime map (wiki blocks first, then book, then the full-attention references)
  [regime]="+sweep=regime"
)
# Phases C and D compare managers / backends: their blocks name cache and backend themselves (their
# eager runs decode at ~25-30 ms/token: ~2 minutes per wiki run, ~10 per book run).
# Phase E with shifted positions runs on the static layout (its args name it).
declare -A OWN_PATH=([c_wiki]=1 [d_wiki]=1 [e_shift_wiki]=1 [e_shift_book]=1 [b4_wiki_static]=1 [b4_book_static]=1
                     [passkey_2048]=1 [passkey_4096]=1 [passkey_8192]=1
                     [passkey_region_2048]=1 [passkey_region_4096]=1 [passkey_region_8192]=1
                     [refresh_ppl_wiki]=1 [refresh_ppl_book]=1)
# Phase C's baseline block (concat x eager streaming R=1/32) is Phase D's: a step also skips the runs
# finished by the step named here (copied under _from_STEP, left out of its tar: no duplicate records).
declare -A SHARES=([c_wiki]=d_wiki)
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } | tee -a "$log"
for name in "$@"; do
  args=${STEPS[$name]:-}
  if [ -z "$args" ]; then echo "== unknown step $name" | tee -a "$log"; continue; fi
  [ -d "docs/results/records/$name" ] && mkdir -p "$work/$name" && cp -rn "docs/results/records/$name/." "$work/$name/"
  shared=${SHARES[$name]:-}
  if [ -n "$shared" ]; then
    mkdir -p "$work/$name/_from_$shared"
    for src in "docs/results/records/$shared" "$work/$shared"; do
      [ -d "$src" ] && cp -rn "$src/." "$work/$name/_from_$shared/"
    done
  fi
  left=$(( limit - ($(date +%s) - t0) - 30 ))
  if [ "$left" -lt 30 ]; then echo "== SKIP $name (time left ${left}s)" | tee -a "$log"; continue; fi
  echo "== $(date -u +%T) $name (limit ${left}s): $args" | tee -a "$log"
  path=$fast; [ -n "${OWN_PATH[$name]:-}" ] && path="device=cuda progress=false"
  timeout "$left" python3 run.py -m $args $path hydra.sweep.dir="$work/$name" >>"$log" 2>&1
  rc=$?  # (taken first: a $(...) in the echo below would reset $?); 124 = stopped by the time limit
  echo "== $(date -u +%T) $name rc=$rc" | tee -a "$log"
  python3 scripts/relativize_records.py "$work/$name" 2>&1 | tail -1 | tee -a "$log"
  (cd "$work" && tar czf "$out/rec-$name.tar.gz" --exclude='.submitit' --exclude='_from_*' "$name")
done
python3 -c 'import collections, sys; from streamkv.record import iter_results
n = collections.Counter(rec.get("status") for _, rec in iter_results(sys.argv[1], "*/*/result.json"))
print("\n".join(f"{c:7d} status {s}" for s, c in sorted(n.items(), key=str)))' "$work" | tee -a "$log"
cp "$log" "$out/sweeps.log"; tail -c 3000 "$log"
