"""The package as installed: imports with or without its compiled extension, backend choice, build
switches, and the README/CI agreement."""
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import mvpp_kernels
from mvpp_kernels import BackendUnavailableError, backend_info
from mvpp_kernels._backend import requested_backend, resolve_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_py(code: str, env_extra=None, cwd=None):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=cwd or ROOT, timeout=300)


def test_compiled_extension_is_built_and_loaded():
    # The README's install builds the C++ extension; CI runs on that install, so a missing or
    # unloadable extension must turn CI red rather than silently test only the reference.
    if os.environ.get("MVPP_BUILD_CPP", "1") == "0":
        pytest.skip("MVPP_BUILD_CPP=0: built without the extension on purpose")
    assert mvpp_kernels._library.compiled_loaded(), mvpp_kernels._library.compiled_status()
    assert backend_info()["auto"]["cpu"]["selective_scan"] == "cpu"


def test_import_without_compiled_extension_falls_back():
    r = _run_py(
        """
        import torch, mvpp_kernels as mk
        info = mk.backend_info()
        assert info["auto"]["cpu"]["selective_scan"] == "reference", info
        u = torch.randn(1, 2, 3); d = torch.rand(1, 2, 3); A = -torch.rand(2, 4)
        B = torch.randn(1, 4, 3); C = torch.randn(1, 4, 3)
        mk.selective_scan(u, d, A, B, C)  # auto -> reference
        try:
            mk.selective_scan(u, d, A, B, C, backend="cpu")
        except mk.BackendUnavailableError as e:
            print("REFUSED:", e)
        """,
        {"MVPP_NO_COMPILED": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert "REFUSED:" in r.stdout and "C++ extension" in r.stdout


def test_import_with_broken_compiled_extension_warns(tmp_path):
    pkg = tmp_path / "mvpp_kernels"
    shutil.copytree(os.path.join(ROOT, "mvpp_kernels"), pkg,
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    (pkg / "_C.cpython-broken.so").write_bytes(b"this is not an ELF file")
    r = _run_py(
        """
        import warnings, mvpp_kernels as mk
        print("STATUS:", mk._library.compiled_status())
        print("AUTO:", mk.backend_info()["auto"]["cpu"]["selective_scan"])
        """,
        {"PYTHONPATH": str(tmp_path)},
        cwd=str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    assert "RuntimeWarning" in r.stderr and "could not be loaded" in r.stderr
    assert "AUTO: reference" in r.stdout


def test_backend_names_and_errors(monkeypatch):
    assert requested_backend("CPU") == "cpu"
    with pytest.raises(ValueError, match="backend='gpu' is not a backend"):
        requested_backend("gpu")
    monkeypatch.setenv("MVPP_BACKEND", "fastest")
    with pytest.raises(ValueError, match="MVPP_BACKEND='fastest'"):
        requested_backend()
    monkeypatch.setenv("MVPP_BACKEND", "reference")
    assert resolve_backend("selective_scan_fwd", torch.device("cpu")) == "reference"
    monkeypatch.delenv("MVPP_BACKEND")
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        resolve_backend("selective_scan_fwd", torch.device("cpu"), "cuda")
    with pytest.raises(BackendUnavailableError, match="has no cuda backend"):
        resolve_backend("x_fwd", torch.device("cpu"), "cuda", implemented=("reference",))


def test_backend_info_reports_every_registered_op():
    info = backend_info()
    for key in ("torch", "compiled_extension", "compiled_kernels", "triton", "auto"):
        assert key in info
    assert "selective_scan" in info["auto"]["cpu"]
    text = mvpp_kernels.format_backend_info(info)
    assert "auto on cpu" in text


@pytest.mark.parametrize("value, message", [("1", "cannot be built"), ("maybe", "must be auto, 0 or 1")])
def test_setup_build_switch_fails_clearly(value, message):
    if torch.version.cuda is not None:
        pytest.skip("a CUDA torch can build the CUDA extension; this checks the refusal on CPU-only torch")
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "MVPP_BUILD_CUDA": value}, timeout=120)
    assert r.returncode != 0
    assert message in (r.stderr + r.stdout)


def test_setup_skips_cuda_with_one_clear_line():
    if torch.version.cuda is not None:
        pytest.skip("CPU-only torch behaviour")
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "MVPP_BUILD_CUDA": "auto"}, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "skipping the CUDA extension" in ln]
    assert len(lines) == 1 and "CPU-only build" in lines[0]


def test_readme_test_command_is_what_ci_runs():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    m = re.search(r"<!-- test-command -->\s*```(?:bash|sh)?\s*\n(.+?)\n```", readme, re.S)
    assert m, "README.md must mark its test command with <!-- test-command -->"
    cmd = m.group(1).strip()
    assert cmd in ci, f"README's test command {cmd!r} is not what .ci/run runs"
