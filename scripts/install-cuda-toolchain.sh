#!/usr/bin/env bash
# Installs the CUDA compiler toolchain (nvcc, ptxas, cicc, headers) from PyPI into <repo>/.venv-cuda.
#
# No system CUDA install is needed: NVIDIA publishes nvcc and its pieces as wheels. They all unpack
# into one directory, site-packages/nvidia/cu13/{bin,nvvm,include,lib}, which already has the layout
# nvcc.profile expects (TOP = bin/.., cicc in nvvm/bin, headers in include/, cccl in include/cccl).
# This script links that directory as .venv-cuda/cuda, a CUDA_HOME-like root; build.rs looks for
# .venv-cuda/cuda/bin/nvcc after $NVCC, PATH and $CUDA_HOME.
#
# Note: nvcc locates its tree from its own directory, so do not symlink the nvcc *file* somewhere
# else (a file symlink makes it look for headers next to the link); put .venv-cuda/cuda/bin on PATH
# or point NVCC at .venv-cuda/cuda/bin/nvcc.
#
# All five versions are pinned together: a newer nvcc emits PTX that this ptxas rejects.
# Idempotent: a second run with everything installed only checks and prints.
# Needs: python3 (>= 3.9) with venv + pip, network access to PyPI, and g++ (nvcc's host compiler).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv-cuda"
PYTHON="${PYTHON:-python3}"
PINS=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cuda-cccl==13.0.85"
)

log() { echo "[install-cuda-toolchain] $*"; }

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
else
  log "virtual environment exists: $VENV"
fi
VPY="$VENV/bin/python"

# Which pins are missing or at another version? (pip metadata, no network.)
missing=()
for pin in "${PINS[@]}"; do
  name="${pin%%==*}"
  want="${pin##*==}"
  have="$("$VPY" -c 'import sys
from importlib.metadata import version, PackageNotFoundError
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    print("")' "$name")"
  if [[ "$have" == "$want" ]]; then
    log "ok       $name==$have"
  else
    log "install  $pin (found: ${have:-none})"
    missing+=("$pin")
  fi
done

if ((${#missing[@]})); then
  # Install all pins together so pip resolves them as one consistent set.
  "$VPY" -m pip install --disable-pip-version-check --no-input "${PINS[@]}"
fi

# Locate the unpacked toolkit root (the directory holding bin/nvcc).
PURELIB="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
ROOT=""
for cand in "$PURELIB"/nvidia/cu13 "$PURELIB"/nvidia/cuda_nvcc; do
  if [[ -x "$cand/bin/nvcc" ]]; then ROOT="$cand"; break; fi
done
if [[ -z "$ROOT" ]]; then
  log "ERROR: bin/nvcc not found under $PURELIB/nvidia after install" >&2
  exit 1
fi

# Check the pieces nvcc needs are where nvcc.profile looks for them.
for f in nvvm/bin/cicc nvvm/libdevice/libdevice.10.bc bin/ptxas bin/fatbinary bin/cudafe++ \
         include/cuda_runtime.h include/crt/host_config.h include/cuda_bf16.h \
         include/cccl/cuda/std/limits; do
  if [[ ! -e "$ROOT/$f" ]]; then
    log "ERROR: $ROOT/$f missing; the wheel layout changed" >&2
    exit 1
  fi
done

# .venv-cuda/cuda -> site-packages/nvidia/cu13 (relative, so the venv can be moved with the repo).
rel="${ROOT#"$VENV"/}"
if [[ "$(readlink "$VENV/cuda" 2>/dev/null || true)" != "$rel" ]]; then
  rm -rf "$VENV/cuda"
  ln -s "$rel" "$VENV/cuda"
  log "linked $VENV/cuda -> $rel"
  # build.rs cannot watch a path that does not exist yet; touching it makes the next cargo build
  # re-run the nvcc search (mtime only, the content is unchanged).
  touch "$REPO/build.rs"
fi
NVCC="$VENV/cuda/bin/nvcc"

if ! command -v g++ >/dev/null 2>&1 && ! command -v c++ >/dev/null 2>&1; then
  log "WARNING: no g++ on PATH; nvcc needs a host C++ compiler to preprocess .cu files" >&2
fi

# Smoke test: one tiny kernel through cicc + ptxas for every target build.rs uses.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/smoke.cu" <<'CU'
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda/std/limits>
extern "C" __global__ void smoke(float* x, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] = __bfloat162float(__float2bfloat16(x[i])) + cuda::std::numeric_limits<float>::epsilon();
}
CU
"$NVCC" --fatbin -O3 \
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_89,code=sm_89 \
  -gencode arch=compute_90,code=sm_90 -gencode arch=compute_80,code=compute_80 \
  "$tmp/smoke.cu" -o "$tmp/smoke.fatbin"
log "smoke test: compiled a fatbin for sm_80/sm_89/sm_90 + compute_80 PTX ($(wc -c <"$tmp/smoke.fatbin") bytes)"

log "nvcc: $NVCC"
log "CUDA_HOME-like root: $VENV/cuda"
"$NVCC" --version | sed -n 's/^Cuda compilation tools, /[install-cuda-toolchain] version: /p'
