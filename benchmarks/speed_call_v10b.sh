#!/usr/bin/env bash
# Issue 26, goal 4 (and the start-up phases): right after `PARTS=3 bash benchmarks/speed_call_v10a.sh`
# on the same warm machine (that call leaves FA4's first half in /tmp/fa4stage, and /tmp/site):
#   run(command="BUDGET_S=450 PARTS='1 2 3' bash benchmarks/speed_call_v10b.sh",
#       carry=[".device/h4/b"], timeout_s=540)
#   1. start-up phases (benchmarks/startup_profile.py): the imports one by one in a fresh interpreter,
#      a 0.5B job's phases from a fresh worker and from a warm one (and whether the waiting warm worker
#      holds anything on the GPU);
#   2. FlashAttention-4 (flash-attn-4 4.0.0b40, nvidia-cutlass-dsl 4.8.1): its CUDA 13 libraries put
#      together from two parts (the first carried by the first call), installed in /tmp/fa4site;
#      the GPU test of its varlen kernel against SDPA one example at a time (forward and backward,
#      tests/test_varlen_kernels.py), and attention_varlen.py (one layer's attention, packed and fixed rows);
#   3. packed rows vs fixed rows at 0.5B, mb 4, seq 2048, no recomputation with CUDA graphs (the
#      defaults on this card) in one process each, 3 rounds: packed through FlashAttention-4 (fastg+nr)
#      and torch's flash kernel (fastg+nr+tv); fixed rows through cuDNN (fastg+nr) and FlashAttention-4
#      (fastg+nr+fx).
# PK (carried): ir.part2. SMOKE=1: parts 1 and 3 on tiny shapes on the CPU (part 2 needs the GPU).
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/v10b_out}
PK=${PK:-.device/h4/b}
PY=${PY:-python3}
mkdir -p "$OUT"
export BACKPROP_HOME=/tmp/bphome2 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1  # no TOKENIZERS_PARALLELISM: a job tokenizes on every core, as users have it
T0=$(date +%s)
left() { echo $(( ${BUDGET_S:-210} - ($(date +%s) - T0) )); }
PARTS=${PARTS:-"2 3"}
cap() { local l; l=$(left); echo $(( l < $1 ? (l > 6 ? l - 5 : 1) : $1 )); }  # a part's timeout within the budget
want() { case " $PARTS " in *" $1 "*) return 0;; *) return 1;; esac; }
if [ -z "${SMOKE:-}" ]; then
  [ -d /tmp/site/bitsandbytes ] || echo "!! /tmp/site is missing: this machine is not the first call's"
  export PYTHONPATH=/tmp/site:$PWD
  ARCH="--arch qwen2.5-0.5b"; SHAPE="--arch qwen2.5-0.5b --seq-len 2048 --steps 6 --warmup 2 --rounds 2 --batch 4"
  M=/tmp/m05; PACKED_STEPS=24
else
  export PYTHONPATH=$PWD
  ARCH="--tiny"; SHAPE="--tiny --seq-len 64 --steps 2 --warmup 1 --rounds 1 --batch 2"; M=/tmp/m-tiny; PACKED_STEPS=3
fi
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
date -u +"%F %T UTC"
if want 1; then
  echo "== 1. start-up phases, 0.5B $(date -u +%T), $(left) s left"
  timeout $(cap 150) $PY benchmarks/startup_profile.py $ARCH --steps 4 --warm --workdir /tmp/ts05 \
    --json "$OUT/startup.json" 2>&1 | grep -v "Warning\|INFO\|Loading weights\|Writing model" | tail -45
fi
FA4=""
if want 2 && [ -z "${SMOKE:-}" ]; then
  echo "== 2. FlashAttention-4: install $(date -u +%T), $(left) s left"
  S=/tmp/fa4stage
  mkdir -p /tmp/fa4site
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fa4site $S/*.whl 2>&1 \
    | grep -v WARNING | tail -2
  tar -C /tmp/fa4site -xJf $S/cu13_small.tar.xz
  L=/tmp/fa4site/nvidia_cutlass_dsl
  xz -dc $S/rt.xz > $L/cu13/lib/libcute_dsl_runtime.so
  cat $S/ir.part1 "$PK/ir.part2" | xz -dc > $L/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
  sha256sum -c $S/big.sha256 2>&1 | tail -2
  # The CUTLASS DSL wheel puts its packages on the path with a .pth file, which Python reads only in
  # site folders, not in PYTHONPATH's: name that folder too.
  export PYTHONPATH=/tmp/site:/tmp/fa4site:$L/dsl_packages:$PWD
  $PY -c "import flash_attn.cute, importlib.metadata as m; print('flash-attn-4', m.version('flash-attn-4'))" 2>&1 \
    | tail -4 && FA4=1
  echo "-- the GPU test (FA4 varlen vs SDPA per example, forward + backward) $(date -u +%T), $(left) s left"
  timeout $(cap 200) $PY -m pytest -q -rs -p no:cacheprovider tests/test_varlen_kernels.py --tb=short 2>&1 \
    | grep -v "Warning\|warn" | tail -25
fi
if want 3; then
  echo "== 3. packed vs fixed, 0.5B mb4, no recomputation + graphs $(date -u +%T), $(left) s left"
  V=fastg+nr,fastg+nr+tv; [ -z "$FA4" ] && V=fastg+nr
  timeout $(cap 150) $PY benchmarks/profile_step.py --model-dir $M $SHAPE --variants $V --packed --steps $PACKED_STEPS \
    --out "$OUT/packed" 2>&1 | grep -v "Warning\|triton_kernel_wrap\|Loading weights" | tail -9
  V=fastg+nr,fastg+nr+fx; [ -z "$FA4" ] && V=fastg+nr
  [ "$(left)" -gt 60 ] && timeout $(( $(left) - 10 )) $PY benchmarks/profile_step.py --model-dir $M $SHAPE \
    --variants $V --out "$OUT/fixed" 2>&1 | grep -v "Warning\|triton_kernel_wrap\|Loading weights" | tail -9
fi
if want 2 && [ -n "$FA4" ] && [ "$(left)" -gt 30 ]; then
  echo "-- attention_varlen.py $(date -u +%T), $(left) s left"
  timeout $(cap 150) $PY benchmarks/attention_varlen.py --shapes 0.5b,7b 2>&1 | grep -v Warning | tail -6 \
    | tee "$OUT/attention_varlen.jsonl"
fi
echo "== end $(date -u +%T), $(( $(date +%s) - T0 )) s"
} 2>&1 | tee "$OUT/log.txt"
tar -C "$OUT" -czf /tmp/v10b.tgz --exclude=log.txt . && find "$OUT" -mindepth 1 ! -name log.txt -delete \
  && mv /tmp/v10b.tgz "$OUT/"
