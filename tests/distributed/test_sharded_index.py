"""ShardedIndex over 2 and 3 gloo ranks spawned on loopback, against one exact_search /
HierarchicalIndex over the union (same seeded data, built in this process).

Each world size runs all of its checks in ONE spawned job (module-scoped fixture), so a process
group is started once per world size; every spawn has bounded timeouts (process-group init and
collectives 60 s, the whole job 150 s, then the ranks are killed)."""
import os

import pytest
import torch

import dist_helpers as H
from mvpp_kernels import HierarchicalIndex, exact_search
from mvpp_kernels.distributed import MANIFEST_NAME, ShardedIndex, spawn_ranks
from mvpp_kernels.ops.exact_search import normalize_rows
from mvpp_kernels.ops.exact_search.reference import pad_topk

HERE = os.path.dirname(os.path.abspath(__file__))
N = 23  # items in the exact bank: not a multiple of 2 or 3, so shards are uneven


def _spawn(fn, world, *args):
    return spawn_ranks(fn, world, *args, timeout_s=150, pg_timeout_s=60, path=HERE)


_JOBS = {}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """One spawned job per world size, started on first use and shared by the module's tests."""
    def get(world):
        if world not in _JOBS:
            d = tmp_path_factory.mktemp(f"w{world}")
            exact_dir, hier_dir = str(d / "exact"), (str(d / "hier") if world == 2 else "")
            _JOBS[world] = (world, _spawn(H.all_checks, world, N, exact_dir, hier_dir), exact_dir, hier_dir)
        return _JOBS[world]
    yield get
    _JOBS.clear()


@pytest.fixture(params=[2, 3])
def job(request, jobs):
    return jobs(request.param)


def _eq(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, w.dtype, g.shape, w.shape)
        assert torch.equal(g, w), (g, w)


def _close(got, want, keys, q, metric):
    """For scores that are not exactly representable: exact_search's own CPU GEMM rounds a score
    differently (last ulp) depending on where the key sits in the bank, so compare the scores to
    1e-5 and, where the ids differ, require the two ids' float64 scores to be within 1e-5 (a
    near-tie ordered by rounding, not a wrong neighbour)."""
    (gs, gi), (ws, wi) = got, want
    assert gs.shape == ws.shape and gi.dtype == wi.dtype == torch.int64
    assert torch.allclose(gs, ws, rtol=0, atol=1e-5)
    k64, q64 = keys.double(), q.double()
    if metric == "cosine":
        k64, q64 = normalize_rows(k64), normalize_rows(q64)
    diff = gi != wi
    rows = torch.arange(gi.shape[0])[:, None].expand_as(gi)[diff]
    true_g = (q64[rows] * k64[gi[diff]]).sum(-1)
    true_w = (q64[rows] * k64[wi[diff]]).sum(-1)
    assert torch.allclose(true_g, true_w, rtol=0, atol=1e-5)
    return int(diff.sum())


def test_exact_equals_union(job):
    world, outs, _, _ = job
    n_exact = 0
    for r, out in enumerate(outs):
        assert out["world"] == world and out["rank"] == r
        for mi, mode in enumerate(H.MODES):
            keys, values = H.data(1 + mi, N, mode)
            q = H.queries_of(1 + mi, r, mode)
            ex = H.exclude_of(r, q.shape[0], N)
            q99 = H.queries_of(99, 0, mode)
            for metric in ("ip", "cosine"):
                cmp = _eq if H.exact_case(mode, metric) else (lambda g, w, qq: _close(g, w, keys, qq, metric))
                n_exact += H.exact_case(mode, metric)
                assert out[("n_local", mode, metric)] == len(range(r, N, world))
                for name, qq, kwargs in (("plain", q, dict(k=H.K)), ("exclude", q, dict(k=H.K, exclude=ex)),
                                         ("k=n", q, dict(k=N)), ("replicated", q99, dict(k=H.K))):
                    want = exact_search(keys, qq, metric=metric, **kwargs)
                    if H.exact_case(mode, metric):
                        _eq(out[(name, mode, metric)], want)
                    else:
                        _close(out[(name, mode, metric)], want, keys, qq, metric)
                s, i, rk, rv, found = out[("rows", mode, metric)]
                want = exact_search(keys, q, H.K, metric=metric, exclude=ex)
                if H.exact_case(mode, metric):
                    _eq((s, i), want)
                else:
                    _close((s, i), want, keys, q, metric)
                kk = normalize_rows(keys) if metric == "cosine" else keys
                assert found.all()
                assert torch.equal(rk, kk[i]) and torch.equal(rv, values[i])
                # excluded ids never come back
                assert not (i == ex[:, None]).any()
        keys, _ = H.data(3, N, "dyadic", dtype=torch.float64)
        _eq(out["f64"], exact_search(keys, H.queries_of(3, r, "dyadic", dtype=torch.float64), H.K, metric="ip"))
    assert n_exact == 3 * world


