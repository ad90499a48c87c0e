#!/usr/bin/env bash
# Builds and runs the vision kernels in the host emulator (no GPU needed): copies kernels/*.cu
# (all but the attention kernels and bench.cu), turns the one `extern __shared__` declaration
# into the emulator's dynamic shared-memory pointer, compiles with g++ (C++20, no FP contraction)
# and runs the cases in vision_emu.cpp.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
here="$root/tools/vision-emu"
cxx="${CXX:-g++}"
work="$(mktemp -d "${TMPDIR:-/tmp}/xsam_vision_emu.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/k"
unit="$work/kernels.cpp"
: > "$unit"
for f in "$root"/kernels/*.cu "$root"/kernels/*.cuh; do
    b="$(basename "$f")"
    case "$b" in
        bench.cu | flash_attn* | paged_attn* | masked_attn* | attn_common*) continue ;;
    esac
    sed -e 's/extern __shared__ __align__(16) unsigned char msda_smem\[\];/unsigned char* msda_smem = emu_dyn_smem;/' "$f" > "$work/k/$b"
    case "$b" in *.cu) echo "#include \"$work/k/$b\"" >> "$unit" ;; esac
done
flags=(-std=c++20 -O1 -ffp-contract=off -I "$here/include" -I "$work/k")
"$cxx" "${flags[@]}" -c "$unit" -o "$work/kernels.o"
"$cxx" "${flags[@]}" -c "$here/emu.cpp" -o "$work/emu.o"
"$cxx" "${flags[@]}" -c "$here/vision_emu.cpp" -o "$work/vision_emu.o"
"$cxx" "$work/kernels.o" "$work/emu.o" "$work/vision_emu.o" -o "$work/vision_emu" -lpthread
"$work/vision_emu"
