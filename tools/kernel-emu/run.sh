#!/usr/bin/env bash
# Builds and runs the attention kernels in the host SIMT emulator (no GPU needed).
# Usage: tools/kernel-emu/run.sh [--quick]   (--quick skips the 64x64 global SAM case, ~1 min)
# Needs a C++17 compiler and the CUDA headers (cuda_bf16.h) of the pinned toolkit:
# $CUDA_INCLUDE, else <repo>/.venv-cuda/cuda/include.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
inc="${CUDA_INCLUDE:-$root/.venv-cuda/cuda/include}"
cxx="${CXX:-c++}"
out="${TMPDIR:-/tmp}/xsam_attn_emu"
"$cxx" -std=c++17 -O1 -DXSAM_EMU -ffp-contract=off -I "$root/tools/kernel-emu" -I "$root/kernels" -I "$inc" \
    "$root/tools/kernel-emu/attn_emu.cpp" -o "$out"
exec "$out" "$@"
