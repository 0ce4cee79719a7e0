"""mamba-ssm's own `Mamba` block (mamba_ssm.modules.mamba_simple) on mvpp's selective scan.

The block is constructed with `use_fast_path=False` (the fused `mamba_inner_fn` needs CUDA and
causal-conv1d). The baseline is the same block with its scan replaced by mamba-ssm's own
`selective_scan_ref` (the pure-torch reference mamba-ssm tests its CUDA kernel against), and, for
decoding, `Mamba.step` with mamba-ssm's torch fallback (its Triton `selective_state_update` set aside).
On a CPU-only mamba-ssm install (no `selective_scan_cuda`) the module is imported through
`import_mamba_simple()`, which is part of what is tested here.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("einops")
if __import__("importlib").util.find_spec("mamba_ssm") is None:
    pytest.skip("mamba-ssm is not installed (scripts/setup.sh installs it without its CUDA build)",
                allow_module_level=True)

from mvpp_kernels.integrations import UntestedClientVersionError, patch_mamba_ssm, use_mvpp_in_mamba_ssm  # noqa: E402
from mvpp_kernels.integrations import mamba_ssm as integ  # noqa: E402
from mvpp_kernels.testing import assert_close  # noqa: E402

from integration_helpers import rel_err, require_backend  # noqa: E402

ms = integ.import_mamba_simple()
selective_scan_ref = __import__("mamba_ssm.ops.selective_scan_interface", fromlist=["x"]).selective_scan_ref

D_MODEL = 16


def make_block(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    block = ms.Mamba(d_model=D_MODEL, d_state=8, d_conv=4, expand=2, use_fast_path=False, layer_idx=0, **kw)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        block.A_log.add_(0.3 * torch.randn(block.A_log.shape, generator=g))
        block.D.add_(0.5 * torch.randn(block.D.shape, generator=g))
    return block.to(dtype)


def inputs(batch=2, L=45, seed=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, L, D_MODEL, generator=g).to(dtype)


def fwd_bwd(block, x):
    block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = block(x)
    g = torch.Generator().manual_seed(99)
    (y.float() * torch.randn(y.shape, generator=g)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in block.named_parameters()}
    grads["x"] = x.grad.detach().clone()
    return y.detach(), grads


@pytest.fixture
def mamba_ref_scan(monkeypatch):
    """The block's scan set to mamba-ssm's selective_scan_ref (what its own tests treat as the truth)."""
    monkeypatch.setattr(ms, "selective_scan_fn", selective_scan_ref)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_block_forward_and_gradients_vs_selective_scan_ref(backend, mamba_ref_scan):
    require_backend(backend)
    block = make_block()
    x = inputs()
    y_ref, g_ref = fwd_bwd(block, x)
    with use_mvpp_in_mamba_ssm(backend=backend) as h:
        y, g = fwd_bwd(block, x)
    assert h.calls["selective_scan_fn"] == 1
    assert ms.selective_scan_fn is selective_scan_ref  # restored to what was there (the fixture's ref)
    assert_close(y, y_ref.double(), torch.float32, name="y")
    assert set(g) == set(g_ref)
    for name, gr in g_ref.items():
        assert_close(g[name], gr.double(), torch.float32, grad=True, name=f"d{name}")


@pytest.mark.triton
def test_block_on_triton_backend(mamba_ref_scan):
    require_backend("triton")
    block = make_block(seed=4)
    x = inputs(batch=1, L=21, seed=5)
    y_ref, g_ref = fwd_bwd(block, x)
    with use_mvpp_in_mamba_ssm(backend="triton"):
        y, g = fwd_bwd(block, x)
    assert_close(y, y_ref.double(), torch.float32, name="y")
    for name, gr in g_ref.items():
        assert_close(g[name], gr.double(), torch.float32, grad=True, name=f"d{name}")


def test_step_decoding_vs_mamba_fallback_and_full_forward(monkeypatch, mamba_ref_scan):
    """Mamba.step token by token: patched (our state update) vs mamba-ssm's torch fallback, and both
    against the block's full-sequence forward."""
    block = make_block(seed=6)
    x = inputs(batch=2, L=11, seed=7)
    with torch.no_grad():
        full = block(x)

    def decode():
        conv_state, ssm_state = block.allocate_inference_cache(x.shape[0], x.shape[1])
        outs = []
        for t in range(x.shape[1]):
            y, conv_state, ssm_state = block.step(x[:, t:t + 1], conv_state, ssm_state)
            outs.append(y)
        return torch.cat(outs, 1), ssm_state

    with torch.no_grad():
        monkeypatch.setattr(ms, "selective_state_update", None)  # mamba-ssm's torch fallback in step()
        y_fallback, s_fallback = decode()
        monkeypatch.undo()
        with use_mvpp_in_mamba_ssm(backend="cpu") as h:
            y_ours, s_ours = decode()
    assert h.calls["selective_state_update"] == x.shape[1]
    assert_close(y_ours, y_fallback.double(), torch.float32, name="step outputs")
    assert_close(s_ours, s_fallback.double(), torch.float32, name="ssm_state")
    assert_close(y_ours, full.double(), torch.float32, name="step vs full forward", scale=2.0)


def test_bfloat16_block(mamba_ref_scan):
    """bf16 block: ours at most 2x the error of mamba-ssm's selective_scan_ref run on the same bf16 block,
    both against the float32 block."""
    block32 = make_block(seed=8)
    block16 = copy.deepcopy(block32).to(torch.bfloat16)
    x = inputs(batch=2, L=40, seed=9)
    with torch.no_grad():
        ref32 = block32(x).double()
        theirs = block16(x.bfloat16())
        with use_mvpp_in_mamba_ssm(backend="cpu"):
            ours = block16(x.bfloat16())
    assert ours.dtype == theirs.dtype == torch.bfloat16
    e_ours, e_theirs = rel_err(ours, ref32), rel_err(theirs, ref32)
    assert e_ours <= 2 * e_theirs + 1e-2, (e_ours, e_theirs)


def test_placeholder_cuda_module_errors_clearly():
    """On a CPU-only install mamba-ssm's own CUDA scan is a placeholder that says what to do."""
    ext = integ._MissingCudaExtension("selective_scan_cuda")
    with pytest.raises(RuntimeError, match="installed without its CUDA extension.*patch_mamba_ssm"):
        ext.fwd


def test_untested_version_is_refused(monkeypatch):
    monkeypatch.setattr(integ, "_installed_version", lambda: "1.2.0")
    with pytest.raises(UntestedClientVersionError, match=r"mamba-ssm 1\.2\.0 .*tested with mamba-ssm 2\.3"):
        patch_mamba_ssm()
    handle = patch_mamba_ssm(allow_untested=True)
    try:
        assert handle.active
    finally:
        handle.unpatch()
    assert not handle.active
