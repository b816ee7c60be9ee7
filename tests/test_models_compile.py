"""`torch.compile` with the default backend (inductor) on adapted models: the same outputs and gradients as eager for
every method, path and DoRA (CPU; one small model, one compile). And `torch.func`: grad, vmap, jvp and a
Hessian-vector product agree with plain tensors; a second `torch.autograd` derivative is refused, never wrong."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

import lowrank_tales as lt
from lowrank_tales.injection import adapter_layers
from tolerance import assert_close

CASES = [  # one adapter per linear layer, all active at once: every method on each path, DoRA on both
    ("folded", "lora", dict(rank=4, alpha=8)), ("folded", "loha", dict(rank=2, alpha=3)),
    ("folded", "lokr", dict(rank=2, alpha=5)), ("folded", "lokh", dict(p=2, alpha=3, dora=True)),
    ("factored", "lora", dict(rank=4, alpha=8)), ("factored", "loha", dict(rank=2, alpha=3)),
    ("factored", "lokr", dict(rank=2, alpha=5)), ("factored", "lora", dict(rank=2, alpha=3, dora=True)),
    ("factored", "lokr", dict(rank=1, alpha=5, decompose_both=True)),  # A = A1 A2 (PEFT's decompose_both)
]


def model():
    "A stack of linear layers, each with one adapter of `CASES`, random factors (a trained adapter is not zero)."
    torch.manual_seed(0)
    dims = [16, 32, 24, 16, 24, 32, 16, 24, 8, 16]
    m = nn.Sequential(*[nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(dims, dims[1:])])
    for i, (path, method, kw) in enumerate(CASES):
        lt.inject(m, method, targets=[f"{i}.0"], name=f"a{i}", path=path, **kw)
    lt.set_adapter(m, [f"a{i}" for i in range(len(CASES))])
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".updates." in n and not n.endswith("magnitude"): p.normal_(0, 0.2)
    return m


def test_inductor_matches_eager():
    "One compile (they are slow on two cores) covers every case: outputs and every gradient as eager."
    torch._dynamo.reset()
    eager, x = model(), torch.randn(5, 16)
    compiled = torch.compile(model())  # the default backend: inductor
    y_e, y_c = eager(x), compiled(x)
    assert_close(y_c, y_e)
    y_e.square().sum().backward()
    y_c.square().sum().backward()
    for (n, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None: assert_close(q.grad, p.grad)


LAYERS = [lt.LoRA, lt.LoHA, lt.LoKr, lt.LoKH]


def layer(cls, path):
    "A float64 6→4 layer with one random adapter of `cls` on `path`, and its plain-tensor reference `f(x, W)`."
    torch.manual_seed(1)
    kw = dict(p=2) if cls is lt.LoKH else dict(rank=2)
    a = cls(nn.Linear(6, 4).double(), alpha=3, path=path, **kw)
    with torch.no_grad():
        for f in a.factors: f.normal_()
    W = a.base.weight + a.delta_weight()
    return a, lambda x: torch.nn.functional.linear(x, W, a.base.bias)


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("path", ["factored", "folded"])
def test_torch_func(cls, path):
    if cls is lt.LoKH and path == "factored": pytest.skip("LoKH has no factored path")
    a, ref = layer(cls, path)
    x, v = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    params = {k: p.detach() for k, p in a.named_parameters()}
    loss = lambda p, x: functional_call(a, p, (x,)).pow(3).sum()
    g = grad(loss)(params, x)
    fs = [f.detach().requires_grad_() for f in a.factors]
    W = a.base.weight + a.scale * lt.adapters.as_layer_weight(a.base, a.delta(*fs))
    torch.nn.functional.linear(x, W, a.base.bias).pow(3).sum().backward()
    key = {id(p): k for k, p in a.named_parameters()}
    names = [key[id(f)] for f in a.factors]  # in the order of `fs`
    for k, f in zip(names, fs): assert_close(g[k], f.grad)
    assert_close(vmap(a)(x[:, None])[:, 0], ref(x))  # per-sample calls
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x[:, None])
    assert_close(per_sample[names[0]].sum(0), g[names[0]])  # per-sample gradients add up
    assert_close(jvp(a, (x,), (v,))[1], jvp(ref, (x,), (v,))[1])
    hvp = lambda f: jvp(grad(lambda x: f(x).pow(3).sum()), (x,), (v,))[1]  # forward-over-reverse
    assert_close(hvp(a), hvp(ref))


@pytest.mark.parametrize("cls", LAYERS)
def test_second_derivative_right(cls):
    "A second `torch.autograd` derivative through the hand-written backward equals the plain formula's."
    a, ref = layer(cls, "folded" if cls is lt.LoKH else "factored")
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    second = lambda f: torch.autograd.grad(torch.autograd.grad(f(x).pow(3).sum(), x, create_graph=True)[0].sum(), x)
    assert_close(second(a)[0], second(ref)[0])


@pytest.mark.parametrize("kind", ["conv", "embedding"])
def test_torch_func_conv_and_embedding(kind):
    "`torch.func.grad` and `vmap` through a LoRA on a convolution or an embedding agree with the eager fast path."
    torch.manual_seed(2)
    base = nn.Conv2d(3, 4, 3).double() if kind == "conv" else nn.Embedding(10, 6).double()
    a = lt.LoRA(base, rank=2, alpha=3)
    with torch.no_grad():
        for f in a.factors: f.normal_()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64) if kind == "conv" else torch.randint(0, 10, (2, 7))
    params = {k: p.detach() for k, p in a.named_parameters()}
    g = grad(lambda p: functional_call(a, p, (x,)).pow(2).sum())(params)
    a(x).pow(2).sum().backward()
    for k, p in a.named_parameters():
        if p.requires_grad: assert_close(g[k], p.grad)  # the factors (the frozen base gets no eager gradient)
    assert_close(vmap(a)(x[:, None])[:, 0], a(x).detach())


def test_torch_func_refuses_dora_with_dropout_in_training():
    "DoRA with dropout has no plain-op form here: inside a transform it is refused, never computed otherwise."
    a = lt.LoRA(nn.Linear(6, 4), rank=2, dora=True, dropout=0.5)  # a new module trains: dropout is on
    with pytest.raises(ValueError, match="DoRA with dropout in training"): vmap(a)(torch.randn(3, 1, 6))
    assert vmap(a.eval())(torch.randn(3, 1, 6)).shape == (3, 1, 4)
