"""Hugging Face transformers' Mamba on mvpp's selective scan (mvpp_kernels.integrations.transformers_mamba).

Tiny random configs built locally (no weights downloaded). Every comparison is patched vs the same
model unpatched, i.e. transformers' own torch path (the Python loop over the sequence that every CPU
user runs), on the same weights and inputs, and the patch's call counter proves mvpp's op ran.
"""
from __future__ import annotations

import copy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
modeling_mamba = pytest.importorskip("transformers.models.mamba.modeling_mamba")

from mvpp_kernels.integrations import (  # noqa: E402
    UntestedClientVersionError,
    patch_transformers_mamba,
    use_mvpp_in_transformers_mamba,
)
from mvpp_kernels.testing import assert_close  # noqa: E402

from integration_helpers import rel_err, require_backend  # noqa: E402

VOCAB = 48


def tiny_model(seed: int = 0, dtype=torch.float32, **overrides):
    cfg = dict(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
               time_step_rank=4, use_cache=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(**cfg)).eval()
    with torch.no_grad():  # non-trivial A, D, dt bias (the default init makes some of them constant)
        g = torch.Generator().manual_seed(seed + 1)
        for layer in model.backbone.layers:
            mixer = layer.mixer
            mixer.A_log.add_(0.3 * torch.randn(mixer.A_log.shape, generator=g))
            mixer.D.add_(0.5 * torch.randn(mixer.D.shape, generator=g))
    return model.to(dtype)


def token_batch(batch=2, L=37, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, L), generator=g)


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_forward_loss_and_every_gradient(backend):
    require_backend(backend)
    model = tiny_model()
    ids = token_batch()
    logits0, loss0, grads0 = loss_and_grads(model, ids)
    with use_mvpp_in_transformers_mamba(backend=backend) as h:
        logits1, loss1, grads1 = loss_and_grads(model, ids)
    assert h.calls["mamba_selective_scan"] == model.config.num_hidden_layers
    assert set(grads1) == set(grads0) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert_close(logits1, logits0.double(), torch.float32, name="logits")
    assert_close(loss1, loss0.double(), torch.float32, name="loss")
    for name, g in grads0.items():
        assert_close(grads1[name], g.double(), torch.float32, grad=True, name=f"d{name}")


def test_mamba_model_hidden_states():
    """The bare MambaModel (no LM head), all hidden states."""
    lm = tiny_model(seed=5)
    model = lm.backbone
    ids = token_batch(batch=3, L=20, seed=6)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True, use_cache=False).hidden_states
        with use_mvpp_in_transformers_mamba(backend="cpu"):
            ours = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    assert len(ours) == len(ref) == lm.config.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert_close(a, b.double(), torch.float32, name=f"hidden_states[{i}]")


def test_generate_with_cache():
    """Greedy generate (prefill through the scan, then one cached state update per token): the same
    tokens and scores as transformers' own path."""
    model = tiny_model(seed=2)
    ids = token_batch(batch=2, L=9, seed=4)
    kw = dict(max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True,
              min_new_tokens=12)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        with use_mvpp_in_transformers_mamba(backend="cpu") as h:
            ours = model.generate(ids, **kw)
    assert h.calls["mamba_selective_scan"] >= model.config.num_hidden_layers  # the prefill
    assert h.calls["mamba_selective_state_update"] >= 11 * model.config.num_hidden_layers  # each new token
    assert torch.equal(ours.sequences, ref.sequences)
    for i, (a, b) in enumerate(zip(ours.scores, ref.scores)):
        assert_close(a, b.double(), torch.float32, name=f"scores[{i}]", scale=2.0)


def _cache_of(out):
    return out.cache if getattr(out, "cache", None) is not None else out.cache_params


def test_cached_step_matches_full_forward():
    """Decoding token by token with the cache (our state update) gives the logits of one full forward
    (our scan): the two halves of the integration agree with each other, not only with transformers."""
    model = tiny_model(seed=7)
    ids = token_batch(batch=2, L=14, seed=8)
    with torch.no_grad(), use_mvpp_in_transformers_mamba(backend="cpu"):
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :5], use_cache=True)
        steps = [out.logits]
        cache = _cache_of(out)
        for t in range(5, ids.shape[1]):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = _cache_of(out)
            steps.append(out.logits)
    assert_close(torch.cat(steps, 1), full.double(), torch.float32, name="stepwise logits", scale=2.0)


