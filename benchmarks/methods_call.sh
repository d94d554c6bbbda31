#!/usr/bin/env bash
# One GPU call for the training methods beyond SFT (issues 24 and 25), every framework on the same card in
# the same call:
#   1. GRPO, Qwen2.5-0.5B architecture, QLoRA, 8 completions of up to 256 tokens a prompt: the engine's job
#      (sampling with generate, and with grpo_sampling_graphs) against trl's GRPOTrainer (benchmarks/grpo_speed.py);
#   2. DPO, Qwen2.5-7B architecture, QLoRA, pairs of 512-token prompts and 512-token answers: the engine's
#      job against trl's DPOTrainer and Unsloth's PatchDPOTrainer (benchmarks/preference_speed.py);
#   3. the same DPO comparison at 0.5B (the engine, trl, trl's bf16 noise floor, Unsloth; dpo05-trl: no Unsloth);
#   both DPO parts end with trl's precompute_ref_log_probs run (--trl-precompute: the engine's way of making
#   the reference, as a control), after their headline is printed and recorded, in what is left of the
#   part's cap (raised by 60 s and 40 s for it; its length is not yet measured: a timeout there loses only it);
#   tests (only when PARTS names it): the tests that CI skips for want of a GPU; jobtests: those of them that
#   run whole jobs (dpo, kto and orpo on the 4-bit fast path; the kept 4-bit copy);
#   grpo-unsloth (only when PARTS names it): the engine's GRPO job against Unsloth's GRPO.
# GRPO and the 0.5B DPO also record their first step's allocations (--memory-history), the DPO runs their
# second step's profile: the log ends with what was alive at each one's peak (benchmarks/memory_at_peak.py)
# and where the DPO step's time went.
# Each part runs under its own timeout inside BUDGET_S, in the order PARTS gives (default: as numbered).
#   run(command="bash benchmarks/methods_call.sh", carry=[".device/h4/a"], timeout_s=590)
# .device/h4/a (git-ignored; benchmarks/make_device_packs.sh builds it) holds what the GPU machine lacks:
# bnb_site.tar.xz (bitsandbytes), whl/ (mcp, pydantic and what they need), pytest/, unsloth_site.tar.xz
# (Unsloth's runtime with trl 1.15 and datasets). The GRPO part's cap is GRPO_CAP seconds (default 450: on
# an H100 the engine's job with generate and trl's GRPOTrainer took ~155 s each; the engine's job with
# grpo_sampling_graphs runs between them).
set -o pipefail
cd "$(dirname "$0")/.."
PK=${PK:-.device/h4/a}
OUT=${OUT:-/tmp/methods_out}
mkdir -p "$OUT" /tmp/site /tmp/us
export BACKPROP_HOME=/tmp/bphome PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
left() { echo $(( ${BUDGET_S:-540} - ($(date +%s) - T0) )); }
cap() { local l; l=$(left); echo $(( l < $1 ? (l > 6 ? l - 5 : 1) : $1 )); }
tar -C /tmp/site -xJf "$PK/bnb_site.tar.xz"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$PK"/whl/*.whl 2>&1 | grep -v WARNING | tail -2
tar -C /tmp/us -xJf "$PK/unsloth_site.tar.xz"
export PYTHONPATH=/tmp/site:$PWD
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
date -u +"%F %T UTC"
grpo() {
  echo "== GRPO 0.5B, $(left) s left"
  timeout "$(cap "${GRPO_CAP:-450}")" python3 benchmarks/grpo_speed.py --arch qwen2.5-0.5b --sampling "${GRPO_SAMPLING:-both}" --trl-path /tmp/us:/tmp/site \
    --memory-history /tmp/memory --memory-steps 2 --warmup 2 --jsonl "$OUT/grpo.jsonl" 2>&1 | grep -v "Warning\|warn(" | tail -40
}
grpo_unsloth() {  # the engine and Unsloth's GRPO (issue 25 asks for it where its pack runs it)
  echo "== GRPO 0.5B, the engine and Unsloth, $(left) s left"
  timeout "$(cap 330)" python3 benchmarks/grpo_speed.py --arch qwen2.5-0.5b --sampling generate --skip-trl \
    --unsloth-path /tmp/us:/tmp/site --jsonl "$OUT/grpo_unsloth.jsonl" 2>&1 | grep -v "Warning\|warn(" | tail -30
}
dpo() {  # dpo ARCH CAP STEPS [more options]
  echo "== DPO $1, $(left) s left"
  timeout "$(cap "$2")" python3 benchmarks/preference_speed.py --arch "$1" --batch 4 --steps "$3" --warmup 3 ${4:-} \
    --trl-path /tmp/us:/tmp/site --unsloth-path /tmp/us:/tmp/site --jsonl "$OUT/dpo.jsonl" 2>&1 \
    | grep -v "Warning\|warn(" | tail -40
}
gputests() {  # the tests that skip without a GPU (CI has none): CUDA graphs, the fused path, offload, a real job
  echo "== GPU-only tests, $(left) s left"
  python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --target /tmp/site "$PK"/pytest/*.whl 2>&1 | grep -v WARNING | tail -2
  timeout "$(cap 200)" python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_fast_path.py \
    tests/test_offload.py tests/test_train.py tests/test_graph_sampling.py tests/test_run_diagnostics.py -rs \
    --tb=short -k gpu 2>&1 | tail -25
}
jobtests() {  # the GPU tests that run whole jobs in workers (~25 s each): dpo, kto, orpo; the kept 4-bit copy
  echo "== GPU-only job tests, $(left) s left"
  timeout "$(cap 240)" python3 -m pytest -q -p no:cacheprovider tests/test_preference_jobs.py \
    tests/test_quantized_cache.py -rs --tb=short -k gpu 2>&1 | tail -25
}
for part in ${PARTS:-grpo dpo7 dpo05}; do
  case $part in
    tests) gputests ;;
    jobtests) jobtests ;;
    grpo) grpo ;;
    grpo-unsloth) grpo_unsloth ;;
    dpo7) dpo qwen2.5-7b 420 10 --trl-precompute ;;
    dpo05) dpo qwen2.5-0.5b 280 12 "--memory-history /tmp/memory --trl-precompute" ;;
    dpo05-trl) dpo qwen2.5-0.5b 240 12 "--memory-history /tmp/memory --skip-unsloth --trl-precompute" ;;  # a short call: no Unsloth
  esac
done
# what was alive at each recorded run's peak (its first step), by the code that allocated it; where the
# 0.5B DPO runs' second step spent its time (the tables are kept in $OUT/diagnostics)
ls /tmp/memory/*.pickle >/dev/null 2>&1 && timeout "$(cap 150)" python3 benchmarks/memory_at_peak.py /tmp/memory/*.pickle --top 15
mkdir -p "$OUT/diagnostics" && cp /tmp/memory/*.json /tmp/memory/*.profile.txt "$OUT/diagnostics/" 2>/dev/null
for f in /tmp/memory/*.profile.txt; do [ -f "$f" ] && { echo "== $f"; head -40 "$f"; }; done
echo "== done, $(left) s left"
} 2>&1 | tee "$OUT/methods_call.log"
