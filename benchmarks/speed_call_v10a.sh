#!/usr/bin/env bash
# Issue 26's GPU calls for goals 1-3 (each part under its own timeout; BUDGET_S bounds the whole call).
# Run from the checkout with the packages carried (`bash benchmarks/make_device_packs.sh` builds them):
#   A=[".device/h4/a/bnb_site.tar.xz", ".device/h4/a/whl", ".device/h4/a/unsloth_site.tar.xz",
#      ".device/h4/a/unsloth_bench.py"]
#   run(command="BUDGET_S=540 PARTS='1 2' MBS=4 ENGINE_VARIANTS=fastg+nr,fast+off,fastg,fastg+nr+um \
#       bash benchmarks/speed_call_v10a.sh", carry=A, timeout_s=590)          # 0.5B: flows, mb4 pairings
#   run(command="BUDGET_S=420 PARTS=2 MBS=16 ENGINE_VARIANTS=fastg+nr,fast+off,fastg \
#       bash benchmarks/speed_call_v10a.sh", carry=A, timeout_s=470)          # 0.5B: mb16 pairings
#   run(command="SIZE=7b BUDGET_S=540 PARTS=1 bash benchmarks/speed_call_v10a.sh", carry=A, timeout_s=590)
#   run(command="SIZE=7b BUDGET_S=540 PARTS=2 MBS=4 ENGINE_VARIANTS=fastg+nr,fast+off \
#       bash benchmarks/speed_call_v10a.sh", carry=A, timeout_s=590)          # 7B: flows, then mb4 pairings
#   1. the server flow (benchmarks/server_flow.py: inspect_gpu, check_dataset, start_finetune with the
#      dataset and model only, job_status until it ends), 200 steps at 0.5B, 100 at 7B:
#      a. fresh worker (BACKPROP_WARM_WORKER=0), compiler caches cold (this call's own cache folders,
#         emptied first, whatever ran on the machine before);
#      b. the server's warm worker (waited for before start_finetune), caches warm;
#      c. fresh worker again, caches warm, 30 steps (0.5B only);
#      each prints the first step's latency after start_finetune's answer and the whole job against its
#      step rate. Flow a keeps a 4-bit copy of the base model (`keep_quantized`, the default): flows b
#      and c load it, as a user's second job on the same model does;
#   2. Unsloth's pairings at seq 2048 and micro-batch MBS (default "4 16"): the engine in one process
#      (profile_step.py: fastg = checkpointed, fastg+nr = no recomputation, the defaults on a card with
#      room; fast+off = offloaded layer inputs, like Unsloth's checkpointing; +um = the MLP unfused) and
#      Unsloth (shared/bench/unsloth/unsloth_bench.py) with its offloaded checkpointing (its default)
#      and with --grad-ckpt off; the engine and the flows share one random model folder;
#   3. FlashAttention-4's large libraries, part 1: copied to /tmp/fa4stage for speed_call_v10b.sh,
#      which must follow while the machine is warm:
#      run(command="PARTS=3 bash benchmarks/speed_call_v10a.sh",
#          carry=[".device/h4/a/fa4", ".device/h4/a/bnb_site.tar.xz", ".device/h4/a/whl"], timeout_s=120)
# The call ends with issue 26's headline lines for what it measured (benchmarks/headline.py).
# PK holds: bnb_site.tar.xz (bitsandbytes 0.50.2 unpacked, CUDA 13 libraries only), whl/ (liger-kernel,
# mcp and what it needs), unsloth_site.tar.xz + unsloth_bench.py, fa4/ (the small FlashAttention-4
# wheels, rt.xz, ir.part1). SMOKE=1: the same parts on tiny shapes on the CPU (a check of this script).
# FLOWS picks the flows (default: a b c at 0.5B, a b at 7B).
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/v10a_out}
PK=${PK:-.device/h4/a}
PY=${PY:-python3}
mkdir -p "$OUT"
export BACKPROP_HOME=/tmp/bphome PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1  # no TOKENIZERS_PARALLELISM: a job tokenizes on every core, as users have it
T0=$(date +%s)
left() { echo $(( ${BUDGET_S:-370} - ($(date +%s) - T0) )); }
PARTS=${PARTS:-"1 2 3"}
cap() { local l; l=$(left); echo $(( l < $1 ? (l > 6 ? l - 5 : 1) : $1 )); }  # a part's timeout within the budget
want() { case " $PARTS " in *" $1 "*) return 0;; *) return 1;; esac; }
if [ -z "${SMOKE:-}" ]; then
  mkdir -p /tmp/site && tar -C /tmp/site -xJf "$PK/bnb_site.tar.xz"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$PK"/whl/*.whl 2>&1 | grep -v WARNING | tail -2
  export PYTHONPATH=/tmp/site:$PWD
  ARCH="--arch qwen2.5-0.5b"; FLOWSTEPS=200; SHAPE="--arch qwen2.5-0.5b --seq-len 2048 --steps 6 --warmup 2 --rounds 2"
  M=/tmp/ts05/model-qwen2.5-0.5b; US="--small --seq-len 2048 --steps 8 --warmup 2"; UM=/tmp/us-model-05
  if [ "${SIZE:-0.5b}" = 7b ]; then  # goal 3's 7B pairing (and the 7B flow, 100 steps): PARTS="2" MBS=4
    ARCH="--arch qwen2.5-7b"; FLOWSTEPS=100; SHAPE="--arch qwen2.5-7b --seq-len 2048 --steps 5 --warmup 2 --rounds 1"
    M=/tmp/ts05/model-qwen2.5-7b; US="--seq-len 2048 --steps 5 --warmup 2"; UM=/tmp/us-model-7; UCAP=160; FCAP=200
    FLOWS=${FLOWS:-"a b"}
  fi
