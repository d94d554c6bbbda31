#!/usr/bin/env bash
# Builds the packages that the offline GPU machine lacks, in the two folders that the GPU calls carry
# (each under the device tool's 64 MiB a call), from PyPI, on the CPU machine:
#   .device/h4/a  (methods_call.sh, speed_call_v10a.sh):
#       bnb_site.tar.xz      bitsandbytes 0.50.2 unpacked, its CUDA 13 libraries only (the image's torch is CUDA 13)
#       whl/                 mcp, pydantic, jsonschema, liger-kernel ... (what the project needs beyond the image)
#       pytest/              pytest and its needs (methods_call.sh's GPU-only tests)
#       unsloth_site.tar.xz  Unsloth's runtime with trl 1.15 and datasets (../shared/bench/unsloth/make_pack.sh)
#       unsloth_bench.py     Unsloth's timing script (../shared/bench/unsloth/)
#       fa4/                 FlashAttention-4's small wheels, its CUDA 13 library wheel without its two large
#                            files (cu13_small.tar.xz), the runtime library (rt.xz), the first part of the IR
#                            library (ir.part1) and both large files' sha256 (big.sha256)
#   .device/h4/b  (speed_call_v10b.sh): ir.part2, the rest of the IR library
# The GPU image (../shared/notes/offline-and-gpu.md): CPython 3.12, torch 2.11 (CUDA 13), transformers,
# peft, accelerate, triton, safetensors, tokenizers, numpy.
#   bash benchmarks/make_device_packs.sh [OUT=.device/h4]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.device/h4}
WORK=/tmp/device_packs
SHARED=${SHARED:-../shared}
PLAT=(--python-version 3.12 --implementation cp --only-binary=:all:
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64)
get() { local dest=$1; shift; python3 -m pip download -q "${PLAT[@]}" -d "$dest" "$@" 2>&1 | grep -v "Location\|WARNING" || true; }
mkdir -p "$WORK" "$OUT/a/fa4" "$OUT/b"
A=$OUT/a

# bitsandbytes: only the CUDA 13 libraries travel (the wheel is 41 MB, mostly CUDA 11/12 and ROCm builds)
get "$WORK/bnb" --no-deps bitsandbytes==0.50.2
rm -rf "$WORK/bnbsite" && python3 -m pip install -q --no-index --no-deps --no-compile --target "$WORK/bnbsite" \
  "$WORK"/bnb/bitsandbytes-0.50.2-*.whl
find "$WORK/bnbsite/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name 'libbitsandbytes_cuda13*' -delete
tar -C "$WORK/bnbsite" -cf - . | xz -6 -T2 > "$A/bnb_site.tar.xz"

# the project's own needs beyond the image (mcp with its dependencies; liger-kernel alone: it would pull torch)
rm -rf "$A/whl" && get "$A/whl" "mcp==2.3.0" pydantic anyio platformdirs filelock jsonschema psutil nvidia-ml-py rich
get "$A/whl" --no-deps "liger-kernel==0.8.5"
rm -rf "$A/pytest" && get "$A/pytest" --no-deps pytest pluggy iniconfig packaging

# Unsloth's runtime and its timing script
bash "$SHARED/bench/unsloth/make_pack.sh" "$WORK/unsloth" >/dev/null
cp "$WORK/unsloth/unsloth_site.tar.xz" "$A/" && cp "$SHARED/bench/unsloth/unsloth_bench.py" "$A/"

# FlashAttention-4 (CuTeDSL): small wheels as they are; the CUDA 13 library wheel (92 MB) is split
rm -rf "$WORK/fa4" && get "$WORK/fa4" --no-deps flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 \
  nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 \
  quack-kernels==0.6.5 "apache-tvm-ffi>=0.1.11,<0.2" torch-c-dlpack-ext "cuda-bindings==13.0.3" cuda-pathfinder einops
rm -f "$A"/fa4/*
find "$WORK/fa4" -name '*.whl' ! -name 'nvidia_cutlass_dsl_libs_cu13-*' -exec cp {} "$A/fa4/" \;
rm -rf "$WORK/cu13" && mkdir -p "$WORK/cu13" && (cd "$WORK/cu13" && unzip -q "$WORK"/fa4/nvidia_cutlass_dsl_libs_cu13-*.whl)
RT=nvidia_cutlass_dsl/cu13/lib/libcute_dsl_runtime.so
IR=nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
(cd "$WORK/cu13" && sha256sum "$RT" "$IR" | sed "s#  nvidia_cutlass_dsl/#  /tmp/fa4site/nvidia_cutlass_dsl/#") > "$A/fa4/big.sha256"
xz -6 -T2 -c "$WORK/cu13/$RT" > "$A/fa4/rt.xz"
xz -6 -T2 -c "$WORK/cu13/$IR" > "$WORK/ir.xz"
rm "$WORK/cu13/$RT" "$WORK/cu13/$IR"
tar -C "$WORK/cu13" -cf - . | xz -6 -T2 > "$A/fa4/cu13_small.tar.xz"
# the first part fills the first call up to ~62 MiB; the rest goes with the second
room=$(( 62 * 1024 * 1024 - $(du -sb "$A" | cut -f1) ))
head -c "$room" "$WORK/ir.xz" > "$A/fa4/ir.part1"
tail -c +"$(( room + 1 ))" "$WORK/ir.xz" > "$OUT/b/ir.part2"
du -sh "$A" "$OUT/b"
