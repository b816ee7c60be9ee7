"""Rows and columns without observations give finite fits at every batch size: below 2,048 systems the solves go to
LAPACK, from 2,048 on to the batched LDLᵀ kernel, and an all-zero Gram matrix must not turn either into NaN."""
import warnings

import numpy as np
import pytest

import lowrank_tales as lt


def _finite(f) -> bool:
    return all(np.isfinite(F).all() for F in f.factors) and np.isfinite(f.rel_error) and np.isfinite(f.losses).all()


@pytest.mark.parametrize("M", [100, 3000])
@pytest.mark.parametrize("reg", [0.0, 0.1])
def test_als_and_hadamard_with_empty_rows(M, reg):
    rng = np.random.default_rng(M)
    A = rng.standard_normal((M, 4)) @ rng.standard_normal((4, 30))
    mask = rng.random(A.shape) < 0.6
    mask[[1, M - 1]] = False; mask[:, 5] = False  # two empty rows, one empty column
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lt.ConvergenceWarning)
        f = lt.als(A, 3, mask=mask, reg=reg, max_iter=4, seed=0)
        h = lt.hadamard_als(A, 2, mask=mask, reg=reg, max_iter=3, seed=0, progress=False)
    assert _finite(f) and _finite(h)
    np.testing.assert_array_equal(f.factors[0][[1, M - 1]], 0.0)  # an empty row's factor is the ridge's answer: zero
    np.testing.assert_array_equal(f.factors[1][:, 5], 0.0)


@pytest.mark.parametrize("shape", [(8, 4), (64, 32)])  # 32 and 2,048 entries of B: one system each
def test_kronecker_with_an_empty_block(shape):
    m1, n1 = shape
    rng = np.random.default_rng(m1)
    A = rng.standard_normal((2 * m1, 2 * n1))
    mask = rng.random(A.shape) < 0.7
    mask[:2, :2] = False  # B[0, 0] multiplies the first 2×2 block of A: nothing observes it
    f = lt.kronecker_als(A, shape, mask=mask, max_iter=3, progress=False)
    assert _finite(f)
