"""PEFT's `use_effective_conv2d` (LoHa's `hada_t1`/`hada_t2`, LoKr's `lokr_t2` Tucker cores on kernels larger than 1)
and LoKr's `decompose_both` (`lokr_w1_a`/`lokr_w1_b`) against real PEFT, on a tiny net of a Conv2d, a Conv1d and a
Linear: the same factors at the same seed (PEFT's init, the zero factor included), and with PEFT's factors copied in,
the same ΔW, outputs and gradients; export_peft read by `PeftModel.from_pretrained`, a `save_pretrained` folder read by
`import_peft`, and our own files, each giving the same outputs."""
import pytest
import torch
from torch import nn

import lowrank_tales as lt
from lowrank_tales.adapters import as_layer_weight
from lowrank_tales.injection import adapter_layers
from lowrank_tales.peft_interop import PEFT_PREFIX, peft_name, peft_shape

peft = pytest.importorskip("peft")

TARGETS = ["0", "2", "4"]
# ranks where PEFT splits everything it can: A = A1 A2 (r < max(a1, a2) / 2) and a low-rank B, so Tucker cores too
CASES = {"loha": (lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=TARGETS, use_effective_conv2d=True),
                  dict(rank=2, alpha=3, use_effective_conv2d=True)),
         "lokr": (lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=TARGETS, use_effective_conv2d=True,
                                          decompose_both=True),
                  dict(rank=2, alpha=3, use_effective_conv2d=True, decompose_both=True))}


def net(dtype=torch.float64):
    "Conv2d 3×3 → Conv1d k=3 → Linear, the same weights at every call."
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 36, 3, padding=1), nn.Flatten(2), nn.Conv1d(36, 48, 3), nn.Flatten(),
                         nn.Linear(144, 16)).to(dtype)


X = torch.randn(2, 4, 1, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def ours(method, dtype=torch.float64):
    torch.manual_seed(3)
    return lt.inject(net(dtype), method, targets=TARGETS, **CASES[method][1])


def theirs(method, init_weights=True, dtype=torch.float64):
    torch.manual_seed(3)
    cfg = CASES[method][0]()
    cfg.init_weights = init_weights
    return peft.get_peft_model(net(dtype), cfg)


def pairs(m, pm):
    "For each adapted module and factor: (our parameter, PEFT's parameter, PEFT's shape, PEFT's name)."
    named = dict(pm.named_parameters())
    return [(p, named[f"{PEFT_PREFIX}{n}.{peft_name(u, k)}.default"], peft_shape(a.base, u, k), peft_name(u, k), u)
            for n, a in adapter_layers(m).items() for u in [a.updates["default"]] for k, p in u.named_parameters()]


def copy_from(m, pm):
    with torch.no_grad():
        for p, q, *_ in pairs(m, pm): p.copy_(q.reshape(p.shape))


@pytest.mark.parametrize("method", list(CASES))
def test_factor_shapes_and_init_as_peft(method):
    "Every PEFT factor has one of ours of PEFT's shape, drawn from the same seed in the same order; ΔW starts at 0."
    m, pm = ours(method, torch.float32), theirs(method, dtype=torch.float32)  # PEFT draws in float32, then casts
    got = pairs(m, pm)
    assert len(got) == sum(1 for n, p in pm.named_parameters() if p.requires_grad)
    assert {n.split(".")[-2] for n, _ in pm.named_parameters()} >= ({"hada_t1", "hada_t2"} if method == "loha" else
                                                                     {"lokr_t2", "lokr_w1_a", "lokr_w1_b"})
    for p, q, shape, *_ in got:
        assert tuple(q.shape) == shape
        assert torch.equal(p.detach().reshape(shape), q.detach())
    x = X.float()
    assert torch.equal(m(x), net(torch.float32)(x))


def _autograd_cp(t1, w1a, w1b, t2, w2a, w2b, scale):
    "PEFT's `HadaWeightCP.forward`, differentiated by autograd."
    one = lambda t, wa, wb: torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)
    return one(t1, w1a, w1b) * one(t2, w2a, w2b) * scale


# PEFT 0.21.2's hand-written `HadaWeightCP.backward` gives `hada_w1_a` and `hada_w2_a` the gradient built from the other
# term's core (its `temp`); the other four gradients are right. Those two are compared with autograd through PEFT's
# own forward instead.
PEFT_CP_WRONG = ("hada_w1_a", "hada_w2_a")


def _grads(m, pm, g):
    "(ours, PEFT's, PEFT's name, our update) for every factor's gradient along `g`."
    (m(X) * g).sum().backward()
    (pm(X) * g).sum().backward()
    return [(p.grad.reshape(q.shape), q.grad, n, u) for p, q, _, n, u in pairs(m, pm)]


@pytest.mark.parametrize("method", list(CASES))
def test_delta_forward_gradients_as_peft(method, monkeypatch):
    "PEFT's random factors copied: ΔW of each layer, the output and every factor's gradient agree."
    m, pm = ours(method), theirs(method, init_weights=False)
    copy_from(m, pm)
    for n, a in adapter_layers(m).items():
        W = pm.base_model.model.get_submodule(n).get_delta_weight("default")
        torch.testing.assert_close(as_layer_weight(a.base, a.delta_weight()), W, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(m(X), pm(X), rtol=1e-12, atol=1e-14)
    g = torch.randn(2, 16, dtype=torch.float64)
    checked = 0
    for ours_g, peft_g, n, u in _grads(m, pm, g):
        if u.method == "loha" and u.tucker and n in PEFT_CP_WRONG: continue
        torch.testing.assert_close(ours_g, peft_g, rtol=1e-10, atol=1e-13)
        checked += 1
    assert checked == (12 if method == "loha" else 14)
    if method == "loha":  # all six on each layer against autograd through PEFT's own forward
        monkeypatch.setattr(peft.tuners.loha.layer, "make_weight_cp", _autograd_cp)
        m.zero_grad(), pm.zero_grad()
        for ours_g, peft_g, *_ in _grads(m, pm, g): torch.testing.assert_close(ours_g, peft_g, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("method", list(CASES))
def test_files_both_ways(method, tmp_path):
    "Our export read by PEFT, PEFT's save read by us, and our own save/load: the same outputs each time."
    m, pm = ours(method), theirs(method, init_weights=False)
    copy_from(m, pm)
    lt.export_peft(m, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(net(), tmp_path / "ours")
    torch.testing.assert_close(back(X), m(X), rtol=1e-12, atol=1e-14)
    pm.save_pretrained(tmp_path / "theirs")
    torch.testing.assert_close(lt.import_peft(net(), tmp_path / "theirs")(X), pm(X), rtol=1e-12, atol=1e-14)
    lt.save_adapter(m, tmp_path / "files")
    loaded = lt.load_adapter(net(), tmp_path / "files")
    assert torch.equal(loaded(X), m(X))
    u = adapter_layers(loaded)["0"].updates["default"]
    assert u.tucker == (3, 3) and (method == "loha" or u.decompose_both)
