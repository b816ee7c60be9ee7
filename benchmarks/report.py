"""Every benchmark's saved results side by side: ratios to the peers and to the physical floors, and each target met
or not. The performance chapter (`nbs/11_performance.ipynb`) derives, tests and renders these functions; they live
beside the benchmarks, not in the package, because they read this folder's `results/`."""
from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["ADAPTER_TARGETS", "results_dir", "load_results", "verdict", "machine_line", "step_floor", "adapter_targets",
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
                   "gpu": {"LoRA": 1.25, "LoHA": 1.45, "LoKr": 1.4, "LoKH": 1.6}}  # training step / frozen step

def _row(area, target, value, bound, at_most=True, fmt="{:.3g}"):
    "One target row: the measured value formatted, and its verdict."
    return {"area": area, "target": target, "measured": "—" if value is None else fmt.format(value),
            "verdict": verdict(value, bound, at_most)}

def adapter_targets(res: dict) -> list[dict]:
    "Rows for the adapter targets: step ratio per method and section (CPU threads, GPU), and faster than PEFT."
    rows = []
    for section in [s for s in ("cpu", "cpu_1_threads", "gpu") if s in res] + ([] if "gpu" in res else ["gpu"]):
        steps = {r["case"]: r["step_ratio"] for r in res.get(section, {}).get("rows", [])}
        kind = "gpu" if section == "gpu" else "cpu"
        for m, bound in ADAPTER_TARGETS[kind].items():
            rows.append(_row(f"adapters {section}", f"{m} step ≤ {bound}", steps.get(f"ours {m}"), bound))
            peft = [v for k, v in steps.items() if k.startswith(f"PEFT {m}")]
            if peft or kind == "gpu":
                rows.append(_row(f"adapters {section}", f"{m} faster than PEFT (ours / fastest PEFT)",
                                 steps[f"ours {m}"] / min(peft) if peft and f"ours {m}" in steps else None, 1.0))
    return rows


def als_targets(res: dict) -> list[dict]:
    "Rows for dense ALS (fraction of the DGEMM peak for K ≥ 64; GPU) and completion (RMSE, speed-up over Spark)."
    rows = [_row("dense ALS cpu", f"K = {r['K']}: ≥ 50% of DGEMM peak", r["fraction_of_peak"], 0.5, False, "{:.0%}")
            for r in res.get("dense", {}).get("rows", []) if r["K"] >= 64]
    gpu = res.get("dense_gpu", {}).get("by_dtype", {})
    for dt in ("float64", "float32") if gpu else ("any dtype",):
        k64 = next((r for r in gpu.get(dt, {}).get("rows", []) if r["K"] == 64), None)
        rows.append(_row("dense ALS gpu", f"{dt}, K = 64: ≥ 70% of GEMM peak", k64 and k64["fraction_of_peak"], 0.7,
                         False, "{:.0%}"))
    for name, r in res.get("completion", {}).get("results", {}).items():
        if not name.startswith("ours"): continue
        bound = 0.885 if "biases" in name else 0.92
        rows.append(_row("completion", f"{name}: RMSE ≤ {bound}", r["rmse_5fold"], bound, fmt="{:.4f}"))
        rows.append(_row("completion", f"{name}: ≥ 10× faster than Spark", r.get("speedup_vs_spark"), 10, False,
                         "{:.1f}×"))
    rows.append(_row("completion gpu", "20 M ratings, rank 64: ≤ 0.16 s per iteration",
                     res.get("completion_gpu", {}).get("s_per_iter"), 0.16))
    return rows


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
