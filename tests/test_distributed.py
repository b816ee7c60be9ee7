"""Data-parallel training of adapted models and distributed ALS in real process groups: two processes on loopback
(gloo), started by `lowrank_tales.distributed.launch` with a hard deadline, against single-process runs."""
import numpy as np
import pytest
import scipy.sparse
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from lowrank_tales.completion import als
from lowrank_tales.distributed import (adapter_ddp, all_reduce_sum, distributed_als, launch, shard_batch, shard_loader,
                                       world)
from lowrank_tales.adapter_files import factor_tensors
from lowrank_tales.injection import inject

TIMEOUT = 60  # seconds; every launch is killed past this, so a broken collective cannot hang the suite


# ---------------------------------------------------------------- adapted models under DDP

def train_mlp(method="lora", steps=12, batch_size=16, inject_rank=2):
    "An injected MLP trained with Adam in float64: plain in one process, wrapped by `adapter_ddp` under a group."
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 4)).double()
    options = dict(p=2) if method == "lokh" else dict(rank=inject_rank)
    inject(model, method, targets=["0", "2"], **options)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(96, 6, generator=g, dtype=torch.float64)
    y = torch.tanh(X @ torch.randn(6, 4, generator=g, dtype=torch.float64))
    net = adapter_ddp(model) if world()[1] > 1 else model
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=0.03)
    done, epoch = 0, 0
    while done < steps:
        for xb, yb in shard_loader(TensorDataset(X, y), batch_size, seed=0, epoch=epoch):
            loss = ((net(xb) - yb) ** 2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
            done += 1
            if done == steps: break
        epoch += 1
    return {k: v.detach().clone() for k, v in factor_tensors(model).items()}


def train_tiny_bert(steps=4, batch_size=8):
    "LoRA on the attention of a 2-layer BERT built from a config (no download), dropout off, float64."
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertModel(cfg).double()
    inject(model, "lora", targets=["query", "value"], rank=2, alpha=4)
    ids = torch.randint(0, 50, (32, 8), generator=torch.Generator().manual_seed(1))
    target = torch.randn(32, 8, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    net = adapter_ddp(model) if world()[1] > 1 else model
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for _, (x, t) in zip(range(steps), shard_loader(TensorDataset(ids, target), batch_size, seed=0)):
        loss = ((net(input_ids=x).last_hidden_state - t) ** 2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    return {k: v.detach().clone() for k, v in factor_tensors(model).items()}


def assert_same_factors(single, ranks, tol):
    for r, factors in enumerate(ranks):
        assert factors.keys() == single.keys()
        for k in single:
            assert torch.allclose(factors[k], single[k], rtol=0, atol=tol), (r, k, (factors[k] - single[k]).abs().max())
    for k in single: assert torch.equal(ranks[0][k], ranks[1][k]), k  # the ranks agree bit for bit


@pytest.mark.parametrize("method", ["lora", "lokh"])
def test_ddp_two_ranks_equal_single_process(method):
    single = train_mlp(method)
    assert any(v.abs().max() > 0 for k, v in single.items() if k.endswith("B") or method != "lora")  # it did train
    assert_same_factors(single, launch(train_mlp, 2, method, timeout=TIMEOUT, echo=False), 1e-12)


def test_ddp_tiny_bert_two_ranks_equal_single_process():
    pytest.importorskip("transformers")
    single = train_tiny_bert()
    assert_same_factors(single, launch(train_tiny_bert, 2, timeout=TIMEOUT, echo=False), 1e-10)


def mismatched_adapters():
    return train_mlp(inject_rank=2 + world()[0], steps=1)


def test_ddp_mismatched_adapters_across_ranks_fail_clearly():
    with pytest.raises(RuntimeError, match="trainable parameters .* must be the same on every rank"):
        launch(mismatched_adapters, 2, timeout=TIMEOUT, echo=False)


def test_adapter_ddp_needs_a_process_group_and_adapters():
    with pytest.raises(RuntimeError, match="adapter_ddp needs an initialised process group"):
        adapter_ddp(inject(nn.Sequential(nn.Linear(4, 4)), "lora", targets=["0"], rank=2))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        adapter_ddp(None)


def no_adapters():
    return adapter_ddp(nn.Linear(3, 3))


def test_adapter_ddp_without_adapters():
    with pytest.raises(RuntimeError, match="model has no adapters: call lt.inject"):
        launch(no_adapters, 2, timeout=TIMEOUT, echo=False)


def test_shard_batch_and_loader_single_process():
    X = torch.arange(20.0)[:, None]
    assert torch.equal(torch.cat([shard_batch(X, r, 4) for r in range(4)]), X)
    with pytest.raises(ValueError, match="does not split evenly over world_size 3"):
        shard_batch(X, 0, 3)
    with pytest.raises(ValueError, match="batch_size 9 must be a multiple of world_size 2"):
        shard_loader(TensorDataset(X), 9, rank=0, world_size=2)


# ---------------------------------------------------------------- launch itself

def raises_on_rank_1():
    if world()[0] == 1: raise KeyError("only rank 1 is unhappy")
    dist.barrier()


def sleeps():
    import time
    time.sleep(120)


def sums_ranks():
    return all_reduce_sum(np.array([world()[0] + 1.0]))[0][0], world()


def test_launch_results_errors_and_deadline():
    assert launch(sums_ranks, 2, timeout=TIMEOUT, echo=False) == [(3.0, (0, 2)), (3.0, (1, 2))]
    with pytest.raises(RuntimeError, match="only rank 1 is unhappy"):
        launch(raises_on_rank_1, 2, timeout=TIMEOUT, echo=False)
    import time
    t = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish before the timeout"):
        launch(sleeps, 2, timeout=3, echo=False)
    assert time.monotonic() - t < 20


# ---------------------------------------------------------------- distributed ALS

def problem(seed=0, M=60, N=45, K=4, density=0.4):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((M, K)) @ rng.standard_normal((K, N)) + 0.1 * rng.standard_normal((M, N))
    mask = rng.random((M, N)) < density
    mask[:, 7] = False  # an empty column
    rows, cols = np.nonzero(mask)
    return rows, cols, A[rows, cols], (M, N), K


def als_on_shard(rows, cols, vals, owner, K, **options):
    mine = owner == world()[0]
    return distributed_als((rows[mine], cols[mine], vals[mine]), K, **options)


@pytest.mark.parametrize("split,init,weighted", [("random", "svd", False), ("rows", "random", True),
                                                 ("one-rank-empty", "svd", True)])
def test_distributed_als_two_ranks_equal_single_process(split, init, weighted):
    rows, cols, vals, shape, K = problem()
    owner = {"random": np.random.default_rng(1).integers(0, 2, len(vals)), "rows": rows % 2,
             "one-rank-empty": np.zeros(len(vals), int)}[split]
    S = scipy.sparse.csr_array((vals, (rows, cols)), shape=shape)
    ref = als(S, K, reg=0.1, weighted_reg=weighted, init=init, seed=4, max_iter=20, tol=0)
    f0, f1 = launch(als_on_shard, 2, rows, cols, vals, owner, K, shape=shape, reg=0.1, weighted_reg=weighted, init=init,
                    seed=4, max_iter=20, tol=0, timeout=TIMEOUT, echo=False)
    for i in (0, 1):
        np.testing.assert_allclose(f0.factors[i], ref.factors[i], rtol=0, atol=1e-10)
        np.testing.assert_array_equal(f0.factors[i], f1.factors[i])
    np.testing.assert_allclose(f0.losses, ref.losses, rtol=1e-10)
    assert f0.n_iter == ref.n_iter == 20 and abs(f0.rel_error - ref.rel_error) < 1e-9


def test_distributed_als_stops_like_als_and_infers_the_shape():
    rows, cols, vals, shape, K = problem(seed=3)
    owner = np.random.default_rng(0).integers(0, 2, len(vals))
    ref = als(scipy.sparse.csr_array((vals, (rows, cols)), shape=shape), K, reg=0.01, weighted_reg=False, seed=0,
              max_iter=100, tol=1e-3)
    f0, _ = launch(als_on_shard, 2, rows, cols, vals, owner, K, reg=0.01, weighted_reg=False, seed=0, max_iter=100,
                   tol=1e-3, timeout=TIMEOUT, echo=False)
    assert f0.n_iter == ref.n_iter < 100
    assert f0.factors[0].shape == (shape[0], K) and f0.factors[1].shape == (K, shape[1])
    np.testing.assert_allclose(f0.factors[0], ref.factors[0], rtol=0, atol=1e-9)


def test_distributed_als_defaults_are_als_completion_defaults():
    "At every default two ranks give `als`'s completion fit: the noise-edge ridge from global sums, the 1 % rule."
    rows, cols, vals, shape, K = problem(seed=5)
    owner = np.random.default_rng(2).integers(0, 2, len(vals))
    ref = als(scipy.sparse.csr_array((vals, (rows, cols)), shape=shape), K, seed=1)
    f0, f1 = launch(als_on_shard, 2, rows, cols, vals, owner, K, shape=shape, seed=1, timeout=TIMEOUT, echo=False)
    assert f0.n_iter == ref.n_iter < 100 and f0.converged
    for i in (0, 1):
        np.testing.assert_allclose(f0.factors[i], ref.factors[i], rtol=0, atol=1e-10)
        np.testing.assert_array_equal(f0.factors[i], f1.factors[i])
    np.testing.assert_allclose(f0.losses, ref.losses, rtol=1e-10)
    # ... and the default is the ridge itself: the same fit with it passed explicitly (weighted, as Spark's regParam)
    edge = vals.std() * (np.sqrt(shape[0]) + np.sqrt(shape[1])) / np.sqrt(len(vals)) / 3
    np.testing.assert_allclose(distributed_als((rows, cols, vals), K, shape=shape, reg=edge, seed=1).losses, ref.losses,
                               rtol=1e-10)


def shard_with_other_shape(rows, cols, vals, owner, K):
    mine = owner == world()[0]
    return distributed_als((rows[mine], cols[mine], vals[mine]), K, shape=(60 + world()[0], 45))


def test_distributed_als_mismatched_shapes_across_ranks_fail_clearly():
    rows, cols, vals, shape, K = problem()
    owner = rows % 2
    with pytest.raises(RuntimeError, match=r"the arguments of distributed_als must be the same on every rank.*\(61, 45\)"):
        launch(shard_with_other_shape, 2, rows, cols, vals, owner, K, timeout=TIMEOUT, echo=False)


def test_distributed_als_single_process_bad_input():
    rows, cols, vals, shape, K = problem()
    with pytest.raises(ValueError, match="ratings' values contains 1 NaN"):
        distributed_als((rows, cols, np.where(np.arange(len(vals)) == 3, np.nan, vals)), K)
    with pytest.raises(ValueError, match="ratings' row ids must be non-negative"):
        distributed_als((rows - 1, cols, vals), K)
    with pytest.raises(ValueError, match="ratings must have 3 columns"):
        distributed_als(np.column_stack([rows, cols]), K)
    with pytest.raises(ValueError, match="duplicated"):
        distributed_als((np.r_[rows, rows[:1]], np.r_[cols, cols[:1]], np.r_[vals, vals[:1]]), K)
