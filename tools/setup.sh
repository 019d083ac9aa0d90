#!/usr/bin/env bash
# Set up hpc_es on a CPU machine: a virtual environment in .venv with the CPU build of torch,
# the package (editable; its dependencies include math-verify, which task=math grades with), the PyPI Open
# MPI wheel, pytest, ruff and mypy, the `report` extra (matplotlib, tensorboard) and the `gguf` extra (gguf,
# accelerate: `python -m hpc_es fetch smollm2`).  Idempotent.
# GPU clusters: see README, "Install on a GPU cluster" (install the CUDA torch build first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Pin the CPU wheel first so nothing later resolves "torch" to a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[mpi-wheel,test,lint,report,gguf]"
.venv/bin/python -c "import torch, transformers, mpi4py, h5py, submitit, math_verify; print('hpc_es set up: torch', torch.__version__, '| transformers', transformers.__version__)"