@pytest.mark.triton
def test_triton_backend_forward_and_grads():
    """The Triton kernel (under TRITON_INTERPRET=1 on CPU): a smaller model to keep the interpreter fast."""
    require_backend("triton")
    model = tiny_model(seed=9, hidden_size=16, state_size=4, num_hidden_layers=1)
    ids = token_batch(batch=1, L=19, seed=10)
    logits0, loss0, grads0 = loss_and_grads(model, ids)
    with use_mvpp_in_transformers_mamba(backend="triton") as h:
        logits1, loss1, grads1 = loss_and_grads(model, ids)
    assert h.calls["mamba_selective_scan"] == 1
    assert_close(logits1, logits0.double(), torch.float32, name="logits")
    for name, g in grads0.items():
        assert_close(grads1[name], g.double(), torch.float32, grad=True, name=f"d{name}")


def test_bfloat16():
    """bf16 weights and activations: both paths are compared against the float32 model; ours may be at
    most 2x transformers' own bf16 error (plus a bf16 ulp-sized floor)."""
    model32 = tiny_model(seed=11)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    ids = token_batch(batch=2, L=33, seed=12)
    with torch.no_grad():
        ref32 = model32(ids, use_cache=False).logits.double()
        stock = model16(ids, use_cache=False).logits
        with use_mvpp_in_transformers_mamba(backend="cpu") as h:
            ours = model16(ids, use_cache=False).logits
    assert h.calls["mamba_selective_scan"] == 2
    assert ours.dtype == stock.dtype and torch.isfinite(ours).all()
    e_ours, e_stock = rel_err(ours, ref32), rel_err(stock, ref32)
    assert e_ours <= 2 * e_stock + 1e-2, (e_ours, e_stock)


def test_patch_restores_and_nests():
    orig_scan = modeling_mamba.mamba_selective_scan
    orig_step = modeling_mamba.mamba_selective_state_update
    h1 = patch_transformers_mamba(backend="cpu")
    assert modeling_mamba.mamba_selective_scan is not orig_scan
    with use_mvpp_in_transformers_mamba(backend="reference"):
        assert modeling_mamba.mamba_selective_scan.__mvpp_backend__ == "reference"
    assert modeling_mamba.mamba_selective_scan.__mvpp_backend__ == "cpu"
    h1.unpatch()
    h1.unpatch()  # idempotent
    assert modeling_mamba.mamba_selective_scan is orig_scan
    assert modeling_mamba.mamba_selective_state_update is orig_step
    assert not h1.active and "undone" in repr(h1)


def test_context_manager_restores_on_error():
    orig = modeling_mamba.mamba_selective_scan
    with pytest.raises(ZeroDivisionError):
        with use_mvpp_in_transformers_mamba():
            1 / 0
    assert modeling_mamba.mamba_selective_scan is orig


def test_untested_version_is_refused(monkeypatch):
    # the live module object (transformers' lazy import machinery may have replaced the one imported above)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.39.3")
    with pytest.raises(UntestedClientVersionError, match=r"transformers 4\.39\.3 .*tested with transformers 5\.25"):
        patch_transformers_mamba()
    orig = modeling_mamba.mamba_selective_scan
    with use_mvpp_in_transformers_mamba(allow_untested=True) as h:
        assert h.active and modeling_mamba.mamba_selective_scan is not orig
    assert modeling_mamba.mamba_selective_scan is orig


def test_complex_A_and_unknown_kwargs_are_refused():
    with use_mvpp_in_transformers_mamba(backend="cpu"):
        scan = modeling_mamba.mamba_selective_scan
        u = torch.randn(1, 2, 5)
        A = -torch.rand(2, 3, dtype=torch.complex64)
        B = torch.randn(1, 3, 5)
        with pytest.raises(TypeError, match="complex A is not supported"):
            scan(u, u.abs(), A, B, B)
        with pytest.raises(TypeError, match="unsupported keyword argument.*new_flag"):
            scan(u, u.abs(), -torch.rand(2, 3), B, B, new_flag=True)
