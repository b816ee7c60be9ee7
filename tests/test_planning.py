"""`plan`, `convert_adapter` and `add_weighted_adapter` on random shapes (hypothesis). The chapter `09b_planning` holds
the derivations and the inline checks; these are the properties over many shapes (the PEFT comparison:
`test_planning_peft.py`)."""

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


@FAST
@given(src=st.sampled_from(METHODS), dst=st.sampled_from(METHODS), d_in=DIMS, d_hidden=DIMS,
       energy=st.sampled_from([0.3, 0.8, 0.95, 1.0]))
def test_energy_keeps_the_fraction_for_every_target(src, dst, d_in, d_hidden, energy):
    m = adapted(src, d_in, d_hidden)
    report = lt.convert_adapter(m, "default", dst, energy=energy, new_name="e")
    lt.convert_adapter(m, "default", dst, new_name="x")  # the exact conversion
    for r, layer in zip(report, adapter_layers(m).values()):
        D, new = layer.updates["default"].delta_weight().double(), layer.updates["e"]
        err = float((D - new.delta_weight().double()).norm() / D.norm())
        assert err ** 2 <= 1 - energy + 1e-6, (r, err)  # keeps the fraction asked of ‖ΔW‖²
        s = torch.linalg.svdvals(D)
        k = int((torch.cumsum(s ** 2, 0) < energy * (s ** 2).sum() * (1 - 1e-12)).sum()) + 1
        assert lt.planning.rank_cap(new) >= min(k, len(s)), (r, k)  # Eckart–Young: no lower rank can
        assert new.n_params <= layer.updates["x"].n_params, r  # never more than the exact conversion