def test_ties_broken_by_global_id(job):
    """The tie data has many equal scores: the merged lists must be (score desc, id asc)."""
    _, outs, _, _ = job
    for out in outs:
        for metric in ("ip", "cosine"):
            s, i = out[("k=n", "ties", metric)]
            same = s[:, 1:] == s[:, :-1]
            assert same.sum() > 10, "the tie data must produce ties"
            assert bool((i[:, 1:] > i[:, :-1])[same].all())


def test_update_routes_to_owner(job):
    world, outs, _, _ = job
    keys, values = H.data(4, N, "ties")
    news = [H.data(40 + r, r + 1, "ties") for r in range(world)]
    union_k = torch.cat([keys] + [k for k, _ in news])
    union_v = torch.cat([values] + [v for _, v in news])
    rep_k, _ = H.data(50, 4, "ties")
    total = union_k.shape[0]
    start = N
    for r, out in enumerate(outs):
        assert torch.equal(out["update_ids"], torch.arange(start, start + r + 1))
        start += r + 1
        assert out["update_next_id"] == total
        assert out["update_n_local"] == len(range(r, total, world))
        s, i, rk, rv, found = out["update_search"]
        _eq((s, i), exact_search(union_k, news[r][0], H.K, metric="cosine"))
        assert torch.equal(rv, union_v[i]) and torch.equal(rk, normalize_rows(union_k)[i])
        assert torch.equal(out["update_rep_ids"], torch.arange(total, total + 4))
        _eq(out["update_rep_search"], exact_search(torch.cat([union_k, rep_k]), H.queries_of(5, r, "ties"),
                                                   H.K, metric="cosine"))
    # the new items are found by the next search: each new item's query returns it
    start = N
    for r, out in enumerate(outs):
        ids = out["update_search"][1]
        assert all(start + j in ids[j].tolist() for j in range(r + 1))
        start += r + 1


def test_empty_shards(job):
    world, outs, _, _ = job
    ek, _ = H.data(6, world - 1, "dyadic")
    for r, out in enumerate(outs):
        assert out["empty_n_local"] == (0 if r == world - 1 else 1)
        q = H.queries_of(6, r, "dyadic")
        want = pad_topk(*exact_search(ek, q, world - 1, metric="ip"), 3)
        _eq(out["empty_search"], want)
        assert (out["empty_search"][1][:, world - 1:] == -1).all()
        hs, hi = out["empty_hier_search"]
        ws, wi = pad_topk(*exact_search(ek, q, world - 1, metric="cosine"), 3)
        assert torch.equal(hi, wi) and torch.allclose(hs, ws, atol=1e-6)
        zs, zi = out["zero_queries"]
        assert zs.shape == ((0, 1) if r == world - 1 else (2, 1))
        if r != world - 1:
            _eq((zs, zi), exact_search(ek, q[:2], 1, metric="ip"))


def test_save_load_round_trip(job):
    world, outs, exact_dir, _ = job
    files = sorted(os.listdir(exact_dir))
    assert files == sorted([MANIFEST_NAME] + [f"shard-{r:05d}-of-{world:05d}.safetensors" for r in range(world)])
    for out in outs:
        assert out["loaded_next_id"] == out["update_next_id"] + 4
        assert out["loaded_n_local"] == out["update_n_local"] + len(
            [g for g in range(out["update_next_id"], out["update_next_id"] + 4) if g % world == out["rank"]])
    keys, _ = H.data(4, N, "ties")
    news = [H.data(40 + r, r + 1, "ties")[0] for r in range(world)]
    union = torch.cat([keys] + news + [H.data(50, 4, "ties")[0]])
    for r, out in enumerate(outs):
        _eq(out["loaded_search"], exact_search(union, H.queries_of(5, r, "ties"), H.K, metric="cosine"))
    # a different world size is refused with both sizes named (this process has no process group)
    with pytest.raises(ValueError, match=f"saved with world size {world} but this process group has world size 1"):
        ShardedIndex.load(exact_dir)


