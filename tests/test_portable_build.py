"""The CPU kernels' generic (non-AVX) paths, checked on a machine that has AVX-512.

setup.py compiles the C++ kernels with -march=native, and several inner loops have an AVX-512 path
chosen at compile time with a portable `#else`. On this project's machines the AVX-512 path is the
one the normal build takes, so without this test the fallback that every user without AVX-512 runs
would never execute. Here the same sources are compiled for baseline x86-64 (SSE2 only) into a
temporary library, and the CPU op tests run against it in a subprocess (MVPP_COMPILED_LIB swaps the
library in, since one process cannot register the same kernels twice).
"""
from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The op test files whose cpu-backend tests call the compiled kernels.
OP_TESTS = [
    "tests/ops/test_selective_scan.py",
    "tests/ops/test_mhp_scan.py",
    "tests/ops/test_frame_score.py",
    "tests/ops/test_cluster_lookup.py",
    "tests/ops/test_cluster_update.py",
    "tests/test_memory_bank.py",
]

pytestmark = [
    pytest.mark.cpp,
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the baseline build targets x86-64"),
    pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler"),
]

_BUILD = textwrap.dedent(
    """
    import glob, os, sys
    os.environ["MVPP_NO_COMPILED"] = "1"
    import mvpp_kernels  # the schemas the kernels register against
    from torch.utils import cpp_extension
    root, out = sys.argv[1], sys.argv[2]
    path = cpp_extension.load(
        name="mvpp_portable",
        sources=sorted(glob.glob(os.path.join(root, "csrc", "cpu", "*.cpp"))),
        extra_cflags=["-O3", "-std=c++17", "-fopenmp", "-march=x86-64", "-mtune=generic"],
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[os.path.join(root, "csrc", "include")],
        build_directory=out,
        is_python_module=False,
        verbose=False,
    )
    print(path)
    """
)


@pytest.fixture(scope="module")
def portable_lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("portable_build")
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    proc = subprocess.run([sys.executable, "-c", _BUILD, ROOT, str(out)], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"the baseline x86-64 build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    lib = proc.stdout.strip().splitlines()[-1]
    assert os.path.isfile(lib), lib
    return lib


def test_portable_build_has_no_vector_extensions(portable_lib):
    from mvpp_kernels._library import compiled_isa

    isa = compiled_isa(portable_lib).split()
    assert isa[0] == "x86-64", isa
    assert not {"avx", "avx2", "avx512f"} & set(isa), f"the baseline build still enables {isa}"


def test_normal_build_reports_its_isa():
    from mvpp_kernels import _library

    if not _library.compiled_loaded():
        pytest.skip("the compiled extension is not built")
    isa = _library.compiled_isa(_library._COMPILED["path"])
    assert isa.split()[0] in ("x86-64", "aarch64", "other"), isa
    assert "CPU ISA:" in _library.compiled_status()


def test_cpu_ops_on_the_portable_build(portable_lib):
    env = dict(os.environ, MVPP_COMPILED_LIB=portable_lib)
    env.pop("PYTEST_ADDOPTS", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *OP_TESTS]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"CPU op tests fail on the baseline x86-64 build:\n{tail}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
    # The subprocess really ran on the portable library, not the package's.
    probe = subprocess.run(
        [sys.executable, "-c", "import mvpp_kernels._library as L; print(L.compiled_status())"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert portable_lib in probe.stdout, probe.stdout + probe.stderr
