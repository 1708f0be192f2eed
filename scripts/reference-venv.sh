#!/usr/bin/env bash
# Creates .venv with the Python reference tools (see docs/reference-venv.md).
# Only for producing fixtures and peer benchmarks: swift and its tests never need it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet 'dvc==3.67.1'
# PyPI's torch is the large CUDA build: install once per developer machine, never in CI.
.venv/bin/pip install --quiet 'torch==2.15.0' 'transformers==5.24.0' safetensors datasets
# AutoAWQ's pure-PyTorch packer/dequantizer are the AWQ oracle (tests/fixtures/make_awq.py);
# `--no-deps` because it pins an old torch.
.venv/bin/pip install --quiet --no-deps 'autoawq==0.2.9'
# lm-evaluation-harness is the eval oracle (tests/fixtures/eval/make_eval_reference.py):
# MMLU/C-Eval k-shot log-likelihood scores with its own task templates; the [hf] extra
# brings accelerate (and peft), which its `hf` model imports.
.venv/bin/pip install --quiet 'lm-eval[hf]==0.4.13'
# PEFT and bitsandbytes (its CPU backend for NF4) are the peers of `swift bench finetune`.
.venv/bin/pip install --quiet 'peft==0.22.0' 'bitsandbytes==0.50.2'
# gguf (llama.cpp's Python package) lets transformers read GGUF files (tests/fixtures/export/check_export.py).
.venv/bin/pip install --quiet 'gguf==0.19.0'
echo "reference venv ready at .venv/: dvc $(.venv/bin/dvc --version | tail -1), transformers $(.venv/bin/python -c 'import transformers; print(transformers.__version__)'), lm-eval $(.venv/bin/python -c 'from importlib.metadata import version; print(version("lm-eval"))')"
