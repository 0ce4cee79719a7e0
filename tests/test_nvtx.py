"""NVTX ranges: balanced push/pop around annotated calls, also when the call raises; off by default
without a GPU."""
import sys
import types

import pytest
import torch

from mvpp_kernels import _nvtx


@pytest.fixture
def fake_nvtx(monkeypatch):
    calls = []
    mod = types.ModuleType("nvtx")
    mod.push_range = lambda name, domain=None: calls.append(("push", name, domain))
    mod.pop_range = lambda domain=None: calls.append(("pop", domain))
    monkeypatch.setitem(sys.modules, "nvtx", mod)
    monkeypatch.setenv("MVPP_NVTX", "1")
    monkeypatch.setattr(_nvtx, "_PUSH_POP", None)
    yield calls
    _nvtx._PUSH_POP = None


def test_ranges_are_balanced_even_on_error(fake_nvtx):
    @_nvtx.annotate("mvpp.op")
    def ok(x):
        return x + 1

    @_nvtx.annotate("mvpp.bad")
    def bad(x):
        raise ValueError("boom")

    assert ok(torch.ones(1)).item() == 2
    with pytest.raises(ValueError, match="boom"):
        bad(torch.ones(1))
    with _nvtx.nvtx_range("mvpp.block"):
        pass
    assert fake_nvtx == [("push", "mvpp.op", "mvpp"), ("pop", "mvpp"), ("push", "mvpp.bad", "mvpp"),
                         ("pop", "mvpp"), ("push", "mvpp.block", "mvpp"), ("pop", "mvpp")]


def test_off_without_gpu_or_request(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("auto mode is on with a GPU")
    monkeypatch.setenv("MVPP_NVTX", "auto")
    monkeypatch.setattr(_nvtx, "_PUSH_POP", None)
    assert _nvtx._resolve() == (None, None)
    _nvtx._PUSH_POP = None


def test_annotated_function_compiles_without_graph_breaks(fake_nvtx):
    @_nvtx.annotate("mvpp.op")
    def f(x):
        return x * 2

    out = torch.compile(f, fullgraph=True, backend="eager")(torch.ones(3))
    assert torch.equal(out, torch.full((3,), 2.0))
