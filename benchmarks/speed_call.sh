#!/usr/bin/env bash
# Issue 9's 0.5B measurements in one GPU call (about 9 minutes, each part under its own timeout), so a
# session with little device time spends it in one full call:
#   0. the GPU-only tests (CUDA graphs, flash varlen, fused LoRA on NF4);
#   1. profile_step.py at micro-batch 4: plain, fastg (the fast path + CUDA graphs) and fastg+nr (no
#      recomputation: the default where memory allows) interleaved over 3 rounds (medians), loss
#      parity, a kernel profile and a cProfile of the host;
#   2. fastg and fastcg (compile + graphs) with Liger off (Liger's Triton RMSNorm breaks compiled graphs);
#   3. fastg/fastg+nr at micro-batch 16;
#   4. packed log-normal rows at micro-batch 4 (fastg/fastg+nr), against part 1's fixed-length rate;
#   5. Unsloth alone at micro-batch 4 and 16 (when UNSLOTH_PACK and UNSLOTH_BENCH are given);
#   6. the whole server flow with default settings beside the fixed-length rate (server_flow.py).
# PARTS="0 1 3 5" runs only those parts.
# Everything it prints goes to $OUT/log.txt; the JSON records, profiles and tables to $OUT/speed_call.tgz.
#
# What the GPU machine lacks travels as wheels (carried, git-ignored), e.g. with the device tool:
#   run(command="bash benchmarks/speed_call.sh", carry=[".device/speed/whl", ".device/flow/whl",
#       ".device/speed/unsloth-pack", ".device/speed/unsloth_bench.py"], timeout_s=590)
# WHEELS: folders of wheels (bitsandbytes, liger-kernel; mcp and its dependencies for the server flow);
# UNSLOTH_PACK: Unsloth's packed site folder (shared/bench/unsloth/README.md says how to make it);
# UNSLOTH_BENCH: shared/bench/unsloth/unsloth_bench.py. Unsloth stays off PYTHONPATH outside part 4:
# with it importable the engine's `backend: auto` would take Unsloth, and the other parts measure the
# native path.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/speed_out}
WHEELS=${WHEELS:-".device/speed/whl .device/flow/whl .device/graphs/whl"}
UNSLOTH_PACK=${UNSLOTH_PACK:-.device/speed/unsloth-pack/unsloth_site.tar.xz}
UNSLOTH_BENCH=${UNSLOTH_BENCH:-.device/speed/unsloth_bench.py}
mkdir -p "$OUT"
export BACKPROP_HOME=/tmp/bphome PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1  # no TOKENIZERS_PARALLELISM: a job tokenizes on every core, as users have it
T0=$(date +%s)
left() { echo $(( 560 - ($(date +%s) - T0) )); }
PARTS=${PARTS:-"0 1 2 3 4 5 6"}  # e.g. PARTS="0 1 3 5": only those parts
want() { case " $PARTS " in *" $1 "*) return 0;; *) return 1;; esac; }

