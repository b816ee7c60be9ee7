"""Adapters: one frozen Linear with LoRA/LoHA/LoKr/LoKH (ours) and PEFT's LoRA/LoHa/LoKr, against the base layer.

Protocol of `shared/design/performance.md`: input requires grad, fixed upstream gradient, adapter weights non-zero.
Per case: forward without grad and a training step (forward + backward) as ratios to the frozen base layer alone,
measured in one run: each case timed next to a base call (paired, random order per round), median of the paired
ratios after warm-up; memory the step keeps for backward beyond the base layer
(CPU: bytes saved by autograd; GPU: peak allocated); trainable parameters; max difference of the output against a
plainly formed update `F.linear(x, W0 + s·ΔW)` computed in float64.

    python benchmarks/bench_adapters.py            # CPU: fp32, 1024×1024, 2,048 tokens, r = 16
    python benchmarks/bench_adapters.py --gpu      # CUDA: bf16, 4096×4096, 16,384 tokens, r = 16 (if available)
    python benchmarks/bench_adapters.py --threads 1   # CPU with one torch thread (section "cpu_1_threads")

Results go to benchmarks/results/adapters.json (one section per mode; a run keeps the other mode's section).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from common import RESULTS, machine, save, table  # noqa: E402

from lowrank_tales.adapters import LoHA, LoKH, LoKr, LoRA  # noqa: E402

TARGETS = {"cpu": {"LoRA": 1.2, "LoHA": 1.6, "LoKr": 1.3, "LoKH": 1.7},
           "gpu": {"LoRA": 1.25, "LoHA": 1.45, "LoKr": 1.4, "LoKH": 1.6}}


def ours(base: nn.Linear, r: int) -> dict:
    "Our four adapters on `base`, with random non-zero factors."
    ads = {"LoRA": LoRA(base, rank=r, alpha=2 * r), "LoHA": LoHA(base, rank=r, alpha=2 * r),
           "LoKr": LoKr(base, rank=r, alpha=2 * r), "LoKH": LoKH(base, p=2, alpha=0.5)}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for ad in ads.values():
            for f in ad.factors: f.copy_(torch.randn(f.shape, generator=gen) / f.shape[-1] ** 0.5)
    return ads


def peers(base: nn.Linear, r: int, adapter_dtype: torch.dtype | None = None) -> dict:
    "PEFT's LoRA, LoHa and LoKr on a copy of `base` (random non-zero initialisation), or {} without PEFT."
    try:
        import peft
    except ImportError:
        return {}
    configs = {"LoRA": peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], init_lora_weights=False),
               "LoHA": peft.LoHaConfig(r=r, alpha=2 * r, target_modules=["0"], init_weights=False),
               "LoKr": peft.LoKrConfig(r=r, alpha=2 * r, target_modules=["0"], init_weights=False)}
    out = {}
    for name, cfg in configs.items():
        model = peft.get_peft_model(nn.Sequential(base), cfg, autocast_adapter_dtype=adapter_dtype is None)
        if adapter_dtype is not None: model.to(adapter_dtype)
        out[name] = model.base_model.model[0]  # the adapted layer itself
    return out


def peft_delta(layer) -> torch.Tensor:
    "PEFT's own formed update `s·ΔW` of an adapted layer."
    return layer.get_delta_weight("default")


def step(module, x, g):
    "One training step: forward, backward with the fixed upstream gradient `g`; gradients dropped afterwards."
    y = module(x)
    y.backward(g)
    x.grad = None
    for p in module.parameters(): p.grad = None


def forward(module, x):
    with torch.no_grad(): module(x)


def saved_bytes(module, x) -> int:
    "Bytes autograd keeps between the forward and the backward of `module(x)` (distinct storages)."
    seen = {}
    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    del y
    return sum(seen.values())


def peak_bytes(fn, device) -> int:
    "Peak CUDA memory allocated while `fn` runs, above what was allocated before."
    torch.cuda.synchronize(device); torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def max_diff(module, x, delta, base) -> float:
    "Max |module(x) − F.linear(x, W0 + s·ΔW)| relative to max |reference|, the reference in float64."
    with torch.no_grad():
        y = module(x).double()
        ref = F.linear(x.double(), base.weight.double() + delta.double(), base.bias.double())
    return float((y - ref).abs().max() / ref.abs().max())


def _timed(fn, device) -> float:
    if device.type == "cuda": torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda": torch.cuda.synchronize(device)
    return time.perf_counter() - start


def paired_ratios(fns: dict, base: str, repeats: int, warmup: int, device) -> dict:
    """Per case: the median over rounds of (case time / base time measured right next to it). Rounds visit the cases
    in a fresh random order, each case paired with a base call before or after it (alternating), so that slow drifts
    and bursts of load on a shared machine hit both sides of each ratio."""
    rng = random.Random(0)
    names = [k for k in fns if k != base]
    for _ in range(warmup):
        for fn in fns.values(): fn()
    ratios = {k: [] for k in names}
    for i in range(repeats):
        rng.shuffle(names)
        for name in names:
            pair = (base, name) if i % 2 else (name, base)
            t = {k: _timed(fns[k], device) for k in pair}
            ratios[name].append(t[name] / t[base])
    out = {k: statistics.median(v) for k, v in ratios.items()}
    out[base] = 1.0
    return out


def run(mode: str, repeats: int, warmup: int) -> dict:
    gpu = mode == "gpu"
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    d, tokens, r = (4096, 16384, 16) if gpu else (1024, 2048, 16)
    torch.manual_seed(0)
    base = nn.Linear(d, d).to(device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, d, device=device, dtype=dtype)
    cases = {"base": base}
    ads = ours(base, r)
    cases.update({f"ours {k}": v for k, v in ads.items()})
    peft_layers = peers(base, r)
    cases.update({f"PEFT {k}": v for k, v in peft_layers.items()})
    if gpu: cases.update({f"PEFT {k} (bf16 weights)": v for k, v in peers(base, r, torch.bfloat16).items()})

    fwd = paired_ratios({k: (lambda m=m: forward(m, x)) for k, m in cases.items()}, "base", repeats, warmup, device)
    trn = paired_ratios({k: (lambda m=m: step(m, x, g)) for k, m in cases.items()}, "base", repeats, warmup, device)
    base_mem = peak_bytes(lambda: step(base, x, g), device) if gpu else saved_bytes(base, x)
    rows = []
    for name, m in cases.items():
        method = name.split()[1] if name != "base" else None
        if name == "base": delta = torch.zeros(d, d, device=device)
        elif name.startswith("ours"): delta = m.delta_weight()
        else: delta = peft_delta(m)
        mem = peak_bytes(lambda: step(m, x, g), device) if gpu else saved_bytes(m, x)
        row = {"case": name, "forward_ratio": fwd[name], "step_ratio": trn[name],
               "extra_memory_MB": (mem - base_mem) / 2 ** 20,
               "trainable_params": sum(p.numel() for p in m.parameters() if p.requires_grad),
               "max_rel_diff": max_diff(m, x, delta, base)}
        if name.startswith("ours"):
            row["path"] = m.choose_path(x)
            row["target"] = TARGETS[mode][method]
            peer = cases.get(f"PEFT {method}")
            row["meets_target"] = row["step_ratio"] <= row["target"]
            if peer is not None: row["faster_than_PEFT"] = trn[name] < trn[f"PEFT {method}"]
        rows.append(row)
    return {"mode": mode, "dtype": str(dtype), "shape": [d, d], "tokens": tokens, "rank": r,
            "repeats": repeats, "warmup": warmup, "machine": machine(),
            "peft": __import__("peft").__version__ if peft_layers else None, "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="CUDA mode: bf16, 4096×4096, 16,384 tokens")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 41 on CPU, 25 on GPU)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's); recorded in the section name")
    args = ap.parse_args()
    mode = "gpu" if args.gpu else "cpu"
    if args.threads: torch.set_num_threads(args.threads)
    section = mode if args.gpu or not args.threads else f"cpu_{args.threads}_threads"
    if args.gpu and not torch.cuda.is_available():
        print("--gpu: CUDA is not available on this machine; nothing measured"); return
    result = run(mode, args.repeats or (25 if args.gpu else 41), args.warmup)
    print(f"{mode}: {result['dtype']}, {result['shape'][0]}×{result['shape'][1]}, {result['tokens']} tokens, r = {result['rank']}, "
          f"{result['repeats']} interleaved rounds; torch {torch.__version__}, PEFT {result['peft']}; {result['machine'].get('gpu', result['machine']['processor'])}")
    print(table(result["rows"], ["case", "path", "forward_ratio", "step_ratio", "target", "meets_target", "faster_than_PEFT",
                                 "extra_memory_MB", "trainable_params", "max_rel_diff"]))
    path = RESULTS / "adapters.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    sections = {k: v for k, v in previous.items() if k not in ("machine", "when")}
    sections[section] = result
    print("wrote", save("adapters", sections))


if __name__ == "__main__":
    main()
