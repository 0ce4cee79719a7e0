#!/usr/bin/env bash
# One device call: build the CUDA extension for sm_90, run the whole test suite on the GPU, run the
# benchmarks, and write JSON, logs and plots under $OUT (at most 8 files come back: keep to that).
#
# Usage from the device tool (repo root; wheels for what the GPU image lacks carried in .whl/):
#   run(command="bash benchmarks/gpu_run.sh", carry=[".whl"])
# Sections can be skipped: SKIP_BUILD=1 SKIP_TESTS=1 SKIP_BENCH=1 SKIP_SANITIZER=1.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
LOG="$OUT/gpu_run.log"
exec > >(tee -a "$LOG") 2>&1
cd "$(dirname "$0")/.."
say() { echo "== $(date +%H:%M:%S) $*"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  say "installing carried wheels"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.total --format=csv || true

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  say "building the extension (sm_90)"
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MVPP_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
  python3 -m pip install -q --no-build-isolation --no-deps -e . || { say "BUILD FAILED"; exit 1; }
fi
python3 -c "import mvpp_kernels as m; print(m.format_backend_info())"

say "device-to-device copy ceiling"
python3 - <<'PY' | tee "$OUT/ceiling.txt"
import torch
x = torch.empty(2**30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); s, e = torch.cuda.Event(True), torch.cuda.Event(True)
s.record(); n = 20
for _ in range(n): y.copy_(x)
e.record(); torch.cuda.synchronize()
t = s.elapsed_time(e) / 1e3 / n
print(f"copy ceiling: {2 * x.numel() / t / 1e9:.0f} GB/s (read+write of 1 GiB)")
PY

rc_tests=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  say "test suite on CUDA"
  python3 -m pytest tests -q -x -p no:cacheprovider --junitxml="$OUT/tests.xml" 2>&1 | tail -40
  rc_tests=${PIPESTATUS[0]}
fi

if [ "${SKIP_SANITIZER:-0}" != 1 ] && command -v compute-sanitizer >/dev/null; then
  say "compute-sanitizer memcheck/racecheck on the CUDA tests"
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest tests/ops -q -m cuda -k "cuda and not compile" -x \
      > "$OUT/sanitizer_$tool.txt" 2>&1; echo "$tool exit $?"
  done
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  say "benchmarks"
  python3 -m pytest benchmarks --benchmark-only --benchmark-json="$OUT/bench_gpu.json" -q 2>&1 | tail -30
  # Plots are packed into one tar: only 8 files come back from a device call.
  python3 -m benchmarks.report "$OUT/bench_gpu.json" --out "$OUT/RESULTS_gpu.md" --plots /tmp/mvpp_plots \
    && tar -cf "$OUT/plots.tar" -C /tmp mvpp_plots || true
fi
say "done: tests exit $rc_tests; files in $OUT"
ls -la "$OUT"
exit $rc_tests
