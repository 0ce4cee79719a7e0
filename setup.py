"""Build for mvpp: the C++ CPU extension always (unless MVPP_BUILD_CPP=0), the CUDA extension when
torch has CUDA and nvcc is found.

Environment switches:
  MVPP_BUILD_CPP=0|1          build the compiled extension at all (default 1)
  MVPP_BUILD_CUDA=auto|0|1    CUDA sources: auto = when torch.version.cuda and nvcc exist;
                              1 = required (fail if impossible); 0 = never
  TORCH_CUDA_ARCH_LIST        e.g. "9.0" or "8.0;9.0+PTX"; default: the visible GPU's arch, else 9.0+PTX
  MAX_JOBS                    parallel compile jobs (honoured by torch's ninja build)
  MVPP_CPU_NATIVE=0|1         compile the CPU kernels with -march=native (default 1; set 0 for
                              a portable binary)
  MVPP_DEBUG=1                -O0 -g, for debugging the kernels

torch must already be installed: use `pip install --no-build-isolation -e .`.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    # pip hides build output unless -v; stderr lines still show in a failing build's log.
    print(f"[mvpp build] {msg}", file=sys.stderr, flush=True)


def _env_flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def _cuda_decision(torch_mod) -> tuple[bool, str]:
    mode = _env_flag("MVPP_BUILD_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"MVPP_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "MVPP_BUILD_CUDA=0"
    from torch.utils.cpp_extension import CUDA_HOME

    reasons = []
    if torch_mod.version.cuda is None:
        reasons.append(f"torch {torch_mod.__version__} is a CPU-only build")
    nvcc = None
    if CUDA_HOME is not None:
        cand = os.path.join(CUDA_HOME, "bin", "nvcc")
        nvcc = cand if os.path.exists(cand) else None
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        reasons.append("nvcc not found (set CUDA_HOME)")
    if reasons:
        if mode == "1":
            raise SystemExit("MVPP_BUILD_CUDA=1 but the CUDA extension cannot be built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, f"torch CUDA {torch_mod.version.cuda}, nvcc at {nvcc}"


def _arch_list(torch_mod) -> str:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    try:
        if torch_mod.cuda.is_available():
            major, minor = torch_mod.cuda.get_device_capability()
            return f"{major}.{minor}"
    except Exception:
        pass
    return "9.0+PTX"


def _record(cpp: bool, cuda: bool, why: str) -> None:
    """Leave the build decision where `mvpp_kernels.backend_info()` can show it: pip hides the build's
    output unless -v, and "why is there no CUDA backend?" deserves an answer after the fact too."""
    import json

    path = os.path.join(ROOT, "mvpp_kernels", "_build_info.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"cpp": cpp, "cuda": cuda, "cuda_reason": why}, f)
    os.replace(tmp, path)


def _extensions():
    if _env_flag("MVPP_BUILD_CPP", "1") == "0":
        _say("MVPP_BUILD_CPP=0: no compiled extension; the reference and Triton backends remain.")
        _record(False, False, "MVPP_BUILD_CPP=0")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _say(
            "torch is not importable at build time, so the C++/CUDA extension is skipped. Install torch "
            "first and use `pip install --no-build-isolation -e .` to get the compiled backends."
        )
        return [], {}

    debug = _env_flag("MVPP_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-std=c++17", "-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-sign-compare"]
    if _env_flag("MVPP_CPU_NATIVE", "1") == "1":
        cxx.append("-march=native")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # csrc/cuda/*.cu: torch bindings; csrc/cuda/kernels/*.cu: torch-free template instantiations
    # (one per file, so nvcc compiles them in parallel under MAX_JOBS).
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "kernels", "*.cu")))

    build_cuda, why = _cuda_decision(torch)
    _record(True, build_cuda, why)
    if build_cuda:
        arch = _arch_list(torch)
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        _say(f"building the CUDA extension for arch {arch} ({why}); MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}")
        nvcc = opt + [
            "-std=c++17",
            "--use_fast_math",
            "--expt-relaxed-constexpr",
            "--expt-extended-lambda",
            "-lineinfo",
            "-U__CUDA_NO_HALF_OPERATORS__",
            "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        ]
        ext = CUDAExtension(
            name="mvpp_kernels._C",
            sources=cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("MVPP_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        _say(f"skipping the CUDA extension: {why}. Building the C++ CPU extension only.")
        ext = CppExtension(
            name="mvpp_kernels._C",
            sources=cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
