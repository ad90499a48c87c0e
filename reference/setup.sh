#!/usr/bin/env bash
# Creates .venv-ref (git-ignored) in the repository root and installs the pinned reference packages.
# Needs python3 (3.11 tested) and access to PyPI. torch comes from plain PyPI: its Linux wheel pulls the
# nvidia-* CUDA runtime wheels (~3 GB) even though everything here runs on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv-ref/bin/python ]; then
    "$PY" -m venv .venv-ref
fi
.venv-ref/bin/pip install -r reference/requirements.txt
.venv-ref/bin/python -c 'import torch, transformers, tokenizers, safetensors, numpy, PIL; print("reference env ok:", "torch", torch.__version__, "transformers", transformers.__version__, "tokenizers", tokenizers.__version__, "safetensors", safetensors.__version__, "numpy", numpy.__version__, "pillow", PIL.__version__)'
