"""Adapters: one frozen Linear with LoRA/LoHA/LoKr/LoKH (ours), PEFT's and LyCORIS's LoRA/LoHa/LoKr, against the base layer.

Protocol of `shared/design/performance.md`: input requires grad, fixed upstream gradient, adapter weights non-zero.
Per case: forward without grad and a training step (forward + backward) as ratios to the frozen base layer alone,
measured in one run: each case timed next to a base call (paired, random order per round), median of the paired
ratios after warm-up; memory the step keeps for backward beyond the base layer
(CPU: bytes saved by autograd; GPU: peak allocated); trainable parameters; max difference of the output against a
plainly formed update `F.linear(x, W0 + s·ΔW)` computed in float64.

    python benchmarks/bench_adapters.py            # CPU: fp32, 1024×1024, 2,048 tokens, r = 16; torch's threads, then
                                                   # one thread, then the step ratio against tokens at one thread
    python benchmarks/bench_adapters.py --gpu      # CUDA: bf16, 4096×4096, 16,384 tokens, r = 16 (if available)
    python benchmarks/bench_adapters.py --threads 1   # only CPU with one torch thread (section "cpu_1_threads")
    python benchmarks/bench_adapters.py --gpu --scaling   # CUDA, and the step ratio against tokens on it
    python benchmarks/bench_adapters.py --bf16     # only the two bf16 CPU sections (also part of the default run)

bf16 on the CPU (sections "cpu_bf16_autocast" and "cpu_bf16_weights", torch's threads): the same layer and protocol,
(a) float32 weights and input under `torch.autocast("cpu", dtype=torch.bfloat16)` -- ours with float32 factors, PEFT
default, LyCORIS -- and (b) bf16 weights and input -- ours with bf16 factors (`dtype=torch.bfloat16`), PEFT with bf16
adapter weights, LyCORIS cast to bf16 -- each against the frozen base step in the same setting. The section records
whether the CPU has native bf16 matrix units (cpuinfo flags amx_bf16 / avx512_bf16) and the measured bf16/fp32
matmul time. DoRA rows (ours `dora=True` against PEFT `use_dora=True`, LoRA) in every CPU section.

Peers, all around the same frozen `nn.Linear` (PEFT and LyCORIS wrap a deep copy, so that the base itself stays plain):
PEFT 0.21 default (adapter weights kept in float32), PEFT with bf16 adapter weights (on a CPU without native bf16
matmul -- AVX2 only -- the bf16 adapter matmuls are emulated and slow: that column measures the CPU, not the method),
and LyCORIS 4.1.3's `LoConModule`/`LohaModule`/`LokrModule` (its default, non-bypass mode: the update is formed).

Results go to benchmarks/results/adapters.json (one section per mode; a run keeps the other mode's section).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
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

from common import RESULTS, interleaved_times, machine, save, table  # noqa: E402

from lowrank_tales.adapters import LoHA, LoKH, LoKr, LoRA  # noqa: E402

SMOKE = False  # --smoke: tiny sizes, a check that every case runs (numbers meaningless; results not saved)
TARGETS = {"cpu": {"LoRA": 1.2, "LoHA": 1.6, "LoKr": 1.3, "LoKH": 1.7},
           "cpu_bf16": {"LoRA": 1.25, "LoHA": 1.6, "LoKr": 1.4, "LoKH": 1.7},
           "gpu": {"LoRA": 1.25, "LoHA": 1.45, "LoKr": 1.4, "LoKH": 1.6}}


def ours(base: nn.Linear, r: int, dtype: torch.dtype | None = None, dora: bool = False) -> dict:
    "Our four adapters on `base` (factors in `dtype`; with `dora`, also LoRA with DoRA), with random non-zero factors."
    ads = {"LoRA": LoRA(base, rank=r, alpha=2 * r, dtype=dtype), "LoHA": LoHA(base, rank=r, alpha=2 * r, dtype=dtype),
           "LoKr": LoKr(base, rank=r, alpha=2 * r, dtype=dtype), "LoKH": LoKH(base, p=2, alpha=0.5, dtype=dtype)}
    if dora: ads["LoRA+DoRA"] = LoRA(base, rank=r, alpha=2 * r, dtype=dtype, dora=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for ad in ads.values():
            for f in ad.factors: f.copy_(torch.randn(f.shape, generator=gen) / f.shape[-1] ** 0.5)
    return ads


def peers(base: nn.Linear, r: int, adapter_dtype: torch.dtype | None = None, dora: bool = False) -> dict:
    "PEFT's LoRA, LoHa and LoKr (with `dora`, also LoRA with DoRA) on a copy of `base`, random non-zero initialisation."
    try:
        import peft
    except ImportError:
        return {}
    configs = {"LoRA": peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], init_lora_weights=False),
               "LoHA": peft.LoHaConfig(r=r, alpha=2 * r, target_modules=["0"], init_weights=False),
               "LoKr": peft.LoKrConfig(r=r, alpha=2 * r, target_modules=["0"], init_weights=False)}
    if dora: configs["LoRA+DoRA"] = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"],
                                                    init_lora_weights=False, use_dora=True)
    out = {}
    for name, cfg in configs.items():
        model = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), cfg, autocast_adapter_dtype=adapter_dtype is None)
        if adapter_dtype is not None:  # only the adapter's own weights: the frozen base keeps its dtype
            for n, p in model.named_parameters():
                if p.requires_grad: p.data = p.data.to(adapter_dtype)
        out[name] = model.base_model.model[0]  # the adapted layer itself
    return out


def lycoris_peers(base: nn.Linear, r: int) -> dict:
    "LyCORIS's LoRA (LoCon), LoHa and LoKr modules around a copy of `base`, random non-zero factors, or {} without it."
    try:
        from lycoris.modules import LoConModule, LohaModule, LokrModule
    except ImportError:
        return {}
    out, gen = {}, torch.Generator().manual_seed(1)
    for name, cls in (("LoRA", LoConModule), ("LoHA", LohaModule), ("LoKr", LokrModule)):
        m = cls(f"bench_{name}", copy.deepcopy(base), multiplier=1.0, lora_dim=r, alpha=2 * r)
        m.apply_to()  # installs the wrapper on its own copy of the layer
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad: p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        out[name] = m.to(base.weight.device)
    return out


def lycoris_delta(m) -> torch.Tensor:
    "The update LyCORIS's own (non-bypass) forward adds to the weight (LoHa: `get_weight · scalar`; its `get_diff_weight` scales twice)."
    with torch.no_grad():
        if hasattr(m, "hada_w1_a"): return (m.get_weight(m.shape) * m.scalar * m.multiplier).reshape(m.shape)
        return m.get_diff_weight(multiplier=m.multiplier)[0].reshape(m.shape)


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


def step_in(ctx):
    "A training step run inside the context manager `ctx()` (autocast, or a null context)."
    def go(module, x, g):
        with ctx(): step(module, x, g)
    return go


def forward_in(ctx):
    "A no-grad forward run inside `ctx()`."
    def go(module, x):
        with ctx(): forward(module, x)
    return go


def measure(section: str, cases: dict, base: nn.Module, x, g, repeats: int, warmup: int, device, ctx=None,
            slow: dict | None = None) -> list:
    """Rows of one section: paired forward and step ratios to `base`, memory, parameters, accuracy, targets.
    `slow` cases (PEFT's emulated bf16 LoHa/LoKr) are timed apart: one paired step after one warm-up."""
    ctx = ctx or contextlib.nullcontext
    stp, fwd_ = step_in(ctx), forward_in(ctx)
    fwd = paired_ratios({k: (lambda m=m: fwd_(m, x)) for k, m in cases.items()}, "base", repeats, warmup, device)
    trn = paired_ratios({k: (lambda m=m: stp(m, x, g)) for k, m in cases.items()}, "base", repeats, warmup, device)
    slow = slow or {}
    if slow:
        slow_trn = paired_ratios({k: (lambda m=m: stp(m, x, g)) for k, m in {"base": base, **slow}.items()}, "base", 1, 1,
                                 device)
        trn.update({k: v for k, v in slow_trn.items() if k != "base"}); fwd.update({k: None for k in slow})
        cases = {**cases, **slow}
    gpu = device.type == "cuda"
    def mem_of(m):
        with ctx(): return peak_bytes(lambda: step(m, x, g), device) if gpu else saved_bytes(m, x)
    base_mem = mem_of(base)
    targets = TARGETS["cpu_bf16" if section.startswith("cpu_bf16") else section.split("_")[0]]
    rows, d = [], base.weight.shape[0]
    for name, m in cases.items():
        method = name.split()[1] if name != "base" else None
        if name == "base" or "DoRA" in name: delta = None  # DoRA rescales W0 + ΔW: no additive update to compare
        elif name.startswith("ours"): delta = m.delta_weight()
        elif name.startswith("LyCORIS"): delta = lycoris_delta(m)
        else: delta = peft_delta(m)
        with ctx(): diff = None if delta is None else max_diff(m, x, delta, base)
        row = {"case": name, "forward_ratio": fwd[name], "step_ratio": trn[name],
               "extra_memory_MB": (mem_of(m) - base_mem) / 2 ** 20,
               "trainable_params": sum(p.numel() for p in m.parameters() if p.requires_grad),
               "timed_rounds": 1 if name in slow else repeats, "max_rel_diff": diff}
        if name.startswith("ours"):
            row["path"] = m.choose_path(x)
            if method in targets:
                row["target"] = targets[method]
                row["meets_target"] = row["step_ratio"] <= row["target"]
            for peer in ("PEFT", "LyCORIS"):
                theirs = [k for k in cases if k.startswith(peer) and k.split()[1] == method]
                if theirs:
                    row[f"step_vs_{peer}"] = trn[name] / min(trn[k] for k in theirs)
                    row[f"faster_than_{peer}"] = trn[name] < min(trn[k] for k in theirs)
        rows.append(row)
    return rows


def run(mode: str, repeats: int, warmup: int, slow_bf16: bool = True) -> dict:
    gpu = mode == "gpu"
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    d, tokens, r = (4096, 16384, 16) if gpu else (1024, 2048, 16)
    if SMOKE: d, tokens = 256, 256
    torch.manual_seed(0)
    base = nn.Linear(d, d).to(device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, d, device=device, dtype=dtype)
    cases = {"base": base}
    cases.update({f"ours {k}": v for k, v in ours(base, r, dora=not gpu).items()})
    peft_layers = peers(base, r, dora=not gpu)
    cases.update({f"PEFT {k}": v for k, v in peft_layers.items()})
    bf16 = {f"PEFT {k} (bf16 weights)": v for k, v in peers(base, r, torch.bfloat16).items()}
    # on a CPU without bf16 matmul units PEFT's bf16 LoHa/LoKr (full-size bf16 matmuls) take tens of seconds per step:
    # timed apart, one paired step after one warm-up, instead of in every round
    slow = {} if gpu or native_bf16() else {k: bf16.pop(k) for k in list(bf16) if "LoRA" not in k}
    if not slow_bf16: slow = {}  # skipped in the one-thread section: tens of seconds per step measure the CPU, not PEFT
    cases.update(bf16)
    lyco = lycoris_peers(base, r)
    cases.update({f"LyCORIS {k}": v for k, v in lyco.items()})
    rows = measure(mode, cases, base, x, g, repeats, warmup, device, slow=slow)
    return {"mode": mode, "dtype": str(dtype), "shape": [d, d], "tokens": tokens, "rank": r,
            "repeats": repeats, "warmup": warmup, "machine": machine(),
            "peft": __import__("peft").__version__ if peft_layers else None,
            "lycoris": __import__("importlib.metadata").metadata.version("lycoris-lora") if lyco else None,
            "bf16_matmul_note": None if gpu else "bf16 on this CPU: " + bf16_note(), "rows": rows}


def native_bf16() -> bool:
    "Whether the CPU has native bf16 matrix instructions (AMX or AVX512-BF16), from /proc/cpuinfo's flags."
    try: flags = Path("/proc/cpuinfo").read_text().split()
    except OSError: return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def run_bf16(kind: str, repeats: int, warmup: int) -> dict:
    """bf16 on the CPU: `kind="autocast"` (float32 weights and input, bf16 autocast, our factors float32) or
    `kind="weights"` (bf16 weights, input and adapter weights), against the frozen base step in the same setting."""
    d, tokens, r = (256, 256, 16) if SMOKE else (1024, 2048, 16)
    device, auto = torch.device("cpu"), kind == "autocast"
    dtype = torch.float32 if auto else torch.bfloat16
    torch.manual_seed(0)
    base = nn.Linear(d, d).to(dtype=dtype).requires_grad_(False)
    x = torch.randn(tokens, d, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, d, dtype=torch.bfloat16)  # the output's dtype in both settings
    cases = {"base": base}
    cases.update({f"ours {k}": v for k, v in ours(base, r, None if auto else torch.bfloat16, dora=True).items()})
    peft_layers = peers(base, r, None if auto else torch.bfloat16, dora=True)
    cases.update({f"PEFT {k}": v for k, v in peft_layers.items()})
    lyco = lycoris_peers(base, r)
    if not auto: lyco = {k: m.to(torch.bfloat16) for k, m in lyco.items()}
    cases.update({f"LyCORIS {k}": v for k, v in lyco.items()})
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if auto else None
    rows = measure(f"cpu_bf16_{kind}", cases, base, x, g, repeats, warmup, device, ctx=ctx)
    return {"mode": f"cpu_bf16_{kind}", "dtype": "torch.float32 under bf16 autocast" if auto else "torch.bfloat16",
            "shape": [d, d], "tokens": tokens, "rank": r, "repeats": repeats, "warmup": warmup, "machine": machine(),
            "native_bf16": native_bf16(), "peft": __import__("peft").__version__ if peft_layers else None,
            "lycoris": __import__("importlib.metadata").metadata.version("lycoris-lora") if lyco else None,
            "bf16_matmul_note": "bf16 on this CPU: " + bf16_note(), "rows": rows}


def bf16_note() -> str:
    "How fast a bf16 matmul runs on this CPU relative to float32 (PEFT's bf16-weights column depends on it)."
    a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
    ah, bh = a.bfloat16(), b.bfloat16()
    t = interleaved_times({"fp32": lambda: a @ b, "bf16": lambda: ah @ bh}, repeats=3, warmup=1)
    return f"a 512×1024×1024 matmul in bf16 takes {t['bf16'] / t['fp32']:.1f}× the float32 time"


def scaling(mode: str, tokens_list=None, repeats: int = 9, warmup: int = 2) -> dict:
    "Training-step ratio to the base layer against the number of tokens, ours and PEFT default."
    d, r = (4096, 16) if mode == "gpu" else (1024, 16)
    tokens_list = tokens_list or ((1024, 2048, 4096, 8192, 16384, 32768) if mode == "gpu" else (256, 512, 1024, 2048, 4096))
    if SMOKE: d, tokens_list = 256, tokens_list[:2]
    device, dtype = (torch.device("cuda"), torch.bfloat16) if mode == "gpu" else (torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    base = nn.Linear(d, d).to(device=device, dtype=dtype).requires_grad_(False)
    cases = {"base": base, **{f"ours {k}": v for k, v in ours(base, r).items()}, **{f"PEFT {k}": v for k, v in peers(base, r).items()}}
    rows = []
    for T in tokens_list:
        x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(T, d, device=device, dtype=dtype)
        times = interleaved_times({k: (lambda m=m: step(m, x, g)) for k, m in cases.items()}, repeats=repeats, warmup=warmup, device=device)
        rows.append({"tokens": T, "base_step_s": times["base"], **{k: times[k] / times["base"] for k in cases if k != "base"},
                     **{f"path {k}": cases[k].choose_path(x) for k in cases if k.startswith("ours")}})
    return {"mode": mode, "shape": [d, d], "rank": r, "dtype": str(dtype), "repeats": repeats, "rows": rows}


def report(result: dict) -> None:
    "Print one section's table."
    print(f"\n{result['mode']} ({result['machine']['torch_threads']} threads): {result['dtype']}, {result['shape'][0]}×{result['shape'][1]}, "
          f"{result['tokens']} tokens, r = {result['rank']}, {result['repeats']} interleaved rounds; torch {torch.__version__}, "
          f"PEFT {result['peft']}, LyCORIS {result['lycoris']}; {result['machine'].get('gpu', result['machine']['processor'])}")
    print(table(result["rows"], ["case", "path", "forward_ratio", "step_ratio", "target", "meets_target", "faster_than_PEFT",
                                 "faster_than_LyCORIS", "extra_memory_MB", "trainable_params", "max_rel_diff"]))
    if result["bf16_matmul_note"]: print(result["bf16_matmul_note"])
    if "native_bf16" in result: print("native bf16 matrix instructions (amx_bf16/avx512_bf16):", result["native_bf16"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="CUDA mode: bf16, 4096×4096, 16,384 tokens")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 15 on CPU, 25 on GPU)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="only this many torch CPU threads (section cpu_<n>_threads); default: torch's threads (section cpu), "
                         "then one thread (section cpu_1_threads) and the scaling against tokens at one thread")
    ap.add_argument("--scaling", action="store_true", help="with --threads or --gpu: also the step ratio against tokens")
    ap.add_argument("--bf16", action="store_true", help="only the two bf16 CPU sections (autocast; bf16 weights)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, two rounds, nothing saved: a check that every case runs")
    args = ap.parse_args()
    global SMOKE
    SMOKE = args.smoke
    if SMOKE: args.repeats, args.warmup = 2, 1
    if args.gpu and not torch.cuda.is_available():
        print("--gpu: CUDA is not available on this machine; nothing measured"); return
    mode, repeats = ("gpu", args.repeats or 25) if args.gpu else ("cpu", args.repeats or 15)
    if args.gpu: plan = [("gpu", None, True, args.scaling)]
    elif args.threads: plan = [(f"cpu_{args.threads}_threads", args.threads, True, args.scaling)]
    elif args.bf16: plan = [("cpu_bf16_autocast", None, True, False), ("cpu_bf16_weights", None, True, False)]
    else: plan = [("cpu", None, True, False), ("cpu_bf16_autocast", None, True, False),
                  ("cpu_bf16_weights", None, True, False), ("cpu_1_threads", 1, False, True)]  # what `make bench` runs
    path = RESULTS / "adapters.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    sections = {k: v for k, v in previous.items() if k not in ("machine", "when")}
    default_threads = torch.get_num_threads()
    for section, threads, slow_bf16, with_scaling in plan:
        torch.set_num_threads(threads or default_threads)
        if section.startswith("cpu_bf16"):
            sections[section] = result = run_bf16(section.rsplit("_", 1)[1], repeats, args.warmup)
        else: sections[section] = result = run(mode, repeats, args.warmup, slow_bf16)
        report(result)
        if with_scaling:
            sections[f"scaling_{section}"] = sc = scaling(mode)
            sc["machine"] = machine()
            print(f"\ntraining step / base step against tokens ({sc['dtype']}, {sc['shape']}, r = {sc['rank']})")
            print(table(sc["rows"], ["tokens", "base_step_s", *[k for k in sc["rows"][0] if k.startswith(("ours", "PEFT"))]]))
        if not SMOKE: print("wrote", save("adapters", sections))  # after every section: an interrupted run keeps what it measured


if __name__ == "__main__":
    main()
