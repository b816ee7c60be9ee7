"""Property-based tests (hypothesis) for the products, the decompositions and the adapters: identities on random shapes,
dtypes and kinds; losses that never increase; exact methods at their SVD oracles; kinds, dtypes and shapes preserved;
adapter merge/unmerge/save/load/PEFT round trips. Each property runs a modest number of examples."""
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from transformers import PretrainedConfig
from torch import nn

import lowrank_tales as lt
from lowrank_tales.core import to_numpy, to_tensor
from lowrank_tales.kronecker import rearrange
from lowrank_tales.adapter_files import factor_tensors
from lowrank_tales.injection import adapter_layers

FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True, database=None)
SLOWER = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True, database=None)
dims = st.integers(1, 5)
kinds = st.sampled_from(["numpy", "torch"])
dtypes = st.sampled_from(["float32", "float64"])
seeds = st.integers(0, 2**16)


def make(shape, seed, kind="numpy", dtype="float64"):
    X = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    return torch.from_numpy(X) if kind == "torch" else X


def close(a, b, dtype):
    a, b = to_numpy(a).astype(float), to_numpy(b).astype(float)
    tol = 1e-4 if dtype == "float32" else 1e-10
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, np.abs(b).max(initial=0)))


# ---------------------------------------------------------------- products
@FAST
@given(p=dims, q=dims, r=dims, s=dims, t=dims, u=dims, kind=kinds, dtype=dtypes, seed=seeds)
def test_kron_mixed_product(p, q, r, s, t, u, kind, dtype, seed):
    B, C, D, E = (make(sh, seed + i, kind, dtype) for i, sh in enumerate([(p, q), (r, s), (q, t), (s, u)]))
    close(lt.kron(B, C) @ lt.kron(D, E), lt.kron(B @ D, C @ E), dtype)


@FAST
@given(p=dims, q=dims, r=dims, s=dims, kind=kinds, dtype=dtypes, seed=seeds)
def test_kron_transpose_and_vec_identity(p, q, r, s, kind, dtype, seed):
    B, C, X = make((p, q), seed, kind, dtype), make((r, s), seed + 1, kind, dtype), make((s, q), seed + 2, kind, dtype)
    close(lt.kron(B, C).T, lt.kron(B.T, C.T), dtype)
    vec = lambda M: M.T.reshape(-1)
    close(lt.kron_matvec(B, C, vec(X)), vec(C @ X @ B.T), dtype)


@FAST
@given(p=dims, r=dims, n=dims, kind=kinds, dtype=dtypes, seed=seeds)
def test_khatri_rao_gram_identity(p, r, n, kind, dtype, seed):
    B, C = make((p, n), seed, kind, dtype), make((r, n), seed + 1, kind, dtype)
    K = lt.khatri_rao(B, C)
    close(K.T @ K, (B.T @ B) * (C.T @ C), dtype)
    x = make((n,), seed + 2, kind, dtype)
    close(lt.khatri_rao_matvec([B, C], x), K @ x, dtype)
    y = make((p * r,), seed + 3, kind, dtype)
    close(lt.khatri_rao_rmatvec([B, C], y), K.T @ y, dtype)


@FAST
@given(m=dims, n=dims, k1=dims, k2=dims, kind=kinds, dtype=dtypes, seed=seeds)
def test_face_split_identity(m, n, k1, k2, kind, dtype, seed):
    W1, Z1, W2, Z2 = (make(sh, seed + i, kind, dtype) for i, sh in enumerate([(m, k1), (k1, n), (m, k2), (k2, n)]))
    close((W1 @ Z1) * (W2 @ Z2), lt.face_split(W1, W2) @ lt.khatri_rao(Z1, Z2), dtype)
    close(lt.face_split(W1, W2), lt.khatri_rao(W1.T, W2.T).T, dtype)


@FAST
@given(shape=st.tuples(dims, dims), dtype=dtypes, seed=seeds)
def test_numpy_torch_round_trip(shape, dtype, seed):
    X = make(shape, seed, "numpy", dtype)
    T = to_tensor(X)
    assert T.dtype == getattr(torch, dtype) and np.array_equal(to_numpy(T), X)
    assert np.array_equal(to_numpy(to_tensor(X.T)), X.T)  # non-contiguous views too


