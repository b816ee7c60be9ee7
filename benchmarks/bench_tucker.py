"""PEFT's Tucker forms (issue 25), timed against PEFT itself: one training step (forward, backward) of a 3×3 convolution
with LoHa/LoKr `use_effective_conv2d=True` (LoKr also `decompose_both=True`), ours and PEFT's interleaved, medians and
the ratio ours / PEFT. The flat form (ours, `use_effective_conv2d=False`) is timed beside them for reference.

    OMP_NUM_THREADS=1 python benchmarks/bench_tucker.py [--reps 15]
"""
import argparse
import os
import statistics
import time

import peft
import torch
from torch import nn

import lowrank_tales as lt


def step_time(model, x) -> float:
    "Seconds of one forward and backward (gradients cleared first)."
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    model(x).square().mean().backward()
    return time.perf_counter() - t


def main(reps: int):
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    net = lambda: (torch.manual_seed(0), nn.Sequential(nn.Conv2d(64, 64, 3, padding=1)))[1]
    x = torch.randn(8, 64, 32, 32)
    cases = {"loha": (peft.LoHaConfig(r=8, alpha=8, target_modules=["0"], use_effective_conv2d=True,
                                      init_weights=False), dict(rank=8, alpha=8)),
             "lokr": (peft.LoKrConfig(r=2, alpha=8, target_modules=["0"], use_effective_conv2d=True,
                                      decompose_both=True, init_weights=False),
                      dict(rank=2, alpha=8, decompose_both=True))}
    print(f"load: {os.getloadavg()}; torch {torch.__version__}, peft {peft.__version__}, threads "
          f"{torch.get_num_threads()}; Conv2d(64, 64, 3) on x {tuple(x.shape)}, one training step")
    for method, (cfg, kw) in cases.items():
        models = {"ours (Tucker)": lt.inject(net(), method, targets=["0"], use_effective_conv2d=True, **kw),
                  "PEFT (Tucker)": peft.get_peft_model(net(), cfg),
                  "ours (flat)": lt.inject(net(), method, targets=["0"], **kw)}
        for m in models.values(): step_time(m, x)  # warm-up
        times = {k: [] for k in models}
        for _ in range(reps):
            for k, m in models.items(): times[k].append(step_time(m, x))
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{method}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items()) +
              f"; ours / PEFT = {med['ours (Tucker)'] / med['PEFT (Tucker)']:.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=15)
    main(p.parse_args().reps)
