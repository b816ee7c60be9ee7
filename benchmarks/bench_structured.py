"""Structured decompositions: our solvers against the reference algorithms, measured side by side in one run.

1. Hadamard: time per sweep of `hadamard_als` (exact block ALS, no momentum) against the reference algorithm written
   as its authors write it (Wertz, Vandaele & Gillis 2025: one column at a time, an m×m `np.diag` weight matrix per
   column, `np.linalg.solve`), from the same start; both run the same sweeps, so the errors must agree.
2. Kronecker and Khatri-Rao: the closed forms (`kronecker_als`, `khatri_rao_als`, method="svd") against fitting the
   same structure by Adam in torch (learning rate picked from a grid), until Adam's error is within 0.1% of ours.

Timings are interleaved (each round calls every function once, in a fresh random order) and the medians of the repeats
after a warm-up are reported; both sides run single-threaded (OMP_NUM_THREADS=1 unless set) because the machine's 2 cores are shared.
Run: `.venv/bin/python benchmarks/bench_structured.py` (about two minutes on 2 CPU cores). Writes
`benchmarks/results/structured.json`.
"""
from __future__ import annotations
import os, sys, time
from pathlib import Path

# Single-threaded on both sides: the 2 cores are shared with other jobs, and oversubscribed BLAS threads make
# small operations erratic. Set before numpy/torch load their thread pools.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"): os.environ.setdefault(var, "1")
import numpy as np
import torch
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_times, machine, save  # noqa: E402

from lowrank_tales.hadamard import hadamard_als
from lowrank_tales.kronecker import kronecker_als, kron_sum
from lowrank_tales.khatri_rao_decomposition import khatri_rao_als
from lowrank_tales.products import khatri_rao

REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))


def median_interleaved(fns: dict, repeats: int = REPEATS) -> dict:
    "Median wall time of each function, calling them in turn `repeats` times after one warm-up round."
    return interleaved_times(fns, repeats=repeats, warmup=1)


# --- Hadamard: the reference algorithm, as its authors write it -------------------------------------------------
def ref_column_ls(s, W, b):
    "One column: min ‖s ∘ (W x) − b‖ by the normal equations with an explicit m×m diagonal matrix."
    H = W.T @ np.diag(s ** 2) @ W
    d = W.T @ (s * b)
    return np.linalg.solve(H, d)

def ref_update(W1, Z1, W2, Z2, X):
    "Update Z2 column by column with the other factor W1 Z1 fixed."
    for j in range(X.shape[1]): Z2[:, j] = ref_column_ls(W1 @ Z1[:, j], W2, X[:, j])
    return Z2

def ref_sweep(X, W1, Z1, W2, Z2):
    "One sweep in the reference order Z2, W2, Z1, W1."
    Z2 = ref_update(W1, Z1, W2, Z2, X)
    W2 = ref_update(Z1.T, W1.T, Z2.T, W2.T, X.T).T
    Z1 = ref_update(W2, Z2, W1, Z1, X)
    W1 = ref_update(Z2.T, W2.T, Z1.T, W1.T, X.T).T
    return W1, Z1, W2, Z2

def ref_hadamard(X, F0, sweeps):
    "The reference exact block coordinate descent (no momentum), tracking the error each sweep as the original does."
    W1, Z1, W2, Z2 = (f.copy() for f in F0)
    nX = np.linalg.norm(X)
    for _ in range(sweeps):
        W1, Z1, W2, Z2 = ref_sweep(X, W1, Z1, W2, Z2)
        err = np.linalg.norm(X - (W1 @ Z1) * (W2 @ Z2)) / nX
    return err

def bench_hadamard(name, X, r, sweeps=10):
    start = hadamard_als(X, r, max_iter=0)  # the SVD start, shared by both
    F0 = start.factors
    ours = lambda: hadamard_als(X, r, max_iter=sweeps, momentum=0.0, tol=0, progress=False)
    init_only = lambda: hadamard_als(X, r, max_iter=0, progress=False)
    ref = lambda: ref_hadamard(X, F0, sweeps)
    t = median_interleaved({"ours": ours, "init": init_only, "reference": ref})
    e_ours, e_ref = ours().rel_error, ref()
    per_ours = (t["ours"] - t["init"]) / sweeps
    per_ref = t["reference"] / sweeps
    return dict(case=f"hadamard {name} r={r}", shape=list(X.shape), dtype=str(X.dtype), sweeps=sweeps,
                ours_s_per_sweep=per_ours, reference_s_per_sweep=per_ref, speedup=per_ref / per_ours,
                ours_error=e_ours, reference_error=float(e_ref))


