"""What every benchmark shares: a description of the machine, interleaved timing with medians, and saving results.

Benchmarks are not tests. Each one measures our code against a reference in the same run (ratios, never absolute
times alone), prints a table, and writes `benchmarks/results/<name>.json` with the machine it ran on.
"""
from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    "The machine and library versions a measurement was taken with."
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__,
            "loadavg_1_5_15min": [round(v, 2) for v in os.getloadavg()],  # the machine is shared: how busy it was
            "shared_machine": True}
    if torch.cuda.is_available(): info["gpu"] = torch.cuda.get_device_name()
    return info


def _sync(device) -> None:
    if device is not None and str(device).startswith("cuda"): torch.cuda.synchronize(device)


def interleaved_times(fns: dict[str, Callable], repeats: int = 7, warmup: int = 2, device=None) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round by round so that machine noise hits all alike.
    Each round visits the functions in a fresh (seeded) random order, so that none always runs right after the same
    other one -- whose leftovers in the caches would otherwise favour or penalise it every time."""
    for _ in range(warmup):
        for fn in fns.values(): fn()
    _sync(device)
    samples, order = {name: [] for name in fns}, random.Random(0)
    for _ in range(repeats):
        for name in order.sample(list(fns), len(fns)):
            fn = fns[name]
            _sync(device); start = time.perf_counter()
            fn()
            _sync(device); samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def save(name: str, results: dict) -> Path:
    "Write `results` (with the machine) to `benchmarks/results/<name>.json` and return the path."
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S"), **results}, indent=2))
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    "A plain-text table of `rows` restricted to `columns`."
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line([fmt(r.get(c, "")) for c in columns]) for r in rows])
