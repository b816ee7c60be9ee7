"""The reliability catalogue and its fixtures: every public function against wrong, empty, non-finite and extreme
inputs, and saved adapter files against damage.

This is test code, not library code: `test_reliability_catalogue.py` and `test_reliability_files.py` import it, and the
reliability chapter (nbs/13_reliability.ipynb) imports it from this folder, runs it and shows what it found."""
from __future__ import annotations
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse
import torch
from torch import nn

from lowrank_tales import (Factorization, als, as_triplets, dense_als, distributed_als, export_peft, extract_adapter,
                           face_split, hadamard_als, import_peft, inject, khatri_rao, khatri_rao_als, khatri_rao_matvec,
                           kron, kron_matvec, kron_sum, kronecker_als, kruskal_rank, load_adapter, matrix_rank, merge,
                           nearest_kronecker, nearest_partition_khatri_rao, partition_khatri_rao, predict, rearrange,
                           save_adapter, set_adapter, shard_batch, trainable_parameters, unmerge)
from lowrank_tales.core import to_numpy
from lowrank_tales.injection import adapter_layers as adapters


@dataclass
class Misuse:
    "One way to call a public function wrongly (or unusually), and what must happen."
    function: str  # the public function, as users write it (`lt.als`)
    misuse: str  # what is wrong with the call
    call: Callable  # a function of no arguments that commits the misuse
    error: type | None  # the exception type expected, or None: the call must succeed with a finite result
    contains: str = ""  # a fragment the error message must contain

def finite(result) -> bool:
    "Whether every number in `result` (a Factorization, array, tensor, module output, or a tuple of them) is finite."
    if isinstance(result, Factorization):
        return finite(result.approx()) and all(math.isfinite(l) for l in result.losses)
    if isinstance(result, (tuple, list)): return all(finite(r) for r in result)
    if isinstance(result, (np.ndarray, torch.Tensor)):
        dense = result.to_dense() if isinstance(result, torch.Tensor) and result.is_sparse else result
        return bool(np.isfinite(to_numpy(dense)).all())
    return True

def check_misuse(m: Misuse) -> dict:
    "Run one misuse; a record of the exception type and message received, and whether they are as expected."
    try: result, got, message = m.call(), None, ""
    except Exception as e: result, got, message = None, type(e), str(e)
    if m.error is None: ok = got is None and finite(result)
    else: ok = got is not None and issubclass(got, m.error) and m.contains in message
    expected = "accepted (finite result)" if m.error is None else f"{m.error.__name__}: …{m.contains}…"
    if got is None: received = "accepted, finite" if finite(result) else "accepted, NOT finite"
    else: received = f"{got.__name__}: {message}"
    return dict(function=m.function, misuse=m.misuse, expected=expected, received=received, ok=ok)

def small_model(seed: int = 0) -> nn.Module:
    "A small MLP (8 → 6 → 4) with a fixed seed."
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))

