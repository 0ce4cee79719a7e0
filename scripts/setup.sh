#!/usr/bin/env bash
# One-time (idempotent) set-up: a virtual environment in .venv with the CPU build of torch and this
# package installed editable with its compiled extension and test dependencies.
#   PYTHON=python3.11 VENV=.venv TORCH_SPEC=torch==2.13.0 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# A pinned torch: an unpinned `torch` would pull several GB of CUDA wheels on a CPU-only machine.
# On a GPU machine, install the CUDA torch you want first and set TORCH_SPEC="" to keep it.
TORCH_SPEC=${TORCH_SPEC-torch==2.13.0}
EXTRAS=${EXTRAS:-test}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip setuptools wheel ninja
if [ -n "$TORCH_SPEC" ]; then
  "$PY" -m pip install -q "$TORCH_SPEC" numpy
fi
# --no-build-isolation: the extension compiles against the torch installed above.
"$PY" -m pip install -q --no-build-isolation -e ".[$EXTRAS]"
if [[ "$EXTRAS" == *test* ]]; then
  # mamba-ssm's own selective_scan_ref is a peer in the tests and benchmarks. Without
  # MAMBA_FORCE_BUILD its setup tries to download a prebuilt CUDA wheel and fails on a CPU torch;
  # with the CUDA build skipped it installs the pure-Python package, and the tests that import it
  # stub its CUDA module themselves.
  MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
    "$PY" -m pip install -q --no-build-isolation --no-deps mamba-ssm==2.3.2.post1 einops \
    || echo "setup: mamba-ssm could not be installed; the tests comparing against it will be skipped (pytest -ra lists them)"
fi
"$PY" -c "import mvpp_kernels; print(mvpp_kernels.format_backend_info())"
