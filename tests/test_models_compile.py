"""`torch.compile` on an adapted model: same outputs and gradients as eager, for each adapter (CPU, `aot_eager`
backend so that the check does not need a C++ compiler and stays fast)."""
import pytest
import torch
from torch import nn

from lowrank_tales.injection import adapter_layers, inject, merge
from tolerance import assert_close


def model(method, **kw):
    torch.manual_seed(0)
    m = inject(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), method, targets=["0", "2"], **kw)
    with torch.no_grad():
        for a in adapter_layers(m).values():
            for f in a.factors: f.normal_(0, 0.2)
    return m


@pytest.mark.parametrize("method,kw", [("lora", dict(rank=4, alpha=8)), ("loha", dict(rank=2, alpha=3)),
                                       ("lokr", dict(rank=2)), ("lokh", dict(p=2))])
def test_compile_matches_eager(method, kw):
    torch._dynamo.reset()
    eager, x = model(method, **kw), torch.randn(5, 16)
    compiled = torch.compile(model(method, **kw), backend="aot_eager", fullgraph=False)
    y_e, y_c = eager(x), compiled(x)
    assert_close(y_c, y_e)
    y_e.square().sum().backward()
    y_c.square().sum().backward()
    for (n, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None: assert_close(q.grad, p.grad)


def test_compile_after_merge():
    torch._dynamo.reset()
    m, x = model("lora", rank=4, alpha=8), torch.randn(5, 16)
    y = m(x).detach()
    merge(m)
    assert_close(torch.compile(m, backend="aot_eager")(x), y)
