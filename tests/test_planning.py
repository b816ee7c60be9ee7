"""`plan`, `convert_adapter` and `add_weighted_adapter` on random shapes (hypothesis), and against PEFT's
`convert_to_lora` (0.21) and `add_weighted_adapter` at equal rank. The chapter `09b_planning` holds the derivations and
the inline checks; these are the properties over many shapes and the peer comparison."""
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import lowrank_tales as lt
from lowrank_tales.injection import adapter_layers

FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True,
                database=None)
DIMS = st.sampled_from([4, 6, 8, 9, 12, 16])
METHODS = ["lora", "loha", "lokr", "lokh"]
SIZES = {"lora": dict(rank=2), "loha": dict(rank=2), "lokr": dict(rank=1), "lokh": {}}


def adapted(method, d_in, d_hidden, seed=0, name="default", **kw):
    "Two linear layers with adapter `name` of `method`, its factors random."
    torch.manual_seed(seed)
    m = lt.inject(nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_in)), method,
                  targets=["0", "2"], name=name, alpha=3.0, **{**SIZES[method], **kw})
    with torch.no_grad():
        for a in adapter_layers(m).values():
            for p in a.updates[name].factors: p.normal_(std=0.5)
    return m


def output_with(m, name, x):
    lt.set_adapter(m, name)
    with torch.no_grad(): return m(x)


@FAST
@given(src=st.sampled_from(METHODS), dst=st.sampled_from(METHODS), d_in=DIMS, d_hidden=DIMS)
def test_exact_conversion_keeps_the_output(src, dst, d_in, d_hidden):
    m = adapted(src, d_in, d_hidden)
    x = torch.randn(5, d_in)
    y = output_with(m, "default", x)
    report = lt.convert_adapter(m, "default", dst, new_name="c")
    assert max(r["rel_error"] for r in report) < 1e-5, report
    torch.testing.assert_close(output_with(m, "c", x), y, rtol=1e-4, atol=1e-4 * float(y.abs().max()))


@FAST
@given(a=st.sampled_from(METHODS), b=st.sampled_from(METHODS), d_in=DIMS, d_hidden=DIMS,
       w=st.lists(st.floats(-2, 2, allow_nan=False), min_size=2, max_size=2))
def test_cat_is_the_weighted_sum_and_svd_its_best_rank_k(a, b, d_in, d_hidden, w):
    m = adapted(a, d_in, d_hidden, name="a")
    lt.inject(m, b, targets=["0", "2"], name="b", alpha=2.0, **SIZES[b])
    with torch.no_grad():
        for layer in adapter_layers(m).values():
            for p in layer.updates["b"].factors: p.normal_(std=0.5)
    report = lt.add_weighted_adapter(m, ["a", "b"], w, "cat", combination="cat")
    for r, layer in zip(report, adapter_layers(m).values()):
        D = w[0] * layer.updates["a"].delta_weight().double() + w[1] * layer.updates["b"].delta_weight().double()
        torch.testing.assert_close(layer.updates["cat"].delta_weight().double(), D, rtol=1e-4,
                                   atol=1e-5 * float(D.abs().max()) + 1e-12)
    report = lt.add_weighted_adapter(m, ["a", "b"], w, "svd", combination="svd", rank=2)
    for r, layer in zip(report, adapter_layers(m).values()):
        D = w[0] * layer.updates["a"].delta_weight().double() + w[1] * layer.updates["b"].delta_weight().double()
        s = torch.linalg.svdvals(D)
        best = float(s[2:].norm() / s.norm()) if s.norm() > 0 else 0.0
        assert abs(r["rel_error"] - best) < 1e-4, (r, best)


