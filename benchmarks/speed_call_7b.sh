#!/usr/bin/env bash
# Issue 9's 7B measurements in one GPU call (about 9 minutes): 1. the plain baseline loop and the engine
# job at fixed length (train_speed.py), 2. the whole server flow with default settings (server_flow.py),
# 3. in one process with a kernel profile each (profile_step.py, variants $VARIANTS): the plain step, the
# checkpointed fast step (fastg), with its layer inputs offloaded (fast+off) and without recomputation
# (fastg+nr); all on the same random-weight Qwen2.5-7B architecture, written once. Part 1's engine runs
# twice: with the defaults (no recomputation where the card holds it) and with $EXTRA (default:
# checkpointing asked for, so offload on). PARTS="1 3" runs only those parts.
#   run(command="bash benchmarks/speed_call_7b.sh", carry=[".device/speed/whl", ".device/flow/whl",
#       ".device/speed/qlora_baseline.py"], timeout_s=590)
# BASELINE: shared/bench/qlora_baseline.py; WHEELS as in speed_call.sh. Output: $OUT/log.txt and an archive of the rest.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/speed_out}
WHEELS=${WHEELS:-".device/speed/whl .device/flow/whl"}
EXTRA=${EXTRA:-'{"gradient_checkpointing": true}'}
VARIANTS=${VARIANTS:-plain,fastg,fastg+nr,fast+off}
BASELINE=${BASELINE:-.device/speed/qlora_baseline.py}
mkdir -p "$OUT"
export BACKPROP_HOME=/tmp/bphome PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1  # no TOKENIZERS_PARALLELISM: a job tokenizes on every core, as users have it
W=$(for d in $WHEELS; do ls "$d"/*.whl 2>/dev/null; done | awk -F/ '!seen[$NF]++')
[ -n "$W" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site $W 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD
if [ -n "${SMOKE:-}" ]; then A="--tiny"; STEPS="--steps 2 --warmup 1"; FLOW="--tiny"
else A="--arch qwen2.5-7b"; STEPS="--steps 6 --warmup 2"; FLOW="--arch qwen2.5-7b --steps 30"; fi
PARTS=${PARTS:-"1 2 3"}
want() { case " $PARTS " in *" $1 "*) return 0;; *) return 1;; esac; }
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
if want 1; then
echo "== 1. plain baseline and engine, fixed length $(date -u +%T)"
timeout 330 python3 benchmarks/train_speed.py --baseline "$BASELINE" $A $STEPS --workdir /tmp/ts7 \
  --extra "$EXTRA" \
  --jsonl "$OUT/ts7.jsonl" 2>&1 | grep -v Warning | tail -8
fi
if want 2; then
echo "== 2. server flow, defaults $(date -u +%T)"
timeout 220 python3 benchmarks/server_flow.py $FLOW --workdir /tmp/ts7 --json "$OUT/flow7.json" 2>&1 \
  | grep -v Warning | tail -14
for d in "$BACKPROP_HOME"/jobs/*/; do [ -d "$d" ] && [ ! -f "$d/result.json" ] && touch "$d/cancel.request"; done
fi
if want 3; then
echo "== 3. plain step and default step, profiled, one process $(date -u +%T)"
M7=/tmp/ts7/model-qwen2.5-7b; [ -n "${SMOKE:-}" ] && M7=/tmp/ts7/model-tiny
timeout 260 python3 benchmarks/profile_step.py $A --model-dir "$M7" --batch 4 $STEPS --variants "$VARIANTS" \
  --profile --out "$OUT/prof7" 2>&1 | grep -v "Warning\|triton_kernel_wrap" | tail -7
fi
echo "== end $(date -u +%T)"
} 2>&1 | tee "$OUT/log.txt"
# As speed_call.sh: one archive beside the log (the device tool returns few files, none with "+" in its name).
tar -C "$OUT" -czf /tmp/speed_call_7b.tgz --exclude=log.txt . && find "$OUT" -mindepth 1 ! -name log.txt -delete \
  && mv /tmp/speed_call_7b.tgz "$OUT/"
