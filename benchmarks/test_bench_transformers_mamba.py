"""transformers' `MambaModel` on CPU: the stock torch path (`torch_eager`) vs the same model patched onto
mvpp's selective scan (`mvpp_cpu`), forward and forward+backward.

    pytest benchmarks/test_bench_transformers_mamba.py --benchmark-only
With MVPP_BENCH_SMOKE=1 (a plain `pytest`) each case runs once on tiny shapes. The interleaved
one-command version that writes benchmarks/results/transformers_mamba.md is
`python benchmarks/transformers_mamba_bench.py`.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from benchmarks.conftest import smoke

transformers = pytest.importorskip("transformers")

from mvpp_kernels.integrations import use_mvpp_in_transformers_mamba  # noqa: E402


def _model_and_ids():
    if smoke():
        layers, hidden, state, vocab, L = 1, 32, 4, 64, 40
    else:  # mamba-130m-shaped layers at reduced depth
        layers, hidden, state, vocab, L = 2, 768, 16, 1024, 1024
    cfg = transformers.MambaConfig(vocab_size=vocab, hidden_size=hidden, state_size=state, num_hidden_layers=layers,
                                   expand=2, conv_kernel=4, time_step_rank=max(1, hidden // 16), use_cache=False,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.MambaModel(cfg)
    ids = torch.randint(3, vocab, (1, L), generator=torch.Generator().manual_seed(1))
    return model, ids, (1, L, hidden, layers)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["torch_eager", "mvpp_cpu"])
def test_bench_transformers_mamba(benchmark, provider, mode):
    model, ids, shape = _model_and_ids()
    ctx = (lambda: use_mvpp_in_transformers_mamba("cpu")) if provider == "mvpp_cpu" else contextlib.nullcontext
    benchmark.extra_info.update(op="transformers_MambaModel", provider=provider, mode=mode, dtype="float32",
                                shape=f"batch={shape[0]} L={shape[1]} hidden={shape[2]} layers={shape[3]}")
    if mode == "fwd":
        model.eval()

        def run():
            with ctx(), torch.no_grad():
                return model(ids).last_hidden_state
    else:
        model.train()

        def run():
            model.zero_grad(set_to_none=True)
            with ctx():
                model(ids).last_hidden_state.sum().backward()
            return model.layers[0].mixer.A_log.grad

    out = benchmark.pedantic(run, rounds=1 if smoke() else 3, iterations=1, warmup_rounds=0 if smoke() else 1)
    assert torch.isfinite(out).all()


def test_one_command_script_smoke(benchmark):
    """Keeps `benchmarks/transformers_mamba_bench.py` (the script behind the RESULTS.md rows) from rotting:
    its --smoke mode runs every row on tiny shapes, checks the patched op really ran, writes no file."""
    if not smoke():
        pytest.skip("the full script is run by hand: python benchmarks/transformers_mamba_bench.py")
    from benchmarks import transformers_mamba_bench

    benchmark.extra_info.update(op="transformers_MambaModel_script", provider="smoke")
    assert benchmark.pedantic(lambda: transformers_mamba_bench.main(["--smoke"]), rounds=1, iterations=1) == 0
