"""Stateful property test of an adapted model: random sequences of every verb (inject with all four methods, DoRA and
dropout; set_adapter; merge/unmerge; disable_adapters entered and left with any verb inside; delete_adapter; unload;
merge_and_unload; save/load through a folder; load_state_dict; train/eval). After every step the output equals a
reference computed from plain tensors (the base weight plus Σ s·ΔW over what should be active, ΔW formed here from
the factors by its formula), and every refused call left the model bit-identical."""
import contextlib
import copy
import tempfile
import warnings
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch import nn

import lowrank_tales as lt
from lowrank_tales.injection import adapter_layers
from tolerance import assert_close

NAMES = ["a", "b", "c"]
TARGETS = ["0", "2"]
KW = {"lora": dict(rank=2, alpha=3.0), "loha": dict(rank=2, alpha=5.0), "lokr": dict(rank=2, alpha=3.0),
      "lokh": dict(p=2, alpha=0.7)}


def delta(u) -> torch.Tensor:
    "`ΔW` of update `u` by its formula, from its factors (plain tensors; the library's `delta` is not used)."
    if u.method == "lora": return u.B @ u.A
    if u.method == "loha": return (u.B1 @ u.A1) * (u.B2 @ u.A2)
    if u.method == "lokr": return torch.kron(u.A, u.B1 @ u.B2 if u.low_rank else u.B)
    W1, W2 = u.W  # LoKH, p = 2: column j is W1[:, j] ⊗ W2[:, j]
    D = torch.einsum("ij,kj->ikj", W1, W2).reshape(W1.shape[0] * W2.shape[0], -1)
    return D if u.along == "output" else D.T


def scale(method: str) -> float:
    kw = KW[method]
    return kw["alpha"] if method == "lokh" else kw["alpha"] / kw["rank"]