# ---------------------------------------------------------------- decompositions
def monotone(losses, slack=1e-9):
    return all(b <= a + slack * max(abs(a), 1.0) for a, b in zip(losses, losses[1:]))


@FAST
@given(m=st.integers(2, 8), n=st.integers(2, 8), seed=seeds, reg=st.sampled_from([0.0, 0.1, 1.0]),
       masked=st.booleans(), biases=st.booleans())
def test_als_loss_never_increases(m, n, seed, reg, masked, biases):
    A = make((m, n), seed)
    mask = np.random.default_rng(seed).random((m, n)) < 0.7 if masked else None
    if mask is not None and not mask.any(): mask[0, 0] = True
    f = lt.als(A, min(2, m, n), reg=reg, mask=mask, biases=biases, max_iter=15, init="random", seed=seed)
    assert monotone(f.losses), f.losses
    assert np.isfinite(f.approx()).all()


@SLOWER
@given(m=st.integers(3, 7), n=st.integers(3, 7), seed=seeds, masked=st.booleans(), reg=st.sampled_from([0.0, 0.1]))
def test_hadamard_loss_never_increases_without_momentum(m, n, seed, masked, reg):
    A = make((m, n), seed)
    mask = np.random.default_rng(seed).random((m, n)) < 0.8 if masked else None
    f = lt.hadamard_als(A, 2, mask=mask, momentum=0.0, max_iter=15, reg=reg, init="random", seed=seed)
    assert monotone(f.losses, 1e-7), f.losses


@SLOWER
@given(seed=seeds, m1=st.integers(1, 3), n1=st.integers(1, 3), terms=st.integers(1, 2))
def test_kronecker_masked_loss_never_increases(seed, m1, n1, terms):
    A = make((m1 * 3, n1 * 2), seed)
    mask = np.random.default_rng(seed).random(A.shape) < 0.75
    mask[0, 0] = True
    terms = min(terms, m1 * n1, 6)
    f = lt.kronecker_als(A, (m1, n1), terms=terms, mask=mask, max_iter=15, reg=1e-3)
    assert monotone(f.losses, 1e-7), f.losses


@SLOWER
@given(seed=seeds, dims_=st.sampled_from([(2, 3), (3, 2), (2, 2, 2)]), n=st.integers(1, 5))
def test_khatri_rao_masked_loss_never_increases(seed, dims_, n):
    A = make((math.prod(dims_), n), seed)
    mask = np.random.default_rng(seed).random(A.shape) < 0.75
    mask[0, 0] = True
    f = lt.khatri_rao_als(A, dims_, mask=mask, max_iter=15)
    assert monotone(f.losses, 1e-7), f.losses


@FAST
@given(m=st.integers(3, 9), n=st.integers(3, 9), k=st.integers(1, 3), seed=seeds, kind=kinds)
def test_als_reaches_the_truncated_svd(m, n, k, seed, kind):
    k = min(k, m - 1, n - 1)
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, m))); V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = 2.0 ** -np.arange(min(m, n))  # a spectral gap of 2 between consecutive singular values
    A = (U[:, :len(s)] * s) @ V[:, :len(s)].T
    f = lt.als(torch.from_numpy(A) if kind == "torch" else A, k, max_iter=300, tol=0, seed=seed)
    best = math.sqrt((s[k:] ** 2).sum() / (s ** 2).sum())
    assert abs(f.rel_error - best) <= 1e-6 * max(best, 1e-3), (f.rel_error, best)


@FAST
@given(m1=st.integers(1, 3), n1=st.integers(1, 3), m2=st.integers(1, 3), n2=st.integers(1, 3), seed=seeds, kind=kinds, dtype=dtypes)
def test_kronecker_svd_hits_van_loan_oracle(m1, n1, m2, n2, seed, kind, dtype):
    A = make((m1 * m2, n1 * n2), seed, kind, dtype)
    terms = 1
    f = lt.kronecker_als(A, (m1, n1), terms=terms)
    s = np.linalg.svd(to_numpy(rearrange(to_tensor(A).double(), (m1, n1))), compute_uv=False)
    best = math.sqrt((s[terms:] ** 2).sum() / (s ** 2).sum())
    assert abs(f.rel_error - best) <= (1e-4 if dtype == "float32" else 1e-9)