def test_hierarchical_recall_matches_one_index(jobs):
    """2 shards (the 2-rank job), 1200 clustered points (24 Gaussian centres, d = 16), 120 queries,
    branching (4, 4) per shard and for the one index, nprobe (1, 2) per shard and for the one index."""
    world, outs, _, hier_dir = jobs(2)
    h = H.HIER
    keys, queries = H.clustered(7, h["n"], h["d"]), H.clustered(8, h["q"], h["d"])
    _, truth = exact_search(keys, queries, h["k"], metric="cosine")
    one = HierarchicalIndex.build(keys, branching=h["branching"], metric="cosine", knn=16, seed=0)
    _, one_ids = one.search(queries, h["k"], nprobe=h["nprobe"])

    def recall(ids):
        return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, truth)) / truth.numel()

    r_one = recall(one_ids)
    for out in outs:
        hs = out["hier"]
        r_sh = recall(hs["search"][1])
        assert r_sh >= r_one - 0.01, (r_sh, r_one)
        assert r_one < 1.0  # the probes are narrow enough that recall is a real measurement
        # every cluster probed: exactly the exact top-10 ids
        assert torch.equal(hs["full"][1], truth)
        # updated items are found (each new item's nearest neighbour is itself)
        assert torch.equal(hs["update_ids"], torch.arange(h["n"], h["n"] + 30))
        assert torch.equal(hs["after_update"][1][:, 0], torch.arange(h["n"], h["n"] + 6))
        _eq(hs["loaded"], hs["saved"])
    print(f"recall@10 one index {r_one:.4f}, sharded over {world} {recall(outs[0]['hier']['search'][1]):.4f}")


def test_rank_that_raises_is_reported():
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 failed in raise_on_last(.|\n)*deliberate failure"):
        spawn_ranks(H.raise_on_last, 2, timeout_s=90, pg_timeout_s=60, path=HERE)


def test_without_process_group_is_one_shard(tmp_path):
    keys, values = H.data(11, 17)
    q = H.queries_of(11, 0)
    bank = ShardedIndex.build(keys, values, kind="exact", metric="cosine")
    assert bank.world == 1 and bank.n_local == 17
    _eq(bank.search(q, 4), exact_search(keys, q, 4, metric="cosine"))
    new, nv = H.data(12, 3)
    assert torch.equal(bank.update(new, nv), torch.arange(17, 20))
    _eq(bank.search(q, 4), exact_search(torch.cat([keys, new]), q, 4, metric="cosine"))
    bank.save(tmp_path)
    _eq(ShardedIndex.load(tmp_path).search(q, 4), bank.search(q, 4))


def test_bad_input():
    keys, _ = H.data(1, 10, "dyadic")
    bank = ShardedIndex.build(keys, kind="exact", metric="ip")
    with pytest.raises(ValueError, match="kind must be one of"):
        ShardedIndex.build(keys, kind="flat")
    with pytest.raises(ValueError, match="queries must have d = 8"):
        bank.search(torch.zeros(2, 3), 1)
    with pytest.raises(ValueError, match="k must be a positive int"):
        bank.search(torch.zeros(2, 8), 0)
    with pytest.raises(TypeError, match="exclude must be an integer"):
        bank.search(torch.zeros(2, 8), 1, exclude=torch.zeros(2))
    with pytest.raises(FileNotFoundError, match="missing manifest.json"):
        ShardedIndex.load("/nonexistent-mvpp-bank")


def test_model_bank_sharded_equals_single_process(jobs):
    """TopologyMemoryBank(hierarchical=False) under 2 gloo ranks (shard="auto" picks ShardedIndex)
    returns exactly the single-process forward (rep, agg, ids) for each rank's batch, and the same
    query gradient."""
    _, outs, _, _ = jobs(2)
    for r, out in enumerate(outs):
        mo = out["model"]
        assert mo["auto_sharded"] is True
        assert mo["n_local"] == 20
        keys, values, content, exclude = H.model_inputs(r)
        single = H.memory_module(False, "auto")
        single.build(keys, values)
        assert single.sharded is None  # no process group here: the unchanged single-process path
        with torch.no_grad():
            want = single(content, exclude=exclude)
        for name in ("rep", "agg", "ids"):
            assert torch.equal(mo["flat"][name], want[name]), name
        c = content.clone().requires_grad_(True)
        single(c, exclude=exclude)["rep"].sum().backward()
        assert torch.allclose(mo["flat_grad"], c.grad, rtol=0, atol=1e-6)
        assert tuple(mo["empty_batch"]) == ((0, 4) if r == 1 else (2, 4))
        assert mo["hier_ids"].shape == (content.shape[0], 4) and (mo["hier_ids"] >= 0).all()
        assert torch.equal(mo["hier_update_ids"], torch.arange(40, 45)) and mo["hier_size"] == 45


def test_fewer_items_than_ranks():
    outs = _spawn(H.fewer_items_than_ranks, 3)
    nk, _ = H.data(61, 1, "dyadic")
    for r, (ids, ids0, n_local, got) in enumerate(outs):
        assert torch.equal(ids, torch.tensor([0])) and ids0.numel() == 0
        assert n_local == (1 if r == 0 else 0)
        _eq(got, pad_topk(*exact_search(nk, nk, 1, metric="ip"), 2))