def snapshot(model: nn.Module):
    "Everything a refused call must leave as it was: modules, state, flags, every parameter and buffer."
    mods = [(n, type(m), m.training, getattr(m, "_state", None)) for n, m in model.named_modules()]
    params = [(n, p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()]
    bufs = [(n, b.clone()) for n, b in model.named_buffers()]
    return mods, params, bufs


def assert_same(a, b):
    assert a[0] == b[0]
    assert [(n, r) for n, r, _ in a[1]] == [(n, r) for n, r, _ in b[1]]
    assert all(torch.equal(p, q) for (_, _, p), (_, _, q) in zip(a[1], b[1]))
    assert [n for n, _ in a[2]] == [n for n, _ in b[2]] and all(torch.equal(p, q) for (_, p), (_, q) in zip(a[2], b[2]))


class AdaptedModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()
        self.W0 = {n: self.model.get_submodule(n).weight.detach().clone() for n in TARGETS}  # the base weights
        self.x = torch.randn(5, 6, dtype=torch.float64)
        self.methods, self.active, self.merged = {}, [], []  # expected: method per adapter, active and merged names
        self.dora = {}
        self.block, self.seed = None, 0  # the open disable_adapters() context, if any
        self.folder = tempfile.TemporaryDirectory()
        self.saved = None  # (name, method, dora, factors by module) of the last saved adapter

    def teardown(self):
        if self.block is not None: self.block.__exit__(None, None, None)
        self.folder.cleanup()

    # the reference ---------------------------------------------------------------------------------------------
    def weight(self, n: str, names) -> torch.Tensor:
        "W0 + Σ s·ΔW over `names` (DoRA: m/‖W0 + s·ΔW‖ per row times W0 + s·ΔW, minus W0) for module `n`."
        W0 = self.W0[n]
        W = W0.clone()
        layer = adapter_layers(self.model).get(n)
        for k in names:
            if layer is None or k not in layer.updates: continue
            u = layer.updates[k]
            V = W0 + scale(self.methods[k]) * delta(u).detach()
            W = W + (u.magnitude.detach()[:, None] / V.norm(dim=1, keepdim=True) * V - W0 if u.dora else V - W0)
        return W

    def reference(self) -> torch.Tensor:
        names = [] if self.block is not None else self.active
        h = torch.relu(nn.functional.linear(self.x, self.weight("0", names), self.model[0].bias))
        return nn.functional.linear(h, self.weight("2", names), self.model[2].bias)

    def refused(self, call, match: str):
        "Run `call`, which must raise `ValueError` containing `match` and leave the model bit-identical."
        before = snapshot(self.model)
        try: call()
        except ValueError as e: assert match in str(e), str(e)
        else: raise AssertionError(f"not refused: expected {match!r}")
        assert_same(snapshot(self.model), before)

    def randomize(self, name: str):
        "Move the new adapter's factors as training would (a trained adapter is not zero)."
        self.seed += 1
        gen = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for a in adapter_layers(self.model).values():
                for k, p in a.updates[name].named_parameters() if name in a.updates else ():
                    p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))

    # rules -----------------------------------------------------------------------------------------------------
    @rule(name=st.sampled_from(NAMES), method=st.sampled_from(list(KW)), dora=st.booleans(),
          dropout=st.sampled_from([0.0, 0.3]), where=st.sampled_from([["0"], ["2"], TARGETS]))
    def inject(self, name, method, dora, dropout, where):
        call = lambda: lt.inject(self.model, method, targets=where, name=name, dora=dora, dropout=dropout,
                                 **KW[method])
        if name in self.methods: return self.refused(call, "already has an adapter named")
        first = not self.methods
        call()
        self.methods[name], self.dora[name] = method, dora
        if first: self.active = [name]
        self.randomize(name)

    @rule(name=st.sampled_from(["", "../up", "/abs", "a/b", ".hidden", "x\0y"]))
    def inject_bad_name(self, name):
        self.refused(lambda: lt.inject(self.model, "lora", targets=["0"], name=name, rank=2),
                     "name must be an adapter name")

    @precondition(lambda self: self.methods)
    @rule(data=st.data())
    def set_adapter(self, data):
        names = data.draw(st.lists(st.sampled_from(list(self.methods)), min_size=1, max_size=3))
        if len(set(names)) < len(names): return self.refused(lambda: lt.set_adapter(self.model, names), "twice")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # merged layers are unmerged first, with a warning (as PEFT)
            lt.set_adapter(self.model, names)
        self.active, self.merged = names, []

    @precondition(lambda self: self.methods)
    @rule(data=st.data())
    def merge(self, data):
        names = data.draw(st.none() | st.lists(st.sampled_from(list(self.methods)), min_size=1, max_size=2))
        todo = self.active if names is None else names
        call = lambda: lt.merge(self.model, names)
        if not todo: return self.refused(call, "no adapter is active")
        if len(set(todo)) < len(todo): return self.refused(call, "twice")
        if any(n not in self.active for n in todo): return self.refused(call, "are not active")
        if any(n in self.merged for n in todo): return self.refused(call, "already merged")
        call()
        self.merged += todo

    @precondition(lambda self: self.methods)
    @rule(data=st.data())
    def unmerge(self, data):
        names = data.draw(st.none() | st.lists(st.sampled_from(list(self.methods)), min_size=1, max_size=1))
        call = lambda: lt.unmerge(self.model, names)
        if not self.merged: return self.refused(call, "no adapter is merged")
        if names and names[0] not in self.merged: return self.refused(call, "are not merged")
        call()
        self.merged = [] if names is None else [n for n in self.merged if n not in names]

    @precondition(lambda self: self.methods and self.block is None)
    @rule()
    def enter_disabled(self):
        self.block = lt.disable_adapters(self.model)
        self.block.__enter__()

    @precondition(lambda self: self.block is not None)
    @rule()
    def leave_disabled(self):
        self.block.__exit__(None, None, None)
        self.block = None

    @precondition(lambda self: self.methods)
    @rule(data=st.data())
    def delete(self, data):
        name = data.draw(st.sampled_from(list(self.methods)))
        call = lambda: lt.delete_adapter(self.model, name)
        if name in self.merged: return self.refused(call, "is merged")
        call()
        del self.methods[name]
        self.active = [n for n in self.active if n != name]

    @precondition(lambda self: self.methods)
    @rule()
    def unload(self):
        lt.unload(self.model)
        self.methods, self.active, self.merged = {}, [], []

    @precondition(lambda self: self.methods)
    @rule()
    def merge_and_unload(self):
        call = lambda: lt.merge_and_unload(self.model)
        if self.block is not None: return self.refused(call, "inside disable_adapters()")
        new = {n: self.weight(n, self.active) for n in TARGETS}
        call()
        self.W0, self.methods, self.active, self.merged = new, {}, [], []

    @precondition(lambda self: self.active)
    @rule(data=st.data())
    def save(self, data):
        name = data.draw(st.sampled_from(self.active))
        if name in self.merged: return
        root = tempfile.mkdtemp(dir=self.folder.name)
        lt.save_adapter(self.model, root, name)
        self.path = next(Path(root).rglob("adapter_config.json")).parent  # PEFT's layout: a named one in a sub-folder
        factors = {n: {k: p.detach().clone() for k, p in a.updates[name].named_parameters()}
                   for n, a in adapter_layers(self.model).items() if name in a.updates}
        self.saved = (name, self.methods[name], factors)

    @precondition(lambda self: self.saved is not None)  # inside disable_adapters() too: the new layers start disabled
    @rule(name=st.sampled_from(NAMES))
    def load(self, name):
        saved_name, method, factors = self.saved
        call = lambda: lt.load_adapter(self.model, self.path, name)
        if name in self.methods: return  # loading into an existing adapter: the file layer's own tests
        first = not self.methods
        call()
        self.methods[name] = method
        if first: self.active = [name]
        for n, fs in factors.items():
            for k, p in adapter_layers(self.model)[n].updates[name].named_parameters(): assert torch.equal(p, fs[k])

    @precondition(lambda self: self.methods)
    @rule()
    def load_state_dict_into_self(self):
        self.model.load_state_dict({k: v.clone() for k, v in self.model.state_dict().items()})

    @rule(training=st.booleans())
    def train_or_eval(self, training):
        self.model.train(training)

    # invariants ------------------------------------------------------------------------------------------------
    def model_output(self) -> torch.Tensor:
        "The output in eval mode (no dropout), the train flag restored after."
        was = self.model.training
        try:
            with torch.no_grad(): return self.model.eval()(self.x)
        finally: self.model.train(was)

    @invariant()
    def output_is_the_reference(self):
        assert_close(self.model_output(), self.reference(), ulps=10_000)

    @invariant()
    def state_dict_means_the_same(self):
        "A fresh copy (unmerged, factors zeroed) takes the model's state dict and computes what the model computes."
        if not self.methods: return
        fresh = copy.deepcopy(self.model)
        for a in adapter_layers(fresh).values():
            if a.merged: a.unmerge()
            with torch.no_grad():
                for p in a.updates.parameters(): p.zero_()
        fresh.load_state_dict(self.model.state_dict())
        with torch.no_grad(): assert_close(fresh.eval()(self.x), self.model_output())

    @invariant()
    def state_is_the_expected(self):
        assert sorted(lt.adapter_names(self.model)) == sorted(self.methods)
        assert sorted(lt.active_adapters(self.model)) == sorted(self.active)
        for a in adapter_layers(self.model).values():
            assert sorted(a.merged) == sorted(n for n in self.merged if n in a.updates)
            assert a.disabled == (self.block is not None)
        assert all(m.training == self.model.training for m in self.model.modules())  # new modules follow the model


AdaptedModel.TestCase.settings = settings(max_examples=60, stateful_step_count=20, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestAdaptedModel = AdaptedModel.TestCase