@FAST
@given(d1=st.integers(1, 4), d2=st.integers(1, 4), n=st.integers(1, 5), seed=seeds, kind=kinds, dtype=dtypes)
def test_khatri_rao_svd_hits_rank_one_oracle(d1, d2, n, seed, kind, dtype):
    A = make((d1 * d2, n), seed, kind, dtype)
    f = lt.khatri_rao_als(A, (d1, d2))
    An = to_numpy(A).astype(float)
    tail = sum((np.linalg.svd(An[:, j].reshape(d1, d2), compute_uv=False)[1:] ** 2).sum() for j in range(n))
    best = math.sqrt(tail / (An ** 2).sum())
    assert abs(f.rel_error - best) <= (1e-4 if dtype == "float32" else 1e-9)


FITS = {"als": lambda A: lt.als(A, 2, max_iter=5), "als_masked": lambda A: lt.als(A, 2, mask=np.ones(tuple(A.shape), bool), max_iter=5),
        "hadamard": lambda A: lt.hadamard_als(A, 2, max_iter=5), "kronecker": lambda A: lt.kronecker_als(A, (2, 2)),
        "khatri_rao": lambda A: lt.khatri_rao_als(A, (2, 3))}


@FAST
@given(name=st.sampled_from(sorted(FITS)), kind=kinds, dtype=dtypes, seed=seeds, transposed=st.booleans())
def test_reconstruction_kind_dtype_shape(name, kind, dtype, seed, transposed):
    A = make((8, 6), seed, kind, dtype).T if transposed else make((6, 8), seed, kind, dtype)
    f = FITS[name](A)
    X = f.approx()
    assert type(X) is type(A) and X.dtype == A.dtype and tuple(X.shape) == (6, 8)
    assert all(type(F) is type(A) and F.dtype == A.dtype for F in f.factors)
    assert np.isfinite(to_numpy(X)).all()


@FAST
@given(name=st.sampled_from(["kronecker", "khatri_rao", "als"]), seed=seeds)
def test_numpy_and_torch_inputs_agree(name, seed):
    A = make((6, 8), seed)
    a, b = FITS[name](A), FITS[name](torch.from_numpy(A))
    close(b.approx(), a.approx(), "float32")  # same algorithm; only the library differs


# ---------------------------------------------------------------- inputs are never modified
def snapshot(x):
    "A deep, exact copy of `x` (numpy, masked, torch or scipy.sparse) to compare with afterwards."
    if isinstance(x, np.ma.MaskedArray): return ("ma", x.data.copy(), np.ma.getmaskarray(x).copy())
    if isinstance(x, np.ndarray): return ("np", x.copy(), x.strides)
    if isinstance(x, torch.Tensor): return ("torch", x.clone(), x.layout)
    import scipy.sparse
    if scipy.sparse.issparse(x): return ("sp", x.format, x.copy(), {k: getattr(x, k).copy() for k in ("data", "row", "col", "indices", "indptr") if hasattr(x, k)})
    return ("other", x)


def same(x, snap) -> bool:
    kind = snap[0]
    if kind == "ma": return np.array_equal(x.data, snap[1], equal_nan=True) and np.array_equal(np.ma.getmaskarray(x), snap[2])
    if kind == "np": return np.array_equal(x, snap[1], equal_nan=True) and x.strides == snap[2]
    if kind == "torch": return x.layout == snap[2] and bool(torch.equal(x.to_dense() if x.is_sparse else x, snap[1].to_dense() if snap[1].is_sparse else snap[1]))
    if kind == "sp": return x.format == snap[1] and all(np.array_equal(getattr(x, k), v) for k, v in snap[3].items())
    return True