else
  export PYTHONPATH=$PWD
  ARCH="--tiny"; FLOWSTEPS=6; SHAPE="--tiny --seq-len 64 --steps 2 --warmup 1 --rounds 1"; M=/tmp/m-tiny
fi
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
date -u +"%F %T UTC"
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__)"
if want 1; then
  # this call's own compiler caches: flow a starts them empty, whatever ran on the machine before
  export TORCHINDUCTOR_CACHE_DIR=/tmp/v10a_caches/inductor TRITON_CACHE_DIR=/tmp/v10a_caches/triton
  # and no kept 4-bit copy: flow a is a user's first job on the model
  case " ${FLOWS:-a b c} " in *" a "*) rm -rf /tmp/v10a_caches "$BACKPROP_HOME/cache/nf4";; esac
  for run in "a 0 0 $FLOWSTEPS" "b 1 90 $FLOWSTEPS" "c 0 0 30"; do
    set -- $run
    case " ${FLOWS:-a b c} " in *" $1 "*) ;; *) continue;; esac
    echo "== 1$1. server flow, $ARCH, $4 steps, warm worker ${2}, $(date -u +%T), $(left) s left"
    BACKPROP_WARM_WORKER=$2 timeout $(cap "${FCAP:-100}") $PY benchmarks/server_flow.py $ARCH --steps $4 --wait-warm $3 \
      --workdir /tmp/ts05 --json "$OUT/flow_$1.json" 2>&1 | grep -v "Warning\|INFO" | tail -10
    for d in "$BACKPROP_HOME"/jobs/*/; do [ -d "$d" ] && [ ! -f "$d/result.json" ] && touch "$d/cancel.request"; done
  done
  $PY -c "
import time
from engine.hardware.gpus import GpuMonitor
m = GpuMonitor(0); m.sample(); t = time.perf_counter()
for _ in range(50): m.sample()
print(f'GpuMonitor.sample(): {(time.perf_counter() - t) / 50 * 1000:.2f} ms a call (the loop takes two a step)')"
  timeout $(cap 40) $PY benchmarks/startup_profile.py $ARCH --imports-only --json "$OUT/imports.json" 2>&1 | tail -13
fi
if want 2; then
  # pairing by pairing (engine, then Unsloth without and with recomputation), so that a call cut short
  # still leaves whole pairings
  [ -z "${SMOKE:-}" ] && [ -f "$PK/unsloth_site.tar.xz" ] && mkdir -p /tmp/us && tar -C /tmp/us -xJf "$PK/unsloth_site.tar.xz"
  for mb in ${MBS:-4 16}; do
    [ "$(left)" -lt 50 ] && { echo "(no time left for mb$mb)"; continue; }
    echo "== 2. mb$mb: engine ${ENGINE_VARIANTS:-fastg,fastg+nr} $(date -u +%T), $(left) s left"
    timeout $(cap 130) $PY benchmarks/profile_step.py --model-dir $M $SHAPE --batch $mb --variants ${ENGINE_VARIANTS:-fastg,fastg+nr} \
      --out "$OUT/engine_mb$mb" 2>&1 | grep -v "Warning\|triton_kernel_wrap\|Loading weights" | tail -12
    [ -n "${SMOKE:-}" ] || [ ! -d /tmp/us ] && continue
    for ck in off unsloth; do
      [ "$(left)" -lt 45 ] && { echo "(no time left for Unsloth mb$mb $ck)"; continue; }
      echo "-- Unsloth mb$mb --grad-ckpt $ck $(date -u +%T), $(left) s left"
      PYTHONPATH=/tmp/site:/tmp/us timeout $(cap "${UCAP:-100}") $PY "$PK/unsloth_bench.py" \
        --batch $mb $US --grad-ckpt $ck --model-dir $UM --jsonl "$OUT/unsloth.jsonl" --tag "mb$mb-$ck" \
        2>&1 | grep "^{" | tail -1 | cut -c1-400
    done
  done
fi
if want 3 && [ -z "${SMOKE:-}" ]; then
  echo "== 3. FlashAttention-4 part 1 to /tmp/fa4stage $(date -u +%T)"
  mkdir -p /tmp/fa4stage && cp -r "$PK"/fa4/* /tmp/fa4stage/ && ls -la /tmp/fa4stage | tail -n +2 | wc -l
fi
echo "== headlines (benchmarks/headline.py)"
$PY benchmarks/headline.py "$OUT"
echo "== end $(date -u +%T), $(( $(date +%s) - T0 )) s"
} 2>&1 | tee "$OUT/log.txt"
tar -C "$OUT" -czf /tmp/v10a.tgz --exclude=log.txt . && find "$OUT" -mindepth 1 ! -name log.txt -delete \
  && mv /tmp/v10a.tgz "$OUT/"
