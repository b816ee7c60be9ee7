"""Every benchmark's saved results side by side: ratios to the peers and to the physical floors, and each target met
or not. The performance chapter (`nbs/11_performance.ipynb`) derives, tests and renders these functions; they live
beside the benchmarks, not in the package, because they read this folder's `results/`."""
from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["ADAPTER_TARGETS", "ADAPTER_SECTIONS", "results_dir", "load_results", "verdict", "machine_line", "step_floor", "adapter_targets",
           "als_targets", "structured_targets"]

RESULTS = Path(__file__).resolve().parent / "results"


def results_dir() -> Path:
    "The folder the benchmarks write their results to: `benchmarks/results`, beside this file."
    return RESULTS

def load_results(name: str,  # benchmark name: "adapters", "als" or "structured"
                 root: str | Path | None = None) -> dict:  # folder holding `<name>.json`; default `results_dir()`
    "The saved results of benchmark `name` (`benchmarks/results/<name>.json`)."
    path = Path(root or results_dir()) / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"name={name!r}: no results file {str(path)!r}; "
                                f"run `python benchmarks/bench_{name}.py` to write it")
    return json.loads(path.read_text())


def verdict(value: float | None,  # the measured value, or None when it was not measured
            target: float,  # the bound
            at_most: bool = True) -> str:  # True: value ≤ target is met; False: value ≥ target is met
    "'MET', 'NOT MET' or 'not measured' for `value` against the bound `target`."
    if value is None or (isinstance(value, float) and math.isnan(value)): return "not measured"
    return "MET" if (value <= target if at_most else value >= target) else "NOT MET"


def machine_line(machine: dict) -> str:
    "One line describing the machine record of a result: device, cores, threads, versions, load average."
    device = machine.get("gpu") or f"{machine.get('processor', '?')} CPU, {machine.get('cpus', '?')} cores"
    load = machine.get("loadavg_1_5_15min")
    parts = [device, f"torch {machine.get('torch', '?')} ({machine.get('torch_threads', '?')} threads)",
             f"numpy {machine.get('numpy', '?')}", f"python {machine.get('python', '?')}",
             f"load average {'/'.join(f'{v:g}' for v in load)}" if load else "load average not recorded"]
    return "; ".join(parts)


def step_floor(adapter,  # an adapter from `lowrank_tales.adapters` around an `nn.Linear`
               tokens: int,  # tokens per step
               path: str | None = None) -> float:  # "factored" or "folded"; default the path `auto` picks in training
    "Training step / frozen step if every product ran equally fast: `1 + extra_macs / (2 T d_out d_in)`."
    if path is None:
        path = "folded" if not adapter.can_factor() else min(("factored", "folded"),
                                                             key=lambda p: adapter.extra_macs(tokens, p, True))
    return 1 + adapter.extra_macs(tokens, path, True) / (2 * tokens * adapter.d_out * adapter.d_in)


ADAPTER_TARGETS = {"cpu": {"LoRA": 1.2, "LoHA": 1.6, "LoKr": 1.3, "LoKH": 1.7},
                   "cpu_bf16": {"LoRA": 1.25, "LoHA": 1.6, "LoKr": 1.4, "LoKH": 1.7},
                   "gpu": {"LoRA": 1.25, "LoHA": 1.45, "LoKr": 1.4, "LoKH": 1.6}}  # training step / frozen step
ADAPTER_SECTIONS = ("cpu", "cpu_1_threads", "cpu_bf16_autocast", "cpu_bf16_weights", "gpu")

def _row(area, target, value, bound, at_most=True, fmt="{:#.3g}"):
    "One target row: the measured value formatted, and its verdict."
    return {"area": area, "target": target, "measured": "—" if value is None else fmt.format(value),
            "verdict": verdict(value, bound, at_most)}

def _method(case: str) -> str:
    "The method of a benchmark case: 'ours LoRA' → 'LoRA', 'PEFT LoKr (bf16 weights)' → 'LoKr'."
    return (case.split() + [""])[1]

def adapter_targets(res: dict) -> list[dict]:
    """Rows for the adapter targets: step ratio per method and section (CPU float32 with torch's threads and one
    thread, CPU bf16 under autocast and with bf16 weights, GPU), faster than PEFT, and DoRA against PEFT's DoRA."""
    rows = []
    for section in [s for s in ADAPTER_SECTIONS if s in res] + ([] if "gpu" in res else ["gpu"]):
        steps = {r["case"]: r["step_ratio"] for r in res.get(section, {}).get("rows", [])}
        kind = "cpu_bf16" if section.startswith("cpu_bf16") else "gpu" if section == "gpu" else "cpu"
        for m, bound in ADAPTER_TARGETS[kind].items():
            rows.append(_row(f"adapters {section}", f"{m} step ≤ {bound}", steps.get(f"ours {m}"), bound))
        for m in [*ADAPTER_TARGETS[kind], "LoRA+DoRA"]:
            peft = [v for k, v in steps.items() if k.startswith("PEFT") and _method(k) == m]
            if peft or (kind == "gpu" and m != "LoRA+DoRA"):
                rows.append(_row(f"adapters {section}", f"{m} faster than PEFT (ours / fastest PEFT)",
                                 steps[f"ours {m}"] / min(peft) if peft and f"ours {m}" in steps else None, 1.0))
    return rows