def as_kind(X, kind, mask=None):
    "X as numpy, torch, a numpy masked array (hiding ~mask), or scipy COO with duplicates (the stored entries)."
    import scipy.sparse
    if kind == "torch": return torch.from_numpy(X.copy())
    if kind == "masked": return np.ma.masked_array(X.copy(), mask=~mask)
    if kind == "scipy":
        r, c = np.nonzero(mask)
        return scipy.sparse.coo_array((np.r_[X[r, c], 1.0], (np.r_[r, r[:1]], np.r_[c, c[:1]])), shape=X.shape)  # a duplicate
    return X.copy()


CALLS = {  # name: (call, kinds it accepts; functions without a mask refuse a masked array with masked entries)
    "lt.als": (lambda A, m: lt.als(A, 2, max_iter=3), ("numpy", "torch", "masked", "scipy")),
    "lt.als (mask)": (lambda A, m: lt.als(A, 2, mask=m, max_iter=3, biases=True), ("numpy", "torch")),
    "lt.dense_als": (lambda A, m: lt.dense_als(A, 2, max_iter=3), ("numpy", "torch")),
    "lt.hadamard_als": (lambda A, m: lt.hadamard_als(A, 2, max_iter=3), ("numpy", "torch", "masked")),
    "lt.hadamard_als (mask)": (lambda A, m: lt.hadamard_als(A, 2, mask=m, max_iter=3), ("numpy", "torch")),
    "lt.kronecker_als": (lambda A, m: lt.kronecker_als(A, (2, 2)), ("numpy", "torch", "masked")),
    "lt.kronecker_als (mask)": (lambda A, m: lt.kronecker_als(A, (2, 2), mask=m, max_iter=3), ("numpy", "torch")),
    "lt.khatri_rao_als": (lambda A, m: lt.khatri_rao_als(A, (2, 3)), ("numpy", "torch", "masked")),
    "lt.khatri_rao_als (widths, mask)": (lambda A, m: lt.khatri_rao_als(A, (2, 3), widths=[(2, 2), (2, 2)], mask=m, max_iter=3),
                                         ("numpy", "torch")),
    "lt.nearest_kronecker": (lambda A, m: lt.nearest_kronecker(A, (2, 2)), ("numpy", "torch")),
    "lt.kron": (lambda A, m: lt.kron(A, A), ("numpy", "torch")),
    "lt.khatri_rao": (lambda A, m: lt.khatri_rao(A, A, A), ("numpy", "torch")),
    "lt.face_split": (lambda A, m: lt.face_split(A, A), ("numpy", "torch")),
    "lt.partition_khatri_rao": (lambda A, m: lt.partition_khatri_rao([A], [A]), ("numpy", "torch")),
    "lt.kron_matvec": (lambda A, m: lt.kron_matvec(A[:2, :2], A[:2, :2], A[:4]), ("numpy", "torch")),
    "lt.khatri_rao_matvec": (lambda A, m: lt.khatri_rao_matvec([A, A], A.T), ("numpy", "torch")),
    "lt.khatri_rao_rmatvec": (lambda A, m: lt.khatri_rao_rmatvec([A[:, :3], A[:, :3]], lt.kron(A, A)[:, :2]), ("numpy", "torch")),
    "lt.matrix_rank": (lambda A, m: lt.matrix_rank(A), ("numpy", "torch")),
    "lt.kruskal_rank": (lambda A, m: lt.kruskal_rank(A), ("numpy", "torch")),
}


@pytest.mark.parametrize("name", sorted(CALLS))
@FAST
@given(kind=st.sampled_from(["numpy", "torch", "masked", "scipy"]), seed=seeds, transposed=st.booleans())
def test_inputs_are_never_modified(name, kind, seed, transposed):
    call, accepted = CALLS[name]
    if kind not in accepted: kind = "numpy"
    X = make((8, 6), seed).T.copy() if transposed else make((6, 8), seed)
    mask = np.random.default_rng(seed).random(X.shape) < 0.8
    mask[:, 0] = mask[0] = True
    A = as_kind(X, kind, mask)
    M = torch.from_numpy(mask.copy()) if kind == "torch" else mask.copy()
    before, before_mask = snapshot(A), snapshot(M)
    call(A, M)
    assert same(A, before), (name, kind)
    assert same(M, before_mask), (name, kind, "mask")