# one wheel of each file name (two packs may carry the same one)
W=$(for d in $WHEELS; do ls "$d"/*.whl 2>/dev/null; done | awk -F/ '!seen[$NF]++')
# (pytest for part 0 travels in .device/graphs/whl where the machine lacks it)
[ -n "$W" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site $W 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD
# SMOKE=1: the same parts on tiny shapes (a CPU check of this script, not a measurement)
if [ -n "${SMOKE:-}" ]; then SHAPE="--tiny --seq-len 64 --steps 1 --warmup 1 --rounds 2"; FLOW="--tiny"; M=/tmp/m-tiny
  PACKED_STEPS=2
else SHAPE="--arch qwen2.5-0.5b --seq-len 2048 --steps 6 --warmup 2 --rounds 3"; FLOW="--arch qwen2.5-0.5b --steps 80"; M=/tmp/m05
  PACKED_STEPS=24; fi
PROFILE="python3 benchmarks/profile_step.py --model-dir $M $SHAPE"
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"
if want 0; then
echo "== 0. GPU tests $(date -u +%T)"
timeout 150 python3 -m pytest -q -p no:cacheprovider -p no:logging tests/test_cuda_graphs.py tests/test_fast_path.py tests/test_offload.py tests/test_train.py -k gpu \
  --tb=short > /tmp/gpu_tests.txt 2>&1
grep -v "Warning\|warn\|DEBUG" /tmp/gpu_tests.txt | grep -A30 "^=* FAILURES" | head -60; tail -1 /tmp/gpu_tests.txt
fi
if want 1; then
echo "== 1. mb4 plain/fastg/fastg+nr, Liger on $(date -u +%T), $(left) s left"
timeout 150 $PROFILE --batch 4 --variants plain,fastg,fastg+nr --profile --out "$OUT/liger" 2>&1 \
  | grep -v "Warning\|triton_kernel_wrap" | tail -12
fi
if want 2; then
echo "== 2. mb4 fastg/fastcg, Liger off $(date -u +%T), $(left) s left"
timeout 80 $PROFILE --batch 4 --variants fastg,fastcg --no-liger --out "$OUT/noliger" 2>&1 \
  | grep -v Warning | tail -8
fi
if want 3; then
echo "== 3. mb16 fastg/fastg+nr, Liger on $(date -u +%T), $(left) s left"
timeout 100 $PROFILE --batch 16 --variants fastg,fastg+nr --profile --out "$OUT/liger" 2>&1 \
  | grep -v "Warning\|triton_kernel_wrap" | tail -8
fi
if want 4; then
echo "== 4. mb4 packed fastg/fastg+nr $(date -u +%T), $(left) s left"
timeout 80 $PROFILE --batch 4 --variants fastg,fastg+nr --packed --steps $PACKED_STEPS --out "$OUT/packed" \
  2>&1 | grep -v "Warning\|triton_kernel_wrap" | tail -5
fi
if want 5 && [ -z "${SMOKE:-}" ] && [ -f "$UNSLOTH_PACK" ] && [ -f "$UNSLOTH_BENCH" ]; then
  echo "== 5. Unsloth alone, mb4 and mb16 $(date -u +%T), $(left) s left"
  mkdir -p /tmp/us && tar -C /tmp/us -xJf "$UNSLOTH_PACK"
  PYTHONPATH=/tmp/site:/tmp/us:$PWD timeout 170 python3 benchmarks/train_speed.py --arch qwen2.5-0.5b \
    --steps 8 --warmup 2 --skip-fixed --unsloth-bench "$UNSLOTH_BENCH" --unsloth-batches 4,16 \
    --workdir /tmp/ts05 --jsonl "$OUT/unsloth.jsonl" 2>&1 | grep -v Warning | tail -6
fi
if want 6 && [ "$(left)" -gt 60 ]; then
  echo "== 6. server flow, defaults, and the fixed-length rate $(date -u +%T), $(left) s left"
  timeout $(( $(left) - 5 )) python3 benchmarks/server_flow.py $FLOW --compare-fixed \
    --workdir /tmp/ts05 --json "$OUT/flow.json" 2>&1 | grep -v Warning | tail -25
  # a flow cut off by its timeout leaves the server's detached worker training: ask it to stop
  for d in "$BACKPROP_HOME"/jobs/*/; do [ -d "$d" ] && [ ! -f "$d/result.json" ] && touch "$d/cancel.request"; done
fi
echo "== end $(date -u +%T)"
} 2>&1 | tee "$OUT/log.txt"
# The device tool brings back at most 8 files: everything in one archive, and the log beside it.
tar -C "$OUT" -czf /tmp/speed_call.tgz --exclude=log.txt . && find "$OUT" -mindepth 1 ! -name log.txt -delete \
  && mv /tmp/speed_call.tgz "$OUT/"