def trained(method: str = "lora", seed: int = 1, **kw) -> nn.Module:
    "A small model with a `method` adapter on both linear layers and random (nonzero) factors."
    model = inject(small_model(), method, targets=["0", "2"], **({"rank": 2} if method != "lokh" else {}) | kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters(model).values():
            for f in a.factors: f.copy_(0.3 * torch.randn(f.shape, generator=gen, dtype=f.dtype))
    return model

def state(model: nn.Module) -> dict:
    "A detached copy of every parameter and buffer, and the names of the adapter modules."
    return dict(tensors={k: v.detach().clone() for k, v in model.state_dict().items()},
                adapters=sorted(adapters(model)))

def same_state(a: dict, b: dict) -> bool:
    "Whether two `state` snapshots are identical, bit for bit."
    return a["adapters"] == b["adapters"] and a["tensors"].keys() == b["tensors"].keys() and \
        all(torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"])

def unchanged_after(make_model: Callable, load: Callable, path) -> Callable:
    "A call of `load(make_model(), path)`; if it raises, the model must be unchanged (else `AssertionError`)."
    def call():
        model = make_model()
        before = state(model)
        try: return load(model, path)
        except Exception:
            if not same_state(before, state(model)):
                raise AssertionError(f"{load.__name__} failed but changed the model") from None
            raise
    return call

_FIXTURES: dict = {}

def fixture_folder() -> Path:
    "A per-session temporary folder with a saved LoRA, LoHA, LoKH (`lora/`, `loha/`, `lokh/`) and PEFT LoRA (`peft/`)."
    if "dir" not in _FIXTURES:
        d = Path(tempfile.mkdtemp(prefix="lowrank_tales_reliability_"))
        for method in ("lora", "loha"): save_adapter(trained(method), d / method)
        save_adapter(trained("lokh", p=2), d / "lokh")
        export_peft(trained("lora"), d / "peft")
        _FIXTURES["dir"] = d
    return _FIXTURES["dir"]

def damaged(name: str, edit: Callable) -> Path:
    "A fresh copy of the fixture folder `name` with `edit(folder)` applied."
    src = fixture_folder() / name
    dst = Path(tempfile.mkdtemp(prefix=f"damaged_{name}_", dir=fixture_folder()))
    shutil.copytree(src, dst, dirs_exist_ok=True)
    edit(dst)
    return dst

def truncate(file: str, keep: float) -> Callable:
    "An edit that cuts `file` to the fraction `keep` of its bytes."
    def edit(d: Path): data = (d / file).read_bytes(); (d / file).write_bytes(data[:int(len(data) * keep)])
    return edit

def flip_byte(file: str, at: float) -> Callable:
    "An edit that inverts the bits of one byte of `file`, at the fraction `at` of its length."
    def edit(d: Path):
        data = bytearray((d / file).read_bytes()); i = min(int(len(data) * at), len(data) - 1); data[i] ^= 0xFF
        (d / file).write_bytes(bytes(data))
    return edit

def _data(seed: int = 0, shape=(6, 8)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)

def _with(A, i, j, v):
    A = A.copy(); A[i, j] = v; return A

def product_misuses() -> list[Misuse]:
    "Misuses of the products."
    A = _data()
    return [
        Misuse("lt.kron", "a numpy array with a torch tensor", lambda: kron(A, torch.tensor(A)), TypeError,
               "operands must be all numpy arrays or all torch tensors"),
        Misuse("lt.kron", "a 1-D operand", lambda: kron(A[0], A), ValueError,
               "B must have 2 dimensions, got ndarray of shape (8,)"),
        Misuse("lt.kron", "a string operand", lambda: kron("abc", A), TypeError, "B must hold real numbers"),
        Misuse("lt.kron", "complex operands", lambda: kron(A + 1j, A), TypeError, "B must hold real numbers"),
        Misuse("lt.kron", "integer operands", lambda: kron(np.eye(2, dtype=int), np.ones((2, 2), int)), None),
        Misuse("lt.kron", "empty operands", lambda: kron(np.zeros((0, 3)), A), None),
        Misuse("lt.khatri_rao", "no factors", lambda: khatri_rao(), ValueError, "khatri_rao needs at least one factor"),
        Misuse("lt.khatri_rao", "factors with different column counts", lambda: khatri_rao(A, A[:, :5]), ValueError,
               "every factor must have the same number of columns"),
        Misuse("lt.khatri_rao", "transposed and non-contiguous torch factors",
               lambda: khatri_rao(torch.tensor(A).T, torch.tensor(A)[:, ::2].T), None),
        Misuse("lt.face_split", "factors with different row counts", lambda: face_split(A, A[:5]), ValueError,
               "every factor must have the same number of rows"),
        Misuse("lt.partition_khatri_rao", "lists of different lengths", lambda: partition_khatri_rao([A], []),
               ValueError, "Bs and Cs must be lists with the same number"),
        Misuse("lt.partition_khatri_rao", "arrays instead of lists", lambda: partition_khatri_rao(A, A), ValueError,
               "Bs and Cs must be lists"),
        Misuse("lt.kron_matvec", "X with the wrong number of rows", lambda: kron_matvec(A, A, np.ones(5)), ValueError,
               "X must have cols(B)·cols(C) = 8·8 = 64 rows"),
        Misuse("lt.khatri_rao_matvec", "X with the wrong number of rows", lambda: khatri_rao_matvec([A, A], np.ones(5)),
               ValueError, "X must have N = 8 rows"),
        Misuse("lt.matrix_rank", "a negative tolerance", lambda: matrix_rank(A, tol=-1), ValueError,
               "tol must be a finite number >= 0"),
        Misuse("lt.kruskal_rank", "a generic 16×32 matrix (C(32, 16) column subsets)",
               lambda: kruskal_rank(np.random.default_rng(0).standard_normal((16, 32))), ValueError,
               "more than max_subsets=100,000: the Kruskal rank of M is at least 4"),
        Misuse("lt.kruskal_rank", "a 6×8 matrix (a few hundred subsets)", lambda: kruskal_rank(A), None),
    ]

def decomposition_misuses() -> list[Misuse]:
    "The same wrong inputs against every decomposition, then each one's own arguments."
    A, out = _data(), []
    fits = {"lt.als": lambda X, **k: als(X, 2, **k),
            "lt.hadamard_als": lambda X, **k: hadamard_als(X, 2, max_iter=10, **k),
            "lt.kronecker_als": lambda X, **k: kronecker_als(X, (2, 2), **k),
            "lt.khatri_rao_als": lambda X, **k: khatri_rao_als(X, (2, 3), **k)}
    empty_row = np.ones(A.shape, bool); empty_row[0] = False
    empty_col = np.ones(A.shape, bool); empty_col[:, 0] = False
    for name, fit in fits.items():
        out += [
            Misuse(name, "A is a string", lambda fit=fit: fit("abc"), TypeError, "A must hold real numbers"),
            Misuse(name, "A is None", lambda fit=fit: fit(None), TypeError, "A must hold real numbers"),
            Misuse(name, "A is 1-D", lambda fit=fit: fit(A[0]), ValueError,
                   "A must have 2 dimensions, got ndarray of shape (8,)"),
            Misuse(name, "A is 3-D", lambda fit=fit: fit(A[None]), ValueError, "A must have 2 dimensions"),
            Misuse(name, "A is complex", lambda fit=fit: fit(A + 1j), TypeError, "A must hold real numbers"),
            Misuse(name, "A holds a NaN (no mask)", lambda fit=fit: fit(_with(A, 0, 0, np.nan)), ValueError,
                   "A contains 1 NaN or infinite entries; pass mask= to mark missing entries"),
            Misuse(name, "A holds an inf (no mask)", lambda fit=fit: fit(_with(A, 1, 2, np.inf)), ValueError,
                   "A contains 1 NaN or infinite entries"),
            Misuse(name, "A holds a NaN at an observed entry",
                   lambda fit=fit: fit(_with(A, 0, 0, np.nan), mask=np.ones(A.shape, bool)), ValueError,
                   "at observed entries"),
            Misuse(name, "A holds NaN only where the mask hides it",
                   lambda fit=fit: fit(_with(A, 0, 0, np.nan), mask=~np.isnan(_with(A, 0, 0, np.nan))), None),
            Misuse(name, "A has no rows", lambda fit=fit: fit(np.zeros((0, 8))), ValueError,
                   "A must have at least one row and one column, got shape (0, 8)"),
            Misuse(name, "A has no columns", lambda fit=fit: fit(np.zeros((6, 0))), ValueError,
                   "A must have at least one row and one column, got shape (6, 0)"),
            Misuse(name, "A is float16 (numpy)", lambda fit=fit: fit(A.astype(np.float16)), TypeError,
                   "A has dtype float16, but the decompositions compute in float32 or float64"),
            Misuse(name, "A is bfloat16 (torch)", lambda fit=fit: fit(torch.tensor(A, dtype=torch.bfloat16)), TypeError,
                   "A has dtype torch.bfloat16"),
            Misuse(name, "A holds integers (numpy)", lambda fit=fit: fit(np.arange(48).reshape(6, 8) % 7), None),
            Misuse(name, "A holds integers (torch)", lambda fit=fit: fit(torch.arange(48).reshape(6, 8) % 7), None),
            Misuse(name, "A is all zeros", lambda fit=fit: fit(np.zeros((6, 8))), None),
            Misuse(name, "A is Fortran-ordered (a transpose)", lambda fit=fit: fit(np.asfortranarray(A)), None),
            Misuse(name, "A is a strided view with negative strides", lambda fit=fit: fit(A[::-1, ::-1]), None),
            Misuse(name, "A is a non-contiguous torch tensor", lambda fit=fit: fit(torch.tensor(_data(1, (8, 6))).T),
                   None),
            Misuse(name, "A is float32 near overflow (1e30)", lambda fit=fit: fit((A * 1e30).astype(np.float32)), None),
            Misuse(name, "A is float32 near underflow (1e-30)", lambda fit=fit: fit((A * 1e-30).astype(np.float32)),
                   None),
            Misuse(name, "mask of the wrong shape", lambda fit=fit: fit(A, mask=np.ones((8, 6), bool)), ValueError,
                   "mask must have the shape of A, (6, 8), got (8, 6)"),
            Misuse(name, "mask holding values other than 0/1", lambda fit=fit: fit(A, mask=np.full(A.shape, 2)),
                   TypeError, "mask must be boolean or 0/1"),
            Misuse(name, "mask observing nothing", lambda fit=fit: fit(A, mask=np.zeros(A.shape, bool)), ValueError,
                   "mask observes no entry of A"),
            Misuse(name, "mask with an empty row", lambda fit=fit: fit(A, mask=empty_row), None),
            Misuse(name, "mask with an empty column", lambda fit=fit: fit(A, mask=empty_col), None),
            Misuse(name, "a scipy.sparse A", lambda fit=fit: fit(scipy.sparse.csr_matrix(A)),
                   *( (None,) if name == "lt.als" else (TypeError, "A is sparse (csr_matrix of shape (6, 8)"))),
            Misuse(name, "max_iter is negative",
                   lambda fit=fit, name=name: (fit(A, max_iter=-1) if name != "lt.hadamard_als"
                                               else hadamard_als(A, 2, max_iter=-1)),
                   ValueError, "max_iter must be at least 0, got -1"),
            Misuse(name, "max_iter is a float",
                   lambda fit=fit, name=name: (fit(A, max_iter=2.5) if name != "lt.hadamard_als"
                                               else hadamard_als(A, 2, max_iter=2.5)),
                   TypeError, "max_iter must be an integer, got 2.5"),
        ]
        out += [
            Misuse(name, "a numpy masked array (its mask marks the observed entries)",
                   lambda fit=fit: fit(np.ma.masked_invalid(_with(A, 0, 0, np.nan))), None),
            Misuse(name, "a meta tensor (a shape, no values)", lambda fit=fit: fit(torch.empty(6, 8, device="meta")),
                   ValueError, "A is a meta tensor (shape (6, 8), no values)"),
            Misuse(name, "tol is negative", lambda fit=fit: fit(A, tol=-1e-3), ValueError,
                   "tol must be a finite number >= 0, got -0.001"),
            Misuse(name, "tol of 1 or more", lambda fit=fit: fit(A, tol=1.0), ValueError,
                   "tol is a relative decrease of the loss and must be in [0, 1), got 1.0"),
            Misuse(name, "tol is a string", lambda fit=fit: fit(A, tol="small"), TypeError,
                   "tol must be a number, got 'small'"),
            Misuse(name, "a numpy Generator as seed, random start",
                   lambda fit=fit: fit(A, init="random", seed=np.random.default_rng(0)), None),
            Misuse(name, "a seed that is not an integer", lambda fit=fit: fit(A, init="random", seed="x"), TypeError,
                   "seed must be None, a nonnegative integer or a numpy Generator, got 'x'"),
            Misuse(name,
                   "A near 1e200 with a ridge (the approximation and rel_error finite; the loss itself is ~1e400)",
                   lambda fit=fit: (lambda f: (f.approx(), np.array([f.rel_error])))(fit(A * 1e200, reg=0.1)), None),
            Misuse(name, "reg is negative", lambda fit=fit: fit(A, reg=-1.0), ValueError,
                   "reg must be a finite number >= 0, got -1.0"),
            Misuse(name, "reg is NaN", lambda fit=fit: fit(A, reg=float("nan")), ValueError,
                   "reg must be a finite number >= 0, got nan"),
            Misuse(name, "reg is a string", lambda fit=fit: fit(A, reg="a"), TypeError,
                   "reg must be a number, got 'a'"),
        ]
    sp = scipy.sparse
    dup = sp.coo_matrix((np.array([1.0, 2.0, 3.0, 4.0]), (np.array([0, 0, 1, 2]), np.array([1, 1, 2, 0]))),
                        shape=(3, 4))
    tdup = torch.sparse_coo_tensor(torch.tensor([[0, 0, 1, 2], [1, 1, 2, 0]]), torch.tensor([1.0, 2.0, 3.0, 4.0]),
                                   (3, 4), check_invariants=True)
    out += [
        Misuse("lt.als", "rank 0", lambda: als(A, 0), ValueError,
               "rank must be between 1 and 6 (min(M, N) for A of shape (6, 8)), got 0"),
        Misuse("lt.als", "rank larger than min(M, N)", lambda: als(A, 7), ValueError, "rank must be between 1 and 6"),
        Misuse("lt.als", "rank as a float", lambda: als(A, 2.0), TypeError, "rank must be an integer, got 2.0"),
        Misuse("lt.als", "rank as a bool", lambda: als(A, True), TypeError, "rank must be an integer, got True"),
        Misuse("lt.als", "an unknown init", lambda: als(A, 2, init="pca"), ValueError,
               "init must be one of 'svd', 'random', got 'pca'"),
        Misuse("lt.als", "weighted_reg given as 'yes'", lambda: als(A, 2, weighted_reg="yes"), TypeError,
               "weighted_reg must be True, False or None, got 'yes'"),
        Misuse("lt.als", "options passed positionally", lambda: als(A, 2, 0.1), TypeError, "positional"),
        Misuse("lt.als", "a scipy COO A (left as it was: its duplicates are summed in a copy)",
               lambda: _coo_unchanged(), None),
        Misuse("lt.predict", "a negative row index",
               lambda: predict(als(A, 2, mask=A > 0), np.array([-1]), np.array([0])), IndexError,
               "rows must lie in [0, 6) (negative indices are not wrapped), got values from -1 to -1"),
        Misuse("lt.predict", "a column index past the end",
               lambda: predict(als(A, 2, mask=A > 0), np.array([0]), np.array([8])), IndexError,
               "cols must lie in [0, 8)"),
        Misuse("lt.predict", "float indices", lambda: predict(als(A, 2, mask=A > 0), np.array([0.0]), np.array([1])),
               TypeError, "rows must hold integer indices, got dtype float64"),
        Misuse("lt.als", "biases given as 1", lambda: als(A, 2, biases=1), TypeError,
               "biases must be True or False, got 1"),
        Misuse("lt.als", "a sparse A together with a mask",
               lambda: als(sp.csr_matrix(A), 2, mask=np.ones(A.shape, bool)), ValueError,
               "mask must be None when A is sparse"),
        Misuse("lt.als", "a sparse A that stores nothing", lambda: als(sp.csr_matrix((4, 5)), 2), ValueError,
               "A stores no entry"),
        Misuse("lt.als", "a sparse A storing NaN", lambda: als(sp.csr_matrix(np.where(np.eye(4, 5) > 0, np.nan, 0)), 2),
               ValueError, "NaN or infinite entries at observed entries"),
        Misuse("lt.als", "a scipy.sparse A with duplicate entries (summed, scipy's convention)",
               lambda: als(dup, 2, reg=0.1), None),
        Misuse("lt.als", "a torch sparse A with duplicate entries (summed, torch's convention)",
               lambda: als(tdup, 2, reg=0.1), None),
        Misuse("lt.als", "a torch sparse float16 A", lambda: als(torch.tensor(A).to_sparse().half(), 2), TypeError,
               "A has dtype torch.float16"),
        Misuse("lt.hadamard_als", "three ranks", lambda: hadamard_als(A, (1, 2, 3)), ValueError,
               "ranks must be an integer r or a pair (r1, r2), got (1, 2, 3)"),
        Misuse("lt.hadamard_als", "rank larger than min(M, N)", lambda: hadamard_als(A, 7), ValueError,
               "ranks must be between 1 and 6"),
        Misuse("lt.hadamard_als", "an unknown method", lambda: hadamard_als(A, 2, method="adam"), ValueError,
               "method must be one of 'als', 'gd', got 'adam'"),
        Misuse("lt.hadamard_als", "momentum of 1", lambda: hadamard_als(A, 2, momentum=1.0), ValueError,
               "momentum must be in [0, 1), got 1.0"),
        Misuse("lt.kronecker_als", "a shape that does not divide A's", lambda: kronecker_als(A, (4, 4)), ValueError,
               "shape (4, 4) must divide A's shape (6, 8) entry-wise"),
        Misuse("lt.kronecker_als", "a shape that is not a pair", lambda: kronecker_als(A, 2), TypeError,
               "shape must be B's shape, a pair (rows, cols) of integers, got 2"),
        Misuse("lt.kronecker_als", "a zero in the shape", lambda: kronecker_als(A, (0, 2)), ValueError,
               "shape entries must be at least 1, got 0"),
        Misuse("lt.kronecker_als", "more terms than the rearranged rank allows",
               lambda: kronecker_als(A, (2, 2), terms=5), ValueError, "terms must be between 1 and 4"),
        Misuse("lt.kronecker_als", "an unknown method", lambda: kronecker_als(A, (2, 2), method="qr"), ValueError,
               "method must be one of 'svd', 'als', 'randomized', got 'qr'"),
        Misuse("lt.khatri_rao_als", "dims whose product is not A's row count", lambda: khatri_rao_als(A, (4, 2)),
               ValueError, "dims (4, 2) multiply to 8, but A of shape (6, 8) has 6 rows"),
        Misuse("lt.khatri_rao_als", "dims as a single integer", lambda: khatri_rao_als(A, 6), TypeError,
               "dims must be a tuple of at least two row counts"),
        Misuse("lt.khatri_rao_als", "a zero in dims", lambda: khatri_rao_als(A, (0, 6)), ValueError,
               "dims entries must be at least 1, got 0"),
        Misuse("lt.khatri_rao_als", "an unknown method", lambda: khatri_rao_als(A, (2, 3), method="qr"), ValueError,
               "method must be one of 'svd', 'als', got 'qr'"),
        Misuse("lt.khatri_rao_als", "widths whose columns do not add up",
               lambda: khatri_rao_als(A, (2, 3), widths=[(2, 2)]), ValueError,
               "widths [(2, 2)] give 4 columns (Σ s_r·t_r), but A has 8"),
        Misuse("lt.hadamard_als", "restarts of 0", lambda: hadamard_als(A, 2, restarts=0), ValueError,
               "restarts must be at least 1, got 0"),
    ]
    return out

def _coo_unchanged() -> float:
    "Fit a scipy COO matrix with duplicate entries; fail unless the caller's matrix is left exactly as it was."
    coo = scipy.sparse.coo_array((np.array([1.0, 2.0, 3.0]), (np.array([0, 0, 1]), np.array([1, 1, 2]))), shape=(3, 4))
    before = (coo.data.copy(), coo.row.copy(), coo.col.copy())
    f = als(coo, 1, max_iter=3)
    if not all(np.array_equal(a, b) for a, b in zip(before, (coo.data, coo.row, coo.col))):
        raise AssertionError("COO modified")
    return f.rel_error

def adapter_misuses() -> list[Misuse]:
    "Misuses of inject/merge/unmerge/save/load/export/import, including damaged adapter files."
    plain = small_model
    adapted = lambda: inject(small_model(), "lora", targets=["0", "2"], rank=2)
    adapted_loha = lambda: inject(small_model(), "loha", targets=["0", "2"], rank=2)
    merged = lambda: merge(trained("lora"))
    other_arch = lambda: nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 4))
    F = "adapter.safetensors"
    copy_lora_tensors = lambda d: shutil.copy(fixture_folder() / "lora" / F, d / F)
    out = [
        Misuse("lt.inject", "an unknown method", lambda: inject(small_model(), "dora", targets=["0"]), ValueError,
               "method must be one of ['lora', 'loha', 'lokr', 'lokh'], got 'dora'"),
        Misuse("lt.inject", "a target that matches no module",
               lambda: inject(small_model(), "lora", targets=["q_proj"]), ValueError,
               "targets ['q_proj'] match no module of the model"),
        Misuse("lt.inject", "an empty list of targets", lambda: inject(small_model(), "lora", targets=[]), ValueError,
               "targets must name at least one module"),
        Misuse("lt.inject", "targets given as an integer", lambda: inject(small_model(), "lora", targets=0), TypeError,
               "targets must be a regex string or a list of module names"),
        Misuse("lt.inject", "a target that is not a supported layer (ReLU)",
               lambda: inject(small_model(), "lora", targets=["1"]), TypeError,
               "module '1' is a ReLU, which lora cannot adapt"),
        Misuse("lt.inject", "not a model", lambda: inject(np.eye(3), "lora", targets=["0"]), TypeError,
               "model must be a torch.nn.Module, got ndarray"),
        Misuse("lt.inject", "a rank larger than the layer allows",
               lambda: inject(small_model(), "lora", targets=["0"], rank=7), ValueError,
               "rank must be between 1 and 6 for a 6×8 layer"),
        Misuse("lt.inject", "a rank for LoKH", lambda: inject(small_model(), "lokh", targets=["0"], rank=2), ValueError,
               "LoKH has no rank"),
        Misuse("lt.inject", "injecting twice under one name", lambda: inject(adapted(), "lora", targets=["0"]),
               ValueError, "model already has an adapter named 'default': pass another name="),
        Misuse("lt.inject", "a failed injection leaves the model plain",
               unchanged_after(plain, lambda m, _: inject(m, "lora", targets=["0", "1"], rank=2), None), TypeError,
               "which lora cannot adapt"),
        Misuse("lt.merge", "a model without adapters", lambda: merge(small_model()), ValueError,
               "model has no adapters to merge"),
        Misuse("lt.merge", "merging twice", lambda: merge(merged()), ValueError,
               "are already merged: unmerge() before merging again"),
        Misuse("lt.unmerge", "a model that is not merged", lambda: unmerge(adapted()), ValueError,
               "no adapter is merged (modules"),
        Misuse("lt.trainable_parameters", "not a model", lambda: trainable_parameters("model"), TypeError,
               "model must be a torch.nn.Module, got str"),
        Misuse("lt.save_adapter", "a model without adapters",
               lambda: save_adapter(small_model(), fixture_folder() / "none"), ValueError,
               "model has no adapters to save"),
        Misuse("lt.save_adapter", "a path that is not a path", lambda: save_adapter(adapted(), 3), TypeError,
               "path must be a folder path (str or PathLike), got int"),
        Misuse("lt.save_adapter", "factors holding NaN",
               lambda: save_adapter(_nan_factor(trained("lora")), fixture_folder() / "nan"), ValueError,
               "hold NaN or infinite entries: refusing to save"),
        Misuse("lt.load_adapter", "a folder that does not exist",
               unchanged_after(plain, load_adapter, Path("/nonexistent/adapter")), ValueError,
               "has no adapter_config.json: not an adapter folder"),
        Misuse("lt.load_adapter", "a PEFT folder", unchanged_after(plain, load_adapter, fixture_folder() / "peft"),
               ValueError, "was not written by save_adapter (for a PEFT folder use import_peft)"),
        Misuse("lt.load_adapter", "into a model of another architecture",
               unchanged_after(other_arch, load_adapter, fixture_folder() / "lora"), ValueError,
               "tensor '0.B' has shape (6, 2), but the model expects (5, 2)"),
        Misuse("lt.load_adapter", "a LoHA file into a LoRA-adapted model",
               unchanged_after(adapted, load_adapter, fixture_folder() / "loha"), ValueError,
               "holds a loha adapter on module '0', but the model's adapter 'default' there is a lora one"),
        Misuse("lt.load_adapter", "into a merged model",
               unchanged_after(merged, load_adapter, fixture_folder() / "lora"), ValueError,
               "is merged in modules"),
    ]
    for name, make in (("plain", plain), ("LoHA-adapted", adapted_loha)):
        out += [
            Misuse("lt.load_adapter", f"tensor file cut in half ({name} model)",
                   unchanged_after(make, load_adapter, damaged("loha", truncate(F, 0.5))), ValueError,
                   "cannot be read, the file is truncated or corrupt"),
            Misuse("lt.load_adapter", f"tensor file cut to 4 bytes ({name} model)",
                   unchanged_after(make, load_adapter, damaged("loha", truncate(F, 0.01))), ValueError,
                   "cannot be read, the file is truncated or corrupt"),
            Misuse("lt.load_adapter", f"one byte flipped in the tensor data ({name} model)",
                   unchanged_after(make, load_adapter, damaged("loha", flip_byte(F, 0.95))), ValueError,
                   "does not match the sha256 checksum"),
            Misuse("lt.load_adapter", f"tensor file from another save ({name} model)",
                   unchanged_after(make, load_adapter, damaged("loha", copy_lora_tensors)), ValueError,
                   "does not match the sha256 checksum"),
            Misuse("lt.load_adapter", f"config cut short ({name} model)",
                   unchanged_after(make, load_adapter, damaged("loha", truncate("adapter_config.json", 0.5))),
                   ValueError, "is not valid JSON, the file is truncated or corrupt"),
            Misuse("lt.load_adapter", f"config value edited ({name} model)",
                   unchanged_after(make, load_adapter, damaged("loha", _edit_config(alpha=3.0))), ValueError,
                   "differs from the configuration recorded inside adapter.safetensors"),
            Misuse("lt.load_adapter", f"config without its module list ({name} model)",
                   unchanged_after(make, load_adapter, damaged("loha", _edit_config(modules=None))), ValueError,
                   "adapter_config.json lacks ['modules']"),
            Misuse("lt.load_adapter", f"tensor file missing ({name} model)",
                   unchanged_after(make, load_adapter, damaged("loha", lambda d: (d / F).unlink())), ValueError,
                   "has no adapter.safetensors"),
        ]
    P = "adapter_model.safetensors"
    out += [
        Misuse("lt.export_peft", "a LoKH adapter",
               lambda: export_peft(trained("lokh", p=2), fixture_folder() / "peft_lokh"), ValueError,
               "LoKH has no PEFT equivalent"),
        Misuse("lt.export_peft", "a model without adapters", lambda: export_peft(small_model(), fixture_folder() / "x"),
               ValueError, "model has no adapters to export"),
        Misuse("lt.import_peft", "a lowrank_tales folder",
               unchanged_after(plain, import_peft, fixture_folder() / "lora"), ValueError,
               "has peft_type None; supported: ['LORA', 'LOHA', 'LOKR']"),
        Misuse("lt.import_peft", "tensor file cut in half",
               unchanged_after(plain, import_peft, damaged("peft", truncate(P, 0.5))), ValueError,
               "cannot be read, the file is truncated or corrupt"),
        Misuse("lt.import_peft", "config cut short",
               unchanged_after(plain, import_peft, damaged("peft", truncate("adapter_config.json", 0.7))), ValueError,
               "is not valid JSON"),
        Misuse("lt.import_peft", "config without r",
               unchanged_after(plain, import_peft, damaged("peft", _edit_config(r=None))), ValueError,
               "adapter_config.json lacks ['r']"),
        Misuse("lt.import_peft", "config with another rank than the tensors",
               unchanged_after(plain, import_peft, damaged("peft", _edit_config(r=3))), ValueError,
               ", but the model expects ("),
        Misuse("lt.import_peft", "into a model of another architecture",
               unchanged_after(other_arch, import_peft, fixture_folder() / "peft"), ValueError,
               "but the model expects"),
    ]
    return out