# --- Kronecker and Khatri-Rao: closed form against Adam ------------------------------------------------------------
def adam_fit(A, params, model, lr, steps, target):
    "Adam on ‖A − model(params)‖²; stops when the relative error reaches `target`. Returns (error, steps)."
    At = torch.from_numpy(A); nA = torch.linalg.norm(At)
    ps = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.Adam(ps, lr=lr)
    for step in range(steps):
        opt.zero_grad()
        loss = ((At - model(*ps)) ** 2).sum()
        loss.backward(); opt.step()
        err = float(loss.detach().sqrt() / nA)
        if err <= target: break
    return err, step + 1

def bench_vs_adam(case, A, ours_fn, params, model, lrs=(0.03, 0.1, 0.3), steps=2000):
    e_ours = ours_fn().rel_error
    target = (1 + 1e-3) * e_ours
    trials = [(lr, *adam_fit(A, params, model, lr, steps, target)) for lr in lrs]
    lr, _, _ = min(trials, key=lambda t: (t[1] > target, t[2]))  # reaches the target in the fewest steps
    adam = lambda: adam_fit(A, params, model, lr, steps, target)
    t = median_interleaved({"ours": ours_fn, "adam": adam}, repeats=max(3, REPEATS // 2))
    e_adam, n_steps = adam()
    return dict(case=case, shape=list(A.shape), dtype=str(A.dtype), ours_s=t["ours"], adam_s=t["adam"], speedup=t["adam"] / t["ours"],
                ours_error=e_ours, adam_error=e_adam, adam_steps=n_steps, adam_lr=lr, adam_reached_target=bool(e_adam <= target))

def pretrained_like(m, n, seed=0):
    "A random m×n matrix with singular values i^(-1/2), like a trained weight's slowly decaying spectrum."
    g = np.random.default_rng(seed)
    U, _ = np.linalg.qr(g.standard_normal((m, min(m, n)))); V, _ = np.linalg.qr(g.standard_normal((n, min(m, n))))
    return (U * np.arange(1, min(m, n) + 1) ** -0.5) @ V.T

def small_start(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]


def main():
    import networkx as nx
    from skimage.data import camera
    from skimage.transform import resize
    from sklearn.datasets import load_digits
    les = nx.to_numpy_array(nx.les_miserables_graph(), weight=None)
    img = resize(camera(), (256, 256), anti_aliasing=True)
    digits = load_digits().data.T.copy()
    W = pretrained_like(512, 512)
    results = []
    for name, X, r in (("Les Miserables", les, 4), ("camera", img, 8)):
        results.append(bench_hadamard(name, X, r))
    results.append(bench_vs_adam("kronecker camera B 16x16, 8 terms", img, lambda: kronecker_als(img, (16, 16), terms=8),
                                 small_start([(8, 16, 16), (8, 16, 16)]), kron_sum))
    results.append(bench_vs_adam("kronecker pretrained-like 512x512 B 16x32, 4 terms", W, lambda: kronecker_als(W, (16, 32), terms=4),
                                 small_start([(4, 16, 32), (4, 32, 16)]), kron_sum))
    results.append(bench_vs_adam("kronecker pretrained-like 512x512 B 16x32, 4 terms, randomized SVD", W,
                                 lambda: kronecker_als(W, (16, 32), terms=4, method="randomized", seed=0),
                                 small_start([(4, 16, 32), (4, 32, 16)]), kron_sum))
    results.append(bench_vs_adam("khatri-rao digits dims (8, 8)", digits, lambda: khatri_rao_als(digits, (8, 8)),
                                 small_start([(8, 1797), (8, 1797)]), khatri_rao))
    results.append(bench_vs_adam("khatri-rao pretrained-like 512x512 dims (16, 32)", W, lambda: khatri_rao_als(W, (16, 32)),
                                 small_start([(16, 512), (32, 512)]), khatri_rao))
    info = dict(machine(), blas_threads=os.environ["OPENBLAS_NUM_THREADS"], repeats=REPEATS)
    print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    print(f"{'case':66} {'ours':>10} {'reference':>10} {'speedup':>8}   errors (ours / reference)")
    for r in results:
        if "ours_s_per_sweep" in r:
            print(f"{r['case'] + ' (per sweep)':66} {r['ours_s_per_sweep'] * 1e3:8.2f}ms {r['reference_s_per_sweep'] * 1e3:8.1f}ms {r['speedup']:7.1f}x"
                  f"   {r['ours_error']:.6f} / {r['reference_error']:.6f}")
        else:
            print(f"{r['case'] + ' (Adam)':66} {r['ours_s'] * 1e3:8.2f}ms {r['adam_s'] * 1e3:8.1f}ms {r['speedup']:7.1f}x"
                  f"   {r['ours_error']:.6f} / {r['adam_error']:.6f} ({r['adam_steps']} steps, lr {r['adam_lr']})")
    print(f"wrote {save('structured', dict(info=info, results=results))}")


if __name__ == "__main__":
    main()
