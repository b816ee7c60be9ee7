"""Structured decompositions: our solvers against the reference algorithms, measured side by side in one run.

1. Hadamard, per sweep: our exact block ALS (no momentum) against two references from the same start, all three
   running the same iterates (so the errors must agree): the algorithm as Wertz, Vandaele & Gillis (2025) write it
   (one column at a time, an m×m `np.diag` weight matrix per column, `np.linalg.solve`), and the same block descent
   vectorised in numpy (every Gram matrix of a block by one BLAS product, one batched `np.linalg.solve`): the fair
   reference for speed.
2. Hadamard, error against wall time, best of four starts after n sweeps each (up to 500, the default cap of
   `init="all"`): `hadamard_als(init="all")` (Gillis et al.'s four SVD-based starts, Wertz et al.'s momentum rule),
   the same with Gillis et al.'s rule (`momentum="gillis"`), Gillis et al. (2026)'s algorithm as their published
   code runs it (github.com/StefanoSicilia/Hadamard-Decomposition, `loop_BCD`: exact four-block descent with
   extrapolation β = 0.75, β̄ = 1, γ = 1.05, γ̄ = 1.01, η = 1.5; a try is undone when its error is not below the
   previous try's; their four starts from numpy's SVD, the best fit kept), vectorised in numpy; the plain vectorised
   block descent (numpy, β = 0); and their algorithm column by column (time per sweep measured, same iterates).
3. Kronecker and Khatri-Rao: the closed forms (`kronecker_als`, `khatri_rao_als`, method="svd") against fitting the
   same structure by Adam in torch (learning rate picked from a grid), until Adam's error is within 0.1% of ours.

Timings are interleaved (each round calls every function once, in a fresh random order) and the medians of the repeats
after a warm-up are reported; both sides run single-threaded (OMP_NUM_THREADS=1 unless set) because the machine's 2
cores are shared (the load average is recorded at the start and at the end).
Run: `.venv/bin/python benchmarks/bench_structured.py` (about ten minutes on 2 shared CPU cores), or with
`--frontier` only part 2 (the other sections kept from the saved file). Writes `benchmarks/results/structured.json`.
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
from lowrank_tales.products import face_split, khatri_rao

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

def ref_update(X, W1, Z1, W2):
    "Z2 = argmin ‖X − (W1 Z1) ∘ (W2 Z2)‖, column by column, with the other factor W1 Z1 fixed."
    return np.stack([ref_column_ls(W1 @ Z1[:, j], W2, X[:, j]) for j in range(X.shape[1])], 1)

def vec_update(X, W1, Z1, W2):
    "The same minimiser for all columns at once: the Gram matrices by one BLAS product, one batched solve."
    H, (M, K) = W1 @ Z1, W2.shape
    G = ((H * H).T @ (W2[:, :, None] * W2[:, None, :]).reshape(M, K * K)).reshape(-1, K, K)
    return np.linalg.solve(G, (W2.T @ (H * X)).T[:, :, None])[:, :, 0].T

def bcd_sweep(X, F, update, beta=0.0):
    "One sweep in the reference order Z2, W2, Z1, W1, each block extrapolated by β right after its update."
    W1, Z1, W2, Z2 = F
    step = lambda new, old: new + beta * (new - old) if beta else new
    Z2 = step(update(X, W1, Z1, W2), Z2)
    W2 = step(update(X.T, Z1.T, W1.T, Z2.T).T, W2)
    Z1 = step(update(X, W2, Z2, W1), Z1)
    W1 = step(update(X.T, Z2.T, W2.T, Z1.T).T, W1)
    return W1, Z1, W2, Z2

def rel_err(X, F):
    return np.linalg.norm(X - (F[0] @ F[1]) * (F[2] @ F[3])) / np.linalg.norm(X)

def plain_bcd(X, F0, sweeps, update):
    "Exact block coordinate descent without momentum, tracking the error each sweep as the original does."
    F = tuple(f.copy() for f in F0)
    for _ in range(sweeps):
        F = bcd_sweep(X, F, update)
        err = rel_err(X, F)
    return err

def gillis_bcd(X, F0, sweeps, update=vec_update, mom=(0.75, 1.0, 1.05, 1.01, 1.5)):
    "Gillis et al.'s extrapolated block descent: errors and elapsed seconds after each sweep (index 0: the start)."
    beta, beta_bar, gamma, gamma_bar, eta = mom
    beta_old, F, errs, times = beta, F0, [rel_err(X, F0)], [0.0]
    t0 = time.perf_counter()
    for _ in range(sweeps):
        new = bcd_sweep(X, F, update, beta)
        err = rel_err(X, new)
        if err < errs[-1]:
            beta_old, beta, beta_bar, F = beta, min(beta_bar, gamma * beta), min(1.0, gamma_bar * beta_bar), new
        else: beta_bar, beta = beta_old, beta / eta  # the sweep is rejected: back to the previous blocks
        errs.append(err); times.append(time.perf_counter() - t0)
    return np.array(errs), np.array(times)

def _rank_one_rows(U, r1, r2):
    "Each row of U as an r1×r2 matrix, replaced by its best rank one, split into (M, r1) and (M, r2) factors."
    P, s, Qh = np.linalg.svd(U.reshape(-1, r1, r2))
    w = np.sqrt(s[:, :1])
    return P[:, :, 0] * w, Qh[:, 0, :] * w

def gillis_starts(X, r1, r2):
    "Their four starts: magnitude/sign TSVDs, and the face-splitting projections of the rank-r1·r2 TSVD (numpy signs)."
    U1, s1, V1 = np.linalg.svd(np.sqrt(np.abs(X))); U2, s2, V2 = np.linalg.svd(np.sign(X) * np.sqrt(np.abs(X)))
    svd = (U1[:, :r1] * np.sqrt(s1[:r1]), np.sqrt(s1[:r1, None]) * V1[:r1],
           U2[:, :r2] * np.sqrt(s2[:r2]), np.sqrt(s2[:r2, None]) * V2[:r2])
    U, s, Vh = np.linalg.svd(X); k = r1 * r2
    W1, W2 = _rank_one_rows(U[:, :k] * np.sqrt(s[:k]), r1, r2)
    H1, H2 = _rank_one_rows(Vh[:k].T * np.sqrt(s[:k]), r1, r2)
    L1, L2 = _rank_one_rows(X @ np.linalg.pinv(khatri_rao(H1.T, H2.T)), r1, r2)
    R1, R2 = _rank_one_rows((np.linalg.pinv(face_split(W1, W2)) @ X).T, r1, r2)
    return {"svd": svd, "fs": (W1, H1.T, W2, H2.T), "fsl": (L1, H1.T, L2, H2.T), "fsr": (W1, R1.T, W2, R2.T)}

def bench_hadamard(name, X, r, sweeps=10):
    "Time per sweep: ours against the column-by-column reference and the vectorised numpy one, same start and iterates."
    start = hadamard_als(X, r, max_iter=0)  # the SVD start, shared by all three
    F0 = start.factors
    ours = lambda: hadamard_als(X, r, max_iter=sweeps, momentum=0.0, tol=0, progress=False)
    init_only = lambda: hadamard_als(X, r, max_iter=0, progress=False)
    ref = lambda: plain_bcd(X, F0, sweeps, ref_update)
    vec = lambda: plain_bcd(X, F0, sweeps, vec_update)
    t = median_interleaved({"ours": ours, "init": init_only, "reference": ref, "numpy": vec})
    e_ours, e_ref, e_vec = ours().rel_error, ref(), vec()
    per_ours = (t["ours"] - t["init"]) / sweeps
    per_ref, per_vec = t["reference"] / sweeps, t["numpy"] / sweeps
    return dict(case=f"hadamard {name} r={r}", shape=list(X.shape), dtype=str(X.dtype), sweeps=sweeps,
                ours_s_per_sweep=per_ours, reference_s_per_sweep=per_ref, speedup=per_ref / per_ours,
                numpy_s_per_sweep=per_vec, speedup_vs_numpy=per_vec / per_ours,
                ours_error=e_ours, reference_error=float(e_ref), numpy_error=float(e_vec))

def _curve_at(curves, sweeps):
    "The best-of-starts error after `sweeps` sweeps per start, and the seconds all starts took to get there."
    return min(e[sweeps] for e, _ in curves), sum(t[sweeps] for _, t in curves)

def _to_target(curves, target):
    "The fewest sweeps per start whose best-of-starts error is ≤ target, and the seconds that took (None: never)."
    for n in range(len(curves[0][0])):
        e, t = _curve_at(curves, n)
        if e <= target: return n, t
    return None, None

def _our_curve(X, r, init, sweeps, momentum=0.5):
    "Our fit from one start: errors after each sweep, and seconds (the start, then the mean sweep time added each sweep)."
    t0 = time.perf_counter(); hadamard_als(X, r, init=init, max_iter=0, progress=False); t_init = time.perf_counter() - t0
    t0 = time.perf_counter(); f = hadamard_als(X, r, init=init, max_iter=sweeps, tol=0, progress=False, momentum=momentum)
    total = time.perf_counter() - t0
    errs = np.sqrt(np.maximum(np.array(f.losses), 0)) / np.linalg.norm(X)
    return errs, t_init + np.arange(sweeps + 1) * (total - t_init) / sweeps

CONTENDERS = ("ours", "ours_gillis_rule", "gillis_numpy", "plain_numpy")


def bench_frontier(name, X, r, target, published, sweeps=500):
    """Error against wall time, best of the four starts after n sweeps each: ours (`init="all"`, its default momentum
    rule), ours with Gillis et al.'s rule (`momentum="gillis"`), their algorithm (numpy, their starts), and the plain
    vectorised block descent (numpy, their starts, no extrapolation); one start of each in turn."""
    starts, curves = gillis_starts(X, r, r), {k: [] for k in CONTENDERS}
    t_starts = time.perf_counter(); gillis_starts(X, r, r); t_starts = time.perf_counter() - t_starts
    for k, F in starts.items():  # interleaved: one start of each contender in turn
        curves["ours"].append(_our_curve(X, r, k, sweeps))
        curves["ours_gillis_rule"].append(_our_curve(X, r, k, sweeps, momentum="gillis"))
        e, t = gillis_bcd(X, F, sweeps)
        curves["gillis_numpy"].append((e, t + t_starts / 4))
        e, t = gillis_bcd(X, F, sweeps, mom=(0.0, 1.0, 1.05, 1.01, 1.5))  # β = 0: plain exact block descent
        curves["plain_numpy"].append((e, t + t_starts / 4))
    col = lambda: gillis_bcd(X, starts["svd"], 3, ref_update)
    vec = lambda: gillis_bcd(X, starts["svd"], 3, vec_update)
    t = median_interleaved({"column": col, "numpy": vec}, repeats=3)
    test_same = np.allclose(col()[0], vec()[0], rtol=1e-8)  # the column form runs the same iterates
    per_col, per_vec = t["column"] / 3, t["numpy"] / 3
    row = dict(case=f"hadamard {name} r={r}", shape=list(X.shape), target=target, published=published,
               sweeps_per_start=sweeps, column_form_same_iterates=bool(test_same),
               column_s_per_sweep=per_col, numpy_s_per_sweep_measured=per_vec)
    for who, cs in curves.items():
        for n in sorted({n for n in (100, 300, sweeps) if n <= sweeps}):
            e, s = _curve_at(cs, n)
            row[f"{who}_error_{n}"], row[f"{who}_s_{n}"] = float(e), float(s)
        n, s = _to_target(cs, target)
        row[f"{who}_sweeps_to_target"], row[f"{who}_s_to_target"] = n, None if s is None else float(s)
    n = row["gillis_numpy_sweeps_to_target"]
    row["gillis_column_s_to_target_est"] = None if n is None else 4 * n * per_col + t_starts
    row[f"gillis_column_s_{sweeps}_est"] = 4 * sweeps * per_col + t_starts
    return row


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


# the five numbers to reach: Gillis et al. (2026)'s, and ours where ours was already better (camera r = 4, 16)
FRONTIER = (("Les Miserables", 4, 0.3824, 0.3824), ("Les Miserables", 6, 0.2224, 0.2224), ("camera", 4, 0.1193, 0.1235),
            ("camera", 8, 0.0788, 0.0788), ("camera", 16, 0.0482, 0.0496))


def print_frontier(rows):
    "Per case and contender: best-of-starts error at 100 and at the cap, sweeps and seconds to reach the target."
    fmt = lambda v, f: "never" if v is None else format(v, f)
    for r in rows:
        n = r["sweeps_per_start"]
        print(f"{r['case']} (target {r['target']:.4f}; their column form: {r['column_s_per_sweep'] * 1e3:.1f} ms a sweep, "
              f"est. {fmt(r['gillis_column_s_to_target_est'], '.1f')} s to target)")
        for who in CONTENDERS:
            print(f"    {who:18} @100 {r[f'{who}_error_100']:.4f}  @{n} {r[f'{who}_error_{n}']:.4f}  "
                  f"sweeps to target {fmt(r[f'{who}_sweeps_to_target'], 'd'):>5}  "
                  f"seconds {fmt(r[f'{who}_s_to_target'], '.2f'):>6}")


def _save_frontier(frontier, load_start):
    "`--frontier`: only the error-against-time part was rerun; the other saved sections stay, with their own record."
    import json
    from common import RESULTS
    old = json.loads((RESULTS / "structured.json").read_text())
    info = dict(machine(), blas_threads=os.environ["OPENBLAS_NUM_THREADS"], loadavg_at_start=load_start)
    print("Hadamard error against wall time, best of four starts | " + " | ".join(f"{k}: {v}" for k, v in info.items()))
    print_frontier(frontier)
    out = {k: v for k, v in old.items() if k not in ("machine", "when")}
    out.update(hadamard_frontier=frontier, frontier_info=dict(info, when=time.strftime("%Y-%m-%d %H:%M:%S")))
    print(f"wrote {save('structured', out)}")


def main():
    """The whole benchmark (about ten minutes on 2 shared cores); `--frontier`: only the Hadamard error against wall
    time, the other sections kept from the saved file."""
    import networkx as nx
    from skimage.data import camera
    from skimage.transform import resize
    from sklearn.datasets import load_digits
    load_start = [round(v, 2) for v in os.getloadavg()]
    les = nx.to_numpy_array(nx.les_miserables_graph(), weight=None)
    img = resize(camera(), (256, 256), anti_aliasing=True)
    data = {"Les Miserables": les, "camera": img}
    digits = load_digits().data.T.copy()
    W = pretrained_like(512, 512)
    results = []
    for name, X, r in (("Les Miserables", les, 4), ("camera", img, 8)) if "--frontier" not in sys.argv[1:] else ():
        results.append(bench_hadamard(name, X, r))
    frontier = [bench_frontier(name, data[name], r, target, published) for name, r, target, published in FRONTIER]
    if "--frontier" in sys.argv[1:]: return _save_frontier(frontier, load_start)
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
    info = dict(machine(), blas_threads=os.environ["OPENBLAS_NUM_THREADS"], repeats=REPEATS, loadavg_at_start=load_start)
    print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    print(f"{'case':66} {'ours':>10} {'reference':>10} {'speedup':>8}   errors (ours / reference)")
    for r in results:
        if "ours_s_per_sweep" in r:
            print(f"{r['case'] + ' (per sweep)':66} {r['ours_s_per_sweep'] * 1e3:8.2f}ms {r['reference_s_per_sweep'] * 1e3:8.1f}ms {r['speedup']:7.1f}x"
                  f"   {r['ours_error']:.6f} / {r['reference_error']:.6f}")
            print(f"{'    against the vectorised numpy block descent':66} {'':10} {r['numpy_s_per_sweep'] * 1e3:8.2f}ms "
                  f"{r['speedup_vs_numpy']:7.2f}x   {r['ours_error']:.6f} / {r['numpy_error']:.6f}")
        else:
            print(f"{r['case'] + ' (Adam)':66} {r['ours_s'] * 1e3:8.2f}ms {r['adam_s'] * 1e3:8.1f}ms {r['speedup']:7.1f}x"
                  f"   {r['ours_error']:.6f} / {r['adam_error']:.6f} ({r['adam_steps']} steps, lr {r['adam_lr']})")
    print("\nHadamard error against wall time, best of four starts: ours (init='all'), ours with Gillis et al.'s rule, "
          "their algorithm and the plain block descent (numpy)")
    print_frontier(frontier)
    print(f"wrote {save('structured', dict(info=info, results=results, hadamard_frontier=frontier))}")


if __name__ == "__main__":
    main()
