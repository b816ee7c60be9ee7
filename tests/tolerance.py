"""Comparisons whose tolerance scales with the dtype's precision and the magnitude compared.

A fixed `atol=1e-6` on float32 is about eight units in the last place of a value near 1; a sum of a few hundred
rounded products can differ by more than that between two correct kernels (an AVX-512 build accumulates in
another order than an AVX2 one). Every float comparison of two computations of the same quantity therefore
allows `ulps` machine epsilons of the dtype, relative to the largest magnitude compared — loose enough for any
correct summation order, and still about 1e-5 of the output scale in float32 (1e-14 in float64), far below what
a wrong formula, scale or layout gives."""
import numpy as np
import torch

ULPS = 64  # units of machine epsilon allowed, relative to the largest magnitude compared


def tolerance(expected, ulps: int = ULPS) -> float:
    "`ulps · eps(dtype) · max|expected|`; an all-zero reference is compared to `ulps · eps` absolutely."
    t = expected if torch.is_tensor(expected) else torch.as_tensor(np.asarray(expected))
    eps = torch.finfo(t.dtype).eps
    scale = float(t.detach().abs().max()) if t.numel() else 0.0
    return ulps * eps * (scale or 1.0)


def assert_close(actual, expected, ulps: int = ULPS, msg: str | None = None):
    "`actual == expected` to `tolerance(expected, ulps)` absolutely and `ulps · eps` relatively."
    rtol = ulps * torch.finfo(expected.dtype).eps
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=tolerance(expected, ulps), msg=msg)
