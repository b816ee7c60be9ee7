"""The one dtype policy (`lowrank_tales.core.compute_dtype`) holds for every public function of Part I: data of any
dtype, numpy or torch, is either refused before anything runs, with a `TypeError` naming the argument, or computed in
exactly the dtype the policy names, giving what the same call gives on the data converted to that dtype first, in a
new array (never a view of the input)."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import lowrank_tales as lt
from lowrank_tales.core import compute_dtype, to_numpy

PROPERTY = settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True,
                    database=None)

NUMPY = ["bool", "int8", "uint8", "int16", "int32", "int64", "uint64", "float16", "float32", "float64", ">f4", ">f8",
         ">i8", "complex64", "longdouble", "object", "<U1", "datetime64[s]"]
TORCH = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64", "complex64"]
KINDS = [("numpy", d) for d in NUMPY] + [("torch", d) for d in TORCH]


def data(kind: str, dtype: str, seed: int, shape=(6, 8)):
    "Small integers (0/1 for booleans) of `shape` in `dtype`: exactly representable in every dtype tested."
    rng = np.random.default_rng(seed)
    X = rng.random(shape) < 0.7 if dtype == "bool" else rng.integers(1, 5, shape)
    if kind == "torch": return torch.from_numpy(np.asarray(X)).to(getattr(torch, dtype))
    if dtype == "<U1": return X.astype(str)
    if dtype.startswith("datetime"): return X.astype(dtype)
    return X.astype(np.dtype(dtype))


def convert(X, target):
    "`X` converted to `target` by the caller, the oracle's input."
    return X.to(target) if isinstance(X, torch.Tensor) else X.astype(target)


# name: (argument named in errors, keep_half, call on one data matrix A (6, 8) whose operands all share A's dtype)
FUNCTIONS = {
    "kron": ("B", True, lambda A: lt.kron(A[:2, :3], A[:3, :2])),
    "khatri_rao": ("M1", True, lambda A: lt.khatri_rao(A, A[:3])),
    "face_split": ("M1", True, lambda A: lt.face_split(A, A[:, :3])),
    "khatri_rao (one factor)": ("M1", True, lambda A: lt.khatri_rao(A)),
    "face_split (one factor)": ("M1", True, lambda A: lt.face_split(A)),
    "partition_khatri_rao": ("Bs[0]", True, lambda A: lt.partition_khatri_rao([A[:2, :2], A[:2, 2:3]],
                                                                               [A[2:5, :1], A[2:5, 1:3]])),
    "kron_apply": ("A", True, lambda A: lt.kron_apply(A[:2, :2], A[2:5, :2], A[:5, :4])),
    "kron_matvec": ("B", True, lambda A: lt.kron_matvec(A[:2, :2], A[2:5, :2], A[:4, :3])),
    "khatri_rao_matvec": ("M1", True, lambda A: lt.khatri_rao_matvec([A[:2], A[2:5]], A.T[:, :2])),
    "khatri_rao_rmatvec": ("M1", True, lambda A: lt.khatri_rao_rmatvec([A[:2], A[2:5]], A[:, :2])),
    "matrix_rank": ("A", True, lambda A: lt.matrix_rank(A)),
    "kruskal_rank": ("M", True, lambda A: lt.kruskal_rank(A[:, :5])),
    "rearrange": ("A", True, lambda A: lt.rearrange(A, (2, 2))),
    "unrearrange": ("R", True, lambda A: lt.unrearrange(A, (2, 3), (2, 4))),
    "kron_sum": ("Bs", True, lambda A: lt.kron_sum(A[:2, :4].reshape(2, 2, 2), A[2:4, :6].reshape(2, 3, 2))),
    "nearest_kronecker": ("A", False, lambda A: lt.nearest_kronecker(A, (2, 2))),
    "kronecker_als": ("A", False, lambda A: lt.kronecker_als(A, (2, 2)).factors),
    "dense_als": ("A", False, lambda A: lt.dense_als(A, 2, seed=0, max_iter=5).factors),
    "als": ("A", False, lambda A: lt.als(A, 2, seed=0, max_iter=5).factors),
    "als (mask)": ("A", False, lambda A: lt.als(A, 2, mask=np.arange(48).reshape(6, 8) % 5 > 0, seed=0,
                                                max_iter=5).factors),
    "hadamard_als": ("A", False, lambda A: lt.hadamard_als(A, 2, seed=0, max_iter=5).factors),
    "khatri_rao_als": ("A", False, lambda A: lt.khatri_rao_als(A, (2, 3)).factors),
    "nearest_partition_khatri_rao": ("A", False, lambda A: lt.nearest_partition_khatri_rao(A, (2, 3), [(2, 4)])),
}


def arrays(result) -> list:
    "The arrays and tensors in a result (nested tuples and lists), or the result itself (a rank)."
    if isinstance(result, (tuple, list)): return [a for r in result for a in arrays(r)]
    return [result]


@pytest.mark.parametrize("kind_dtype", KINDS, ids=[f"{k}-{d}" for k, d in KINDS])
@pytest.mark.parametrize("name", list(FUNCTIONS))
@given(seed=st.integers(0, 2 ** 16))
@PROPERTY
def test_one_dtype_policy(name, kind_dtype, seed):
    arg, keep_half, call = FUNCTIONS[name]
    X = data(*kind_dtype, seed)
    try: target = compute_dtype(X.dtype, arg, keep_half)
    except TypeError as refusal:
        with pytest.raises(TypeError) as e: call(X)
        assert str(e.value).startswith(arg + " "), f"{name} refused {X.dtype} naming something else: {e.value}"
        assert str(X.dtype).lstrip("<>=|") in str(e.value), str(e.value)
        assert str(e.value) == str(refusal), "one message for one refusal"
        return
    got, want = arrays(call(X)), arrays(call(convert(X, target)))
    for g, w in zip(got, want, strict=True):
        if isinstance(g, int): assert g == w; continue
        assert type(g) is type(X) and g.dtype == target, f"{name}: {X.dtype} gave {g.dtype}, the policy says {target}"
        np.testing.assert_array_equal(to_numpy(g.float() if g.dtype == torch.bfloat16 else g),
                                      to_numpy(w.float() if w.dtype == torch.bfloat16 else w))
        if g.dtype != torch.bfloat16 and X.dtype != torch.bfloat16:  # numpy has no bfloat16 view to compare
            assert not np.shares_memory(to_numpy(g), to_numpy(X)), f"{name}: the result aliases the input"


def test_policy_is_the_same_for_numpy_and_torch():
    for dtype in ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"]:
        for keep_half in (False, True):
            try: n = compute_dtype(np.dtype(dtype), "A", keep_half)
            except TypeError as e: n = type(e)
            try: t = compute_dtype(getattr(torch, dtype), "A", keep_half)
            except TypeError as e: t = type(e)
            assert n == t or str(n) == str(t).removeprefix("torch."), (dtype, n, t)
