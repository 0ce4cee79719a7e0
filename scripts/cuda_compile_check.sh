#!/usr/bin/env bash
# Compile every CUDA source (torch-free cores and torch bindings) for sm_90 with the local nvcc.
# Compile only: nothing runs. Exit status non-zero on any compile error.
#   PYTHON=python  ARCH=90  BUILD_DIR=build/cuda-check  JOBS=2
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
ARCH=${ARCH:-90}
BUILD_DIR=${BUILD_DIR:-build/cuda-check}
JOBS=${JOBS:-2}
command -v nvcc >/dev/null || { echo "cuda_compile_check: nvcc not found on PATH" >&2; exit 2; }
TORCH_INC=$("$PYTHON" - <<'PY'
import inspect
from torch.utils import cpp_extension as c
params = inspect.signature(c.include_paths).parameters
paths = c.include_paths("cuda") if "device_type" in params else c.include_paths(cuda=True)
print(";".join(paths))
PY
)
ABI=$("$PYTHON" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
  -DMVPP_TORCH_INCLUDE="$TORCH_INC" -DMVPP_TORCH_CXX11_ABI="$ABI" -DPython3_EXECUTABLE="$(command -v "$PYTHON")" >/dev/null
cmake --build "$BUILD_DIR" --target mvpp_cuda_compile_check -j "$JOBS"
echo "cuda_compile_check: all CUDA sources compiled for sm_$ARCH"