def als_targets(res: dict) -> list[dict]:
    "Rows for dense ALS (fraction of the DGEMM peak for K ≥ 64; GPU) and completion (RMSE and time against peers)."
    rows = [_row("dense ALS cpu", f"K = {r['K']}: ≥ 50% of DGEMM peak", r["fraction_of_peak"], 0.5, False, "{:.0%}")
            for r in res.get("dense", {}).get("rows", []) if r["K"] >= 64]
    gpu = res.get("dense_gpu", {}).get("by_dtype", {})
    for dt in ("float64", "float32") if gpu else ("any dtype",):
        k64 = next((r for r in gpu.get(dt, {}).get("rows", []) if r["K"] == 64), None)
        rows.append(_row("dense ALS gpu", f"{dt}, K = 64: ≥ 70% of GEMM peak", k64 and k64["fraction_of_peak"], 0.7,
                         False, "{:.0%}"))
    results = res.get("completion", {}).get("results", {})
    svd = next((v for k, v in results.items() if k.startswith("surprise SVD")), None)
    for name, r in results.items():
        if not name.startswith("ours"): continue
        bound = 0.885 if "biases" in name else 0.92
        rows.append(_row("completion", f"{name}: RMSE ≤ {bound}", r["rmse_5fold"], bound, fmt="{:.4f}"))
        rows.append(_row("completion", f"{name}: ≥ 10× faster than Spark", r.get("speedup_vs_spark"), 10, False,
                         "{:.1f}×"))
        if "biases" in name and svd:
            rows.append(_row("completion", f"{name}: RMSE below surprise SVD's ({svd['rmse_5fold']:.4f})",
                             r["rmse_5fold"], svd["rmse_5fold"] - 1e-12, fmt="{:.4f}"))
            rows.append(_row("completion", f"{name}: less time per fit than surprise SVD (ours / SVD)",
                             r["fit_s_median"] / svd["fit_s_median"], 1.0 - 1e-12))
        cmf = results.get(res.get("completion", {}).get("cmfrec_best") or "")
        if "biases" in name and cmf:
            rows.append(_row("completion", f"{name}: RMSE below cmfrec's best ({cmf['rmse_5fold']:.4f})",
                             r["rmse_5fold"], cmf["rmse_5fold"] - 1e-12, fmt="{:.4f}"))
            rows.append(_row("completion", f"{name}: less time per fit than cmfrec's best (ours / cmfrec)",
                             r["fit_s_median"] / cmf["fit_s_median"], 1.0 - 1e-12))
    scale = res.get("completion_scale_cpu", {})
    rows.append(_row("completion scale cpu", "2 M ratings, rank 64: ≤ 1 s per iteration", scale.get("s_per_iter"), 1.0))
    acc = scale.get("accuracy", {})
    gap = acc["cg"]["heldout_rmse"] - acc["cholesky"]["heldout_rmse"] if acc else None
    rows.append(_row("completion scale cpu", "CG's held-out RMSE within 0.005 of exact Cholesky's (same sweeps)", gap,
                     0.005, fmt="{:+.4f}"))
    rows += _large_rows(res["completion_large"]) if "completion_large" in res else []
    rows.append(_row("completion gpu", "20 M ratings, rank 64: ≤ 0.16 s per iteration",
                     res.get("completion_gpu", {}).get("s_per_iter"), 0.16))
    return rows


def _large_rows(large: dict) -> list[dict]:
    """Rows for completion at 2 M planted ratings against cmfrec. Per iteration as `--scale` measures it: the seconds
    a sweep adds, (fit of 10 sweeps − default fit) / (10 − its sweeps), the start (a randomized SVD) left out."""
    by = {r["model"]: r for r in large["rows"]}
    ours, best = next(r for m, r in by.items() if m.startswith("ours, defaults")), by[large["cmfrec_best"]]
    ten = next((r for m, r in by.items() if m.startswith("ours, 10 sweeps")), None)
    per = None if not ten or ten["sweeps"] <= ours["sweeps"] else \
        (ten["fit_s"] - ours["fit_s"]) / (ten["sweeps"] - ours["sweeps"])
    tuned = min((r for m, r in by.items() if m.startswith("ours")), key=lambda r: r["heldout_rmse"])
    equal = tuned["fit_s"] / best["fit_s"] if tuned["heldout_rmse"] <= best["heldout_rmse"] else math.inf
    return [_row("completion large cpu", "2 M planted ratings, rank 64: ≤ 1 s per iteration (a sweep's added time)",
                 per, 1.0),
            _row("completion large cpu", f"defaults: RMSE ≤ cmfrec's best ({best['heldout_rmse']:.4f})",
                 ours["heldout_rmse"], best["heldout_rmse"], fmt="{:.4f}"),
            _row("completion large cpu", "defaults: less time per fit than cmfrec's best (ours / cmfrec)",
                 ours["fit_s"] / best["fit_s"], 1.0 - 1e-12),
            _row("completion large cpu", "at equal RMSE: ours' most accurate fit, if no worse than cmfrec's best, "
                 "in less time (ours / cmfrec; inf: worse)", equal, 1.0 - 1e-12)]


def structured_targets(res: dict) -> list[dict]:
    "Rows for Hadamard (≥ 10× per sweep vs the reference, same error) and Kronecker/Khatri-Rao (≥ 10× vs Adam)."
    rows = []
    for r in res.get("results", []):
        area = r["case"].split()[0]
        peer = "reference" if "reference_error" in r else "Adam"
        rows.append(_row(area, f"{r['case']}: ≥ 10× faster than {peer}", r["speedup"], 10, False, "{:.1f}×"))
        err_ref = r.get("reference_error", r.get("adam_error"))
        rows.append(_row(area, f"{r['case']}: error ≤ {peer}'s (+0.1%)", r["ours_error"] / err_ref, 1.001,
                         fmt="{:.5f} of it"))
    return rows