# ---------------------------------------------------------------- adapters
def model_for(layer: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if layer == "conv": return nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1))
    return nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6))


def inputs_for(layer: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 5, 5, generator=g) if layer == "conv" else torch.randn(3, 12, generator=g)


METHOD_KW = {"lora": dict(rank=2, alpha=4.0), "loha": dict(rank=2, alpha=4.0), "lokr": dict(rank=2), "lokh": dict(p=2)}


def randomized(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapter_layers(model).values():
            for f in a.factors: f.copy_(0.2 * torch.randn(f.shape, generator=g, dtype=f.dtype))
    return model


def adapted(method, layer, seed):
    return lt.inject(model_for(layer, seed), method, targets=["0", "2"], **METHOD_KW[method])


methods = st.sampled_from(sorted(METHOD_KW))
layers = st.sampled_from(["linear", "conv"])


@FAST
@given(method=methods, layer=layers, seed=seeds)
def test_zero_update_at_initialisation(method, layer, seed):
    base, x = model_for(layer, seed), inputs_for(layer, seed)
    m = adapted(method, layer, seed)
    torch.testing.assert_close(m(x), base(x), rtol=0, atol=1e-6)
    assert all(float(a.delta_weight().abs().max()) == 0 for a in adapter_layers(m).values())


@FAST
@given(method=methods, layer=layers, seed=seeds)
def test_merge_matches_unmerged_and_unmerge_is_exact(method, layer, seed):
    m, x = randomized(adapted(method, layer, seed), seed), inputs_for(layer, seed)
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    y = m(x)
    lt.merge(m)
    torch.testing.assert_close(m(x), y, rtol=1e-4, atol=1e-5)
    lt.unmerge(m)
    assert all(torch.equal(v, weights[k]) for k, v in m.state_dict().items())
    assert torch.equal(m(x), y)


@SLOWER
@given(method=methods, layer=layers, seed=seeds)
def test_save_load_round_trip_is_identical(method, layer, seed):
    m, x = randomized(adapted(method, layer, seed), seed), inputs_for(layer, seed)
    with tempfile.TemporaryDirectory() as d:
        lt.save_adapter(m, Path(d))
        back = lt.load_adapter(model_for(layer, seed), Path(d))
    assert all(torch.equal(p, factor_tensors(m)[k]) for k, p in factor_tensors(back).items())
    assert torch.equal(back(x), m(x))


@SLOWER
@given(method=st.sampled_from(["lora", "loha", "lokr"]), layer=layers, seed=seeds)
def test_peft_export_import_is_identical(method, layer, seed):
    m, x = randomized(adapted(method, layer, seed), seed), inputs_for(layer, seed)
    with tempfile.TemporaryDirectory() as d:
        lt.export_peft(m, Path(d))
        back = lt.import_peft(model_for(layer, seed), Path(d))
    assert all(torch.equal(p, factor_tensors(m)[k]) for k, p in factor_tensors(back).items())
    assert torch.equal(back(x), m(x))


# ---------------------------------------------------------------- a failing call changes nothing
def full_state(model: nn.Module):
    """What a failed call must leave as it was: module types, requires_grad, every tensor's bits, active and merged
    names, and the model's `config` (a Hugging Face model's, as JSON)."""
    config = getattr(model, "config", None)
    return ([(n, type(m)) for n, m in model.named_modules()], [(n, p.requires_grad) for n, p in model.named_parameters()],
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, list(getattr(m, "active", [])), list(getattr(m, "merged", []))) for n, m in model.named_modules()],
            None if config is None else config.to_json_string())


def same_bits(x, y) -> bool:
    "Bit-identical tensors (a NaN equals itself)."
    return x.shape == y.shape and x.dtype == y.dtype and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))


def same_full(a, b) -> bool:
    return a[0] == b[0] and a[1] == b[1] and a[3] == b[3] and a[4] == b[4] and a[2].keys() == b[2].keys() and \
        all(same_bits(a[2][k], b[2][k]) for k in a[2])


def _nan_in_last(m):
    with torch.no_grad(): adapter_layers(m)["2"].updates["default"].factors[-1].view(-1)[0] = float("nan")