def _nan_factor(model: nn.Module) -> nn.Module:
    "`model` with one adapter factor entry set to NaN."
    with torch.no_grad(): next(iter(adapters(model).values())).factors[0].view(-1)[0] = float("nan")
    return model

def _edit_config(**changes) -> Callable:
    "An edit of `adapter_config.json`: set each key to its value (or delete it, for None)."
    def edit(d: Path):
        cfg = json.loads((d / "adapter_config.json").read_text())
        for k, v in changes.items():
            if v is None: cfg.pop(k, None)
            else: cfg[k] = v
        (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return edit

def _fresh(fn: Callable, *inputs):
    "`fn(*inputs)`, failing unless the result shares no memory with any input and every input is left unchanged."
    before = [to_numpy(x).copy() for x in inputs]
    out = fn(*inputs)
    if any(np.shares_memory(to_numpy(out), to_numpy(x)) for x in inputs):
        raise AssertionError("result aliases an input")
    if not all(np.array_equal(b, to_numpy(x)) for b, x in zip(before, inputs)): raise AssertionError("input changed")
    return out

def _sparse_unchanged(fn: Callable, coo):
    "`fn(coo)`, failing unless the caller's COO matrix keeps its entries, duplicates included, exactly."
    before = (coo.data.copy(), coo.row.copy(), coo.col.copy())
    out = fn(coo)
    if not all(np.array_equal(a, b) for a, b in zip(before, (coo.data, coo.row, coo.col))):
        raise AssertionError("COO modified")
    return out

def _equal(got, want):
    "`got`, failing unless it equals `want` exactly (integer data must stay exact)."
    if not np.array_equal(to_numpy(got), want): raise AssertionError(f"{to_numpy(got)} != {want}")
    return got

def _frame(with_na: bool = True):
    "A pandas frame of nullable integers (pd.NA at (0, 0) when `with_na`)."
    import pandas as pd
    X = np.arange(48).reshape(6, 8) % 7 + 1
    df = pd.DataFrame({f"c{j}": pd.array(X[:, j], dtype="Int64") for j in range(8)})
    if with_na: df.iloc[0, 0] = pd.NA
    return df

def input_misuses() -> list[Misuse]:
    "Inputs whose meaning a function must keep or refuse: masks, sparse formats, aliasing, integers, dtypes, ranks."
    A, sp = _data(), scipy.sparse
    masked = np.ma.masked_invalid(_with(A, 0, 0, np.nan))
    bsr = sp.bsr_array(np.kron(np.eye(3), np.ones((2, 2))), blocksize=(2, 2))  # blocks of ones, and padding zeros
    dup = sp.coo_array((np.array([1.0, 2.0, 3.0]), (np.array([0, 0, 1]), np.array([1, 1, 2]))), shape=(2, 3))
    return [
        # a numpy masked array: honoured where a function takes a mask, refused where it does not
        Misuse("lt.nearest_kronecker", "a masked array (it has no mask argument)",
               lambda: nearest_kronecker(masked, (2, 2)), ValueError,
               "A is a numpy masked array with 1 masked entries"),
        Misuse("lt.nearest_partition_khatri_rao", "a masked array (it has no mask argument)",
               lambda: nearest_partition_khatri_rao(masked, (2, 3), [(2, 4)]), ValueError,
               "A is a numpy masked array with 1 masked entries"),
        Misuse("lt.extract_adapter", "a masked array as the update", lambda: extract_adapter(masked, "lora", rank=2),
               ValueError, "delta is a numpy masked array with 1 masked entries"),
        Misuse("lt.kron", "a masked array operand", lambda: kron(masked, A), ValueError,
               "B is a numpy masked array with 1 masked entries"),
        Misuse("lt.nearest_kronecker", "a masked array with nothing masked (its data)",
               lambda: nearest_kronecker(np.ma.masked_array(A), (2, 2)), None),
        # sparse input: stored entries mean the same in every format; block formats refused
        Misuse("lt.kronecker_als", "a torch sparse A (it reads dense data)",
               lambda: kronecker_als(torch.tensor(A).to_sparse(), (2, 2)), TypeError, "A is sparse"),
        Misuse("lt.kronecker_als", "a 3-D torch sparse A",
               lambda: kronecker_als(torch.ones(2, 6, 8).to_sparse(), (2, 2)),
               TypeError, "A is sparse"),
        Misuse("lt.as_triplets", "a scipy BSR matrix (its blocks store padding zeros)", lambda: as_triplets(bsr),
               TypeError, "ratings is a block-sparse BSR matrix"),
        Misuse("lt.distributed_als", "a torch BSR matrix",
               lambda: distributed_als(torch.tensor(bsr.toarray()).to_sparse_bsr((2, 2)), 1),
               TypeError, "ratings is a block-sparse BSR matrix"),
        Misuse("lt.as_triplets", "a 3-D torch sparse tensor", lambda: as_triplets(torch.ones(2, 3, 4).to_sparse()),
               ValueError, "ratings must have 2 dimensions"),
        Misuse("lt.as_triplets", "a COO with duplicates (summed in a copy; the caller's COO unchanged)",
               lambda: _sparse_unchanged(lambda S: _equal(as_triplets(S)[2], [3.0, 3.0]), dup), None),
        Misuse("lt.as_triplets", "int64 values beyond 2**53 (float64 would round them)",
               lambda: as_triplets(sp.coo_array(np.array([[2 ** 62, 0], [0, 1]]))), ValueError, "beyond ±2**53"),
        Misuse("lt.kronecker_als", "a scipy.sparse mask (read by its values)",
               lambda: kronecker_als(A, (2, 2), mask=sp.csr_array(np.arange(48).reshape(6, 8) % 5 > 0)), None),
        # results never alias inputs
        Misuse("lt.khatri_rao", "one factor (its own product: a copy)", lambda: _fresh(khatri_rao, A), None),
        Misuse("lt.face_split", "one factor (its own product: a copy)", lambda: _fresh(face_split, A), None),
        Misuse("lt.rearrange", "a shape whose rearrangement is a plain reshape (a copy)",
               lambda: _fresh(lambda X: rearrange(X, (2, 8)), A[:2]), None),
        # integers are exact, for numpy and torch alike
        Misuse("lt.kron", "int64 torch tensors (computed in float64, exact)",
               lambda: _equal(kron(torch.tensor([[2 ** 20 + 1]]), torch.tensor([[2 ** 20 + 1]])),
                              [[(2 ** 20 + 1) ** 2]]),
               None),
        Misuse("lt.kron", "an integer beyond 2**53", lambda: kron(np.array([[2 ** 60]]), np.ones((1, 1))), ValueError,
               "B holds the integer 1152921504606846976, beyond ±2**53"),
        # one dtype policy
        Misuse("lt.kron", "float16 operands (products keep half precision)",
               lambda: _equal(kron(np.ones((1, 1), np.float16), np.full((1, 1), 3, np.float16)).dtype == np.float16,
                              True),
               None),
        Misuse("lt.nearest_kronecker", "a bfloat16 tensor (fitters refuse half precision)",
               lambda: nearest_kronecker(torch.tensor(A, dtype=torch.bfloat16), (2, 2)), TypeError,
               "A has dtype torch.bfloat16, but the decompositions compute in float32 or float64"),
        Misuse("lt.extract_adapter", "a float16 update", lambda: extract_adapter(A.astype(np.float16), "lora", rank=2),
               TypeError, "delta has dtype float16"),
        *[Misuse(name, "a big-endian float64 A", lambda fit=fit: fit(A.astype(">f8")), None)
          for name, fit in (("lt.als", lambda X: als(X, 2)), ("lt.dense_als", lambda X: dense_als(X, 2)),
                            ("lt.hadamard_als", lambda X: hadamard_als(X, 2, max_iter=5)),
                            ("lt.kronecker_als", lambda X: kronecker_als(X, (2, 2))),
                            ("lt.khatri_rao_als", lambda X: khatri_rao_als(X, (2, 3))),
                            ("lt.kron", lambda X: kron(X, X)))],
        Misuse("lt.als", "a pandas frame of nullable integers holding pd.NA (read as NaN)", lambda: als(_frame(), 2),
               ValueError, "A contains 1 NaN or infinite entries; pass mask= to mark missing entries"),
        Misuse("lt.als", "a pandas frame with pd.NA where the mask hides it",
               lambda: als(_frame(), 2, mask=~_frame().isna().to_numpy()), None),
        Misuse("lt.kronecker_als", "a pandas frame of nullable integers", lambda: kronecker_als(_frame(False), (2, 2)),
               None),
        Misuse("lt.kron", "strings", lambda: kron(np.array([["a"]]), A), TypeError,
               "B must hold real numbers: float32 or float64"),
        Misuse("lt.kron_sum", "stacks with different numbers of terms",
               lambda: kron_sum(np.ones((2, 2, 2)), np.ones((3, 2, 2))), ValueError, "the same number of terms"),
        # booleans are not numbers
        *[Misuse(name, "reg=True (a boolean, not 1.0)", lambda fit=fit: fit(A, reg=True), TypeError,
                 "reg must be a number, got True")
          for name, fit in (("lt.als", lambda X, **k: als(X, 2, **k)),
                            ("lt.kronecker_als", lambda X, **k: kronecker_als(X, (2, 2), **k)),
                            ("lt.hadamard_als", lambda X, **k: hadamard_als(X, 2, max_iter=5, **k)),
                            ("lt.nearest_kronecker", lambda X, **k: nearest_kronecker(X, (2, 2), **k)))],
        # ranks of a process group
        Misuse("lt.shard_batch", "a rank outside the world", lambda: shard_batch(torch.ones(4, 2), 2, 2), ValueError,
               "rank must be between 0 and 1 (a rank of a world of 2 processes), got 2"),
        Misuse("lt.shard_batch", "a negative rank", lambda: shard_batch(torch.ones(4, 2), -1, 2), ValueError,
               "rank must be between 0 and 1"),
    ]

def _tree(root: Path) -> dict:
    "Every entry under `root`: a link's target, a file's bytes, None for a folder (what a save must leave as it was)."
    return {str(p.relative_to(root)): os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}

def _users_folder() -> Path:
    "A temporary folder of a user's things: a git tree (`.git/`), a dot-file, a file, a symlink to a folder."
    d = Path(tempfile.mkdtemp(prefix="lowrank_tales_users_"))
    (d / ".git").mkdir(); (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (d / ".env").write_text("KEY=1\n"); (d / "notes.txt").write_text("mine\n")
    (d / "shared").symlink_to(d / ".git", target_is_directory=True)
    return d

def _into_users_folder(save: Callable) -> Callable:
    """A call of `save(folder)` on a user's folder; `AssertionError` if anything that was there changed or went,
    whether the save succeeded or failed. Returns the names the save added."""
    def call():
        d = _users_folder(); before = _tree(d)
        try: save(d)
        finally:
            after = _tree(d); shutil.rmtree(d)
            if lost := [k for k, v in before.items() if after.get(k, "gone") != v]:
                raise AssertionError(f"the save changed or removed {lost}") from None
        return sorted(set(after) - set(before))
    return call

def _at(folder: Path, fn: Callable):
    "`fn()` run with `folder` as the working directory (restored after)."
    cwd = os.getcwd(); os.chdir(folder)
    try: return fn()
    finally: os.chdir(cwd)

def _nan_second_layer(model: nn.Module) -> dict:
    "`model`'s state dict with new values everywhere and a NaN factor in its second adapted layer (layer '2')."
    sd = {k: v * 0.5 + 0.25 for k, v in model.state_dict().items()}
    sd["2.updates.default.A"] = torch.full_like(sd["2.updates.default.A"], float("nan"))
    return sd

def promise_misuses() -> list[Misuse]:
    """The promises of the hostile review's categories, as misuses: files touch only what they wrote, names are names,
    state matches output, compile/functorch paths, imports keep their meaning, failed calls change nothing."""
    dot = lambda save: _into_users_folder(lambda d: _at(d, lambda: save(trained("lora"), ".")))
    merged = lambda: merge(trained("lora"))
    second = lambda m, _: inject(m, "lora", targets=["0"], name="b", rank=2, rank_pattern="0")
    return [
        # files touch only what they wrote
        Misuse("lt.save_adapter", "into '.', a git tree with dot-entries (only its own files appear)",
               dot(save_adapter), None),
        Misuse("lt.export_peft", "into '.', a git tree with dot-entries (only its own files appear)",
               dot(export_peft), None),
        Misuse("lt.save_adapter", "a file in the way of the folder",
               _into_users_folder(lambda d: save_adapter(trained("lora"), d / "notes.txt")), ValueError,
               "exists and is not a folder: refusing to save there"),
        Misuse("lt.save_adapter", "a symlink in the way of the folder",
               _into_users_folder(lambda d: save_adapter(trained("lora"), d / "shared")), ValueError,
               "is a symbolic link: refusing to save through it"),
        # names are names
        Misuse("lt.inject", "name='..' (a path, not a name)",
               unchanged_after(trained, lambda m, _: inject(m, "lora", targets=["0"], name="..", rank=2), None),
               ValueError, "name must be an adapter name (a non-empty string without '.', '/', '\\' or NUL), got '..'"),
        Misuse("lt.inject", "name='a/b' (a path, not a name)",
               unchanged_after(trained, lambda m, _: inject(m, "lora", targets=["0"], name="a/b", rank=2), None),
               ValueError, "got 'a/b'"),
        # state matches output
        Misuse("lt.merge", "load_state_dict of a NaN factor for the second of two merged layers",
               unchanged_after(merged, lambda m, _: m.load_state_dict(_nan_second_layer(m)), None), ValueError,
               "would write NaN or infinite values into the weight: refused"),
        # compile / torch.func: a path a method lacks is refused when set
        Misuse("lt.inject", "layer.path = 'factored' on LoKH (it has no factored path)",
               unchanged_after(lambda: trained("lokh", p=2), lambda m, _: setattr(m[0], "path", "factored"), None),
               ValueError, "path must be one of ('auto', 'folded') for adapter 'default' (LoKHUpdate on a Linear)"),
        # imports keep their meaning
        Misuse("lt.import_peft", "target_modules that select none of the file's modules",
               unchanged_after(small_model, import_peft, damaged("peft", _edit_config(target_modules=["zzz"]))),
               ValueError, "matches no module of the model"),
        Misuse("lt.import_peft", "layers_to_transform=0 on a model without layers",
               unchanged_after(small_model, import_peft, damaged("peft", _edit_config(layers_to_transform=0))),
               ValueError, "matches no module of the model"),
        # failed calls change nothing
        Misuse("lt.inject", "a second adapter with rank_pattern='0' (not a dict)",
               unchanged_after(trained, second, None), TypeError,
               "rank_pattern must be a dict of module pattern (a regex string) → value, got '0'"),
        Misuse("lt.inject", "targets='(' (not a regular expression)",
               unchanged_after(small_model, lambda m, _: inject(m, "lora", targets="(", rank=2), None), ValueError,
               "targets must be a valid regular expression, got '('"),
        Misuse("lt.set_adapter", "name_or_names=None",
               unchanged_after(trained, lambda m, _: set_adapter(m, None), None), TypeError,
               "name_or_names must be an adapter name or a list of them"),
    ]

def catalogue() -> list[Misuse]:
    "Every misuse this page documents and the test suite checks."
    return product_misuses() + decomposition_misuses() + adapter_misuses() + input_misuses() + promise_misuses()

def run_catalogue(entries: list[Misuse] | None = None) -> list[dict]:
    "The record of `check_misuse` for every entry (default: the whole catalogue)."
    return [check_misuse(m) for m in (catalogue() if entries is None else entries)]

def fuzz_case(rng: random.Random, source: str = "loha") -> dict:
    "One random corruption of the fixture adapter `source`, loaded into a plain and into an adapted model."
    file = rng.choice(["adapter.safetensors", "adapter_config.json"])
    def edit(d: Path):
        data = bytearray((d / file).read_bytes())
        if rng.random() < 0.5:
            for _ in range(rng.randint(1, 8)): data[rng.randrange(len(data))] = rng.randrange(256)
        else: del data[rng.randrange(len(data)):]
        (d / file).write_bytes(bytes(data))
    folder = damaged(source, edit)
    reference = state(load_adapter(small_model(), fixture_folder() / source))
    outcomes = []
    for make in (small_model, lambda: inject(small_model(), source, targets=["0", "2"], rank=2)):
        model = make(); before = state(model)
        try:
            load_adapter(model, folder)
            outcomes.append("loaded intact" if same_state(state(model), reference) else "LOADED DIFFERENT VALUES")
        except ValueError:
            unchanged = same_state(before, state(model))
            outcomes.append("refused, model unchanged" if unchanged else "REFUSED BUT MODEL CHANGED")
        except Exception as e: outcomes.append(f"UNEXPECTED {type(e).__name__}: {e}")
    shutil.rmtree(folder)
    ok = all(o in ("loaded intact", "refused, model unchanged") for o in outcomes)
    return dict(file=file, outcomes=outcomes, ok=ok)

def fuzz_adapter_files(n: int = 50, seed: int = 0) -> list[dict]:
    "`n` random corruptions (seeded), each loaded into a plain and an adapted model."
    rng = random.Random(seed)
    return [fuzz_case(rng) for _ in range(n)]
