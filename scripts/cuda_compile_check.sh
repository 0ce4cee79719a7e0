#!/usr/bin/env bash
# Compile every CUDA source (torch-free cores and torch bindings) for sm_90 with the local nvcc.
# Compile only: nothing runs. Exit status non-zero on any compile error.
#   PYTHON=python  ARCH=90  BUILD_DIR=build/cuda-check  JOBS=2
#   scripts/cuda_compile_check.sh --file X.cu   compiles one file with the library's flags (used by
#                                               tests/test_cuda_compile.py to show the lane fails on errors)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
ARCH=${ARCH:-90}
BUILD_DIR=${BUILD_DIR:-build/cuda-check}
JOBS=${JOBS:-2}
# The flags of the torch-free library target (warnings are errors); passed to CMake below.
NVCC_FLAGS="--expt-relaxed-constexpr;--expt-extended-lambda;-lineinfo;--use_fast_math;-Werror=all-warnings"
command -v nvcc >/dev/null || { echo "cuda_compile_check: nvcc not found on PATH" >&2; exit 2; }
if [ "${1:-}" = "--file" ]; then
  [ -n "${2:-}" ] || { echo "usage: $0 --file FILE.cu" >&2; exit 2; }
  IFS=';' read -r -a flags <<<"$NVCC_FLAGS"
  exec nvcc -std=c++17 "${flags[@]}" -arch="sm_$ARCH" -Icsrc/include -c "$2" -o /dev/null
fi
# torch (a CPU-only build here) looks for CUDA_HOME to list its CUDA include dirs; nvcc on PATH may be
# a wrapper script, so ask nvcc itself where its toolkit is.
if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=$(nvcc -v --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)
  CUDA_HOME=$(cd "${CUDA_HOME:-/usr/local/cuda}" 2>/dev/null && pwd || echo /usr/local/cuda)
  export CUDA_HOME
fi
TORCH_INC=$("$PYTHON" - <<'PY'
import inspect
from torch.utils import cpp_extension as c
params = inspect.signature(c.include_paths).parameters
try:
    paths = c.include_paths("cuda") if "device_type" in params else c.include_paths(cuda=True)
except OSError:  # no CUDA toolkit known to torch: nvcc adds its own include dirs anyway
    paths = c.include_paths()
print(";".join(paths))
PY
)
ABI=$("$PYTHON" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
  -DMVPP_TORCH_INCLUDE="$TORCH_INC" -DMVPP_TORCH_CXX11_ABI="$ABI" -DMVPP_NVCC_FLAGS="$NVCC_FLAGS" \
  -DPython3_EXECUTABLE="$(command -v "$PYTHON")" >/dev/null
cmake --build "$BUILD_DIR" --target mvpp_cuda_compile_check -j "$JOBS"
echo "cuda_compile_check: all CUDA sources compiled for sm_$ARCH"