def _wide_folder(d):
    wide = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))
    return lt.save_adapter(randomized(lt.inject(wide, "lora", targets=["0", "2"], rank=2), 0), Path(d) / "wide")


def _cut_folder(m, d):
    src = lt.save_adapter(randomized(lt.inject(model_for("linear", 0), "loha", targets=["0", "2"], rank=2), 0), Path(d) / "cut")
    data = (src / "adapter.safetensors").read_bytes()
    (src / "adapter.safetensors").write_bytes(data[: len(data) * 2 // 3])
    return src


FAILING = {  # name → (prepare(model) or None, call(model, folder)); every call below must fail on the prepared model
    "inject: a rank too large for the last layer": (None, lambda m, d: lt.inject(m, "lora", targets=["0", "2"], name="x", rank=np.int64(7))),
    "inject: an unknown target": (None, lambda m, d: lt.inject(m, "lokr", targets=["0", "nope"], name="x")),
    "inject: a layer the method cannot take": (None, lambda m, d: lt.inject(m, "loha", targets=["0", "1"], name="x")),
    "inject: modules_to_save on an adapted layer": (None, lambda m, d: lt.inject(m, "lora", targets=["0"], name="x", modules_to_save=["0"])),
    "inject: rslora for a method without it": (None, lambda m, d: lt.inject(m, "loha", targets=["0"], name="x", rslora=True)),
    "merge: a non-finite factor in the last layer": (_nan_in_last, lambda m, d: lt.merge(m)),
    "merge_and_unload: a non-finite factor": (_nan_in_last, lambda m, d: lt.merge_and_unload(m)),
    "merge: twice": (lt.merge, lambda m, d: lt.merge(m)),
    "unmerge: nothing merged": (None, lambda m, d: lt.unmerge(m)),
    "set_adapter: an unknown name": (None, lambda m, d: lt.set_adapter(m, ["default", "nope"])),
    "delete_adapter: an unknown name": (None, lambda m, d: lt.delete_adapter(m, "nope")),
    "delete_adapter: a merged adapter": (lt.merge, lambda m, d: lt.delete_adapter(m, "default")),
    "load_adapter: another architecture": (None, lambda m, d: lt.load_adapter(m, _wide_folder(d), name="x")),
    "load_adapter: a truncated file": (None, lambda m, d: lt.load_adapter(m, _cut_folder(m, d), name="x")),
    "import_peft: not a PEFT folder": (None, lambda m, d: lt.import_peft(m, _wide_folder(d), name="x")),
    "extract_adapters: a budget too small": (None, lambda m, d: lt.extract_adapters(m, model_for("linear", 9), "lora", targets=["0", "2"], budget=3)),
    "init_from_weight: a rank too large": (None, lambda m, d: lt.init_from_weight(m, "lora", targets=["0", "2"], rank=7)),
    "compress: an unknown structure": (None, lambda m, d: lt.compress(m, "tucker", targets=["0"])),
}


def randomized_all(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapter_layers(model).values():
            for u in a.updates.values():
                for f in u.factors: f.copy_(0.2 * torch.randn(f.shape, generator=g, dtype=f.dtype))
    return model


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True, database=None)
@given(case=st.sampled_from(sorted(FAILING)), method=methods, seed=seeds, second=st.booleans())
def test_a_failing_call_leaves_the_model_bit_identical(case, method, seed, second):
    "Random failing calls on randomly trained models (one adapter, or two named ones): each raises, nothing changes."
    m = randomized(adapted(method, "linear", seed), seed)
    m.config = PretrainedConfig(tie_word_embeddings=False, note=f"seed {seed}")  # a config, as a Hugging Face model has
    if second:
        lt.inject(m, "lora", targets=["2"], name="second", rank=2)
        lt.set_adapter(m, ["default", "second"])
        randomized_all(m, seed + 1)
    prepare, call = FAILING[case]
    if prepare is not None: prepare(m)
    before = full_state(m)
    with tempfile.TemporaryDirectory() as d:
        with pytest.raises((ValueError, TypeError)): call(m, d)
    assert same_full(before, full_state(m)), case