@FAST
@given(d_in=DIMS, d_hidden=DIMS, budget=st.integers(60, 400))
def test_plan_fits_its_budget_and_injects_what_it_counts(d_in, d_hidden, budget):
    net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_in))
    smallest = min(lt.planning.smallest_adapter(m, net[0]) for m in METHODS)
    smallest = max(smallest, min(lt.planning.smallest_adapter(m, net[2]) for m in METHODS))
    if budget < smallest:
        with pytest.raises(ValueError, match="the smallest of"): lt.plan(net, budget, targets=["0", "2"])
        return
    p = lt.plan(net, budget, targets=["0", "2"])
    assert all(r["params"] <= budget for r in p)
    p.inject(net)
    assert lt.trainable_parameters(net) == sum(r["params"] for r in p.choose().values())


peft = pytest.importorskip("peft")


def peft_copy(ours, base, tmp_path):
    "PEFT's model holding the same adapter as `ours` (through `export_peft`)."
    lt.export_peft(ours, tmp_path)
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_against_peft_convert_to_lora(tmp_path, method):
    "At equal rank PEFT's truncated SVD and ours agree where ours approximates; at the exact rank both are exact."
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 36), nn.ReLU(), nn.Linear(36, 24))
    ours = lt.inject(copy.deepcopy(base), method, targets=["0", "2"], alpha=4.0,
                     **(dict(rank=3) if method == "loha" else dict(rank=2)))
    with torch.no_grad():
        for a in adapter_layers(ours).values():
            for p in a.updates["default"].factors: p.normal_(std=0.3)
    theirs = peft_copy(ours, base, tmp_path)
    exact = 9 if method == "loha" else 8
    for rank in (2, exact):
        _, sd = peft.convert_to_lora(theirs, rank)
        report = lt.convert_adapter(ours, "default", "lora", rank=rank, new_name=f"r{rank}")
        for r in report:
            D = adapter_layers(ours)[r["layer"]].updates["default"].delta_weight().double()
            pre = f"base_model.model.{r['layer']}."
            P = sd[pre + "lora_B.weight"].double() @ sd[pre + "lora_A.weight"].double()
            peft_error = float((D - P).norm() / D.norm())
            assert abs(peft_error - r["rel_error"]) < 1e-4, (rank, peft_error, r)
            if rank == exact: assert r["rel_error"] < 1e-6 and peft_error < 1e-5


def test_against_peft_add_weighted_adapter_linear(tmp_path):
    "PEFT's `linear` on two LoRAs of equal rank sums scaled factors (cross terms); ours refuses, and `cat` is exact."
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 36), nn.ReLU(), nn.Linear(36, 24))
    ours = lt.inject(copy.deepcopy(base), "lora", targets=["0", "2"], rank=3, alpha=6.0)
    with torch.no_grad():
        for a in adapter_layers(ours).values():
            for p in a.updates["default"].factors: p.normal_(std=0.3)
    theirs = peft_copy(ours, base, tmp_path / "a")
    lt.inject(ours, "lora", targets=["0", "2"], name="b", rank=3, alpha=6.0)
    with torch.no_grad():
        for a in adapter_layers(ours).values():
            for p in a.updates["b"].factors: p.normal_(std=0.3)
    lt.export_peft(ours, tmp_path / "all", name="b")
    theirs.load_adapter(tmp_path / "all" / "b", adapter_name="b")
    theirs.add_weighted_adapter(["default", "b"], [0.5, 0.5], "lin", combination_type="linear")
    layer = adapter_layers(ours)["0"]
    D = 0.5 * layer.updates["default"].delta_weight() + 0.5 * layer.updates["b"].delta_weight()
    pl = theirs.base_model.model[0]
    P = pl.get_delta_weight("lin")
    assert float((P - D).norm() / D.norm()) > 0.1  # PEFT's linear is not the weighted sum
    with pytest.raises(ValueError, match="combination='linear' is not exact"):
        lt.add_weighted_adapter(ours, ["default", "b"], [0.5, 0.5], "lin")
    report = lt.add_weighted_adapter(ours, ["default", "b"], [0.5, 0.5], "cat", combination="cat")
    assert max(r["rel_error"] for r in report) < 1e-6
