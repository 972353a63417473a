#!/usr/bin/env bash
# The GPU install, checked: run as is on a machine with an NVIDIA GPU, from the repository root,
# after `pip install -e '.[gpu,dev]'` (README, "On a GPU machine"). Under 10 minutes; prints one
# table (transformers engine and a training round in bf16 on CUDA, release and resume timings and
# the memory they return, the vLLM engine with LoRA hot-load and sleep mode where vLLM is
# installed) and writes the figures to $TMPDIR/gpu-check-<host>.json. Exit 0: every step passed.
#
#     bash benchmarks/gpu_check.sh            # the bundled student if prepared, else the tiny model
#     bash benchmarks/gpu_check.sh --model tiny
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
export VLLM_ENABLE_V1_MULTIPROCESSING=0 HF_HUB_OFFLINE=1
exec timeout 600 "$PY" benchmarks/gpu_check.py --device cuda --out "${TMPDIR:-/tmp}/gpu-check-$(hostname -s).json" "$@"
